r"""Every GPU figure of docs/benchmarks.md in one run (one device call).

  python benchmarks/gpu_suite.py --out=$OUT            # on the GPU, < 8 min
  python benchmarks/gpu_suite.py --smoke --out=/tmp/s  # CPU, tiny shapes (a test runs it)

Stages, each in its own subprocess under its own timeout (an out-of-memory or
a hang loses one stage, not the run), printing as they go; a stage that would
not fit in what is left of ``--budget_s`` is skipped and says so:

1. ``flops``: the train step's FLOPs from the model's layer shapes
   (``agmm_jax.model.flops``), and PyTorch's ``FlopCounterMode`` count of the same
   architecture (meta tensors) beside it.
2. ``step``, bfloat16, ``pce_only``, both ``model.dilated_conv`` settings,
   timed alternately in one process with an empty persistent compilation
   cache: compile time without cache, step time, images/s, true fraction of
   the bf16 peak, XLA's ``memory_analysis`` and the device's peak memory
   after compiling and after the steps. The faster setting is used below.
3. ``torch``: a PyTorch train step of the same architecture
   (``references/torch_deeplab.py``, cross-entropy on the sparse labels = pCE,
   SGD momentum) in bfloat16 (autocast, channels_last) and float32, each
   with its peak memory.
4. ``step`` for bfloat16 ``agmm_released``, float32 ``agmm_released`` and
   float32 ``pce_only`` (one process each, so each peak is its own).
5. ``cache``: a new process compiles the stage-2 step again with the cache
   the earlier stages filled: compile time with the cache; and the float32
   AGMM step again (its peak memory without autotuning in the process).
6. ``pipeline``: the input pipeline's images/s (VOC augmentation, crop 321,
   batch 16) on the machine's cores.
7. ``max_batch``: the largest ResNet-101 OS8 321x321 batch whose float32
   pCE step compiles and runs, starting from the batch 16 program's
   ``memory_analysis`` (bytes per image) and the device's memory limit.
8. ``float32 without autotuning``: the float32 AGMM step with
   ``--xla_gpu_autotune_level=0``, to tell the autotuner's scratch memory
   from the program's (docs/benchmarks.md, "float32 peak memory").

Ends with a summary: every figure and the JAX / PyTorch ratios of this run.
With ``--out`` it writes ``gpu_suite.json`` (all results) and
``gpu_suite.md`` (the summary) there. Shapes: ResNet-101 deep stem OS8,
321x321, global batch 16, 21 classes (``--smoke``: ResNet-18, 33x33, batch
2, one step; every stage still runs).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import signal
import tempfile
import threading
import time
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

# (depth, output_stride, crop, batch, timed steps)
FULL_SHAPE = (101, 8, 321, 16, 10)
SMOKE_SHAPE = (18, 8, 33, 2, 1)
CAMVID_TRAIN = os.path.join(REPO_ROOT, '.device_data', 'camvid', 'train')
SMOKE_IMAGES = os.path.join(REPO_ROOT, 'demo_data', 'camvid_mini', 'train')
MARKER = 'GPU_SUITE_RESULT '


# ------------------------------- stages (child) -------------------------------


def _device_peak() -> int | None:
  import jax  # pylint: disable=g-import-not-at-top
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get('peak_bytes_in_use')


def _memory_analysis(compiled: Any) -> dict[str, int]:
  analysis = compiled.memory_analysis()
  fields = ('argument_size_in_bytes', 'output_size_in_bytes',
            'alias_size_in_bytes', 'temp_size_in_bytes',
            'generated_code_size_in_bytes')
  return {field: int(getattr(analysis, field, 0) or 0) for field in fields}


def stage_step(args: dict[str, Any]) -> dict[str, Any]:
  """Compiles and times the train step of each ``dilated_conv`` setting."""
  from agmm_jax.runtime import compilation_cache  # pylint: disable=g-import-not-at-top
  from benchmarks import bench_train_step  # pylint: disable=g-import-not-at-top
  compilation_cache.enable(args['cache_dir'])
  depth, output_stride, crop, batch, num_steps = args['shape']
  configs = [bench_train_step.bench_config(
      depth, output_stride, batch, args['dtype'], args['loss'], setting)
             for setting in args['dilated_conv']]
  results = {'dtype': args['dtype'], 'loss': args['loss'], 'settings': {}}
  compiled_steps = []
  for setting, config in zip(args['dilated_conv'], configs):
    compiled = bench_train_step.compile_step(config, crop)
    compiled_steps.append(compiled)
    results['settings'][setting] = {
        'compile_s': compiled.compile_seconds,
        'memory_analysis': _memory_analysis(compiled.compiled),
        'peak_after_compile': _device_peak()}
    print(f'  {setting}: compiled in {compiled.compile_seconds:.1f} s',
          flush=True)
  times = bench_train_step.time_alternately(compiled_steps, num_steps)
  step_flops = bench_train_step.train_flops(configs[0], crop)
  for setting, compiled, seconds in zip(args['dilated_conv'], compiled_steps,
                                        times):
    median = statistics.median(seconds)
    results['settings'][setting].update(
        step_s=median, images_per_s=batch / median, loss=compiled.loss(),
        throughput=bench_train_step.throughput_line(step_flops, median))
  results['peak_after_steps'] = _device_peak()
  results['train_flops'] = step_flops
  return results


def stage_flops(args: dict[str, Any]) -> dict[str, Any]:
  """Train FLOPs per image: ours, and PyTorch's FlopCounterMode if present."""
  from agmm_jax.model import flops  # pylint: disable=g-import-not-at-top
  from benchmarks import bench_train_step  # pylint: disable=g-import-not-at-top
  depth, output_stride, crop, _, _ = args['shape']
  config = bench_train_step.bench_config(depth, output_stride, 2, 'float32',
                                         'pce_only', 'xla')
  count = flops.architecture_forward_flops(config.model,
                                           bench_train_step.NUM_CLASSES,
                                           (1, crop, crop, 3))
  result = {'forward': count.forward, 'convolution': count.convolution,
            'matmul': count.matmul, 'train': count.train,
            'train_torch_convention': (3 * count.convolution
                                       - count.first_convolution)}
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from torch.utils import flop_counter  # pylint: disable=g-import-not-at-top
    from references import torch_deeplab  # pylint: disable=g-import-not-at-top
  except ImportError:
    return result
  model = torch_deeplab.TorchDeepLabV3Plus(
      bench_train_step.NUM_CLASSES, depth, True, output_stride).to('meta')
  # Batch 2: BatchNorm in train mode needs two values per channel (the ASPP
  # pooling branch is 1x1); the count is per image.
  images = torch.empty(2, 3, crop, crop, device='meta')
  with flop_counter.FlopCounterMode(display=False) as counter:
    _, logits = model(images)
    logits.sum().backward()
  result['torch_flop_counter_train'] = counter.get_total_flops() / 2
  return result


