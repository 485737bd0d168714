"""A resumed run is the same run: the config fields it may not change.

Rerunning a training command on a work directory with checkpoints resumes
it. A resumed run that silently took a changed crop size, loss form or
sparse-label spec would mix two experiments in one set of checkpoints (and
with a changed ``data.prepare.sparse`` over an already prepared
``WORKDIR/data`` it would even train on the old labels while ``config.json``
records the new spec). ``check_resumable`` compares the command's config with
``WORKDIR/config.json``, the config the checkpoints were written with, before
anything is written, and refuses a difference in one line naming each field
with both values.

The identity fields (``IDENTITY_PREFIXES`` less ``ALLOWED_CHANGES``), and why:

* ``model.*``: the network the parameters belong to (depth, stem, output
  stride, ASPP rates); ``pretrained`` is the initialization the run started
  from (a resumed run does not load it again, so a change would be ignored).
* ``data.*`` with ``data.prepare.*``: the examples and labels trained on (the
  folder, splits, dense or sparse labels, the sparse-label generator spec and
  seed, the source and its preparation), the crop and augmentation that make
  the batches.
* ``loss.*``: the objective (terms, weights, each term's options).
* ``optimizer.*``, ``global_batch_size``, ``seed``: the update rule (its
  state is in the checkpoint), the batch the iterator position counts in, the
  data order and initialization; ``warmup.*``: how many of the steps train
  pCE alone before the loss (``agmm_jax/train/stages.py``).
* ``spml_stage2.*`` (less its step count): how SPML's second stage makes its
  pseudo-labels and trains; ``cam.*`` (less the classifier's length): the
  same for the CAM stages.
* ``data.eval_split``, ``eval.mode``, ``eval.scales``, ``eval.flip``,
  ``eval.given_classes``: the evaluation whose mIoU chooses the best
  checkpoint; mIoUs of two protocols do not compare.

Everything else may change and is logged: how long (``num_train_steps``,
``num_epochs``, ``spml_stage2.num_train_steps``, ``cam.num_epochs``,
``cam.num_train_steps``: the learning-rate schedule
follows the new length), how often (evaluation, checkpoint, log, image
summary periods, ``keep_checkpoints``), and how it is computed
(``model.dilated_conv``, ``model.compute_dtype``: the stored parameters stay
float32; ``data.num_threads``, ``data.prefetch``, ``data.eval_canvas``,
``eval.batch_size``, ``mesh``, the compilation cache, predict options).
"""

import json
import os
from typing import Any

from absl import logging
import ml_collections

CONFIG_FILE = 'config.json'
LATEST_DIR = 'checkpoints'  # As storage/checkpoint.py (no Orbax import here).

IDENTITY_PREFIXES = (
    'model.', 'data.', 'loss.', 'optimizer.', 'warmup.', 'spml_stage2.', 'cam.',
    'global_batch_size', 'seed', 'eval.mode', 'eval.scales', 'eval.flip',
    'eval.given_classes')
# Identity fields added after runs were recorded, with the value every run
# recorded without them trained with: such a run is compared with that value
# (other fields missing from an older config.json are logged, not checked).
ADDED_FIELDS = {'warmup.fraction': 0.0, 'eval.given_classes': False,
                'loss.soft_self_labeling.step_scale': 'image'}
ALLOWED_CHANGES = (
    'model.dilated_conv', 'model.compute_dtype', 'data.num_threads',
    'data.prefetch', 'data.eval_canvas', 'spml_stage2.num_train_steps',
    'cam.num_epochs', 'cam.num_train_steps')


def is_identity_field(field: str) -> bool:
  """Whether a resumed run must keep the dotted config ``field``."""
  if field in ALLOWED_CHANGES:
    return False
  return any(field == prefix or (prefix.endswith('.') and
                                 field.startswith(prefix))
             for prefix in IDENTITY_PREFIXES)


def flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  """``{'a': {'b': 1}}`` -> ``{'a.b': 1}`` (leaves: JSON values)."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def with_added_fields(recorded: dict[str, Any], current: dict[str, Any],
                      prefix: str = '') -> dict[str, Any]:
  """Flat ``recorded`` with the ``ADDED_FIELDS`` under ``prefix`` it lacks
  and ``current`` (flat) has, at the value every older run trained with:
  what an older ``config.json`` (or its ``prefix`` subtree) means today."""
  added = {field[len(prefix):]: value for field, value in ADDED_FIELDS.items()
           if field.startswith(prefix)}
  return {**{field: value for field, value in added.items()
             if field in current}, **recorded}


def changed_fields(recorded: dict[str, Any], current: dict[str, Any]
                   ) -> list[tuple[str, Any, Any]]:
  """``(field, recorded value, current value)`` of each flat ``current``
  field ``recorded`` holds with another value (sorted); a field ``recorded``
  lacks (fill ``with_added_fields`` first) is not compared."""
  return [(field, recorded[field], value)
          for field, value in sorted(current.items())
          if field in recorded and recorded[field] != value]


def has_checkpoint(workdir: str) -> bool:
  """Whether ``WORKDIR/checkpoints`` holds a step (a finalized folder)."""
  try:
    names = os.listdir(os.path.join(workdir, LATEST_DIR))
  except (FileNotFoundError, NotADirectoryError):
    return False
  return any(name.isdigit() for name in names)


def recorded_config(workdir: str) -> dict[str, Any] | None:
  """``WORKDIR/config.json`` as a dict; None when there is none.

  Raises:
    ValueError: one line naming the file when it is not a JSON object.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  try:
    with open(path, encoding='utf-8') as f:
      recorded = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
    recorded = error
  if not isinstance(recorded, dict):
    reason = (str(recorded).splitlines() or ['not a JSON object'])[0]
    raise ValueError(
        f'{path} is damaged ({reason}); it records the config of the '
        'checkpoints there: restore it (its earlier copies are config.N.json) '
        'or use a new --workdir')
  return recorded


def _show(value: Any) -> str:
  return json.dumps(value)


def check_resumable(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a resumed run whose identity fields differ from the
  checkpointed run's; logs the other changed fields.

  ``config`` has its data paths resolved (``data_prep.auto.resolved_paths``),
  as the recorded one had. Nothing is compared when the work directory has
  no checkpoint (a new run, or one killed before its first save).

  Raises:
    ValueError: one line naming each changed identity field with both values,
      or naming a damaged ``config.json``.
  """
  if not has_checkpoint(workdir):
    return
  recorded = recorded_config(workdir)
  if recorded is None:
    logging.warning('%s has checkpoints but no %s: the resumed run\'s config '
                    'cannot be checked against theirs', workdir, CONFIG_FILE)
    return
  new = flatten(json.loads(config.to_json_best_effort()))
  old = with_added_fields(flatten(recorded), new)
  for field in sorted(new):
    if field not in old and is_identity_field(field):
      logging.info('%s: %s is not recorded in its %s (an older run); '
                   'not checked', workdir, field, CONFIG_FILE)
  refused, allowed = [], []
  for field, before, after in changed_fields(old, new):
    change = f'{field} {_show(before)} -> {_show(after)}'
    (refused if is_identity_field(field) else allowed).append(change)
  if refused:
    raise ValueError(
        f'{workdir} holds checkpoints of a run with other settings '
        f'(checkpointed -> this command): {"; ".join(refused)}; a resumed run '
        'must keep them: use a new --workdir, or rerun with the checkpointed '
        f'values (in {os.path.join(workdir, CONFIG_FILE)})')
  for change in allowed:
    logging.info('resuming %s with a changed %s', workdir, change)
