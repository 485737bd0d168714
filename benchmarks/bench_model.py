"""Benchmark of the DeepLabV3+ model: parameter counts, compile and step times.

Usage::

  python -m benchmarks.bench_model [--depth 50] [--stem deep] \
      [--output_stride 16] [--size 129] [--batch 2] [--dtype float32] \
      [--iters 3] [--search_batch]

Prints the parameter counts (total, backbone, head), then for the jitted eval
forward and the jitted train step (forward + backward of a cross-entropy on the
logits + mean of the features, BatchNorm in train mode) the compile time and
the mean wall time per call over ``--iters`` calls. ``--search_batch`` (only on
a GPU/TPU) doubles the per-device batch of the train step until it no longer
fits and reports the largest one that ran. Not a test.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from agmm_jax.model import deeplab


def _train_step_fn(graphdef):
  """Pure train step: gradient of a toy loss w.r.t. the params, new BN stats."""

  def step(params, rest, images, labels):
    def loss_fn(params):
      # copy=True: fresh Variables at this trace level, so BatchNorm may
      # update its statistics inside the gradient trace (flax 0.12).
      model = nnx.merge(graphdef, params, rest, copy=True)
      features, logits = model(images)
      log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
      ce = -jnp.mean(jnp.take_along_axis(log_probs, labels[..., None], -1))
      return ce + 1e-3 * jnp.mean(features), nnx.state(model, nnx.BatchStat)

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, grads, batch_stats

  return jax.jit(step)


def _eval_fn(graphdef):
  def forward(params, rest, images):
    return nnx.merge(graphdef, params, rest, copy=True)(images)

  return jax.jit(forward)


def _time_calls(fn, args, iters: int) -> tuple[float, float]:
  """(compile seconds, mean seconds per call after compilation)."""
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(*args))  # First run: allocation, autotuning.
  start = time.perf_counter()
  for _ in range(iters):
    jax.block_until_ready(compiled(*args))
  return compile_s, (time.perf_counter() - start) / iters


def _inputs(batch: int, size: int, num_classes: int):
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, num_classes, (batch, size, size)),
                       jnp.int32)
  return images, labels


def search_batch(train_step, params, rest, size: int, num_classes: int,
                 start: int, limit: int = 256) -> int:
  """Largest per-device batch (doubling from ``start``) whose step runs."""
  best, batch = 0, start
  while batch <= limit:
    try:
      images, labels = _inputs(batch, size, num_classes)
      jax.block_until_ready(train_step(params, rest, images, labels))
    except Exception as error:  # pylint: disable=broad-except
      # XLA reports out-of-memory as a generic runtime error.
      if 'RESOURCE_EXHAUSTED' not in str(error) and 'memory' not in str(error).lower():
        raise
      break
    best, batch = batch, batch * 2
  return best


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--depth', type=int, default=50)
  parser.add_argument('--stem', default='deep')
  parser.add_argument('--output_stride', type=int, default=16)
  parser.add_argument('--multi_grid', action='store_true')
  parser.add_argument('--size', type=int, default=129)
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--num_classes', type=int, default=21)
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--iters', type=int, default=3)
  parser.add_argument('--search_batch', action='store_true')
  args = parser.parse_args()

  device = jax.devices()[0]
  print(f'device: {device.platform} {device.device_kind} x{jax.device_count()}')
  abstract = nnx.eval_shape(lambda: deeplab.DeepLabV3Plus(
      args.num_classes, depth=args.depth, stem=args.stem, rngs=nnx.Rngs(0)))
  total = deeplab.count_params(abstract)
  backbone = deeplab.count_params(abstract.backbone)
  print(f'params ResNet-{args.depth} {args.stem} stem, {args.num_classes} '
        f'classes: total {total / 1e6:.2f}M, backbone {backbone / 1e6:.2f}M, '
        f'head {(total - backbone) / 1e6:.2f}M')

  start = time.perf_counter()
  model = nnx.jit(lambda: deeplab.DeepLabV3Plus(
      args.num_classes, depth=args.depth, stem=args.stem,
      output_stride=args.output_stride, multi_grid=args.multi_grid,
      dtype=jnp.dtype(args.dtype), rngs=nnx.Rngs(0)))()
  jax.block_until_ready(nnx.state(model))
  print(f'init (jitted, incl. compile): {time.perf_counter() - start:.1f}s')
  images, labels = _inputs(args.batch, args.size, args.num_classes)
  config = (f'batch {args.batch}, {args.size}x{args.size}, OS '
            f'{args.output_stride}, {args.dtype}')

  model.eval()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  compile_s, step_s = _time_calls(_eval_fn(graphdef), (params, rest, images),
                                  args.iters)
  print(f'eval forward ({config}): compile {compile_s:.1f}s, '
        f'{step_s * 1e3:.0f} ms/step, {args.batch / step_s:.2f} img/s')

  model.train()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  train_step = _train_step_fn(graphdef)
  compile_s, step_s = _time_calls(train_step, (params, rest, images, labels),
                                  args.iters)
  print(f'train fwd+bwd ({config}): compile {compile_s:.1f}s, '
        f'{step_s * 1e3:.0f} ms/step, {args.batch / step_s:.2f} img/s')

  if args.search_batch:
    if device.platform == 'cpu':
      print('batch search skipped: needs a GPU/TPU')
    else:
      best = search_batch(train_step, params, rest, args.size,
                          args.num_classes, start=args.batch)
      print(f'largest per-device train batch at {args.size}x{args.size}: {best}')


if __name__ == '__main__':
  main()
