"""Running the planned commands one after another (resumable): the study
marker each workdir gets (the command, its attempts, `done`), the machine
description, data preparation before the runs, the deadline of a device call
and the SIGTERM passed on to the trainer.
"""

import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from agmm_jax.storage import workdir as workdir_lib
from benchmarks.study.grid import REPO_ROOT, Run, run_config

# Written by --run into each workdir: the command and its attempts.
MARKER_FILE = 'study_run.json'
LOG_FILE = 'study_stdout.log'


def read_marker(workdir: str) -> dict[str, Any] | None:
  """The study marker of a workdir, or None when it has none."""
  path = os.path.join(workdir, MARKER_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}: not valid JSON ({e})') from None


def attempts_wall_s(marker: Mapping[str, Any] | None, command: str
                    ) -> float | None:
  """The summed wall time of the attempts of `marker` when it is
  `command`'s and has any (the attempt of a run still going has none yet:
  0, unless timed_so_far gave it one); None otherwise (a run by hand, timed
  by its events instead)."""
  if not marker or marker.get('command') != command or not marker.get('attempts'):
    return None
  return float(sum(a.get('wall_s', 0.0) for a in marker['attempts']))


def write_marker(workdir: str, marker: Mapping[str, Any]) -> None:
  """Writes the marker atomically (a kill never leaves half a file)."""
  path = os.path.join(workdir, MARKER_FILE)
  with open(path + '.tmp', 'w') as f:
    json.dump(marker, f, indent=2)
  os.replace(path + '.tmp', path)


def is_done(run: Run, repo_root: str = REPO_ROOT) -> bool:
  """True when `run`'s exact command finished with status 0 in its workdir."""
  marker = read_marker(os.path.join(repo_root, run.workdir))
  return bool(marker and marker.get('done')
              and marker.get('command') == run.command)


def _vector_isa(flags: set[str]) -> str:
  """The widest x86 vector extension among /proc/cpuinfo's `flags` ('' if
  none is known). Two CPUs of one model name can differ here, and XLA:CPU
  compiles for it, so a run's float rounding (and its mIoU) follows it."""
  if 'avx512f' in flags:
    return 'AVX-512'
  return 'AVX2' if 'avx2' in flags else ''


def cpu_label(machine: Mapping[str, Any]) -> str:
  """'MODEL (ISA), N cores' of a `machine_description()` (records written
  before the ISA was recorded: 'MODEL, N cores'); '' without a CPU."""
  if not machine.get('cpu'):
    return ''
  isa = machine.get('cpu_vector_isa')
  return (f'{machine["cpu"]}' + (f' ({isa})' if isa else '')
          + f', {machine["cpu_count"]} cores')


def machine_description() -> dict[str, Any]:
  """CPU model, core count (the machine's, and the ones this process may
  use), OS and library versions of this machine."""
  cpu = platform.processor() or platform.machine()
  flags = set()
  try:
    with open('/proc/cpuinfo') as f:
      lines = f.read().splitlines()
    models = [line.split(':', 1)[1].strip() for line in lines
              if line.startswith('model name')]
    cpu = models[0] if models else cpu
    flags = next((set(line.split(':', 1)[1].split()) for line in lines
                  if line.startswith('flags')), set())
  except OSError:
    pass
  versions = {}
  for package in ('jax', 'jaxlib', 'flax'):
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      versions[package] = 'not installed'
  # The GPUs, where nvidia-smi lists them (the lent device machine).
  devices = ''
  if shutil.which('nvidia-smi'):
    listing = subprocess.run(['nvidia-smi', '-L'], capture_output=True,
                             text=True, check=False)
    devices = '; '.join(listing.stdout.strip().splitlines())
  return {'cpu': cpu, 'cpu_count': os.cpu_count(),
          'cpu_vector_isa': _vector_isa(flags),
          'cores': workdir_lib.usable_cores(),
          'platform': platform.platform(), 'python': platform.python_version(),
          'devices': devices, **versions}


_UTC_FORMAT = '%Y-%m-%d %H:%M:%S UTC'


def utc_now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime(_UTC_FORMAT)


def close_lost_attempts(attempts: Sequence[dict[str, Any]],
                        log_path: str) -> None:
  """Gives a wall time to the attempts whose study process died mid-run.

  An attempt is written to the marker when its run starts and completed when
  it ends; one still without `wall_s` at the next start lost its study
  process (a SIGKILL, a lost machine) while the run was going. Its end is
  taken as the last write to the run's log (the trainer logs every few
  steps), its exit status as unknown (None), and it is marked `lost`.
  """
  for attempt in attempts:
    if 'wall_s' not in attempt:
      attempt.update(
          wall_s=_wall_s_to_last_log_write(attempt, log_path), returncode=None,
          lost='the study process ended during the run; wall_s runs to the '
          f'last write of {LOG_FILE}')


def _wall_s_to_last_log_write(attempt: Mapping[str, Any],
                              log_path: str) -> float:
  start = datetime.datetime.strptime(attempt['start'], _UTC_FORMAT).replace(
      tzinfo=datetime.timezone.utc).timestamp()
  end = os.path.getmtime(log_path) if os.path.exists(log_path) else start
  return max(end - start, 0.0)


def timed_so_far(marker: Mapping[str, Any] | None, workdir: str
                 ) -> dict[str, Any] | None:
  """A copy of `marker` in which an attempt still open (a run going on, or
  one whose study was killed) is timed to the last write of its log, so
  that a report gives a run in progress its wall time so far."""
  if not marker:
    return None
  log_path = os.path.join(workdir, LOG_FILE)
  return {**marker, 'attempts': [
      attempt if 'wall_s' in attempt else {
          **attempt, 'wall_s': _wall_s_to_last_log_write(attempt, log_path)}
      for attempt in marker.get('attempts', [])]}


