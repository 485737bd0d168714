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
divisible by the devices, NaN/inf loss: one line on stderr, the last good
checkpoint kept); 143 stopped by SIGTERM after saving a checkpoint (rerun to
resume). An unknown ``--config.X`` is a flags error (status 1).
"""

import logging as py_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from agmm_jax import train
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


class _QuietCheckpointInfo(py_logging.Filter):
  """Drops Orbax's INFO records (dozens per save); its warnings still show."""

  def filter(self, record) -> bool:
    return (record.levelno >= py_logging.WARNING
            or f'{os.sep}orbax{os.sep}' not in record.pathname)


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
    train.run(_CONFIG.value, _WORKDIR.value)
  except train.Preempted as preempted:
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
