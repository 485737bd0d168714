r"""BatchNorm + ReLU and the residual add + ReLU on one and two threads:
XLA:CPU beside PyTorch.

  python -m benchmarks.bench_elementwise_cpu --rounds=15

The minimal reproduction of what is left of the study step's two-thread gap
(issue 32; docs/benchmarks.md, "Where the two-thread gap is"): its
convolutions scale from one thread to two nearly as PyTorch's do, its
BatchNorm and elementwise fusions do not. For each activation shape of the
study's CPU model (ResNet-18 OS16, 161x161 crops, batch 8), forward and
backward of

* ``bn_relu``: ``relu(BatchNorm(x))`` in train mode, the model's own
  ``deeplab.BatchNorm`` (two-pass batch variance, running averages updated)
  under ``nnx.jit`` / ``nnx.grad``, beside ``relu(F.batch_norm(x, training=
  True))`` with ``backward``;
* ``add_relu``: ``relu(x + shortcut)`` (a basic block's end), ``jax.vjp``
  beside the same in PyTorch.

Each library's figures come from two child processes, one pinned to one core
and one to two (``os.sched_setaffinity``: XLA:CPU and PyTorch size their
thread pools from the affinity), each timing ``--rounds`` alternate calls
after a warm-up, with glibc's mmap threshold raised (``CHILD_ENV``).
Printed: the medians in ms per shape, their sums weighted by how often the
shape occurs in the step, and the speed-up from one thread to two.
"""

import json
import os
import statistics
import subprocess
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import timing  # pylint: disable=g-import-not-at-top

# (label, shape NHWC, BatchNorms of this shape in the study step, residual
# adds of this shape): ResNet-18 torchvision stem, OS16, 161x161, batch 8.
SHAPES = (
    ('stem 81x81x64', (8, 81, 81, 64), 1, 0),
    ('layer1 41x41x64', (8, 41, 41, 64), 4, 2),
    ('layer2 21x21x128', (8, 21, 21, 128), 5, 2),
    ('layer3 11x11x256', (8, 11, 11, 256), 5, 2),
    ('layer4 11x11x512', (8, 11, 11, 512), 5, 2),
    ('ASPP 11x11x256', (8, 11, 11, 256), 5, 0),
    ('decoder reduce 41x41x48', (8, 41, 41, 48), 1, 0),
    ('decoder fuse 41x41x256', (8, 41, 41, 256), 2, 0),
)
KINDS = ('bn_relu', 'add_relu')
# glibc serves allocations above its mmap threshold (128 KiB, adapting up to
# 32 MiB) with fresh pages: a call whose ~14 MB outputs are mmapped anew
# pays their page faults (add_relu at 81x81x64: 15.7 ms against 3.1 ms with
# the threshold raised, on the dev machine's VM), depending on which sizes
# the process freed before. Both libraries get the raised threshold so that
# the figures are of the kernels, not of the allocator's history.
CHILD_ENV = {**os.environ, 'MALLOC_MMAP_THRESHOLD_': str(32 << 20),
             'MALLOC_TRIM_THRESHOLD_': str(1 << 36)}

_ROUNDS = flags.DEFINE_integer('rounds', 15, 'Timed rounds per shape.')
_CHILD = flags.DEFINE_string('child', '', 'Internal: "jax" or "torch".')


def jax_calls(shape):
  """Timed calls of the jitted forward + backward, by kind."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from agmm_jax.model import deeplab  # pylint: disable=g-import-not-at-top

  x = jax.random.normal(jax.random.key(0), shape)
  shortcut = jax.random.normal(jax.random.key(1), shape)
  cotangent = jax.random.normal(jax.random.key(2), shape)
  batch_norm = deeplab.BatchNorm(shape[-1])

  @nnx.jit
  def bn_relu(module, x, cotangent):
    def weighted(module, x):
      return (jax.nn.relu(module(x)) * cotangent).sum()
    return nnx.grad(weighted, argnums=(0, 1))(module, x)

  @jax.jit
  def add_relu(x, shortcut, cotangent):
    _, vjp = jax.vjp(lambda a, b: jax.nn.relu(a + b), x, shortcut)
    return vjp(cotangent)

  return {
      'bn_relu': lambda: jax.block_until_ready(
          bn_relu(batch_norm, x, cotangent)),
      'add_relu': lambda: jax.block_until_ready(
          add_relu(x, shortcut, cotangent)),
  }


def torch_calls(shape):
  """The same in PyTorch (NCHW, float32)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  batch, height, width, channels = shape
  nchw = (batch, channels, height, width)
  x = torch.randn(nchw, requires_grad=True)
  shortcut = torch.randn(nchw, requires_grad=True)
  cotangent = torch.randn(nchw)
  weight = torch.ones(channels, requires_grad=True)
  bias = torch.zeros(channels, requires_grad=True)
  running_mean, running_var = torch.zeros(channels), torch.ones(channels)

  def bn_relu():
    y = F.batch_norm(x, running_mean, running_var, weight, bias,
                     training=True, momentum=0.1, eps=1e-5)
    torch.relu(y).backward(cotangent)

  def add_relu():
    torch.relu(x + shortcut).backward(cotangent)

  return {'bn_relu': bn_relu, 'add_relu': add_relu}