def stage_torch(args: dict[str, Any]) -> dict[str, Any]:
  """A PyTorch train step of the same architecture, bf16 (autocast,
  channels_last) and float32: median step, images/s, peak memory."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from benchmarks import bench_train_step  # pylint: disable=g-import-not-at-top
  from references import torch_deeplab  # pylint: disable=g-import-not-at-top
  depth, output_stride, crop, batch, num_steps = args['shape']
  cuda = torch.cuda.is_available()
  device = torch.device('cuda' if cuda else 'cpu')
  torch.backends.cudnn.benchmark = True
  synthetic = bench_train_step.synthetic_batch(batch, crop)
  images = torch.from_numpy(synthetic['image'].transpose(0, 3, 1, 2)).to(device)
  labels = torch.from_numpy(synthetic['label'].astype(np.int64)).to(device)
  results = {'device': torch.cuda.get_device_name() if cuda else 'cpu'}
  for mode in ('bfloat16', 'float32'):
    model = torch_deeplab.TorchDeepLabV3Plus(
        bench_train_step.NUM_CLASSES, depth, True, output_stride).to(device)
    inputs = images
    if mode == 'bfloat16':
      model = model.to(memory_format=torch.channels_last)
      inputs = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9,
                                weight_decay=1e-4)

    def step():
      with torch.autocast(device.type, dtype=torch.bfloat16,
                          enabled=mode == 'bfloat16'):
        _, logits = model(inputs)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels,
                                                 ignore_index=-1)
      optimizer.zero_grad(set_to_none=True)
      loss.backward()
      optimizer.step()
      return loss

    if cuda:
      torch.cuda.reset_peak_memory_stats()
    for _ in range(min(2, num_steps)):  # cuDNN autotuning, allocator warm-up.
      step()
    seconds = []
    for _ in range(num_steps):
      if cuda:
        torch.cuda.synchronize()
      start = time.perf_counter()
      loss = step()
      loss.item()  # Synchronizes.
      seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    results[mode] = {
        'step_s': median, 'images_per_s': batch / median,
        'peak_bytes': torch.cuda.max_memory_allocated() if cuda else None}
    del model, optimizer
    if cuda:
      torch.cuda.empty_cache()
  return results


def stage_pipeline(args: dict[str, Any]) -> dict[str, Any]:
  """The train input pipeline's images/s at each thread count."""
  from benchmarks import bench_input_pipeline  # pylint: disable=g-import-not-at-top
  crop, batch, num_batches = args['crop'], args['batch'], args['batches']
  results = {'cpus': os.cpu_count()}
  with tempfile.TemporaryDirectory() as out_dir:
    bench_input_pipeline.write_split(args['images_dir'], out_dir, args['num'])
    for threads in args['threads']:
      first, images_per_s, _ = bench_input_pipeline.throughput(
          out_dir, crop, batch, num_batches, threads)
      results[f'threads_{threads}'] = {'first_batch_s': first,
                                       'images_per_s': images_per_s}
  return results


