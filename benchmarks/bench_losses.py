"""Benchmark of the AGMM losses (forward + backward); prints figures, not a test.

Usage (from the repository root):

    python benchmarks/bench_losses.py [--runs 5] [--model_depth 101]
        [--skip_torch] [--skip_model] [--skip_cityscapes] [--many_classes 10]

1. VOC shapes (batch 4, 21 classes, 321 x 321 labels, decoder features
   81 x 81 x 256): compile time and median wall time of jit(value_and_grad) of
   the ``agmm_released`` and ``agmm_paper`` totals with respect to logits and
   features, and of the GMM response G on the feature grid alone (where the
   forms differ: distance and sigma); calls alternate between the programs so
   that background load hits all alike. The batch has 3 classes labeled per
   crop, as a VOC image; the released form's distance loops over the classes
   labeled in each crop, so both presets are timed again with
   ``--many_classes`` (default 10, a Cityscapes street scene) per crop.
2. If torch is importable: the same for the PyTorch port of the official loss
   (``tests/methods/test_agmm.py``), and the ratio.
3. If ``agmm_jax.model.deeplab`` exists: a forward + backward of DeepLabV3+ (output
   stride 8) plus loss at batch 4 x 321, for ``pce_only`` and
   ``agmm_released``, and the share of the step the AGMM terms take. The
   compiled program's memory is printed first; a depth whose step would not fit
   ``--max_step_memory_gb`` is skipped with a message.
4. Cityscapes shapes (batch 4, 19 classes, 721 x 721, features 181 x 181 x
   256): memory of the compiled loss programs from ``memory_analysis()``.
"""

import argparse
import os
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from agmm_jax.data import labels as labels_lib  # pylint: disable=g-import-not-at-top
from agmm_jax import methods  # pylint: disable=g-import-not-at-top
from agmm_jax.methods import agmm  # pylint: disable=g-import-not-at-top
from configs import presets  # pylint: disable=g-import-not-at-top


def sparse_batch(rng, batch, size, feat_size, channels, num_classes, classes_per_image=3):
  """Point/scribble-like labels: ``classes_per_image`` classes per image
  (background and others) on ~2% of the pixels, the bottom tenth of the crop
  padded."""
  label = np.full((batch, size, size), labels_lib.UNLABELED, np.int32)
  present = np.zeros((batch, num_classes), np.float32)
  for b in range(batch):
    classes = np.concatenate([[0], rng.choice(np.arange(1, num_classes),
                                              classes_per_image - 1, replace=False)])
    labeled = rng.random((size, size)) < 0.02
    label[b][labeled] = rng.choice(classes, labeled.sum())
    present[b, classes] = 1.0
  label[:, -size // 10:, :] = labels_lib.PADDING
  return methods.LossInputs(
      jnp.asarray(rng.normal(size=(batch, size, size, num_classes)), jnp.float32),
      jnp.asarray(rng.normal(size=(batch, feat_size, feat_size, channels)), jnp.float32),
      jnp.asarray(label), jnp.asarray(present))


def loss_value_and_grad(preset):
  loss_fn = methods.build_loss(presets.preset(preset))

  def total(logits, features, label, present):
    return loss_fn(methods.LossInputs(logits, features, label, present))[0]

  return jax.jit(jax.value_and_grad(total, argnums=(0, 1)))


def time_calls(fn, args, runs):
  """Median wall time of ``runs`` calls after one warm-up call."""
  return time_interleaved({'fn': fn}, args, runs)['fn']


def time_interleaved(fns, args, runs):
  """Median wall time of each function, calls alternating between them so
  that a change of background load hits every function alike."""
  for fn in fns.values():
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in fns}
  for _ in range(runs):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(values) for name, values in times.items()}


def response_value_and_grad(form):
  """jit(value_and_grad) of sum(G) on the feature grid: the GMM response alone,
  the only part in which the two forms differ (prototypes included; the
  label-resolution terms and the prototype term are shared)."""
  def total(logits, features, label, present):
    return jnp.sum(agmm.gmm_feature_response(
        methods.LossInputs(logits, features, label, present), form=form,
        sigma_stop_gradient=True)[0])

  return jax.jit(jax.value_and_grad(total, argnums=(0, 1)))


