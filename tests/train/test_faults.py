"""Faults injected into real runs: nothing is lost, whatever happens (CPU).

One command (``configs/tiny.py``, 8 steps, a checkpoint every 2 steps, an
evaluation every 3 and at the end, data prepared on first use from a raw
folder into WORKDIR/data) is run uninterrupted in one work directory (the
reference) and, in another, as a chain of runs each stopped by one fault
(``tests/fault_runner.py`` injects it at a deterministic point):

1. SIGTERM during data preparation: exit 143, one line, nothing written, the
   converter's workers gone;
2. SIGKILL during data preparation: no dataset, no workers left behind;
3. SIGKILL during the save of checkpoint 2: the step is not finalized (its
   temporary folder remains, and is removed by the next run);
4. SIGTERM during the evaluation of step 3: step 3 is saved, exit 143;
5. SIGKILL between steps (after step 5);
6. SIGKILL during the evaluation of step 6;
7. ENOSPC from the checkpoint writer while saving step 8: exit 1, one line
   naming the last complete step (6), which is intact;
8. checkpoint 6 truncated and checkpoint 4 missing a file: the rerun warns
   once per step, sets them aside and resumes from step 3, and finishes.

Every checkpoint the chain made (each written by a rerun) must equal the
reference's at the same step, bit for bit: parameters, BatchNorm statistics,
optimizer state, step, RNG and data-iterator position; and so must the best
checkpoint. The subprocesses share the session's persistent compilation
cache (``session_compilation_cache``).
"""

import hashlib
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
NUM_CLASSES = 4
TOTAL_STEPS = 8
# Chain order: (name, FAULT of fault_runner.py).
CHAIN = (('prep_term', 'prep_term'), ('prep_kill', 'prep_kill'),
         ('save_kill', 'save_kill:2'), ('eval_term', 'eval_term:3'),
         ('step_kill', 'step_kill:5'), ('eval_kill', 'eval_kill:6'),
         ('save_enospc', 'save_enospc:8'))


def command(workdir: str, source_root: str) -> list[str]:
  return [sys.executable, os.path.join('tests', 'fault_runner.py'),
          '--config=configs/tiny.py', f'--workdir={workdir}',
          '--config.data.prepare.converter=folder',
          f'--config.data.prepare.root={source_root}',
          '--config.data.prepare.sparse=points:1',
          '--config.data.prepare.downscale=1',
          f'--config.data.prepare.void_value={NUM_CLASSES}',
          f'--config.num_train_steps={TOTAL_STEPS}',
          '--config.checkpoint_every_steps=2', '--config.keep_checkpoints=10',
          '--config.eval_every_steps=3', '--config.image_summary_every_steps=0']


def start(workdir: str, source_root: str, cache_dir: str, log_path: str,
          fault: str = '', workers_file: str = '') -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS='cpu', FAULT=fault,
             FAULT_WORKERS_FILE=workers_file,
             JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  env.pop('XLA_FLAGS', None)
  with open(log_path, 'w') as log:
    return subprocess.Popen(command(workdir, source_root), cwd=REPO_ROOT,
                            env=env, stdout=log, stderr=subprocess.STDOUT)


def listing(path: str) -> list[str]:
  return sorted(os.listdir(path)) if os.path.isdir(path) else []


def lines_around(log: str, needle: str, context: int = 40) -> str:
  """The log's lines from ``context`` before to ``context`` after the first
  line containing ``needle`` (the log's last ``context`` lines when none
  does), so that a failure shows the traceback, not the log's first
  kilobytes."""
  lines = log.splitlines()
  hit = next((i for i, line in enumerate(lines) if needle in line),
             len(lines))
  return '\n'.join(lines[max(0, hit - context):hit + context])


def running(pid: int) -> bool:
  """True while ``pid`` exists and is not a zombie."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except FileNotFoundError:
    return False


def workers_still_running(workers_file: str, timeout: float = 15) -> list[int]:
  """The converter's worker ids still running after ``timeout`` seconds."""
  with open(workers_file) as f:
    pids = [int(p) for p in f.read().split()]
  assert pids, 'the fault struck before any worker started'
  deadline = time.monotonic() + timeout
  while any(running(p) for p in pids) and time.monotonic() < deadline:
    time.sleep(0.1)
  return [p for p in pids if running(p)]