def prepare_data(runs: Sequence[Run], overrides: Sequence[str] = (),
                 repo_root: str = REPO_ROOT) -> dict[str, float]:
  """Converts the data folder of every run once (before the runs, so the
  runs' wall times are training only); returns `{data_dir: seconds}`."""
  from data_prep import auto  # pylint: disable=g-import-not-at-top
  seconds = {}
  cwd = os.getcwd()
  os.chdir(repo_root)  # config paths are relative to the repository
  try:
    for run in runs:
      config = run_config(run, overrides)
      if config.data.dir in seconds:
        continue
      start = time.perf_counter()
      if auto.prepare_if_missing(config.data.prepare, config.data.dir):
        print(f'prepared {config.data.dir} in '
              f'{time.perf_counter() - start:.0f} s', flush=True)
      seconds[config.data.dir] = time.perf_counter() - start
  finally:
    os.chdir(cwd)
  return seconds


def run_plan(runs: Sequence[Run], *, repo_root: str = REPO_ROOT,
             keep_going: bool = True, env: Mapping[str, str] | None = None,
             deadline: float | None = None,
             predicted_s: Mapping[Run, float] | None = None,
             done_elsewhere: Callable[[Run], bool] | None = None,
             on_done: Callable[[Run], object] | None = None
             ) -> list[tuple[Run, str]]:
  """Runs the commands one after another; returns `(run, status)` pairs.

  status: 'skipped' (already done with the same command, in its workdir or
  where `done_elsewhere` says: the study's archive), 'done',
  'failed (exit N)', or 'deferred (deadline)'. `env`: variables added to the
  commands' environment (JAX_COMPILATION_CACHE_DIR). `deadline`
  (time.monotonic() seconds): a run whose `predicted_s` would end after it
  is not started (it and the rest are left for the next call), and a run
  still going at the deadline gets SIGTERM (it checkpoints and exits 143). A run's stdout and stderr are appended to
  `WORKDIR/study_stdout.log`; its marker `WORKDIR/study_run.json` records the
  command, every attempt (start time and load average when it starts, wall
  seconds and exit status when it ends; close_lost_attempts completes one
  whose study process died) and `done`. A killed or preempted run is simply
  rerun: the trainer resumes from its workdir; a SIGTERM or Ctrl-C of this process is passed on
  to the running trainer (which saves a checkpoint first). Stops at the first
  failure unless `keep_going`; always stops when a run was stopped by a signal
  (status >= 128 or < 0). `on_done(run)` follows every run that is done,
  including one done before in its workdir (the study archives its record).
  """
  statuses = []
  machine = machine_description()
  child_env = {**os.environ, **(env or {})}
  for index, run in enumerate(runs, 1):
    label = f'[{index}/{len(runs)}] {run.cell.name} seed {run.seed}'
    if is_done(run, repo_root) or (done_elsewhere and done_elsewhere(run)):
      print(f'{label}: done before, skipped', flush=True)
      if on_done and is_done(run, repo_root):
        on_done(run)
      statuses.append((run, 'skipped'))
      continue
    if deadline is not None and time.monotonic() + (
        predicted_s or {}).get(run, 0.0) > deadline:
      print(f'{label}: deferred (predicted to end after the deadline)',
            flush=True)
      statuses.append((run, 'deferred (deadline)'))
      break
    workdir = os.path.join(repo_root, run.workdir)
    os.makedirs(workdir, exist_ok=True)
    marker = read_marker(workdir) or {}
    attempts = marker.get('attempts', []) if (
        marker.get('command') == run.command) else []
    log_path = os.path.join(workdir, LOG_FILE)
    close_lost_attempts(attempts, log_path)
    print(f'{label}: {run.command}\n  log: {log_path}', flush=True)
    attempt = {'start': utc_now(), 'load_average': os.getloadavg()[0],
               'cores': workdir_lib.usable_cores()}
    attempts.append(attempt)
    marker = {'command': run.command, 'cell': run.cell.name,
              'labels': run.cell.labels, 'method': run.cell.method,
              'seed': run.seed, 'done': False, 'attempts': attempts,
              'machine': machine}
    # Recorded before the run starts, so that a study killed mid-run leaves
    # the attempt for close_lost_attempts to complete.
    write_marker(workdir, marker)
    start = time.perf_counter()
    with open(log_path, 'a') as log:
      log.write(f'\n=== {attempt["start"]}: {run.command}\n')
      log.flush()
      process = subprocess.Popen(run.argv, cwd=repo_root, stdout=log,
                                 stderr=subprocess.STDOUT, env=child_env)
      # A SIGTERM to the study reaches the trainer, which then saves a
      # checkpoint and exits 143; so do Ctrl-C and the deadline.
      previous = signal.signal(
          signal.SIGTERM, lambda *_: process.send_signal(signal.SIGTERM))
      timer = None
      if deadline is not None:
        timer = threading.Timer(max(deadline - time.monotonic(), 0.0),
                                process.terminate)
        timer.start()
      try:
        returncode = process.wait()
      except KeyboardInterrupt:
        process.terminate()
        returncode = process.wait()
      finally:
        signal.signal(signal.SIGTERM, previous)
        if timer is not None:
          timer.cancel()
    attempt.update(wall_s=time.perf_counter() - start, returncode=returncode)
    write_marker(workdir, {**marker, 'done': returncode == 0})
    status = 'done' if returncode == 0 else f'failed (exit {returncode})'
    print(f'{label}: {status} in {attempt["wall_s"]:.0f} s', flush=True)
    if returncode == 0 and on_done:
      on_done(run)
    statuses.append((run, status))
    if returncode != 0 and (not keep_going or returncode < 0
                            or returncode >= 128):
      break
  return statuses
