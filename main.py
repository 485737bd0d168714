r"""Command line of agmm_jax: train, evaluate or predict.

  python main.py --config=configs/voc_point.py --workdir=runs/voc_point \
      [--config.FIELD=VALUE ...]

``config.mode`` selects train (default; periodic evaluation, checkpoints,
TensorBoard events in WORKDIR; rerunning the command resumes), eval (IoU table
of the best or latest checkpoint) or predict (palette PNGs and overlays of a
folder of images).

Several processes (one per host): give every process the same
``--coordinator_address=HOST:PORT --num_processes=N`` and its own
``--process_id`` (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID), or pass ``--distributed`` to let JAX detect a cluster
(SLURM, Open MPI, Cloud TPU).

Exit status: 0 done; 1 bad input (an unknown ``--config.X`` or bad value,
missing or unprepared data, shapes that do not fit the data, a class list
other than the checkpoint's, batch size not divisible by the devices, NaN/inf
loss, a failed checkpoint write, a work directory in use by another training
run (its lock, agmm_jax/storage/lock.py) or holding checkpoints of a run with
other settings (agmm_jax/storage/run_identity.py): one ``error:`` line on
stderr saying what to do, the last good checkpoint kept; a failed data
conversion lists its bad files first); 143 stopped by SIGTERM after saving a checkpoint, or during data
preparation with nothing written (rerun to resume).
"""

import logging as py_logging
import os
import sys
from typing import Any, NoReturn

from absl import app
from absl import flags
from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
from ml_collections import config_flags
import numpy as np

