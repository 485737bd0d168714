"""Interrupted runs resume exactly (CPU, ``main.py`` in subprocesses).

Run A trains 8 steps uninterrupted. Run B trains the same command in another
work directory and is SIGKILLed as soon as its step-2 checkpoint exists; the
rerun is stopped with SIGTERM right after it resumed (it must save the next
step and exit 143); a third rerun finishes. B's final parameters, BatchNorm
statistics, optimizer state and data-iterator state must equal A's: the
checkpoints hold everything a run depends on, the input iterator included.

The subprocesses share the session's persistent compilation cache (with the
other modules' runs of the tiny config), so at most the first two compile
the train step.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests import fixtures

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOTAL_STEPS = 8


def start(workdir: str, data_dir: str, cache_dir: str,
          log_path: str) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  env.pop('XLA_FLAGS', None)
  with open(log_path, 'a') as log:
    return subprocess.Popen(
        [sys.executable, 'main.py', '--config=configs/tiny.py',
         f'--workdir={workdir}', '--alsologtostderr',
         f'--config.compilation_cache_dir={cache_dir}',
         f'--config.data.dir={data_dir}',
         f'--config.num_train_steps={TOTAL_STEPS}',
         '--config.checkpoint_every_steps=2', '--config.keep_checkpoints=10',
         '--config.eval_every_steps=0', '--config.image_summary_every_steps=0'],
        cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_for(predicate, process: subprocess.Popen, what: str,
             timeout: float = 400) -> None:
  deadline = time.monotonic() + timeout
  while not predicate():
    assert process.poll() is None, f'process ended before {what}'
    assert time.monotonic() < deadline, f'timed out waiting for {what}'
    time.sleep(0.05)


def checkpoint_steps(workdir: str) -> list[int]:
  path = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(path):
    return []
  return sorted(int(n) for n in os.listdir(path) if n.isdigit())


def load_step(workdir: str, step: int):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, 'checkpoints', str(step))
  state = ocp.StandardCheckpointer().restore(os.path.join(path, 'state'))
  with open(os.path.join(path, 'data', 'process_0-of-1.json')) as f:
    data_state = json.load(f)
  return state, data_state


def start_script_run(script: str, config_arg: str, flags: list[str], kill_env: str,
                     kill_at: int, workdir: str, data_dir: str, cache_dir: str,
                     log_path: str) -> subprocess.Popen:
  """``script`` (a test file run as main.py with its own stage plan) on the
  tiny data, CPU, checkpoints every 2 steps, no evaluation; ``kill_env`` tells
  it after which step to SIGKILL itself (0: never)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', **{kill_env: str(kill_at)},
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  env.pop('XLA_FLAGS', None)
  with open(log_path, 'a', encoding='utf-8') as log:
    return subprocess.Popen(
        [sys.executable, os.path.abspath(script), config_arg,
         f'--workdir={workdir}', '--alsologtostderr',
         f'--config.compilation_cache_dir={cache_dir}', f'--config.data.dir={data_dir}',
         *flags, '--config.checkpoint_every_steps=2',
         '--config.keep_checkpoints=10', '--config.eval_every_steps=0',
         '--config.image_summary_every_steps=0'],
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), env=env,
        stdout=log, stderr=subprocess.STDOUT)


def modification_times(folder: str) -> dict[str, float]:
  return {os.path.join(root, name): os.path.getmtime(os.path.join(root, name))
          for root, _, names in os.walk(folder) for name in names}


def assert_resume_matches(folder_a: str, folder_b: str, step: int, resumed_from: int) -> None:
  """The checkpoint ``step`` of an uninterrupted run (``folder_a``) and of a
  killed-and-resumed one (``folder_b``, resumed from step ``resumed_from``)
  hold equal states and iterators, and the resumed run moved the parameters
  after its resume (so the comparison is not of two copies of one file)."""
  state_a, data_a = load_step(folder_a, step)
  state_b, data_b = load_step(folder_b, step)
  assert data_a == data_b
  leaves_a = jax.tree_util.tree_flatten_with_path(state_a)[0]
  leaves_b = dict(jax.tree_util.tree_flatten_with_path(state_b)[0])
  assert len(leaves_a) == len(leaves_b) > 10
  for path, leaf in leaves_a:
    np.testing.assert_allclose(fixtures.host_array(leaves_b[path]), fixtures.host_array(leaf),
                               rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path))
  start_state, _ = load_step(folder_b, resumed_from)
  assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(start_state['params']),
                                                   jax.tree.leaves(state_b['params'])))


