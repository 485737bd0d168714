"""Prepares a config's dataset on first use (the demo and CamVid configs).

`config.data.prepare` names a converter and its arguments; when
`config.data.dir` has no `metadata.json` yet, the converter writes it there
(atomically, so a killed preparation is simply redone on the next run).
SIGTERM during the conversion stops it cleanly: the temporary folder is
removed and ``PreparationInterrupted`` is raised (main.py exits with 143).
"""

import os
import signal

import ml_collections

from data_prep import folder

_CONVERTERS = ('folder',)


class PreparationInterrupted(Exception):
  """SIGTERM arrived during the conversion; nothing was written."""


def _raise_interrupted(signum, frame):
  del signum, frame
  raise PreparationInterrupted()


def prepare_if_missing(prepare: ml_collections.ConfigDict,
                       data_dir: str) -> bool:
  """Converts the dataset described by `prepare` into `data_dir` if needed.

  Returns True when a conversion ran. Raises FileNotFoundError naming the
  folder when it is not prepared and `prepare.converter` is empty, and
  data_prep.common.ConversionError when the source data are bad.
  """
  if os.path.exists(os.path.join(data_dir, 'metadata.json')):
    return False
  if not prepare.converter:
    raise FileNotFoundError(
        f'{data_dir}: no prepared dataset (metadata.json) there; convert the '
        'data with data_prep first (see README) or set config.data.dir')
  if prepare.converter not in _CONVERTERS:
    raise ValueError(f'config.data.prepare.converter: unknown converter '
                     f'{prepare.converter!r}, expected one of {_CONVERTERS}')
  if not os.path.isdir(prepare.root):
    raise FileNotFoundError(
        f'{prepare.root}: source folder of config.data.prepare.root not found')
  if os.path.exists(data_dir):
    raise FileExistsError(
        f'{data_dir}: exists but has no metadata.json; remove it or choose '
        'another config.data.dir')
  parent = os.path.dirname(os.path.abspath(data_dir))
  os.makedirs(parent, exist_ok=True)
  try:
    # The exception unwinds through the converter, which removes its
    # temporary folder and shuts its workers down. Outside the main thread
    # (no signal handlers there) SIGTERM keeps its default action.
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
  except ValueError:
    previous = None
  try:
    folder.convert_folder(
        prepare.root, data_dir,
        void_values=(prepare.void_value,),
        sparse=prepare.sparse,
        seed=prepare.seed,
        train_dense=prepare.dense_train,
        downscale=prepare.downscale,
        num_workers=min(4, os.cpu_count() or 1),
        progress=True)
  except PreparationInterrupted:
    raise PreparationInterrupted(
        f'stopped by SIGTERM while preparing {data_dir}; nothing was written '
        'there; rerun the same command to prepare it') from None
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
  return True

