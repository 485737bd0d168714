"""Damaged files and bad start-up values through ``main.py`` (issue 36): each
ends with one ``error:`` line (exit 1), no traceback, and leaves the work
directory as it was. The subprocesses run all at once.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from agmm_jax.data import input_pipeline
from tests import fixtures
from tests.storage import workdir_helpers

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
# Small enough that the tiny model's first checkpoint (about 90 MB) does
# not fit, large enough for config.json and the event file.
FULL_DISK_BYTES = 40 << 20


def start(args: list[str], runner: str = 'main.py',
          fault: str = '') -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS='cpu', FAULT=fault)
  return subprocess.Popen(  # pylint: disable=consider-using-with
      [sys.executable, runner, *args], cwd=REPO_ROOT, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> str:
  """The process's one error line, after checking exit status 1, that it
  is the last line and that nothing printed a traceback."""
  _, stderr = process.communicate(timeout=600)
  assert process.returncode == 1, stderr[-3000:]
  assert 'Traceback' not in stderr and 'never retrieved' not in stderr
  errors = [line for line in stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and stderr.strip().splitlines()[-1] == errors[0]
  return errors[0]


def tiny(workdir: str, *overrides: str) -> list[str]:
  return ['--config=configs/tiny.py', f'--workdir={workdir}', *overrides]


@pytest.fixture(name='small_disk')
def fixture_small_disk(tmp_path):
  """A full-able file system (a small tmpfs; needs root), or None."""
  mount_point = tmp_path / 'small_disk'
  mount_point.mkdir()
  mounted = subprocess.run(
      ['mount', '-t', 'tmpfs', '-o', f'size={FULL_DISK_BYTES}', 'tmpfs',
       str(mount_point)], capture_output=True, check=False).returncode == 0
  yield str(mount_point) if mounted else None
  if mounted:
    subprocess.run(['umount', str(mount_point)], check=True)


def test_damaged_files_and_bad_values_end_with_one_line(
    tiny_trained_run, tiny_data_dir, tmp_path, small_disk):
  trained = tiny_trained_run[0]
  best_damaged, latest_damaged = str(tmp_path / 'best'), str(tmp_path / 'latest')
  for copy in (best_damaged, latest_damaged):
    shutil.copytree(trained, copy, ignore=shutil.ignore_patterns('.lock'))
  best_step, = os.listdir(os.path.join(trained, 'checkpoints_best'))
  fixtures.truncate_largest_file(
      os.path.join(best_damaged, 'checkpoints_best', best_step, 'state'))
  for step in ('2', '4'):  # Eval mode restores the state only.
    fixtures.truncate_largest_file(
        os.path.join(latest_damaged, 'checkpoints', step, 'state'))
  bad_metadata = str(tmp_path / 'bad_metadata')
  shutil.copytree(tiny_data_dir, bad_metadata)
  with open(os.path.join(bad_metadata, input_pipeline.METADATA_FILE), 'a',
            encoding='utf-8') as f:
    f.write('}')
  photos = tmp_path / 'photos'
  photos.mkdir()
  Image.new('RGB', (8, 8)).save(photos / 'a.jpg')
  a_file = tmp_path / 'a_file'
  a_file.write_text('x')
  before = {w: workdir_helpers.snapshot(w)
            for w in (best_damaged, latest_damaged)}
  if small_disk:  # The real thing; otherwise an injected ENOSPC.
    first_run = os.path.join(small_disk, 'run')
    first_save = start(tiny(first_run, f'--config.data.dir={tiny_data_dir}'))
  else:
    first_run = str(tmp_path / 'fresh')
    first_save = start(tiny(first_run, f'--config.data.dir={tiny_data_dir}'),
                       runner='tests/fault_runner.py', fault='save_enospc:2')
  data = f'--config.data.dir={tiny_data_dir}'
  cases = {  # workdir: (process, its error line's start[, its end])
      best_damaged: (
          start(tiny(best_damaged, data, '--config.mode=eval')),
          f'error: the best checkpoint, step {best_step} ({best_damaged}/'
          f'checkpoints_best/{best_step}), does not restore: ',
          '--config.eval.checkpoint=latest uses the latest one, step 4'),
      latest_damaged: (
          start(tiny(latest_damaged, data, '--config.mode=eval',
                     '--config.eval.checkpoint=latest')),
          f'error: checkpoint 4 ({latest_damaged}/checkpoints/4) does not '
          'restore (nor do the older steps 2): ',
          f'--config.eval.checkpoint=best uses the best one, step {best_step}'),
      str(tmp_path / 'w_metadata'): (
          start(tiny(str(tmp_path / 'w_metadata'),
                     f'--config.data.dir={bad_metadata}')),
          f'error: {bad_metadata}/metadata.json: unreadable dataset metadata'),
      str(tmp_path / 'w_photos'): (
          start(tiny(str(tmp_path / 'w_photos'), f'--config.data.dir={photos}')),
          f"error: config.data.dir='{photos}' holds files but no "
          'metadata.json, so it is not a prepared dataset; '),
      str(a_file): (
          start(tiny(str(a_file))),
          f'error: --workdir={a_file} is a file, not a folder'),
      str(tmp_path / 'w_steps0'): (
          start(tiny(str(tmp_path / 'w_steps0'),
                     '--config.num_train_steps=0')),
          'error: config.num_train_steps must be an integer -1 or >= 1 '
          '(-1: num_epochs epochs), got 0'),
      str(tmp_path / 'w_epochs'): (
          start(tiny(str(tmp_path / 'w_epochs'), '--config.num_train_steps=-1',
                     '--config.num_epochs=-5')),
          'error: config.num_epochs must be an integer >= 1 when '
          'num_train_steps is -1, got -5'),
      str(tmp_path / 'w_period'): (
          start(tiny(str(tmp_path / 'w_period'),
                     '--config.eval_every_steps=-2')),
          'error: config.eval_every_steps must be an integer -1 or >= 0'),
  }
  try:
    _check_outcomes(cases, before, first_save, first_run)
  finally:
    for process, *_ in [*cases.values(), (first_save,)]:
      if process.poll() is None:
        process.kill()
        process.wait()


def _check_outcomes(cases, before, first_save, first_run: str) -> None:
  """Each case's one line; the first save's, on a disk without room."""
  for workdir, (process, start_of_line, *end_of_line) in cases.items():
    line = finish(process)
    assert line.startswith(start_of_line), (workdir, line)
    assert line.endswith(tuple(end_of_line) or ''), (workdir, line)
    if workdir in before:
      assert workdir_helpers.snapshot(workdir) == before[workdir], workdir
    elif os.path.isdir(workdir):  # Refused after locking it: nothing else.
      assert os.listdir(workdir) == ['.lock'], workdir
  line = finish(first_save)
  assert 'there is no complete checkpoint yet' in line and 'None' not in line
  assert not [n for n in os.listdir(os.path.join(first_run, 'checkpoints'))
              if n.isdigit()]
