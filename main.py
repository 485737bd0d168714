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

Exit status: 0 done; 1 bad input (missing data, unknown mode, batch size not
divisible by the devices, NaN/inf loss, a failed checkpoint write: one line on
stderr, the last good checkpoint kept); 143 stopped by SIGTERM after saving a
checkpoint, or during data preparation with nothing written (rerun to resume).
An unknown ``--config.X`` is a flags error (status 1).
"""

import logging as py_logging
import os
import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
from ml_collections import config_flags
import numpy as np

from agmm_jax import inference
from agmm_jax import train
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


def resolve_data_dir(config: ml_collections.ConfigDict,
                     workdir: str) -> ml_collections.ConfigDict:
  """A copy of ``config`` whose ``data.dir`` holds a prepared dataset.

  With ``config.data.prepare.converter`` set, the dataset is converted on
  first use (``data_prep.auto``; process 0 converts, the others wait) into
  ``data.dir``, or ``WORKDIR/data`` when ``data.dir`` is empty.
  """
  config = config.copy_and_resolve_references()
  prepare = config.data.get('prepare')
  if prepare is None or not prepare.get('converter'):
    return config
  data_dir = config.data.dir or os.path.join(os.path.abspath(workdir), 'data')
  error = None
  if jax.process_index() == 0:
    try:
      auto.prepare_if_missing(prepare, data_dir)
    except Exception as prepare_error:  # pylint: disable=broad-exception-caught
      # Raised below, once the other processes know: left at a barrier they
      # would wait for the coordination timeout.
      error = prepare_error
  if jax.process_count() > 1:
    failed = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
    if failed and error is None:
      raise ValueError(f'data preparation of config.data.dir={data_dir!r} failed '
                       'on process 0 (its log has the reason)')
  if error is not None:
    raise error
  with config.unlocked():
    config.data.dir = data_dir
  return config


def run(config: ml_collections.ConfigDict, workdir: str) -> Any:
  """Dispatches on ``config.mode``: train | eval | predict.

  In train mode with ``config.predict.input_dir`` set (single process), the
  trained model then segments those images as in predict mode.
  """
  if config.mode not in MODES:
    raise ValueError(f'config.mode must be one of {MODES}, got {config.mode!r}')
  config = resolve_data_dir(config, workdir)
  if config.mode == 'train':
    scores = train.train_and_evaluate(config, workdir)
    # A train config that names images to segment (the demo) ends with them.
    if config.predict.input_dir and jax.process_count() == 1:
      inference.predict(config, workdir)
    return scores
  if config.mode == 'eval':
    return inference.evaluate_checkpoint(config, workdir)
  return inference.predict(config, workdir)


class _QuietCheckpointInfo(py_logging.Filter):
  """Drops Orbax's INFO records (dozens per save); its warnings and errors
  still show, as one line each: the exception of a failed save reaches
  ``main`` and is reported there (its traceback would only repeat it)."""

  def filter(self, record) -> bool:
    if f'{os.sep}orbax{os.sep}' not in record.pathname:
      return True
    record.exc_info, record.exc_text = None, None
    return record.levelno >= py_logging.WARNING


def main(argv: list[str]) -> None:
  logging.get_absl_handler().addFilter(_QuietCheckpointInfo())
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if _CONFIG.value is None:
    raise app.UsageError('--config=configs/NAME.py is required')
  try:
    initialize_distributed()
    logging.info('process %d of %d, %d devices', jax.process_index(),
                 jax.process_count(), jax.device_count())
    run(_CONFIG.value, _WORKDIR.value)
  except (train.Preempted, auto.PreparationInterrupted) as preempted:
    print(str(preempted), file=sys.stderr)
    sys.exit(train.EXIT_PREEMPTED)
  except (ValueError, OSError, train.NonFiniteError) as error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(1)
  except data_prep_common.ConversionError as error:
    # One summary line; the offending files follow, one per line.
    print(f'error: data preparation failed: {error}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
