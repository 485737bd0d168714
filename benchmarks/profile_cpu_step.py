r"""The CPU train step of agmm_jax beside PyTorch's: A/B timing and profiles.

  python -m benchmarks.profile_cpu_step --step_shape=cpu --rounds=7
  python -m benchmarks.profile_cpu_step --step_shape=study --profile

Shapes: ``cpu`` is ``bench_train_step.py --shape=cpu`` (ResNet-50 deep stem,
OS 8, 161x161, batch 2); ``study`` is the study's CPU model
(configs/camvid_clicks.py size=cpu: ResNet-18 torchvision stem, OS 16,
161x161, batch 8). Both steps are float32 pCE on the synthetic batch of
bench_train_step.py (2% labeled pixels): agmm_jax's jitted step
(``pce_only`` preset, SGD) and a PyTorch step of the same architecture
(``references/torch_deeplab.py``, ``cross_entropy(ignore_index=-1)``, SGD).

Timing: one warm-up step each, then ``--rounds`` rounds of one JAX step and
one PyTorch step alternately, so that background load hits both alike;
medians, their ratio and the load average before and after are printed.
``--variants`` adds agmm_jax steps with other ``config.model`` settings
(``name=field:value``, e.g. ``xla=dilated_conv:xla`` for the old default),
timed in the same rounds. The pseudo-field ``conv1x1`` rebuilds the 1x1
convs that ``'taps'`` makes dots of: ``conv1x1:xla`` as XLA convolutions
(the step before the dot form), ``conv1x1:autodiff`` as dots with
autodiff's weight gradient instead of ``pointwise_dot_conv``'s.
Figures and their reading: docs/benchmarks.md,
"CPU train step against PyTorch".

``--profile`` then traces ``--profile_steps`` steps of each JAX step (``jax.profiler``:
one event per XLA:CPU thunk, named after its HLO instruction) and profiles
as many PyTorch steps (``torch.profiler``), and prints both sums in
milliseconds per step by layer kind (convolutions by kernel, dilation and
pass, BatchNorm, resizes, loss, optimizer, layout copies) and the top HLO
instructions and aten ops.
"""

import collections
import contextlib
import gzip
import json
import glob
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable
from unittest import mock

from absl import app
from absl import flags
import jax
from jax import lax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_train_step  # pylint: disable=g-import-not-at-top
from benchmarks import hlo_profile  # pylint: disable=g-import-not-at-top
from benchmarks.timing import time_rounds  # pylint: disable=g-import-not-at-top
from agmm_jax.model import dilated_conv  # pylint: disable=g-import-not-at-top

SHAPES = {
    # name: (depth, stem, output_stride, crop, batch)
    'cpu': (50, 'deep', 8, 161, 2),
    'study': (18, 'torchvision', 16, 161, 8),
}

_SHAPE = flags.DEFINE_enum('step_shape', 'cpu', sorted(SHAPES), 'Step shape.')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Timed rounds (JAX, PyTorch).')
_PROFILE = flags.DEFINE_bool('profile', False, 'Profile both steps.')
_PROFILE_ROUNDS = flags.DEFINE_integer('profile_steps', 3, 'Steps profiled.')
_VARIANTS = flags.DEFINE_list(
    'variants', [], 'Extra agmm_jax steps, name=field:value[+field:value] '
    'setting config.model fields (values parsed as Python literals).')
_TORCH = flags.DEFINE_bool('torch', True, 'Time the PyTorch step too.')


def jax_step(shape: str, model_overrides: dict[str, Any] | None = None
             ) -> bench_train_step.CompiledStep:
  """agmm_jax's compiled pCE train step of ``shape``."""
  depth, stem, output_stride, crop, batch = SHAPES[shape]
  config = bench_train_step.bench_config(
      depth, output_stride, batch, 'float32', 'pce_only',
      bench_train_step.dilated_conv.DEFAULT)
  config.model.stem = stem
  overrides = dict(model_overrides or {})
  conv1x1 = overrides.pop('conv1x1', 'auto')
  for field, value in overrides.items():
    config.model[field] = value
  # The model takes its conv functions when it is built, and traces them
  # when compile_step compiles the step.
  patches = {
      'auto': {},
      'xla': {'pointwise_dot_conv': lax.conv_general_dilated},
      'autodiff': {'_pointwise_matmul': lambda x, kernel, precision, element:
                   jax.numpy.einsum('nhwc,co->nhwo', x, kernel,
                                    precision=precision,
                                    preferred_element_type=element)},
  }
  if conv1x1 not in patches:
    raise ValueError(f'conv1x1 must be one of {sorted(patches)}, got {conv1x1!r}')
  with contextlib.ExitStack() as stack:
    for name, replacement in patches[conv1x1].items():
      stack.enter_context(mock.patch.object(dilated_conv, name, replacement))
    return bench_train_step.compile_step(config, crop)


