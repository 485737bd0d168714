r"""Times one jitted train step (forward, AGMM losses, backward, SGD update).

  python benchmarks/bench_train_step.py --shape=cpu   # ResNet-50 OS8, 161x161, batch 2
  python benchmarks/bench_train_step.py --shape=voc   # ResNet-101 OS8, 321x321, batch 16
  python benchmarks/bench_train_step.py --shape=voc --compute_dtype=bfloat16

The model and losses come from configs/voc_point.py (deep stem, ASPP 6/12/18,
``agmm_released`` losses) with the shape's depth, crop and global batch; the
batch is synthetic (normal images, 2% labeled pixels). Prints the compile
time, the median step time over ``--steps`` steps after one warm-up step,
images/s, and on GPU the peak device memory and the achieved FLOP/s (XLA's
``cost_analysis`` count of the compiled step divided by the step time) as a
fraction of the device's dense bfloat16 peak.

Reference: the official PyTorch step (ResNet-50 OS8, 161x161, batch 2) takes
0.94 s on the 2-core CPU machine this project is developed on.
"""

import os
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from agmm_jax import methods  # pylint: disable=g-import-not-at-top
from agmm_jax import sharding  # pylint: disable=g-import-not-at-top
from agmm_jax import steps  # pylint: disable=g-import-not-at-top
from agmm_jax import train_state  # pylint: disable=g-import-not-at-top
from configs import presets  # pylint: disable=g-import-not-at-top
from configs import voc_point  # pylint: disable=g-import-not-at-top

SHAPES = {
    # name: (depth, output_stride, crop, global batch)
    'cpu': (50, 8, 161, 2),
    'voc': (101, 8, 321, 16),
}
NUM_CLASSES = 21
# Dense bfloat16 peak FLOP/s by device kind (substring match).
BF16_PEAK_FLOPS = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12,
                   'L4': 121e12, 'TPU v5 lite': 197e12, 'TPU v4': 275e12}

_SHAPE = flags.DEFINE_enum('shape', 'cpu', sorted(SHAPES), 'Benchmark shape.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps.')
_DTYPE = flags.DEFINE_enum('compute_dtype', 'float32',
                           ['float32', 'bfloat16'], 'Model compute dtype.')
_LOSS = flags.DEFINE_enum('loss', 'agmm_released', list(presets.PRESETS),
                          'Loss preset (pce_only isolates the model cost).')


def synthetic_batch(batch: int, crop: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  label = np.where(rng.random((batch, crop, crop)) < 0.02,
                   rng.integers(0, NUM_CLASSES, (batch, crop, crop)), -1)
  class_present = np.zeros((batch, NUM_CLASSES), np.float32)
  for b in range(batch):
    class_present[b, np.unique(label[b][label[b] >= 0])] = 1.0
  return {'image': rng.normal(size=(batch, crop, crop, 3)).astype(np.float32),
          'label': label.astype(np.int32), 'class_present': class_present}


def main(argv):
  del argv
  depth, output_stride, crop, batch = SHAPES[_SHAPE.value]
  config = voc_point.get_config()
  config.model.depth = depth
  config.model.output_stride = output_stride
  config.model.compute_dtype = _DTYPE.value
  config.model.pretrained = ''
  config.global_batch_size = batch
  config.loss = presets.preset(_LOSS.value)
  total_steps = 1000

  mesh = sharding.create_mesh(config.mesh)
  sharding.per_process_batch_size(batch, mesh)
  loss = methods.build_loss(config.loss)
  state, model_defs, tx = train_state.create_train_state(
      config, NUM_CLASSES, mesh, total_steps, extra_heads=loss.needs.heads)
  step_fn = steps.make_train_step(
      model_defs, loss, tx, mesh,
      lr_schedule=train_state.learning_rate_schedule(config.optimizer, total_steps),
      head_lr_multiplier=config.optimizer.head_lr_multiplier)
  device_batch = sharding.global_batch(synthetic_batch(batch, crop), mesh)

  start = time.perf_counter()
  compiled = step_fn.lower(state, device_batch).compile()
  compile_seconds = time.perf_counter() - start

  state, metrics = compiled(state, device_batch)  # Warm-up.
  jax.block_until_ready(metrics)
  times = []
  for _ in range(_STEPS.value):
    start = time.perf_counter()
    state, metrics = compiled(state, device_batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  step_seconds = statistics.median(times)

  device = jax.devices()[0]
  print(f'shape={_SHAPE.value} (ResNet-{depth} OS{output_stride}, {crop}x{crop}, '
        f'batch {batch}), compute_dtype={_DTYPE.value}, loss={_LOSS.value}, '
        f'{jax.device_count()} x {device.device_kind}')
  print(f'compile: {compile_seconds:.1f} s')
  print(f'step: {step_seconds:.3f} s median of {len(times)} '
        f'(min {min(times):.3f}, max {max(times):.3f}); '
        f'{batch / step_seconds:.2f} images/s; '
        f'loss {float(train_state.host(metrics.compute()["loss"])):.4f}')
  if device.platform == 'gpu':
    stats = device.memory_stats() or {}
    peak = stats.get('peak_bytes_in_use')
    if peak is not None:
      print(f'peak memory: {peak / 2**30:.2f} GiB')
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float((cost or {}).get('flops', 0.0))
    peak_flops = next((v for k, v in BF16_PEAK_FLOPS.items()
                       if k in device.device_kind), None)
    achieved = flops / step_seconds
    line = f'achieved: {achieved / 1e12:.1f} TFLOP/s ({flops / 1e12:.2f} TFLOP per step)'
    if peak_flops:
      line += f', {100 * achieved / (peak_flops * jax.device_count()):.1f}% of bf16 peak'
    print(line)


if __name__ == '__main__':
  app.run(main)