def stage_max_batch(args: dict[str, Any]) -> dict[str, Any]:
  """Largest batch whose step compiles and runs: predicted from the batch
  ``shape[3]`` program's memory (linear in the batch), then tried, shrinking
  by 15% after each out-of-memory."""
  import jax  # pylint: disable=g-import-not-at-top
  from agmm_jax.runtime import compilation_cache  # pylint: disable=g-import-not-at-top
  from benchmarks import bench_train_step  # pylint: disable=g-import-not-at-top
  compilation_cache.enable(args['cache_dir'])
  depth, output_stride, crop, batch, _ = args['shape']

  def config_at(size):
    return bench_train_step.bench_config(depth, output_stride, size,
                                         args['dtype'], 'pce_only',
                                         args['dilated_conv'])

  base = bench_train_step.compile_step(config_at(batch), crop)
  memory = _memory_analysis(base.compiled)
  # Batch-independent: parameters and optimizer state (donated, aliased).
  fixed = memory['alias_size_in_bytes']
  per_image = (memory['argument_size_in_bytes'] + memory['output_size_in_bytes']
               + memory['temp_size_in_bytes'] - 2 * fixed) / batch
  del base
  limit = (jax.devices()[0].memory_stats() or {}).get('bytes_limit')
  if not limit:
    return {'per_image_bytes': per_image, 'note': 'no device memory limit'}
  size = max(batch, int((0.95 * limit - fixed) // per_image) // 8 * 8)
  results = {'per_image_bytes': per_image, 'bytes_limit': limit,
             'predicted': size, 'tried': {}}
  for _ in range(args['tries']):
    try:
      compiled = bench_train_step.compile_step(config_at(size), crop)
      compiled.run()
      results['tried'][size] = 'ran'
      results['largest'] = size
      return results
    except Exception as error:  # pylint: disable=broad-except
      # XLA reports out-of-memory as a generic runtime error.
      if 'RESOURCE_EXHAUSTED' not in str(error) and 'memory' not in str(error).lower():
        raise
      results['tried'][size] = 'out of memory'
      size = max(8, int(size * 0.85) // 8 * 8)
  return results


STAGES = {'step': stage_step, 'flops': stage_flops, 'torch': stage_torch,
          'pipeline': stage_pipeline, 'max_batch': stage_max_batch}


def run_stage_in_process(name: str, args_json: str) -> None:
  result = STAGES[name](json.loads(args_json))
  print(MARKER + json.dumps(result), flush=True)


# ----------------------------- orchestrator (parent) --------------------------


class Suite:
  """Runs stages as subprocesses within a time budget; keeps their results."""

  def __init__(self, budget_s: float, smoke: bool):
    self.deadline = time.monotonic() + budget_s
    self.smoke = smoke
    self.results: dict[str, Any] = {}

  def _run_subprocess(self, label: str, stage: str, args: dict[str, Any],
                      env: dict[str, str] | None, timeout_s: float | None
                      ) -> dict[str, Any] | None:
    """``stage`` in a child process; its printed result (or the failure)."""
    command = [sys.executable, os.path.abspath(__file__), '--stage', stage,
               '--stage_args', json.dumps(args)]
    process = subprocess.Popen(
        command, env=dict(os.environ, **(env or {})), cwd=REPO_ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timer = threading.Timer(timeout_s, process.kill) if timeout_s else None
    if timer:
      timer.start()
    result, tail = None, []
    for line in process.stdout:  # Printed as it comes.
      if line.startswith(MARKER):
        result = json.loads(line[len(MARKER):])
      elif line.strip():
        print(f'  {line.rstrip()}', flush=True)
        tail = (tail + [line.strip()])[-3:]
    process.wait()
    if timer:
      timer.cancel()
    if process.returncode != 0:
      what = ('timed out' if process.returncode == -signal.SIGKILL
              else f'failed (exit {process.returncode})')
      print(f'[{label}] {what}', flush=True)
      result = {'failed': f'{what}: ' + ' | '.join(tail)[-500:]}
    return result

  def run(self, label: str, stage: str, args: dict[str, Any], *,
          needs_s: float, timeout_s: float, env: dict[str, str] | None = None
          ) -> dict[str, Any] | None:
    """Runs ``stage`` unless fewer than ``needs_s`` seconds are left; prints
    its output as it comes; returns (and records under ``label``) its result."""
    left = self.deadline - time.monotonic()
    if not self.smoke and left < needs_s:
      print(f'[{label}] skipped: {left:.0f} s left, needs about {needs_s:.0f} s',
            flush=True)
      self.results[label] = {'skipped': f'time ({left:.0f} s left)'}
      return None
    print(f'[{label}] start', flush=True)
    start = time.monotonic()
    if self.smoke and stage != 'flops':
      # In one process: the smoke run checks the stages' code, not isolation
      # (the flops stage still goes through a subprocess).
      result = STAGES[stage](json.loads(json.dumps(args)))
    else:
      result = self._run_subprocess(label, stage, args, env,
                                    None if self.smoke else min(timeout_s, left))
    elapsed = time.monotonic() - start
    print(f'[{label}] done in {elapsed:.0f} s: {json.dumps(result)[:600]}',
          flush=True)
    self.results[label] = result
    return result


def _gib(value: Any) -> str:
  return f'{value / 2**30:.2f} GiB' if isinstance(value, (int, float)) else 'n/a'


def _settings(result: dict[str, Any] | None) -> dict[str, Any]:
  return (result or {}).get('settings') or {}


def summary_lines(results: dict[str, Any], shape: tuple[int, ...]) -> list[str]:
  """The summary table (markdown) of the suite's results, with ratios."""
  depth, output_stride, crop, batch, _ = shape
  lines = [f'ResNet-{depth} deep stem OS{output_stride}, {crop}x{crop}, '
           f'global batch {batch}, 21 classes', '',
           '| what | step | images/s | compile | peak memory (device) | '
           'XLA memory_analysis (args + temps + outputs - aliases) | '
           'throughput (FLOPs from layer shapes) |', '|---|---|---|---|---|---|---|']
  for label, result in results.items():
    for setting, figures in _settings(result).items():
      memory = figures.get('memory_analysis', {})
      total = (memory.get('argument_size_in_bytes', 0)
               + memory.get('temp_size_in_bytes', 0)
               + memory.get('output_size_in_bytes', 0)
               - memory.get('alias_size_in_bytes', 0))
      lines.append(
          f'| {label}, dilated_conv={setting} | '
          f'{1000 * figures.get("step_s", float("nan")):.1f} ms | '
          f'{figures.get("images_per_s", float("nan")):.1f} | '
          f'{figures.get("compile_s", float("nan")):.1f} s | '
          f'{_gib(result.get("peak_after_steps"))} (after compile '
          f'{_gib(figures.get("peak_after_compile"))}) | {_gib(total)} '
          f'(temps {_gib(memory.get("temp_size_in_bytes"))}) | '
          f'{figures.get("throughput", "")} |')
  torch_result = results.get('torch') or {}
  for mode in ('bfloat16', 'float32'):
    figures = torch_result.get(mode)
    if figures:
      lines.append(f'| PyTorch {mode} ({torch_result.get("device")}) | '
                   f'{1000 * figures["step_s"]:.1f} ms | '
                   f'{figures["images_per_s"]:.1f} | - | '
                   f'{_gib(figures.get("peak_bytes"))} | - | - |')
  lines.append('')
  pce = _settings(results.get('bf16 pce_only'))
  if pce and torch_result.get('bfloat16'):
    best = min(pce.values(), key=lambda f: f.get('step_s', float('inf')))
    lines.append(f'JAX / PyTorch images/s, bfloat16 pCE step: '
                 f'{best["images_per_s"] / torch_result["bfloat16"]["images_per_s"]:.2f}x')
  if len(pce) == 2 and all('step_s' in f for f in pce.values()):
    lines.append(f'step space_to_batch / xla (bfloat16 pCE): '
                 f'{pce["space_to_batch"]["step_s"] / pce["xla"]["step_s"]:.3f}')
  f32 = _settings(results.get('f32 agmm_released'))
  if f32 and torch_result.get('float32'):
    peak = (results.get('f32 agmm_released') or {}).get('peak_after_steps')
    if peak and torch_result['float32'].get('peak_bytes'):
      lines.append(f'float32 AGMM peak / PyTorch float32 peak: '
                   f'{peak / torch_result["float32"]["peak_bytes"]:.2f}')
  first = _settings(results.get('bf16 pce_only'))
  cached = _settings(results.get('cache'))
  if first and cached:
    setting = next(iter(cached))
    lines.append(f'compile without cache {first[setting]["compile_s"]:.1f} s, '
                 f'with cache {cached[setting]["compile_s"]:.1f} s')
  flops_result = results.get('flops') or {}
  if 'train' in flops_result:
    lines.append(
        f'train FLOPs per image: {flops_result["train"] / 1e9:.1f} GFLOP '
        f'(3 x forward, resizes included); PyTorch convention '
        f'{flops_result["train_torch_convention"] / 1e9:.1f}; PyTorch '
        f'FlopCounterMode '
        f'{flops_result.get("torch_flop_counter_train", float("nan")) / 1e9:.1f}')
  for label in ('pipeline', 'max_batch', 'f32 agmm_released, autotune off'):
    if label in results:
      lines.append(f'{label}: {json.dumps(results[label])}')
  return lines


def orchestrate(smoke: bool, budget_s: float, out_dir: str | None) -> int:
  shape = SMOKE_SHAPE if smoke else FULL_SHAPE
  suite = Suite(budget_s, smoke)
  cache_dir = tempfile.mkdtemp(prefix='gpu_suite_cache_')
  conv_settings = ['xla', 'space_to_batch']
  # (needs_s, timeout_s) of one ResNet-101 step compile on the H200: ~50 s.
  compile_s = 60.0

  def step_args(dtype, loss, settings, cache=cache_dir):
    if smoke:
      # One program for every step stage: after the first two compiles the
      # rest hit the cache (bfloat16 convs are slow on XLA:CPU, and the AGMM
      # step is tested elsewhere).
      dtype, loss = 'float32', 'pce_only'
    return {'shape': shape, 'dtype': dtype, 'loss': loss,
            'dilated_conv': settings, 'cache_dir': cache}

  suite.run('flops', 'flops', {'shape': shape}, needs_s=20, timeout_s=120)
  first = suite.run('bf16 pce_only', 'step',
                    step_args('bfloat16', 'pce_only', conv_settings),
                    needs_s=2 * compile_s, timeout_s=240)
  timed = {k: v for k, v in _settings(first).items() if 'step_s' in v}
  best = min(timed, key=lambda k: timed[k]['step_s']) if timed else 'xla'
  print(f'dilated_conv for the other steps: {best}', flush=True)
  suite.run('torch', 'torch', {'shape': shape}, needs_s=40, timeout_s=150,
            env={'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'})
  for dtype, loss, label in (('bfloat16', 'agmm_released', 'bf16 agmm_released'),
                             ('float32', 'agmm_released', 'f32 agmm_released'),
                             ('float32', 'pce_only', 'f32 pce_only')):
    suite.run(label, 'step', step_args(dtype, loss, [best]),
              needs_s=compile_s, timeout_s=180)
  suite.run('cache', 'step', step_args('bfloat16', 'pce_only', [best]),
            needs_s=30, timeout_s=120)
  # The float32 step again, from the cache: no autotuning in this process.
  suite.run('f32 agmm_released, cached', 'step',
            step_args('float32', 'agmm_released', [best]),
            needs_s=30, timeout_s=120)
  suite.run('pipeline', 'pipeline', {
      'images_dir': SMOKE_IMAGES if smoke else CAMVID_TRAIN,
      'num': 8 if smoke else 64, 'crop': shape[2],
      'batch': shape[3] if smoke else 16, 'batches': 2 if smoke else 20,
      'threads': [2] if smoke else [8, 16]}, needs_s=30, timeout_s=90)
  suite.run('max_batch', 'max_batch', {
      'shape': shape, 'dtype': 'float32', 'dilated_conv': best,
      'cache_dir': cache_dir, 'tries': 1 if smoke else 3},
            needs_s=2 * compile_s, timeout_s=300)
  suite.run('f32 agmm_released, autotune off', 'step',
            step_args('float32', 'agmm_released', [best],
                      cache=cache_dir if smoke
                      else tempfile.mkdtemp(prefix='gpu_suite_cache_')),
            needs_s=compile_s, timeout_s=150,
            env={'XLA_FLAGS': (os.environ.get('XLA_FLAGS', '')
                               + ' --xla_gpu_autotune_level=0').strip()}
            if not smoke else None)

  lines = summary_lines(suite.results, shape)
  print('\n'.join(['', '## Summary', ''] + lines), flush=True)
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'gpu_suite.json'), 'w') as f:
      json.dump({'shape': shape, 'results': suite.results}, f, indent=1)
    with open(os.path.join(out_dir, 'gpu_suite.md'), 'w') as f:
      f.write('\n'.join(lines) + '\n')
  failed = [label for label, result in suite.results.items()
            if result is None or 'failed' in result]
  return 1 if failed else 0


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--smoke', action='store_true',
                      help='CPU, tiny shapes, every stage (what the test runs)')
  parser.add_argument('--out', default=None,
                      help='folder for gpu_suite.json and gpu_suite.md')
  parser.add_argument('--budget_s', type=float, default=450.0,
                      help='stages that would end after this are skipped')
  parser.add_argument('--stage', choices=sorted(STAGES), help=argparse.SUPPRESS)
  parser.add_argument('--stage_args', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.stage:
    run_stage_in_process(args.stage, args.stage_args)
    return
  sys.exit(orchestrate(args.smoke, args.budget_s, args.out))


if __name__ == '__main__':
  main()