@pytest.fixture(scope='module')
def runs(tmp_path_factory, session_compilation_cache):
  tmp = tmp_path_factory.mktemp('resume')
  data_dir = fixtures.make_folder_dataset_tfrecords(tmp / 'data', num_train=6,
                                                    num_val=2, num_classes=4)
  cache = session_compilation_cache
  work_a, work_b = str(tmp / 'a'), str(tmp / 'b')
  logs = {name: str(tmp / f'{name}.log') for name in ('a', 'b1', 'b2', 'b3')}
  run_a = start(work_a, data_dir, cache, logs['a'])
  run_b = start(work_b, data_dir, cache, logs['b1'])
  wait_for(lambda: 2 in checkpoint_steps(work_b), run_b, 'checkpoint 2')
  run_b.send_signal(signal.SIGKILL)
  run_b.wait()
  killed_at = checkpoint_steps(work_b)
  assert killed_at[-1] < TOTAL_STEPS, 'run B finished before it was killed'

  run_b = start(work_b, data_dir, cache, logs['b2'])
  wait_for(lambda: 'resumed from' in open(logs['b2']).read(), run_b,
           'the resume message')
  run_b.send_signal(signal.SIGTERM)
  sigterm_status = run_b.wait(timeout=400)
  sigterm_log = open(logs['b2']).read()
  after_sigterm = checkpoint_steps(work_b)

  run_b = start(work_b, data_dir, cache, logs['b3'])
  assert run_b.wait(timeout=400) == 0, open(logs['b3']).read()[-3000:]
  assert run_a.wait(timeout=400) == 0, open(logs['a']).read()[-3000:]
  return dict(work_a=work_a, work_b=work_b, killed_at=killed_at,
              sigterm_status=sigterm_status, sigterm_log=sigterm_log,
              after_sigterm=after_sigterm)


def test_sigterm_saves_the_next_step_and_exits_143(runs):
  assert runs['sigterm_status'] == 143, runs['sigterm_log'][-3000:]
  resumed_from = runs['killed_at'][-1]
  saved = runs['after_sigterm'][-1]
  assert resumed_from < saved <= TOTAL_STEPS
  last_line = runs['sigterm_log'].strip().splitlines()[-1]
  assert last_line == (f'stopped by SIGTERM after saving step {saved}; rerun '
                       'the same command to resume')


def test_resumed_run_equals_uninterrupted_run(runs):
  state_a, data_a = load_step(runs['work_a'], TOTAL_STEPS)
  state_b, data_b = load_step(runs['work_b'], TOTAL_STEPS)
  assert data_a == data_b
  assert int(state_a['step']) == int(state_b['step']) == TOTAL_STEPS
  leaves_a = jax.tree_util.tree_flatten_with_path(state_a)[0]
  leaves_b = dict(jax.tree_util.tree_flatten_with_path(state_b)[0])
  assert len(leaves_a) == len(leaves_b) > 10
  for path, leaf in leaves_a:
    np.testing.assert_allclose(fixtures.host_array(leaves_b[path]),
                               fixtures.host_array(leaf),
                               rtol=1e-6, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))


def test_interrupted_run_differs_from_initial_state(runs):
  """Guards the comparison: training moved the parameters after the resume."""
  state_killed, _ = load_step(runs['work_b'], runs['killed_at'][-1])
  state_final, _ = load_step(runs['work_b'], TOTAL_STEPS)
  killed = jax.tree.leaves(state_killed['params'])
  final = jax.tree.leaves(state_final['params'])
  assert len(killed) == len(final) > 10
  assert not all(np.allclose(a, b) for a, b in zip(killed, final))
