"""The workdir's records beside the checkpoints: ``config.json`` (every config
the run was started with), ``classes.json`` (the classes its checkpoints
were trained on), ``environment.json`` (where each start executed: backend,
devices, host cores, XLA_FLAGS, jax), and which stage's checkpoint folder
holds a checkpoint (eval and predict restore the last stage's that does).

A damaged ``classes.json`` or ``config.json`` is a one-line ValueError naming
the file.
"""

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from absl import logging

from agmm_jax.data import input_pipeline
from agmm_jax.storage import run_identity

CONFIG_FILE = run_identity.CONFIG_FILE
# The class names a run's checkpoints were trained on, next to config.json.
CLASSES_FILE = 'classes.json'


def _write_atomically(path: str, text: str) -> None:
  """Written beside and renamed: a run killed mid-write leaves the previous
  file whole."""
  with open(f'{path}.tmp', 'w', encoding='utf-8') as f:
    f.write(text)
  os.replace(f'{path}.tmp', path)


def write_config(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Dumps the config to ``workdir/config.json`` (process 0); returns it.

  A rerun with a different config (say, more steps) keeps the earlier dump
  as ``config.N.json`` so the workdir records every config it was run with.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    if os.path.exists(path):
      with open(path, encoding='utf-8') as f:
        previous = f.read()
      if previous == text:
        return path
      index = 1
      while os.path.exists(os.path.join(workdir, f'config.{index}.json')):
        index += 1
      os.replace(path, os.path.join(workdir, f'config.{index}.json'))
      logging.warning('%s: the config differs from the last run; the earlier '
                      'one is kept as config.%d.json', workdir, index)
    _write_atomically(path, text)
  return path


def _read_json(path: str, what: str) -> Any:
  """The JSON of ``path``; one line naming the file when it does not parse."""
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (ValueError, UnicodeDecodeError) as error:
    raise ValueError(f'{path} is damaged ({what} is not readable JSON: {error}); '
                     'restore it or delete it') from None


def recorded_data_dir(workdir: str) -> str | None:
  """``data.dir`` of ``WORKDIR/config.json``, or None without that file
  (read by ``run_identity.recorded_config``: one line for a damaged file)."""
  config = run_identity.recorded_config(workdir)
  if config is None:
    return None
  try:
    return str(config['data']['dir'])
  except (KeyError, TypeError):
    raise ValueError(f'{os.path.join(workdir, CONFIG_FILE)} is damaged (no data.dir); '
                     'restore it or use a new --workdir') from None


def checkpoint_classes(workdir: str) -> list[str] | None:
  """The class names of ``workdir``'s checkpoints, or None when unknown.

  From ``WORKDIR/classes.json`` (written by training), or for runs older than
  that file from the metadata of the ``data.dir`` recorded in
  ``WORKDIR/config.json``.
  """
  path = os.path.join(workdir, CLASSES_FILE)
  if os.path.exists(path):
    names = _read_json(path, 'the class list')
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
      raise ValueError(f'{path} is damaged (not a list of class names); restore it '
                       'or delete it')
    return names
  data_dir = recorded_data_dir(workdir)
  try:
    return input_pipeline.class_names(input_pipeline.read_metadata(data_dir))
  except (OSError, ValueError, KeyError, TypeError):
    return None


def check_classes(workdir: str, class_names: list[str], data_dir: str) -> None:
  """Raises a one-line ValueError naming both class lists when the data's
  differ from those ``workdir``'s checkpoints were trained on."""
  trained = checkpoint_classes(workdir)
  if trained is not None and trained != list(class_names):
    raise ValueError(
        f'the checkpoints of {workdir} were trained on {len(trained)} classes '
        f'{trained} but {data_dir} has {len(class_names)} classes '
        f'{list(class_names)}; use data with the checkpoint\'s classes (same '
        'names, same order in classes.txt)')


def record_classes(workdir: str, class_names: list[str]) -> None:
  """Writes ``WORKDIR/classes.json`` (process 0), the list
  ``checkpoint_classes`` reads."""
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    _write_atomically(os.path.join(workdir, CLASSES_FILE), json.dumps(list(class_names)))


# Where each start of the run executed: a list, one entry per start.
ENVIRONMENT_FILE = 'environment.json'


def usable_cores() -> int:
  """The cores this process may run on (its affinity mask, e.g. under
  ``taskset``): XLA:CPU sizes its thread pool, and so splits its reductions,
  by them."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not Linux.
    return os.cpu_count() or 1


def execution_environment() -> dict[str, Any]:
  """What the run's arithmetic depends on besides its config: the backend,
  its devices and processes, the host cores this process may use
  (``usable_cores``), XLA_FLAGS and the jax version."""
  return {'backend': jax.default_backend(),
          'device_kind': jax.devices()[0].device_kind,
          'device_count': jax.device_count(),
          'process_count': jax.process_count(),
          'host_cores': usable_cores(),
          'xla_flags': os.environ.get('XLA_FLAGS', ''),
          'jax': jax.__version__}


def record_environment(workdir: str, start: str,
                       stage_folders: Sequence[str]) -> None:
  """Appends this start's ``execution_environment`` to
  ``WORKDIR/environment.json`` (process 0). A run that resumes in another
  one (a finalized checkpoint in one of its ``stage_folders``, relative to
  the workdir) gets a warning naming what changed: it is still correct, but
  from here on it rounds differently than the same command uninterrupted
  would, so it is not bit-for-bit the run the command makes (resumption is
  exact only in the same environment)."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, ENVIRONMENT_FILE)
  history = _read_json(path, 'the run\'s environments') if os.path.exists(
      path) else []
  if not isinstance(history, list):
    raise ValueError(f'{path} is damaged (not a list of environments); '
                     'restore it or delete it')
  current = execution_environment()
  previous = {k: v for k, v in (history[-1] if history else {}).items()
              if k != 'start'}
  changed = [f'{key} {current[key]!r} (was {previous[key]!r})'
             for key in current if key in previous
             and previous[key] != current[key]]
  if changed and any(run_identity.has_checkpoint(os.path.join(workdir, folder))
                     for folder in stage_folders):
    logging.warning(
        '%s: resumed in another environment: %s; training continues, but '
        'its steps from here round differently than an uninterrupted run of '
        'this command', workdir, ', '.join(changed))
  os.makedirs(workdir, exist_ok=True)
  _write_atomically(path, json.dumps(history + [{'start': start, **current}],
                                     indent=1))