def state_digest(checkpoint_dir: str, step: int) -> tuple[str, dict]:
  """SHA-256 of every leaf of ``checkpoint_dir/step/state`` (in path order,
  with its dtype and shape) and the iterator state of that step."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.join(checkpoint_dir, str(step))
  state = ocp.StandardCheckpointer().restore(os.path.join(path, 'state'))
  digest = hashlib.sha256()
  for key, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    array = np.ascontiguousarray(fixtures.host_array(leaf))
    digest.update(f'{jax.tree_util.keystr(key)}{array.dtype}{array.shape}'
                  .encode())
    digest.update(array.tobytes())
  data_file = os.path.join(path, 'data', 'process_0-of-1.json')
  data_state = None
  if os.path.exists(data_file):
    with open(data_file) as f:
      data_state = json.load(f)
  return digest.hexdigest(), data_state


@pytest.fixture(scope='module')
def runs(tmp_path_factory, session_compilation_cache):
  tmp = tmp_path_factory.mktemp('faults')
  source_root, _ = fixtures.make_folder_root(
      tmp, num_classes=NUM_CLASSES, split_sizes={'train': 6, 'val': 3},
      name='raw')
  cache = session_compilation_cache
  reference, chain = str(tmp / 'reference'), str(tmp / 'chain')
  reference_run = start(reference, source_root, cache,
                        str(tmp / 'reference.log'))
  outcomes = {}
  for name, fault in CHAIN:
    workers_file = str(tmp / f'{name}.workers')
    log_path = str(tmp / f'{name}.log')
    status = start(chain, source_root, cache, log_path, fault,
                   workers_file).wait(timeout=600)
    with open(log_path) as f:
      log = f.read()
    outcomes[name] = dict(
        status=status, log=log, last_line=log.strip().splitlines()[-1],
        workdir=listing(chain),
        checkpoints=listing(os.path.join(chain, 'checkpoints')),
        workers_left=(workers_still_running(workers_file)
                      if name.startswith('prep') else []))

  chain_checkpoints = os.path.join(chain, 'checkpoints')
  # Digests of the steps the reruns wrote, before two of them are damaged.
  digests = {step: state_digest(chain_checkpoints, step)
             for step in (2, 4, 6)}
  fixtures.truncate_largest_file(
      os.path.join(chain_checkpoints, '6', 'state'))
  os.remove(os.path.join(chain_checkpoints, '4', 'data', 'process_0-of-1.json'))
  log_path = str(tmp / 'final.log')
  status = start(chain, source_root, cache, log_path).wait(timeout=600)
  with open(log_path) as f:
    outcomes['final'] = dict(status=status, log=f.read(),
                             checkpoints=listing(chain_checkpoints),
                             unreadable=listing(os.path.join(
                                 chain, 'checkpoints_unreadable')))
  digests[TOTAL_STEPS] = state_digest(chain_checkpoints, TOTAL_STEPS)
  for step in (4, 6):  # Saved afresh by the final run.
    digests[f'{step} again'] = state_digest(chain_checkpoints, step)

  assert reference_run.wait(timeout=600) == 0, open(
      tmp / 'reference.log').read()[-3000:]
  reference_checkpoints = os.path.join(reference, 'checkpoints')
  reference_best = listing(os.path.join(reference, 'checkpoints_best'))
  chain_best = listing(os.path.join(chain, 'checkpoints_best'))
  return dict(
      outcomes=outcomes, digests=digests,
      reference_digests={step: state_digest(reference_checkpoints, step)
                         for step in (2, 4, 6, TOTAL_STEPS)},
      reference_best=reference_best, chain_best=chain_best,
      best_digests=(
          state_digest(os.path.join(reference, 'checkpoints_best'),
                       int(reference_best[0]))[0],
          state_digest(os.path.join(chain, 'checkpoints_best'),
                       int(chain_best[0]))[0]) if chain_best else None)


def test_sigterm_during_data_preparation_writes_nothing(runs):
  outcome = runs['outcomes']['prep_term']
  assert outcome['status'] == 143, outcome['log'][-3000:]
  assert outcome['last_line'].startswith('stopped by SIGTERM while preparing ')
  assert outcome['last_line'].endswith('/data; nothing was written there; '
                                       'rerun the same command to prepare it')
  assert 'Traceback' not in outcome['log'], lines_around(
      outcome['log'], 'Traceback')
  # No dataset, no temporary folder: only the run's lock file.
  assert outcome['workdir'] == ['.lock']
  assert outcome['workers_left'] == []


def test_kill_during_data_preparation_leaves_no_dataset_nor_workers(runs):
  outcome = runs['outcomes']['prep_kill']
  assert outcome['status'] == -signal.SIGKILL, outcome['log'][-3000:]
  assert 'data' not in outcome['workdir']
  assert outcome['workers_left'] == []


def test_kill_during_checkpoint_save_leaves_the_step_unfinished(runs):
  outcome = runs['outcomes']['save_kill']
  assert outcome['status'] == -signal.SIGKILL, outcome['log'][-3000:]
  assert outcome['checkpoints'] == ['2.orbax-checkpoint-tmp']
  # The next run removed the unfinished folder and saved step 2 afresh.
  assert runs['outcomes']['eval_term']['checkpoints'] == ['2', '3']


def test_sigterm_during_evaluation_saves_that_step(runs):
  outcome = runs['outcomes']['eval_term']
  assert outcome['status'] == 143, outcome['log'][-3000:]
  assert outcome['last_line'] == ('stopped by SIGTERM after saving step 3; '
                                  'rerun the same command to resume')


def test_kills_between_steps_and_during_evaluation_lose_no_checkpoint(runs):
  for name in ('step_kill', 'eval_kill'):
    outcome = runs['outcomes'][name]
    assert outcome['status'] == -signal.SIGKILL, outcome['log'][-3000:]
    assert outcome['checkpoints'] == ['2', '3', '4'], name


def test_failed_write_stops_with_one_line_and_keeps_the_last_step(runs):
  outcome = runs['outcomes']['save_enospc']
  assert outcome['status'] == 1, outcome['log'][-3000:]
  assert outcome['last_line'].startswith('error: writing a checkpoint in ')
  assert 'No space left on device' in outcome['last_line']
  assert 'the last complete checkpoint, step 6, is intact' in outcome[
      'last_line']
  assert 'Traceback' not in outcome['log'], lines_around(
      outcome['log'], 'Traceback')
  assert outcome['checkpoints'] == ['2', '3', '4', '6',
                                    '8.orbax-checkpoint-tmp']


def test_unreadable_checkpoints_are_set_aside_with_one_line_each(runs):
  outcome = runs['outcomes']['final']
  assert outcome['status'] == 0, outcome['log'][-3000:]
  warnings = [line for line in outcome['log'].splitlines()
              if 'is unreadable' in line]
  assert len(warnings) == 2, outcome['log'][-3000:]
  assert 'checkpoint 6 is unreadable' in warnings[0]
  assert 'checkpoint 4 is unreadable' in warnings[1]
  assert all(w.endswith('resuming from step 3') for w in warnings)
  # No "Event loop is closed" tracebacks of the failed restores.
  assert 'Traceback' not in outcome['log'], lines_around(
      outcome['log'], 'Traceback')
  assert outcome['unreadable'] == ['4', '6']
  assert outcome['checkpoints'] == ['2', '3', '4', '6', '8']


@pytest.mark.parametrize('step', [2, 4, 6, '4 again', '6 again', TOTAL_STEPS])
def test_checkpoint_equals_the_uninterrupted_run(runs, step):
  reference_step = int(str(step).split()[0])
  state, data = runs['digests'][step]
  reference_state, reference_data = runs['reference_digests'][reference_step]
  assert data is not None and data == reference_data
  assert state == reference_state


def test_best_checkpoint_equals_the_uninterrupted_run(runs):
  assert runs['chain_best'] == runs['reference_best']
  reference, chain = runs['best_digests']
  assert chain == reference


def test_training_moved_the_state(runs):
  """Guards the comparisons: the steps compared differ from one another."""
  digests = [runs['reference_digests'][s][0] for s in (2, 4, 6, TOTAL_STEPS)]
  assert len(set(digests)) == 4