def time_child(library: str, rounds: int) -> dict:
  """Medians in ms, ``{shape label: {kind: ms}}``, and the thread count."""
  make = jax_calls if library == 'jax' else torch_calls
  medians = {}
  for label, shape, _, _ in SHAPES:
    calls = {kind: timing.timed(call) for kind, call in make(shape).items()}
    times = timing.time_rounds(calls, rounds)  # The warm-up compiles.
    medians[label] = {kind: 1e3 * statistics.median(t)
                      for kind, t in times.items()}
  if library == 'torch':
    import torch  # pylint: disable=g-import-not-at-top
    threads = torch.get_num_threads()
  else:
    threads = len(os.sched_getaffinity(0))
  return {'threads': threads, 'medians': medians}


def run_child(library: str, cores: set, rounds: int) -> dict:
  """One child process pinned to ``cores``; its JSON result."""
  command = [sys.executable, '-m', 'benchmarks.bench_elementwise_cpu',
             f'--child={library}', f'--rounds={rounds}']
  result = subprocess.run(
      command, check=True, capture_output=True, text=True, env=CHILD_ENV,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      preexec_fn=lambda: os.sched_setaffinity(0, cores))
  return json.loads(result.stdout.strip().splitlines()[-1])


def step_sum(medians: dict, kind: str) -> float:
  """ms per study step: each shape's median times its count in the step."""
  column = 2 if kind == 'bn_relu' else 3
  return sum(medians[row[0]][kind] * row[column] for row in SHAPES)


def main(argv):
  del argv
  if _CHILD.value:
    print(json.dumps(time_child(_CHILD.value, _ROUNDS.value)))
    return
  available = sorted(os.sched_getaffinity(0))
  if len(available) < 2:
    sys.exit('bench_elementwise_cpu: needs two cores in the affinity mask')
  settings = {'1 core': {available[0]}, '2 cores': set(available[:2])}
  print(f'load average {os.getloadavg()[0]:.2f} (1 min)', flush=True)
  results = {}
  for setting, cores in settings.items():
    for library in ('jax', 'torch'):
      results[(library, setting)] = run_child(library, cores, _ROUNDS.value)
      print(f'{library} on {setting}: '
            f'{results[(library, setting)]["threads"]} threads', flush=True)
  columns = [(lib, setting) for setting in settings for lib in ('jax', 'torch')]
  for kind in KINDS:
    print(f'\n{kind}: forward + backward, ms (median of {_ROUNDS.value})')
    print('| shape | ' + ' | '.join(f'{lib} {s}' for lib, s in columns) + ' |')
    print('|---' * (len(columns) + 1) + '|')
    for label, *_ in SHAPES:
      cells = [f'{results[c]["medians"][label][kind]:.2f}' for c in columns]
      print(f'| {label} | ' + ' | '.join(cells) + ' |')
    sums = {c: step_sum(results[c]['medians'], kind) for c in columns}
    print('| per study step (x count) | ' +
          ' | '.join(f'**{sums[c]:.1f}**' for c in columns) + ' |')
    for lib in ('jax', 'torch'):
      print(f'{kind} {lib}: one core -> two cores speed-up '
            f'{sums[(lib, "1 core")] / sums[(lib, "2 cores")]:.2f}x')
    print(f'{kind} jax / torch: one core '
          f'{sums[("jax", "1 core")] / sums[("torch", "1 core")]:.2f}x, two '
          f'cores {sums[("jax", "2 cores")] / sums[("torch", "2 cores")]:.2f}x')
  print(f'load average {os.getloadavg()[0]:.2f} (1 min)')


if __name__ == '__main__':
  app.run(main)
