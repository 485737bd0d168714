r"""Runs ``main.py`` with one injected fault (tests/train/test_faults.py's driver).

  FAULT=KIND[:STEP] python tests/fault_runner.py [main.py flags ...]

The library has no test hooks: this script wraps library functions before
``main.py`` starts, so a fault lands at a deterministic point of the run
rather than after a sleep. KIND is one of:

* ``prep_kill`` / ``prep_term``: SIGKILL / SIGTERM to this process during data
  preparation, once the train split is written into the converter's temporary
  folder (by its worker pool, started at once) and before the val split is;
  the converter's worker process ids are written to the file
  ``$FAULT_WORKERS_FILE`` first.
* ``step_kill:STEP``: SIGKILL between steps, right after train step STEP.
* ``eval_kill:STEP`` / ``eval_term:STEP``: SIGKILL / SIGTERM during the
  evaluation of step STEP, after its first batch.

  Before these kills and ``eval_term``, the fault waits until no checkpoint
  save is in flight, so the outcome does not depend on the machine's load.
* ``save_kill:STEP``: SIGKILL during the checkpoint save of step STEP, once
  Orbax's temporary folder of that step exists (the write is in flight; the
  test checks that the step was not finalized).
* ``save_enospc:STEP``: the checkpoint writer fails with ENOSPC (no space left
  on device) while saving step STEP.

Without FAULT the run is plain ``main.py``.
"""

import errno
import os
import runpy
import signal
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _signal_self(signum: int) -> None:
  os.kill(os.getpid(), signum)
  # SIGTERM runs the Python handler at the next bytecode; SIGKILL never
  # returns.


def _wait_for_saves_in_flight() -> None:
  """Returns once no asynchronous checkpoint save of this run is unfinished.

  A kill between steps or during an evaluation then finds nothing being
  written, whatever the machine's load (a kill during a save is its own
  fault, ``save_kill``).
  """
  workdir = next(a.split('=', 1)[1] for a in sys.argv
                 if a.startswith('--workdir='))
  folders = [os.path.join(workdir, name)
             for name in ('checkpoints', 'checkpoints_best')]
  while any('.orbax-checkpoint-tmp' in name for folder in folders
            for name in os.listdir(folder)):
    time.sleep(0.01)


def _install(kind: str, step: int) -> None:
  """Wraps the library function where ``kind`` strikes."""
  # pylint: disable=g-import-not-at-top
  import grain
  from agmm_jax.storage import checkpoint as checkpoint_lib
  from agmm_jax.evaluation import evaluator
  from agmm_jax.train import steps
  from agmm_jax.train import state as train_state_lib
  from data_prep import common as data_prep_common

  if kind in ('prep_kill', 'prep_term'):
    convert_split = data_prep_common._convert_split  # pylint: disable=protected-access

    def faulty_convert_split(directory, split, *args, pool, **kwargs):
      if split != 'train':
        # The converter's worker processes, for the test to check they end.
        with open(os.environ['FAULT_WORKERS_FILE'], 'w') as f:
          f.write(' '.join(str(p) for p in getattr(pool.executor, '_processes', {})))
        _signal_self(signal.SIGKILL if kind == 'prep_kill' else signal.SIGTERM)
      return convert_split(directory, split, *args, pool=pool, **kwargs)
    data_prep_common._convert_split = faulty_convert_split  # pylint: disable=protected-access
    # The tiny dataset converts faster than workers start: start them anyway,
    # so that the fault finds workers to leave behind.
    data_prep_common._pool_pays_off = lambda *args: True  # pylint: disable=protected-access

  elif kind == 'step_kill':
    make_train_step = steps.make_train_step

    def faulty_make_train_step(*args, **kwargs):
      train_step = make_train_step(*args, **kwargs)

      def faulty_train_step(state, batch):
        state, metrics = train_step(state, batch)
        if int(train_state_lib.host(state['step'])) == step:
          _wait_for_saves_in_flight()
          _signal_self(signal.SIGKILL)
        return state, metrics
      return faulty_train_step
    steps.make_train_step = faulty_make_train_step

  elif kind in ('eval_kill', 'eval_term'):
    evaluate_dataset = evaluator.evaluate_dataset

    def faulty_evaluate_dataset(eval_fn, state, *args, **kwargs):
      if int(train_state_lib.host(state['step'])) != step:
        return evaluate_dataset(eval_fn, state, *args, **kwargs)
      signals = [signal.SIGKILL if kind == 'eval_kill' else signal.SIGTERM]

      def faulty_eval_fn(*eval_args, **eval_kwargs):
        result = eval_fn(*eval_args, **eval_kwargs)
        if signals:
          _wait_for_saves_in_flight()
          _signal_self(signals.pop())
        return result
      return evaluate_dataset(faulty_eval_fn, state, *args, **kwargs)
    evaluator.evaluate_dataset = faulty_evaluate_dataset

  elif kind == 'save_kill':
    save = checkpoint_lib.Checkpointer.save

    def faulty_save(self, at_step, *args, **kwargs):
      saved = save(self, at_step, *args, **kwargs)
      if at_step == step:
        directory = str(self._latest.directory)  # pylint: disable=protected-access
        # Orbax may create the temporary folder in its save thread.
        while not any(n.startswith(f'{step}.orbax-checkpoint-tmp') or
                      n == str(step) for n in os.listdir(directory)):
          time.sleep(0.001)
        _signal_self(signal.SIGKILL)
      return saved
    checkpoint_lib.Checkpointer.save = faulty_save

  elif kind == 'save_enospc':
    handler_save = grain.checkpoint.CheckpointHandler.save

    def faulty_handler_save(self, directory, *args, **kwargs):
      if os.path.basename(os.path.dirname(str(directory))).startswith(
          f'{step}.orbax-checkpoint-tmp'):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC),
                      str(directory))
      return handler_save(self, directory, *args, **kwargs)
    grain.checkpoint.CheckpointHandler.save = faulty_handler_save

  else:
    raise ValueError(f'FAULT: unknown kind {kind!r}')


def main() -> None:
  sys.path.insert(0, REPO_ROOT)
  fault = os.environ.get('FAULT', '')
  if fault:
    kind, _, step = fault.partition(':')
    _install(kind, int(step or 0))
  sys.argv = [os.path.join(REPO_ROOT, 'main.py')] + sys.argv[1:]
  runpy.run_path(sys.argv[0], run_name='__main__')


if __name__ == '__main__':
  main()
