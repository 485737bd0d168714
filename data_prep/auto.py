"""Prepares a config's datasets on first use: training data and eval data.

* Training data: `config.data.prepare` names a converter and its arguments;
  when `config.data.dir` (default `WORKDIR/data`) has no `metadata.json` yet,
  the converter writes it there (atomically, so a killed preparation is
  simply redone on the next run).
* Eval data (`config.eval.data_dir`, eval mode): a prepared dataset is used as
  it is; a raw folder dataset (the layout `data_prep.folder` reads) is
  converted, with the converter's checks, into a cache under
  `WORKDIR/eval_data/` keyed by the folder's contents, so a changed folder is
  converted again and an unchanged one never.

`resolved_paths` computes every path (no writes, the same on every process);
`prepare_missing` converts what is missing (process 0). SIGTERM during a
conversion (training or eval data) stops it cleanly: the temporary folder is
removed and ``PreparationInterrupted`` is raised (main.py exits with 143).
"""

import hashlib
import os
import signal

from absl import logging
import ml_collections

from data_prep import common
from data_prep import folder

_CONVERTERS = ('folder',)
DEFAULT_DATA_SUBDIR = 'data'
EVAL_CACHE_SUBDIR = 'eval_data'


def _has_metadata(path: str) -> bool:
  return os.path.isfile(os.path.join(path, common.METADATA_FILE))


def convert_command(root: str, prepare: ml_collections.ConfigDict,
                    output: str) -> str:
  """The `data_prep.folder` command line that prepares `root` for a config."""
  sparse = f' --sparse={prepare.sparse}' if prepare.sparse else (
      ' --sparse=clicks:20')
  return (f'python -m data_prep.folder --root={root} '
          f'--void_value={prepare.void_value}{sparse} --output={output}')


def check_not_raw(data_dir: str, field: str,
                  prepare: ml_collections.ConfigDict) -> None:
  """Raises a one-line FileNotFoundError when `data_dir` (the value of
  `field`) is a raw folder dataset instead of a prepared one, saying how to
  convert it."""
  if (os.path.isdir(data_dir) and not _has_metadata(data_dir)
      and folder.is_folder_dataset(data_dir)):
    output = os.path.normpath(data_dir) + '_prepared'
    raise FileNotFoundError(
        f'{field}={data_dir!r} is a raw folder dataset (classes.txt, images/, '
        f'labels/), not a prepared one: convert it with '
        f'`{convert_command(data_dir, prepare, output)}` and pass '
        f'--{field}={output}')


def _train_data_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """`config.data.dir`, or `WORKDIR/data` when empty and the config prepares
  its own data."""
  if config.data.dir or not config.data.prepare.converter:
    return config.data.dir
  return os.path.join(os.path.abspath(workdir), DEFAULT_DATA_SUBDIR)


def _folder_fingerprint(root: str, split: str,
                        void_values: tuple[int, ...]) -> str:
  """SHA-1 of the folder's files (relative path, size, mtime), the split and
  the void values: any change to the source gives another cache."""
  digest = hashlib.sha1(repr((split, void_values)).encode())
  for directory, subdirs, files in os.walk(root):
    subdirs.sort()
    for name in sorted(files):
      path = os.path.join(directory, name)
      stat = os.stat(path)
      digest.update(repr((os.path.relpath(path, root), stat.st_size,
                          stat.st_mtime_ns)).encode())
  return digest.hexdigest()[:12]


def eval_split(config: ml_collections.ConfigDict) -> str:
  """The split eval mode evaluates: `config.eval.split`, else the config's
  `data.eval_split`."""
  return config.eval.split or config.data.eval_split


def _eval_cache_dir(source: str, workdir: str, split: str,
                    void_values: tuple[int, ...]) -> str:
  name = os.path.basename(os.path.normpath(os.path.abspath(source)))
  fingerprint = _folder_fingerprint(source, split, void_values)
  return os.path.join(os.path.abspath(workdir), EVAL_CACHE_SUBDIR,
                      f'{name}-{split}-{fingerprint}')


