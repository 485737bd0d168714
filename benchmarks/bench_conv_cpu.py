r"""One convolution, forward and both gradients: XLA:CPU beside PyTorch.

  python -m benchmarks.bench_conv_cpu --rounds=7

The minimal reproduction of the CPU step's convolution gap (issue 32): for
each convolution shape of the two CPU benchmark models
(benchmarks/profile_cpu_step.py), ``jax.vjp`` of ``lax.conv_general_dilated``
(NHWC/HWIO, float32, jitted; the forward and the input and weight gradients
of one cotangent) beside ``torch.nn.functional.conv2d`` (NCHW, float32, the
same forward and ``backward``) and, for dilated convs, the same vjp of
``agmm_jax.model.dilated_conv.tap_sum_conv`` (one matmul per in-image tap)
and, for 1x1 convs, of ``pointwise_dot_conv`` (one dot; the forms
``dilated_conv='taps'`` uses).
One warm-up call each, then ``--rounds`` rounds of one call of each; medians
in milliseconds and their ratio to PyTorch, with the load average.
"""

import os
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from agmm_jax.model import dilated_conv  # pylint: disable=g-import-not-at-top
from benchmarks import timing  # pylint: disable=g-import-not-at-top

# (label, batch, grid, in, out, kernel, rate): the step shapes' convs.
CONVS = (
    ('R50 layer3 3x3 r2', 2, 21, 256, 256, 3, 2),
    ('R50 layer4 3x3 r4', 2, 21, 512, 512, 3, 4),
    ('R50 ASPP 3x3 r6', 2, 21, 2048, 256, 3, 6),
    ('R50 ASPP 3x3 r12', 2, 21, 2048, 256, 3, 12),
    ('R50 ASPP 3x3 r18', 2, 21, 2048, 256, 3, 18),
    ('R50 layer3 1x1 1024->256', 2, 21, 1024, 256, 1, 1),
    ('R50 layer4 1x1 512->2048', 2, 21, 512, 2048, 1, 1),
    ('R50 layer4 1x1 2048->512', 2, 21, 2048, 512, 1, 1),
    ('R50 layer1 1x1 64->256', 2, 41, 64, 256, 1, 1),
    ('R18 layer4 3x3 r2', 8, 11, 512, 512, 3, 2),
    ('R18 ASPP 3x3 r6', 8, 11, 512, 256, 3, 6),
    ('R18 ASPP 3x3 r12', 8, 11, 512, 256, 3, 12),
    ('decoder 3x3 304->256 (R18 batch)', 8, 41, 304, 256, 3, 1),
    ('R18 layer1 3x3 64', 8, 41, 64, 64, 3, 1),
)

_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Timed rounds.')
_ONLY = flags.DEFINE_string('only', '', 'Substring of the labels to run.')


def jax_call(conv_fn, batch, grid, cin, cout, kernel, rate):
  """A timed call of the jitted vjp (forward, input and weight gradients)."""
  pad = rate * (kernel - 1) // 2
  x = jax.random.normal(jax.random.key(0), (batch, grid, grid, cin))
  w = jax.random.normal(jax.random.key(1), (kernel, kernel, cin, cout)) * 0.02
  g = jax.random.normal(jax.random.key(2), (batch, grid, grid, cout))

  @jax.jit
  def forward_backward(x, w, g):
    y, vjp = jax.vjp(lambda x, w: conv_fn(
        x, w, (1, 1), ((pad, pad), (pad, pad)), rhs_dilation=(rate, rate),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC')), x, w)
    return y, vjp(g)

  def call():
    start = time.perf_counter()
    jax.block_until_ready(forward_backward(x, w, g))
    return time.perf_counter() - start
  return call


def torch_call(batch, grid, cin, cout, kernel, rate):
  import torch  # pylint: disable=g-import-not-at-top
  pad = rate * (kernel - 1) // 2
  x = torch.randn(batch, cin, grid, grid, requires_grad=True)
  w = (torch.randn(cout, cin, kernel, kernel) * 0.02).requires_grad_()
  g = torch.randn(batch, cout, grid, grid)

  def call():
    start = time.perf_counter()
    x.grad = w.grad = None
    y = torch.nn.functional.conv2d(x, w, padding=pad, dilation=rate)
    y.backward(g)
    return time.perf_counter() - start
  return call


def main(argv):
  del argv
  import torch  # pylint: disable=g-import-not-at-top
  print(f'jax {jax.__version__} on {jax.devices()[0].device_kind}, torch '
        f'{torch.__version__} ({torch.get_num_threads()} threads); load '
        f'average {os.getloadavg()[0]:.2f}')
  print('| conv (batch, grid, in->out) | torch ms | XLA ms | XLA/torch | '
        "'taps' form ms | 'taps' form/torch |\n|---|---|---|---|---|---|")
  for label, *shape in CONVS:
    if _ONLY.value not in label:
      continue
    calls = {'torch': torch_call(*shape),
             'xla': jax_call(lax.conv_general_dilated, *shape)}
    kernel, rate = shape[-2:]
    if rate > 1 or kernel == 1:
      calls['taps'] = jax_call(dilated_conv.conv_function('taps', rate, kernel),
                               *shape)
    times = timing.time_rounds(calls, _ROUNDS.value)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    taps = (f'{ms["taps"]:.1f} | {ms["taps"] / ms["torch"]:.2f}'
            if 'taps' in ms else '- | -')
    batch, grid, cin, cout = shape[:4]
    print(f'| {label} ({batch}, {grid}x{grid}, {cin}->{cout}) | '
          f'{ms["torch"]:.1f} | {ms["xla"]:.1f} | '
          f'{ms["xla"] / ms["torch"]:.2f} | {taps} |', flush=True)
  print(f'load average {os.getloadavg()[0]:.2f}')


if __name__ == '__main__':
  app.run(main)
