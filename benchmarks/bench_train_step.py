r"""Times one jitted train step (forward, losses, backward, SGD update).

  python benchmarks/bench_train_step.py --shape=cpu   # ResNet-50 OS8, 161x161, batch 2
  python benchmarks/bench_train_step.py --shape=voc   # ResNet-101 OS8, 321x321, batch 16
  python benchmarks/bench_train_step.py --shape=voc --compute_dtype=bfloat16
  python benchmarks/bench_train_step.py --dilated_conv=auto,xla,taps

The model and losses come from configs/voc_point.py (deep stem, ASPP 6/12/18,
``agmm_released`` losses) with the shape's depth, crop and global batch; the
batch is synthetic (normal images, 2% labeled pixels). Each
``--dilated_conv`` setting (``config.model.dilated_conv``) gets its own
compiled step; the steps are timed alternately (so background load hits all
alike) and the ratio to the first is printed. Prints the compile time, the
median step time over ``--steps`` steps after one warm-up step, images/s, the
step's FLOPs counted from the model's layer shapes (``agmm_jax.model.flops``: forward
x 3) and the achieved FLOP/s, and on GPU the peak device memory and the
fraction of the device's dense bfloat16 peak.

The PyTorch step of the same shape, timed alternately with agmm_jax's, and
the profiles of both: benchmarks/profile_cpu_step.py.
"""

import dataclasses
import os
import statistics
import sys
import time
from typing import Any, Sequence

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from agmm_jax.model import dilated_conv  # pylint: disable=g-import-not-at-top
from agmm_jax.model import flops  # pylint: disable=g-import-not-at-top
from agmm_jax import methods  # pylint: disable=g-import-not-at-top
from agmm_jax.runtime import sharding  # pylint: disable=g-import-not-at-top
from agmm_jax.train import steps  # pylint: disable=g-import-not-at-top
from agmm_jax.train import state as train_state  # pylint: disable=g-import-not-at-top
from configs import presets  # pylint: disable=g-import-not-at-top
from configs import voc_point  # pylint: disable=g-import-not-at-top

SHAPES = {
    # name: (depth, output_stride, crop, global batch)
    'cpu': (50, 8, 161, 2),
    'voc': (101, 8, 321, 16),
}
NUM_CLASSES = 21

_SHAPE = flags.DEFINE_enum('shape', 'cpu', sorted(SHAPES), 'Benchmark shape.')
_STEPS = flags.DEFINE_integer(
    'steps', 5, 'Timed steps (0: compile and print XLA\'s memory_analysis only).')
_DTYPE = flags.DEFINE_enum('compute_dtype', 'float32',
                           ['float32', 'bfloat16'], 'Model compute dtype.')
_LOSS = flags.DEFINE_enum('loss', 'agmm_released', list(presets.PRESETS),
                          'Loss preset (pce_only isolates the model cost).')
_DILATED_CONV = flags.DEFINE_list(
    'dilated_conv', [dilated_conv.DEFAULT],
    f'config.model.dilated_conv settings to time, each auto or one of '
    f'{dilated_conv.DILATED_CONV_IMPLEMENTATIONS}.')


def synthetic_batch(batch: int, crop: int) -> dict[str, np.ndarray]:
  """Normal images, labels on 2% of the pixels, their classes present."""
  rng = np.random.default_rng(0)
  label = np.where(rng.random((batch, crop, crop)) < 0.02,
                   rng.integers(0, NUM_CLASSES, (batch, crop, crop)), -1)
  class_present = np.zeros((batch, NUM_CLASSES), np.float32)
  for b in range(batch):
    class_present[b, np.unique(label[b][label[b] >= 0])] = 1.0
  return {'image': rng.normal(size=(batch, crop, crop, 3)).astype(np.float32),
          'label': label.astype(np.int32), 'class_present': class_present}


def bench_config(depth: int, output_stride: int, batch: int, compute_dtype: str,
                 loss_preset: str, dilated_conv_setting: str
                 ) -> ml_collections.ConfigDict:
  """configs/voc_point.py at this depth, stride, batch, dtype, loss, conv."""
  config = voc_point.get_config()
  config.model.depth = depth
  config.model.output_stride = output_stride
  config.model.compute_dtype = compute_dtype
  config.model.dilated_conv = dilated_conv_setting
  config.model.pretrained = ''
  config.global_batch_size = batch
  config.loss = presets.preset(loss_preset)
  return config