def resolved_paths(config: ml_collections.ConfigDict,
                   workdir: str) -> ml_collections.ConfigDict:
  """A copy of `config` with its data paths resolved (nothing is written).

  `data.dir` becomes `WORKDIR/data` when empty and the config prepares its
  data. In eval mode with `eval.data_dir`, `data.dir` becomes that dataset
  (or its conversion cache when it is a raw folder dataset) and
  `data.eval_split` becomes `eval_split(config)`; the training data's folder
  is kept as `eval.train_data_dir` (the checkpoint's class list of older runs
  is read from it).
  """
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.dir = _train_data_dir(config, workdir)
    if config.mode != 'eval' or not config.eval.data_dir:
      return config
    source = config.eval.data_dir
    if not os.path.isdir(source):
      raise FileNotFoundError(
          f'config.eval.data_dir={source!r}: no such directory (give a '
          'prepared dataset or a folder dataset: classes.txt, images/, '
          'labels/)')
    split = eval_split(config)
    config.eval.train_data_dir = config.data.dir
    config.data.eval_split = split
    if _has_metadata(source):
      config.data.dir = source
    elif folder.is_folder_dataset(source):
      config.data.dir = _eval_cache_dir(
          source, workdir, split, (int(config.data.prepare.void_value),))
    else:
      raise FileNotFoundError(
          f'config.eval.data_dir={source!r}: neither a prepared dataset '
          '(metadata.json) nor a folder dataset (classes.txt with images/ and '
          'labels/ at the root or in split folders)')
  return config


def prepare_missing(config: ml_collections.ConfigDict) -> bool:
  """Converts whatever `resolved_paths(config)` names and is missing.

  Returns True when a conversion ran. Predict mode converts nothing (it reads
  the checkpoint's class list, and the data only where they are). Raises
  FileNotFoundError / ValueError (one line) for bad paths and
  data_prep.common.ConversionError for bad source data.
  """
  if config.mode == 'predict':
    return False
  if config.mode == 'eval' and config.eval.data_dir:
    return _prepare_eval_data(config)
  return prepare_if_missing(config.data.prepare, config.data.dir)


class PreparationInterrupted(Exception):
  """SIGTERM arrived during the conversion; nothing was written."""


def _raise_interrupted(signum, frame):
  del signum, frame
  raise PreparationInterrupted()


def _convert_folder(source: str, output: str, **options) -> None:
  """`folder.convert_folder(source, output, **options)` on up to 4 workers,
  stopped cleanly by SIGTERM: the exception unwinds through the converter,
  which removes its temporary folder and shuts its workers down, and
  `PreparationInterrupted` names `output`. Outside the main thread (no signal
  handlers there) SIGTERM keeps its default action."""
  try:
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
  except ValueError:
    previous = None
  try:
    folder.convert_folder(source, output,
                          num_workers=min(4, os.cpu_count() or 1),
                          progress=True, **options)
  except PreparationInterrupted:
    raise PreparationInterrupted(
        f'stopped by SIGTERM while preparing {output}; nothing was written '
        'there; rerun the same command to prepare it') from None
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)


def _prepare_eval_data(config: ml_collections.ConfigDict) -> bool:
  """Converts the raw folder `config.eval.data_dir` into its cache."""
  if _has_metadata(config.data.dir):
    return False
  split = config.data.eval_split
  void_value = int(config.data.prepare.void_value)
  logging.info('converting the folder dataset %s (split %s, void value %d) '
               'into %s', config.eval.data_dir, split, void_value,
               config.data.dir)
  try:
    _convert_folder(
        config.eval.data_dir, config.data.dir, splits=(split,),
        sparse_splits=(), void_values=(void_value,),
        skip_bad=bool(config.data.prepare.skip_bad))
  except common.ConversionError as error:
    if any(common.BAD_LABEL_VALUES in problem for problem in error.problems):
      error.hint = (f'the raw labels\' void value is '
                    f'config.data.prepare.void_value={void_value}: override '
                    'it if the folder uses another')
    raise
  return True