from agmm_jax.runtime import compilation_cache
from agmm_jax import errors
from agmm_jax.evaluation import modes
from agmm_jax.storage import lock as lock_lib
from agmm_jax.storage import run_identity
from agmm_jax.train import loop
from agmm_jax.train import trainer
from configs import common as config_common
from data_prep import auto
from data_prep import common as data_prep_common

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, '
                               'events, config.json).', required=True)
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file (configs/*.py).', lock_config=True)
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', os.environ.get('JAX_COORDINATOR_ADDRESS', ''),
    'HOST:PORT of process 0 for multi-process runs.')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', int(os.environ.get('JAX_NUM_PROCESSES', '0') or 0),
    'Number of processes (with --coordinator_address).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', int(os.environ.get('JAX_PROCESS_ID', '-1') or -1),
    'This process (with --coordinator_address).')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'jax.distributed.initialize() with cluster '
    'auto-detection.')


def initialize_distributed() -> None:
  """Connects the processes of a multi-process run (no-op for one process)."""
  if _COORDINATOR.value:
    if _NUM_PROCESSES.value < 1 or _PROCESS_ID.value < 0:
      raise ValueError('--coordinator_address needs --num_processes and '
                       '--process_id (or JAX_NUM_PROCESSES / JAX_PROCESS_ID)')
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()


MODES = ('train', 'eval', 'predict')


def _on_process_0(check, what: str) -> Any:
  """``check()`` on process 0, its failure raised on every process (left at
  a barrier, the others would wait for the coordination timeout); returns
  its result on process 0, None elsewhere."""
  error, result = None, None
  if jax.process_index() == 0:
    try:
      result = check()
    except Exception as check_error:  # pylint: disable=broad-exception-caught
      error = check_error
  if jax.process_count() > 1:
    failed = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
    if failed and error is None:
      raise ValueError(f'{what} failed on process 0 (its log has the reason)')
  if error is not None:
    raise error
  return result


def resolve_data(config: ml_collections.ConfigDict,
                 workdir: str) -> ml_collections.ConfigDict:
  """A copy of ``config`` whose ``data.dir`` holds a prepared dataset.

  Paths come from ``data_prep.auto.resolved_paths`` (an empty ``data.dir``
  of a config that prepares its data is ``WORKDIR/data``; in eval mode,
  ``eval.data_dir``, converted into a cache when it is a raw folder dataset);
  process 0 converts what is missing, the others wait.
  """
  config = auto.resolved_paths(config, workdir)

  def prepare() -> None:
    os.makedirs(workdir, exist_ok=True)
    auto.prepare_missing(config)
  _on_process_0(prepare, 'data preparation of '
                f'config.data.dir={config.data.dir!r}')
  return config


def check_workdir(workdir: str) -> None:
  """One line for a ``--workdir`` that cannot be a work directory."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise FileExistsError(
        f'--workdir={workdir} is a file, not a folder: give a new folder (it '
        'is created) or the folder of an earlier run to resume it')


def claim_workdir(config: ml_collections.ConfigDict,
                  workdir: str) -> lock_lib.WorkdirLock | None:
  """The training run's lock of ``workdir`` (process 0; None elsewhere),
  taken before anything is written there, and the check that a resumed run
  keeps the checkpointed run's identity (``storage/run_identity.py``), made
  under the lock, before config.json is rewritten."""
  def claim() -> lock_lib.WorkdirLock:
    workdir_lock = lock_lib.WorkdirLock(workdir).acquire()
    try:
      run_identity.check_resumable(auto.resolved_paths(config, workdir),
                                   workdir)
    except BaseException:
      workdir_lock.release()
      raise
    return workdir_lock
  return _on_process_0(claim, f'locking --workdir={workdir}')


def run(config: ml_collections.ConfigDict, workdir: str) -> Any:
  """Dispatches on ``config.mode``: train | eval | predict.

  A training run holds ``workdir``'s lock until it returns (eval and predict
  only read checkpoints and take none). In train mode with
  ``config.predict.input_dir`` set (single process), the trained model then
  segments those images as in predict mode.
  """
  if config.mode not in MODES:
    raise ValueError(f'config.mode must be one of {MODES}, got {config.mode!r}')
  config_common.check_values(config)
  check_workdir(workdir)
  workdir_lock = (claim_workdir(config, workdir) if config.mode == 'train'
                  else None)
  try:
    return _run_mode(config, workdir)
  finally:
    if workdir_lock is not None:
      workdir_lock.release()


def _run_mode(config: ml_collections.ConfigDict, workdir: str) -> Any:
  """The body of ``run`` (checks passed, lock held in train mode)."""
  # Before anything compiles: a rerun or a resumed run loads the programs.
  cache_dir = compilation_cache.enable(config.compilation_cache_dir)
  logging.info('persistent compilation cache: %s', cache_dir or 'off')
  config = resolve_data(config, workdir)
  if config.mode == 'train':
    scores = trainer.train_and_evaluate(config, workdir)
    # A train config that names images to segment (the demo) ends with them.
    if config.predict.input_dir and jax.process_count() == 1:
      modes.predict(config, workdir)
    return scores
  if config.mode == 'eval':
    return modes.evaluate_checkpoint(config, workdir)
  return modes.predict(config, workdir)


class _QuietCheckpointInfo(py_logging.Filter):
  """Drops Orbax's INFO records (dozens per save); its warnings and errors
  still show, as one line each: the exception of a failed save reaches
  ``main`` and is reported there (its traceback would only repeat it)."""

  def filter(self, record) -> bool:
    if f'{os.sep}orbax{os.sep}' not in record.pathname:
      return True
    record.exc_info, record.exc_text = None, None
    return record.levelno >= py_logging.WARNING


def _exit_with(message: str) -> NoReturn:
  """Ends the run with one `error:` line on stderr and exit status 1."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(1)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing; a mistake (unknown ``--config.X``, bad value,
  config file that fails to load) is one ``error:`` line, exit status 1."""
  try:
    return flags.FLAGS(argv)
  except Exception as error:  # pylint: disable=broad-exception-caught
    # Any exception of a config file's get_config() surfaces here.
    _exit_with(errors.flag_error_line(error, argv))


def main(argv: list[str]) -> None:
  logging.get_absl_handler().addFilter(_QuietCheckpointInfo())
  if len(argv) > 1:
    _exit_with(f'unexpected arguments: {" ".join(argv[1:])} (flags are '
               '--name=value)')
  if _CONFIG.value is None:
    _exit_with('--config=configs/NAME.py is required')
  try:
    # config_flags defers a load error (a missing file) to the first use of
    # the config; the copy is that first use.
    config = _CONFIG.value.copy_and_resolve_references()
  except Exception as error:  # pylint: disable=broad-exception-caught
    _exit_with(errors.flag_error_line(error, sys.argv))
  try:
    initialize_distributed()
    logging.info('process %d of %d, %d devices', jax.process_index(),
                 jax.process_count(), jax.device_count())
    run(config, _WORKDIR.value)
  except (loop.Preempted, auto.PreparationInterrupted) as preempted:
    print(str(preempted), file=sys.stderr)
    sys.exit(loop.EXIT_PREEMPTED)
  except (ValueError, OSError, loop.NonFiniteError) as error:
    _exit_with(str(error))
  except data_prep_common.ConversionError as error:
    # The offending files, one per line, then one summary line (last, where
    # the eye lands) saying what to do.
    for problem in error.problems:
      print(problem, file=sys.stderr)
    hints = [error.hint] if error.hint else []
    if error.skippable:
      hints.append('--config.data.prepare.skip_bad=True leaves the bad '
                   'examples out and lists them')
    _exit_with(f'data preparation failed: {len(error.problems)} problem(s) '
               f'above, nothing written{"".join("; " + h for h in hints)}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
