"""Pretrained weights: the folder format of converted backbones and AGMM
checkpoints (``data_prep/convert_torch_weights.py`` writes it) and their
loading into a :class:`agmm_jax.model.deeplab.DeepLabV3Plus`.

A weights folder holds ``metadata.json`` and an Orbax checkpoint ``state`` of
float32 arrays keyed by the model's weight paths (:func:`weight_variables`).
"""

import json
import os
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from agmm_jax.model import deeplab

CHECKPOINT_METADATA = 'metadata.json'
CHECKPOINT_STATE = 'state'


def _path_key(path: Sequence[Any]) -> str:
  return '/'.join(str(part) for part in path)


def weight_variables(module: nnx.Module) -> dict[str, nnx.Variable]:
  """``{'a/b/kernel': Variable}`` of every Param and BatchStat of ``module``.

  These are the variables a converted PyTorch checkpoint provides; the keys
  are the slash-joined attribute paths (list indices as decimal strings).
  """
  variables = {}
  for path, node in nnx.iter_graph(module):
    if isinstance(node, (nnx.Param, nnx.BatchStat)):
      variables[_path_key(path)] = node
  return variables


def flatten_checkpoint(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  """Nested ``{name: {...: array}}`` -> ``{'name/.../leaf': array}``."""
  flat = {}
  for name, value in tree.items():
    key = f'{prefix}{name}'
    if isinstance(value, dict):
      flat.update(flatten_checkpoint(value, key + '/'))
    else:
      flat[key] = value
  return flat


def unflatten_checkpoint(flat: dict[str, Any]) -> dict[str, Any]:
  """Inverse of ``flatten_checkpoint``."""
  tree: dict[str, Any] = {}
  for key, value in flat.items():
    node = tree
    parts = key.split('/')
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = value
  return tree


def key_mismatch_report(expected: dict[str, tuple[int, ...]],
                        found: dict[str, tuple[int, ...]],
                        what: str) -> str | None:
  """A readable listing of missing / unexpected / wrong-shape keys, or None."""
  missing = sorted(set(expected) - set(found))
  unexpected = sorted(set(found) - set(expected))
  wrong_shape = sorted(
      f'{k}: expected {tuple(expected[k])}, got {tuple(found[k])}'
      for k in set(expected) & set(found)
      if tuple(expected[k]) != tuple(found[k]))
  if not (missing or unexpected or wrong_shape):
    return None
  lines = [f'{what}: {len(missing)} missing, {len(unexpected)} unexpected, '
           f'{len(wrong_shape)} wrong-shape keys']
  for title, keys in (('missing', missing), ('unexpected', unexpected),
                      ('wrong shape', wrong_shape)):
    lines.extend(f'  {title}: {k}' for k in keys)
  return '\n'.join(lines)


def read_checkpoint_metadata(path: str) -> dict[str, Any]:
  """The JSON the converter writes next to the weights."""
  metadata_path = os.path.join(path, CHECKPOINT_METADATA)
  if not os.path.exists(metadata_path):
    raise FileNotFoundError(f'{metadata_path}: not a converted weights folder '
                            '(run python -m data_prep.convert_torch_weights)')
  with open(metadata_path) as f:
    return json.load(f)


def load_pretrained(model: deeplab.DeepLabV3Plus, path: str) -> None:
  """Loads converted PyTorch weights into ``model`` in place.

  Args:
    model: the model to fill (a backbone-only checkpoint fills
      ``model.backbone`` and leaves the head untouched).
    path: folder written by ``data_prep.convert_torch_weights``.

  Raises:
    ValueError: listing every missing, unexpected or wrong-shape key.
  """
  import orbax.checkpoint as ocp  # Only needed for loading.

  path = os.path.abspath(path)
  metadata = read_checkpoint_metadata(path)
  kind = metadata.get('kind')
  if kind not in ('backbone', 'full'):
    raise ValueError(f'{path}/{CHECKPOINT_METADATA}: unknown kind {kind!r}')
  restored = ocp.StandardCheckpointer().restore(
      os.path.join(path, CHECKPOINT_STATE))
  flat = flatten_checkpoint(restored)
  variables = weight_variables(model)
  if kind == 'backbone':
    variables = {k: v for k, v in variables.items()
                 if k.startswith('backbone/')}
  # The heads of a loss method are never in a converted checkpoint.
  variables = {k: v for k, v in variables.items()
               if not k.startswith('extra_heads/')}
  report = key_mismatch_report(
      {k: tuple(v.get_value().shape) for k, v in variables.items()},
      {k: tuple(np.shape(v)) for k, v in flat.items()},
      f'{path} ({kind} checkpoint) does not fit the model')
  if report:
    raise ValueError(report)
  for key, variable in variables.items():
    variable.set_value(jnp.asarray(flat[key], variable.get_value().dtype))