def prepare_if_missing(prepare: ml_collections.ConfigDict,
                       data_dir: str) -> bool:
  """Converts the dataset described by `prepare` into `data_dir` if needed.

  Returns True when a conversion ran; says so in one log line first, naming
  the folder it creates and the source. Raises FileNotFoundError naming the
  folder when it is not prepared and `prepare.converter` is empty, or when
  it is a raw folder dataset (saying how to convert it), or when it is an
  absolute path whose parent does not exist (the parents of a relative one,
  a config's default under data/, are created), and
  data_prep.common.ConversionError when the source data are bad.
  """
  check_not_raw(data_dir, 'config.data.dir', prepare)
  if _has_metadata(data_dir):
    return False
  if not prepare.converter:
    if not data_dir:
      raise FileNotFoundError(
          'config.data.dir is empty: set --config.data.dir to a prepared '
          'dataset (data_prep, see README)')
    raise FileNotFoundError(
        f'config.data.dir={data_dir!r}: no prepared dataset (metadata.json) '
        'there; convert the data with data_prep first (see README)')
  if prepare.converter not in _CONVERTERS:
    raise ValueError(f'config.data.prepare.converter: unknown converter '
                     f'{prepare.converter!r}, expected one of {_CONVERTERS}')
  if not os.path.isdir(prepare.root):
    raise FileNotFoundError(
        f'config.data.prepare.root={prepare.root!r}: source folder not found '
        f'(relative to {os.getcwd()}; run from the repository root)')
  # A relative data.dir is a config's own default (`data/NAME` under the
  # repository's git-ignored data/), so its missing parents are made: a fresh
  # clone has no data/. An absolute one is typed by a user, where a missing
  # parent is more likely a typo (a wrong mount) than a wish for a new tree.
  make_parents = not os.path.isabs(data_dir)
  data_dir = os.path.abspath(data_dir)
  if os.path.isdir(data_dir) and not os.listdir(data_dir):
    os.rmdir(data_dir)  # An empty folder is filled like a new one.
  if os.path.isfile(data_dir):
    raise FileExistsError(
        f'config.data.dir={data_dir!r} is a file: point it at a prepared '
        'dataset or a new folder (or leave it empty for WORKDIR/data)')
  if os.path.exists(data_dir):
    raise FileExistsError(
        f'config.data.dir={data_dir!r} holds files but no metadata.json, so '
        'it is not a prepared dataset; config.data.dir is where the prepared '
        'data go: to train on a raw folder of images and labels, pass it as '
        '--config.data.prepare.root (and leave config.data.dir empty for '
        'WORKDIR/data), or convert it first with '
        f'`{convert_command(data_dir, prepare, data_dir + "_prepared")}`')
  parent = os.path.dirname(data_dir)
  if make_parents:
    os.makedirs(parent, exist_ok=True)
  if not os.path.isdir(parent):
    raise FileNotFoundError(
        f'config.data.dir={data_dir!r}: its parent {parent} does not exist; '
        'create it first or leave config.data.dir empty for WORKDIR/data')
  logging.info('config.data.dir=%s does not exist: creating it with the %s '
               'converter from %s (sparse %r, seed %d)', data_dir,
               prepare.converter, os.path.abspath(prepare.root),
               prepare.sparse, prepare.seed)
  _convert_folder(
      prepare.root, data_dir,
      void_values=(prepare.void_value,),
      sparse=prepare.sparse,
      seed=prepare.seed,
      train_dense=prepare.dense_train,
      downscale=prepare.downscale,
      skip_bad=bool(prepare.skip_bad))
  return True
