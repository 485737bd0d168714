r"""The train step of two commits timed in one run: did a change slow it?

  python -m benchmarks.compare_commits --before=f3e6dea --after=HEAD \
      --rounds=3 -- --shape=cpu --dilated_conv=xla --steps=4

Each commit is checked out into a temporary detached worktree (or a folder
given instead of a revision is used as it is), and
``benchmarks/bench_train_step.py`` with the arguments after ``--`` runs in
each, one process after the other for ``--rounds`` rounds, so background
load hits both alike. Every process prints its median step time; this
script prints each commit's median over its rounds, the ratio after/before
and the load average before and after. The step arguments must mean the same
to both commits (``--dilated_conv=xla`` pins the convolution form across the
change of the CPU default).
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# bench_train_step.py's result line: 'dilated_conv=xla: step 2.540 s median of 4 ...'
STEP_LINE = re.compile(r'dilated_conv=\S+: step ([0-9.]+) s median')


def checkout(revision: str, parent: str) -> str:
  """A folder holding ``revision``: the folder itself when it is one, else a
  detached worktree of this repository under ``parent``."""
  if os.path.isdir(revision):
    return os.path.abspath(revision)
  folder = os.path.join(parent, revision.replace('/', '_'))
  subprocess.run(['git', '-C', REPO_ROOT, 'worktree', 'add', '--detach', '-q', folder,
                  revision], check=True)
  return folder


def step_seconds(folder: str, step_args: list[str]) -> float:
  """The median step time one bench_train_step.py process prints."""
  result = subprocess.run([sys.executable, 'benchmarks/bench_train_step.py', *step_args],
                          cwd=folder, capture_output=True, text=True, check=False)
  found = STEP_LINE.findall(result.stdout)
  if result.returncode != 0 or not found:
    tail = (result.stderr or result.stdout).strip().splitlines()[-1:]
    raise SystemExit(f'error: bench_train_step.py failed in {folder}: {tail}')
  return float(found[0])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--before', required=True, help='revision or folder')
  parser.add_argument('--after', default='HEAD', help='revision or folder')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('step_args', nargs='*', help='bench_train_step.py arguments')
  args = parser.parse_args()
  parent = tempfile.mkdtemp(prefix='compare_commits_')
  folders = {}
  try:
    folders = {name: checkout(getattr(args, name), parent) for name in ('before', 'after')}
    times = {name: [] for name in folders}
    print(f'load average before: {os.getloadavg()[0]:.2f}', flush=True)
    for round_index in range(args.rounds):
      for name, folder in folders.items():
        times[name].append(step_seconds(folder, args.step_args))
        print(f'round {round_index + 1}: {name} {times[name][-1]:.3f} s', flush=True)
    print(f'load average after: {os.getloadavg()[0]:.2f}')
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, median in medians.items():
      print(f'{name} ({getattr(args, name)}): step {median:.3f} s, median of '
            f'{args.rounds} processes')
    print(f'after / before: {medians["after"] / medians["before"]:.3f}')
  finally:
    for name, folder in folders.items():
      if folder.startswith(parent):
        subprocess.run(['git', '-C', REPO_ROOT, 'worktree', 'remove', '--force', folder],
                       check=False)
    shutil.rmtree(parent, ignore_errors=True)


if __name__ == '__main__':
  main()
