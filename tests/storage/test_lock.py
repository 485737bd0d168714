"""agmm_jax.storage.lock: one training run per work directory.

The second process is ``main.py`` run for real on a work directory whose
lock this test process holds (an ``flock`` conflicts between two opens of the
file, even in one process); eval mode beside it reads on.
"""

import os
import signal
import socket
import subprocess
import sys

import pytest

from agmm_jax.storage import lock as lock_lib
from configs import tiny
import main
from tests.storage import workdir_helpers

REPO_ROOT = workdir_helpers.REPO_ROOT


def test_second_training_on_a_locked_workdir_refuses_in_one_line(
    tiny_trained_run, tiny_data_dir):
  workdir = tiny_trained_run[0]
  with lock_lib.WorkdirLock(workdir):
    before = workdir_helpers.snapshot(workdir)  # .lock names this process.
    result = workdir_helpers.run_main([
        '--config=configs/tiny.py', f'--workdir={workdir}',
        f'--config.data.dir={tiny_data_dir}'])
    assert workdir_helpers.snapshot(workdir) == before
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      f'error: {os.path.abspath(workdir)} is in use by another run (PID '
      f'{os.getpid()} on host {socket.gethostname()}); wait for it to end or '
      'stop it, or use another --workdir')
  assert 'Traceback' not in result.stderr


def test_the_lock_of_a_killed_process_is_released(tmp_path):
  holder = subprocess.Popen(  # pylint: disable=consider-using-with
      [sys.executable, '-c',
       'import sys, time\n'
       'from agmm_jax.storage import lock\n'
       f'held = lock.WorkdirLock({str(tmp_path)!r}).acquire()\n'
       'print("locked", flush=True)\n'
       'time.sleep(600)\n'], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(lock_lib.WorkdirLocked,
                       match=f'PID {holder.pid} on host '):
      lock_lib.WorkdirLock(str(tmp_path)).acquire()
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with lock_lib.WorkdirLock(str(tmp_path)) as workdir_lock:
    with open(workdir_lock.path, encoding='utf-8') as f:
      assert f.read().split() == [str(os.getpid()), socket.gethostname()]


def test_released_lock_can_be_taken_again(tmp_path):
  first = lock_lib.WorkdirLock(str(tmp_path / 'new')).acquire()
  with pytest.raises(lock_lib.WorkdirLocked):
    lock_lib.WorkdirLock(str(tmp_path / 'new')).acquire()
  first.release()
  lock_lib.WorkdirLock(str(tmp_path / 'new')).acquire().release()


def test_training_refuses_but_eval_reads_beside_a_running_training(
    tiny_trained_run, tiny_data_dir):
  workdir, trained_scores = tiny_trained_run
  config = tiny.get_config()
  config.data.dir = tiny_data_dir
  with lock_lib.WorkdirLock(workdir):
    with pytest.raises(lock_lib.WorkdirLocked, match='is in use by another'):
      main.run(config, workdir)
    config.mode = 'eval'
    config.eval.checkpoint = 'latest'
    scores = main.run(config, workdir)
  assert scores['step'] == trained_scores['step']
  assert scores['miou'] == pytest.approx(trained_scores['miou'], abs=1e-6)