def memory_line(compiled):
  analysis = compiled.memory_analysis()
  return (f'arguments {analysis.argument_size_in_bytes / 2**20:.0f} MiB, '
          f'outputs {analysis.output_size_in_bytes / 2**20:.0f} MiB, '
          f'temporaries {analysis.temp_size_in_bytes / 2**20:.0f} MiB')


def bench_jax_losses(inputs, runs):
  compiled = {}
  for preset in ('agmm_released', 'agmm_paper'):
    start = time.perf_counter()
    compiled[preset] = loss_value_and_grad(preset).lower(*inputs[:4]).compile()
    print(f'  {preset:14s} compile {time.perf_counter() - start:.1f} s; '
          f'{memory_line(compiled[preset])}', flush=True)
  for form in agmm.GMM_FORMS:
    compiled[f'{form} response'] = response_value_and_grad(form).lower(*inputs[:4]).compile()
  timings = time_interleaved(compiled, inputs[:4], runs)
  for preset in ('agmm_released', 'agmm_paper'):
    print(f'  {preset:14s} forward+backward median {timings[preset]:.3f} s', flush=True)
  for form in agmm.GMM_FORMS:
    print(f'  GMM response G (feature grid) alone, {form:8s} form: forward+backward median '
          f'{timings[f"{form} response"] * 1e3:.0f} ms', flush=True)
  print(f'  paper / released: whole loss {timings["agmm_paper"] / timings["agmm_released"]:.2f}, '
        f'GMM response {timings["paper response"] / timings["released response"]:.2f}',
        flush=True)
  return timings, compiled