def torch_step(shape: str) -> Callable[[], float]:
  """A PyTorch float32 pCE train step of ``shape``; returns its seconds."""
  import torch  # pylint: disable=g-import-not-at-top
  from references import torch_deeplab  # pylint: disable=g-import-not-at-top
  depth, stem, output_stride, crop, batch = SHAPES[shape]
  synthetic = bench_train_step.synthetic_batch(batch, crop)
  images = torch.from_numpy(synthetic['image'].transpose(0, 3, 1, 2).copy())
  labels = torch.from_numpy(synthetic['label'].astype(np.int64))
  model = torch_deeplab.TorchDeepLabV3Plus(
      bench_train_step.NUM_CLASSES, depth, stem == 'deep', output_stride)
  optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9,
                              weight_decay=1e-4)

  def step() -> float:
    start = time.perf_counter()
    _, logits = model(images)
    loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-1)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    loss.item()
    return time.perf_counter() - start

  step.model = model  # For the profile's conv table.
  step.images = images
  return step


def load_line() -> str:
  one, five, _ = os.getloadavg()
  return f'load average {one:.2f} (1 min), {five:.2f} (5 min)'


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
  """``name=field:value+field:value`` -> (name, {field: value})."""
  import ast  # pylint: disable=g-import-not-at-top
  name, _, settings = text.partition('=')
  overrides = {}
  for setting in settings.split('+'):
    field, _, value = setting.partition(':')
    try:
      overrides[field] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[field] = value
  return name, overrides


def profile_jax(compiled: bench_train_step.CompiledStep, num_steps: int
                ) -> dict[str, float]:
  """Milliseconds per step of each HLO instruction (thunk) of the step."""
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(num_steps):
      compiled.run()
    jax.profiler.stop_trace()
    path, = glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'),
                      recursive=True)
    with gzip.open(path) as f:
      trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  totals = collections.Counter()
  for event in events:
    args = event.get('args') or {}
    if event.get('ph') == 'X' and 'hlo_op' in args:
      totals[args['hlo_op']] += event['dur'] / 1e3 / num_steps
  return dict(totals)


def print_table(title: str, rows: dict[str, float], step_ms: float,
                limit: int | None = None) -> None:
  print(f'\n{title}\n| what | ms/step | share |\n|---|---|---|')
  ordered = sorted(rows.items(), key=lambda item: -item[1])
  for name, ms in ordered[:limit]:
    print(f'| {name} | {ms:.1f} | {100 * ms / step_ms:.1f}% |')
  print(f'| (sum) | {sum(rows.values()):.1f} | |')


def main(argv):
  del argv
  shape = _SHAPE.value
  depth, stem, output_stride, crop, batch = SHAPES[shape]
  print(f'shape={shape}: ResNet-{depth} {stem} stem, OS{output_stride}, '
        f'{crop}x{crop}, batch {batch}, float32 pCE; {load_line()}')
  jax_steps = {'jax': jax_step(shape)}
  for text in _VARIANTS.value:
    name, overrides = parse_variant(text)
    jax_steps[name] = jax_step(shape, overrides)
  print(f"jax: dilated_conv='auto' = "
        f"{bench_train_step.dilated_conv.resolve('auto')!r} on this backend")
  for name, step in jax_steps.items():
    print(f'{name}: compile {step.compile_seconds:.1f} s')
  steps = {name: step.run for name, step in jax_steps.items()}
  if _TORCH.value:
    import torch  # pylint: disable=g-import-not-at-top
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads')
    steps['torch'] = torch_step(shape)
  if _ROUNDS.value > 0:
    times = time_rounds(steps, _ROUNDS.value)
    reference = statistics.median(times['torch' if _TORCH.value else 'jax'])
    for name, seconds in times.items():
      median = statistics.median(seconds)
      print(f'{name}: step {median:.3f} s median of {len(seconds)} (min '
            f'{min(seconds):.3f}, max {max(seconds):.3f}); {median / reference:.2f}x '
            f'{"torch" if _TORCH.value else "jax"}')
    print(load_line())
  if _PROFILE.value:
    for name, step in jax_steps.items():
      per_op = profile_jax(step, _PROFILE_ROUNDS.value)
      kinds = hlo_profile.hlo_kinds(step.compiled.as_text())
      step_ms = sum(per_op.values())
      print_table(f'{name} (XLA:CPU) by layer kind', hlo_profile.sum_by(
          per_op, kinds), step_ms)
      print_table(f'{name}: top HLO instructions', {
          f'{op} ({kinds.get(op, "?")})': ms for op, ms in per_op.items()},
                  step_ms, limit=12)
    if _TORCH.value:
      by_kind, by_op = hlo_profile.profile_torch(steps['torch'],
                                                 _PROFILE_ROUNDS.value)
      torch_ms = sum(by_kind.values())
      print_table('PyTorch by layer kind', by_kind, torch_ms, limit=25)
      print_table('PyTorch: top aten ops (self time)', by_op, torch_ms,
                  limit=15)
    print(load_line())


if __name__ == '__main__':
  app.run(main)