@dataclasses.dataclass
class CompiledStep:
  """A compiled train step with its state and a device batch."""
  compiled: Any
  state: Any
  batch: Any
  compile_seconds: float
  last_metrics: Any = None

  def run(self) -> float:
    """One step (the state is donated and replaced); its seconds."""
    start = time.perf_counter()
    self.state, metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready(metrics)
    self.last_metrics = metrics
    return time.perf_counter() - start

  def loss(self) -> float:
    return float(train_state.host(self.last_metrics.compute()['loss']))


def compile_step(config: ml_collections.ConfigDict, crop: int) -> CompiledStep:
  """Builds the state and compiles the train step of ``config`` at ``crop``."""
  total_steps = 1000
  batch = config.global_batch_size
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
  return CompiledStep(compiled, state, device_batch,
                      time.perf_counter() - start)


def time_alternately(compiled_steps: Sequence[CompiledStep], num_steps: int
                     ) -> list[list[float]]:
  """One warm-up step each, then ``num_steps`` rounds of one step of each."""
  for compiled in compiled_steps:
    compiled.run()
  times = [[] for _ in compiled_steps]
  for _ in range(num_steps):
    for compiled, seconds in zip(compiled_steps, times):
      seconds.append(compiled.run())
  return times


def train_flops(config: ml_collections.ConfigDict, crop: int) -> float:
  """FLOPs of one train step of ``config`` (model forward x 3, whole batch)."""
  return flops.architecture_forward_flops(
      config.model, NUM_CLASSES,
      (config.global_batch_size, crop, crop, 3)).train


def throughput_line(step_flops: float, step_seconds: float) -> str:
  """Achieved TFLOP/s, and the fraction of the devices' bf16 peak if known."""
  achieved = step_flops / step_seconds
  line = (f'{achieved / 1e12:.2f} TFLOP/s ({step_flops / 1e12:.2f} TFLOP per '
          'step, counted from the layer shapes)')
  peak = flops.bf16_peak_flops(jax.devices()[0])
  if peak:
    line += f', {100 * achieved / (peak * jax.device_count()):.1f}% of bf16 peak'
  return line


def memory_line(compiled: Any) -> str:
  """XLA's ``memory_analysis`` of a compiled step, in GiB."""
  analysis = compiled.memory_analysis()
  gib = lambda name: (getattr(analysis, name, 0) or 0) / 2**30
  total = (gib('argument_size_in_bytes') + gib('output_size_in_bytes')
           + gib('temp_size_in_bytes') - gib('alias_size_in_bytes'))
  return (f'memory_analysis: arguments {gib("argument_size_in_bytes"):.2f} GiB, '
          f'outputs {gib("output_size_in_bytes"):.2f} (aliased to arguments '
          f'{gib("alias_size_in_bytes"):.2f}), temporaries '
          f'{gib("temp_size_in_bytes"):.2f}; total {total:.2f} GiB')


def main(argv):
  del argv
  depth, output_stride, crop, batch = SHAPES[_SHAPE.value]
  device = jax.devices()[0]
  print(f'shape={_SHAPE.value} (ResNet-{depth} OS{output_stride}, {crop}x{crop}, '
        f'batch {batch}), compute_dtype={_DTYPE.value}, loss={_LOSS.value}, '
        f'{jax.device_count()} x {device.device_kind}')
  configs = [bench_config(depth, output_stride, batch, _DTYPE.value,
                          _LOSS.value, setting)
             for setting in _DILATED_CONV.value]
  compiled_steps = [compile_step(config, crop) for config in configs]
  for setting, compiled in zip(_DILATED_CONV.value, compiled_steps):
    print(f'dilated_conv={setting}: compile {compiled.compile_seconds:.1f} s; '
          f'{memory_line(compiled.compiled)}')
  if _STEPS.value < 1:
    return
  times = time_alternately(compiled_steps, _STEPS.value)
  step_flops = train_flops(configs[0], crop)
  first_median = statistics.median(times[0])
  for setting, compiled, seconds in zip(_DILATED_CONV.value, compiled_steps,
                                        times):
    median = statistics.median(seconds)
    print(f'dilated_conv={setting}: step {median:.3f} s median of '
          f'{len(seconds)} (min {min(seconds):.3f}, max {max(seconds):.3f}); '
          f'{batch / median:.2f} images/s; {median / first_median:.3f}x the '
          f'first; loss {compiled.loss():.4f}')
    print(f'  achieved: {throughput_line(step_flops, median)}')
  if device.platform == 'gpu':
    peak = (device.memory_stats() or {}).get('peak_bytes_in_use')
    if peak is not None:
      print(f'peak memory (all steps of this process): {peak / 2**30:.2f} GiB')


if __name__ == '__main__':
  app.run(main)