def bench_torch(inputs, runs):
  import torch  # pylint: disable=g-import-not-at-top
  from references.torch_agmm_loss import (  # pylint: disable=g-import-not-at-top
      to_official_mask, torch_official_loss)
  num_classes = inputs.logits.shape[-1]
  logits = torch.from_numpy(np.asarray(inputs.logits).transpose(0, 3, 1, 2).copy())
  features = torch.from_numpy(np.asarray(inputs.decoder_features).transpose(0, 3, 1, 2).copy())
  mask = torch.from_numpy(to_official_mask(np.asarray(inputs.label), num_classes))
  present = torch.from_numpy(np.array(inputs.class_present))

  def step():
    logits_leaf = logits.clone().requires_grad_(True)
    features_leaf = features.clone().requires_grad_(True)
    total = sum(torch_official_loss(logits_leaf, features_leaf, mask, present,
                                    num_classes).values())
    total.backward()

  step()
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def bench_model_step(inputs, depth, runs, max_memory_gb,
                     step_presets=('pce_only', 'agmm_released')):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from agmm_jax.model import deeplab  # pylint: disable=g-import-not-at-top
  batch, size = inputs.label.shape[:2]
  num_classes = inputs.logits.shape[-1]
  model = deeplab.DeepLabV3Plus(num_classes, depth=depth, output_stride=8,
                               rngs=nnx.Rngs(0))
  model.train()
  images = jnp.asarray(np.random.default_rng(1).normal(size=(batch, size, size, 3)),
                       jnp.float32)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  timings = {}
  for preset in step_presets:
    loss_fn = methods.build_loss(presets.preset(preset))

    def step(params, rest, images, label, present, loss_fn=loss_fn):
      def total(model):
        features, logits = model(images)
        return loss_fn(methods.LossInputs(logits, features, label, present))[0]
      return nnx.value_and_grad(total)(nnx.merge(graphdef, params, rest))

    args = (params, rest, images, inputs.label, inputs.class_present)
    start = time.perf_counter()
    compiled = jax.jit(step).lower(*args).compile()
    compile_s = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    total_gb = (analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
                + analysis.output_size_in_bytes) / 2**30
    if total_gb > max_memory_gb:
      print(f'  depth {depth} {preset}: needs {total_gb:.1f} GiB > '
            f'--max_step_memory_gb {max_memory_gb}; skipped', flush=True)
      return None
    timings[preset] = time_calls(compiled, args, runs)
    print(f'  ResNet-{depth} OS8 + {preset:13s} forward+backward median '
          f'{timings[preset]:.2f} s (compile {compile_s:.1f} s; {memory_line(compiled)})',
          flush=True)
  return timings


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--runs', type=int, default=5)
  parser.add_argument('--torch_runs', type=int, default=2)
  parser.add_argument('--model_runs', type=int, default=2)
  parser.add_argument('--model_depth', type=int, default=101)
  parser.add_argument('--max_step_memory_gb', type=float, default=8.0)
  parser.add_argument('--skip_torch', action='store_true')
  parser.add_argument('--skip_model', action='store_true')
  parser.add_argument('--skip_cityscapes', action='store_true')
  parser.add_argument('--many_classes', type=int, default=10,
                      help='classes labeled per crop in the second VOC-shape timing; 0 skips it')
  args = parser.parse_args()
  print(f'jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPU cores, '
        f'load average {os.getloadavg()[0]:.1f} (timings scale with other load)')

  rng = np.random.default_rng(0)
  voc = sparse_batch(rng, batch=4, size=321, feat_size=81, channels=256, num_classes=21)
  print('VOC shapes: batch 4, 21 classes, labels 321x321, features 81x81x256')
  jax_timings, compiled = bench_jax_losses(voc, args.runs)
  if args.many_classes:
    # Same shapes as the VOC batch, so the programs compiled above serve.
    crowded = sparse_batch(np.random.default_rng(0), batch=4, size=321, feat_size=81,
                           channels=256, num_classes=21, classes_per_image=args.many_classes)
    programs = {preset: compiled[preset] for preset in ('agmm_released', 'agmm_paper')}
    timings = time_interleaved(programs, crowded[:4], args.runs)
    print(f'  {args.many_classes} classes labeled per crop: agmm_released '
          f'{timings["agmm_released"]:.3f} s, agmm_paper {timings["agmm_paper"]:.3f} s, '
          f'paper / released {timings["agmm_paper"] / timings["agmm_released"]:.2f}', flush=True)

  if not args.skip_torch:
    try:
      import torch  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      print('  torch not importable; official-port timing skipped')
    else:
      torch.set_num_threads(os.cpu_count())
      torch_s = bench_torch(voc, args.torch_runs)
      print(f'  PyTorch port of the official loss forward+backward median {torch_s:.2f} s '
            f'({torch.get_num_threads()} threads); speed-up released '
            f'{torch_s / jax_timings["agmm_released"]:.1f}x, paper '
            f'{torch_s / jax_timings["agmm_paper"]:.1f}x', flush=True)

  if not args.skip_model:
    if not os.path.exists(os.path.join(REPO_ROOT, 'agmm_jax', 'models.py')):
      print('  agmm_jax/model/deeplab.py not found; train-step timing skipped')
    else:
      step = bench_model_step(voc, args.model_depth, args.model_runs,
                              args.max_step_memory_gb)
      if step is not None:
        share = (step['agmm_released'] - step['pce_only']) / step['agmm_released']
        print(f'  AGMM terms: {100 * share:.0f}% of the agmm_released step '
              f'(step difference); standalone loss / step = '
              f'{jax_timings["agmm_released"] / step["agmm_released"]:.2f}', flush=True)

  if not args.skip_cityscapes:
    city = methods.LossInputs(
        jax.ShapeDtypeStruct((4, 721, 721, 19), jnp.float32),
        jax.ShapeDtypeStruct((4, 181, 181, 256), jnp.float32),
        jax.ShapeDtypeStruct((4, 721, 721), jnp.int32),
        jax.ShapeDtypeStruct((4, 19), jnp.float32))
    print('Cityscapes shapes: batch 4, 19 classes, labels 721x721, features 181x181x256')
    for preset in ('agmm_released', 'agmm_paper'):
      compiled = loss_value_and_grad(preset).lower(*city[:4]).compile()
      print(f'  {preset:14s} compiled forward+backward: {memory_line(compiled)}', flush=True)


if __name__ == '__main__':
  main()
