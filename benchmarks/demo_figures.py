r"""The demo's wall time and final mIoU, from one run at the current commit.

README.md and docs/benchmarks.md quote these two figures; both come from the
output of this script (one measurement, never from two runs):

  # Runs the README's demo command in a fresh workdir and times it (12-20 min
  # on 2 CPU cores):
  python -m benchmarks.demo_figures --workdir=/tmp/demo_figures
  # Reads a finished run instead (the time is then the span of its
  # TensorBoard scalars: no data preparation, no first compilation):
  python -m benchmarks.demo_figures --workdir=runs/demo --read_only

Prints the commit (with `+dirty` for uncommitted changes), the machine, the
wall time and the mIoU of the last evaluation.
"""

import argparse
import os
import subprocess
import sys
import time

from benchmarks.study import results
from benchmarks.study import runner

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_COMMAND = ('main.py', '--config=configs/demo.py')


def commit() -> str:
  """HEAD's short hash, `+dirty` when tracked files differ from it."""
  head = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO_ROOT,
                        capture_output=True, text=True, check=True).stdout
  dirty = subprocess.run(['git', 'diff', '--quiet', 'HEAD'], cwd=REPO_ROOT,
                         check=False).returncode != 0
  return head.strip() + ('+dirty' if dirty else '')


def run_demo(workdir: str) -> float:
  """Runs the demo command into the new `workdir`; returns its wall seconds."""
  if os.path.exists(workdir):
    raise SystemExit(f'{workdir} exists: the figures need a fresh run (remove '
                     'it, or pass --read_only to read it)')
  start = time.perf_counter()
  subprocess.run([sys.executable, *DEMO_COMMAND, f'--workdir={workdir}'],
                 cwd=REPO_ROOT, check=True)
  return time.perf_counter() - start


def final_miou(workdir: str) -> tuple[int, float, float | None]:
  """(step, mIoU) of the last `eval/miou` scalar of `workdir`, and the span
  of its scalar events in seconds."""
  scalars, span_s = results.read_scalars(workdir)
  if results.DEFAULT_MIOU_TAG not in scalars:
    raise SystemExit(f'{workdir}: no {results.DEFAULT_MIOU_TAG} scalar '
                     '(did the run finish an evaluation?)')
  steps, values = scalars[results.DEFAULT_MIOU_TAG]
  return int(steps[-1]), float(values[-1]), span_s


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m benchmarks.demo_figures', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--read_only', action='store_true',
                      help='read a finished run instead of running the demo')
  args = parser.parse_args(argv)
  workdir = os.path.abspath(args.workdir)
  wall_s = None if args.read_only else run_demo(workdir)
  step, miou, span_s = final_miou(workdir)
  machine = runner.machine_description()
  print(f'commit: {commit()}')
  print(f'machine: {runner.cpu_label(machine)}, jax {machine["jax"]}')
  if wall_s is not None:
    print(f'wall time: {wall_s:.0f} s ({wall_s / 60:.1f} min), command: '
          f'python {" ".join(DEMO_COMMAND)} --workdir={args.workdir}')
  elif span_s is not None:
    print(f'event span: {span_s:.0f} s ({span_s / 60:.1f} min; excludes data '
          'preparation and the first compilation)')
  print(f'mIoU: {100 * miou:.2f}% (val, step {step})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
