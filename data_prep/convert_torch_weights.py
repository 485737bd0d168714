"""Converts PyTorch ResNet / AGMM DeepLabV3+ weights for ``agmm_jax.model.deeplab``.

Usage::

  python -m data_prep.convert_torch_weights --input FILE.pth --output DIR \
      [--num_classes N] [--drop_aux]

Accepted inputs (a ``state_dict``, optionally wrapped as ``{'state_dict': ...}``
or ``{'model': ...}``, keys optionally prefixed ``module.``):

* ``backbone``: an ImageNet ResNet in torchvision layout (``conv1``, ``bn1``,
  ``layerN.M.convK/bnK``, ``layerN.M.downsample.0/1``) or in the deep-stem
  layout of the official AGMM code (``conv1.0/1/3/4/6``, ``bn1``). The ImageNet
  classifier ``fc.*`` is dropped (it has no counterpart).
* ``full``: a trained AGMM DeepLabV3+ (``backbone.*``, ``head.b0..b4``,
  ``head.project``, ``reduce``, ``fuse``, ``classifier``). ``--drop_aux``
  drops an ``aux_classifier.*`` (trained with ``aux: True``); otherwise it is
  reported as unexpected.

Depth (18/34/50/101/152) and stem are read off the keys; ``num_batches_tracked``
is ignored. Every other key must map onto a variable of the Flax model with
the right shape: missing, unexpected and wrong-shape keys are all listed in one
``ValueError``. Conv kernels go from OIHW to HWIO; BatchNorm ``weight``,
``bias``, ``running_mean``, ``running_var`` become ``scale``, ``bias``,
``mean``, ``var``.

Output folder: ``state/`` (Orbax ``StandardCheckpointer`` of the nested dict
of float32 NumPy arrays keyed like ``agmm_jax.model.pretrained.weight_variables``) and
``metadata.json`` (format, kind, depth, stem, num_classes, source). Load with
``agmm_jax.model.pretrained.load_pretrained``.

PyTorch is imported lazily in ``load_torch_state_dict`` only.
"""

import argparse
import json
import os
import re
import sys
from typing import Any, Mapping, Sequence

import numpy as np
from flax import nnx

from agmm_jax.model import deeplab
from agmm_jax.model import pretrained

FORMAT = 'agmm_jax.torch_weights/1'

# Module-path renames PyTorch (dotted) <-> Flax (dotted, joined by '/' later).
# '{i}' stands for a number that is carried over. Paths not matched keep their
# names (e.g. backbone.layer1.0.conv1, classifier).
_MODULE_RULES: tuple[tuple[str, str], ...] = (
    ('backbone.conv1.0', 'backbone.conv1.conv1'),
    ('backbone.conv1.1', 'backbone.conv1.bn1'),
    ('backbone.conv1.3', 'backbone.conv1.conv2'),
    ('backbone.conv1.4', 'backbone.conv1.bn2'),
    ('backbone.conv1.6', 'backbone.conv1.conv3'),
    ('backbone.layer{i}.{j}.downsample.0', 'backbone.layer{i}.{j}.downsample.conv'),
    ('backbone.layer{i}.{j}.downsample.1', 'backbone.layer{i}.{j}.downsample.bn'),
    # The pooling branch b4 first: 'head.b{i}.conv' would also match it.
    ('head.b4.gap.1', 'head.b4.conv'),
    ('head.b4.gap.2', 'head.b4.bn'),
    ('head.b{i}.0', 'head.b{i}.conv'),
    ('head.b{i}.1', 'head.b{i}.bn'),
    ('head.project.0', 'head.project.conv'),
    ('head.project.1', 'head.project.bn'),
    ('reduce.0', 'reduce.conv'),
    ('reduce.1', 'reduce.bn'),
    ('fuse.0', 'fuse.0.conv'),
    ('fuse.1', 'fuse.0.bn'),
    ('fuse.3', 'fuse.1.conv'),
    ('fuse.4', 'fuse.1.bn'),
)
_TORCH_TO_FLAX_LEAF = {'bias': 'bias', 'running_mean': 'mean',
                       'running_var': 'var'}
_FLAX_TO_TORCH_LEAF = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias',
                       'mean': 'running_mean', 'var': 'running_var'}


def _template_regex(template: str) -> re.Pattern:
  pattern = re.escape(template)
  for name in ('i', 'j'):
    pattern = pattern.replace(re.escape('{' + name + '}'), f'(?P<{name}>\\d+)')
  return re.compile(f'^{pattern}$')


_FORWARD = tuple((_template_regex(t), f) for t, f in _MODULE_RULES)
_BACKWARD = tuple((_template_regex(f), t) for t, f in _MODULE_RULES)


def _rename_module(path: str, rules) -> str:
  for regex, template in rules:
    match = regex.match(path)
    if match:
      return template.format(**match.groupdict())
  return path


def torch_key_to_flax(key: str, ndim: int) -> str:
  """``'backbone.layer1.0.conv1.weight'`` -> ``'backbone/layer1/0/conv1/kernel'``.

  ``ndim`` tells a conv ``weight`` (4-D, -> ``kernel``) from a BatchNorm one
  (1-D, -> ``scale``).
  """
  module, _, leaf = key.rpartition('.')
  if leaf == 'weight':
    flax_leaf = 'kernel' if ndim == 4 else 'scale'
  else:
    flax_leaf = _TORCH_TO_FLAX_LEAF.get(leaf, leaf)
  return (_rename_module(module, _FORWARD) + '.' + flax_leaf).replace('.', '/')


def flax_key_to_torch(key: str) -> str:
  """Inverse of ``torch_key_to_flax`` (for error messages)."""
  module, _, leaf = key.replace('/', '.').rpartition('.')
  return _rename_module(module, _BACKWARD) + '.' + _FLAX_TO_TORCH_LEAF.get(leaf, leaf)


def _torch_shape(flax_key: str, shape: Sequence[int]) -> tuple[int, ...]:
  """Shape of the PyTorch tensor that becomes ``flax_key`` (HWIO -> OIHW)."""
  if flax_key.endswith('/kernel') and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(shape)


def _infer_architecture(keys: Sequence[str], source: str) -> tuple[int, str]:
  """(depth, stem) from ``backbone.*`` key names."""
  stem = ('deep' if any(k.startswith('backbone.conv1.0.') for k in keys)
          else 'torchvision')
  blocks = []
  for stage in range(1, 5):
    indices = {int(m.group(1)) for k in keys
               for m in [re.match(rf'^backbone\.layer{stage}\.(\d+)\.', k)] if m}
    blocks.append(max(indices) + 1 if indices else 0)
  kind = ('bottleneck' if any(k.startswith('backbone.layer1.0.conv3.')
                              for k in keys) else 'basic')
  for depth, (block_kind, layers) in deeplab.RESNET_LAYERS.items():
    if block_kind == kind and tuple(layers) == tuple(blocks):
      return depth, stem
  raise ValueError(f'{source}: {kind} blocks per stage {tuple(blocks)} match no '
                   f'ResNet depth in {sorted(deeplab.RESNET_LAYERS)}')


def convert_state_dict(state_dict: Mapping[str, np.ndarray], *,
                       num_classes: int | None = None, drop_aux: bool = False,
                       source: str = 'state_dict'
                       ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Maps a PyTorch state dict onto the Flax model's variables.

  Args:
    state_dict: name -> array (NumPy; PyTorch tensors converted by the caller).
    num_classes: for full models, must equal the classifier's rows if given.
    drop_aux: drop ``aux_classifier.*`` of a full model.
    source: name used in error messages.

  Returns:
    (``{flax_key: float32 array}``, metadata dict with kind, depth, stem,
    num_classes).

  Raises:
    ValueError: unknown layout, or a listing of missing / unexpected /
      wrong-shape keys.
  """
  tensors = {}
  for key, value in state_dict.items():
    key = key[len('module.'):] if key.startswith('module.') else key
    if key.endswith('num_batches_tracked'):
      continue
    tensors[key] = np.asarray(value)
  if not tensors:
    raise ValueError(f'{source}: no tensors found')
  kind = 'full' if any(k.startswith('backbone.') for k in tensors) else 'backbone'
  if kind == 'backbone':
    # The ImageNet classifier has no counterpart in a segmentation model.
    tensors = {f'backbone.{k}': v for k, v in tensors.items()
               if not k.startswith('fc.')}
  elif drop_aux:
    tensors = {k: v for k, v in tensors.items()
               if not k.startswith('aux_classifier.')}
  depth, stem = _infer_architecture(list(tensors), source)

  if kind == 'full':
    if 'classifier.weight' not in tensors:
      raise ValueError(f'{source}: full model without classifier.weight')
    found_classes = int(tensors['classifier.weight'].shape[0])
    if num_classes is not None and num_classes != found_classes:
      raise ValueError(f'{source}: --num_classes {num_classes} but '
                       f'classifier.weight has {found_classes} rows')
    num_classes = found_classes
  abstract_model = nnx.eval_shape(lambda: deeplab.DeepLabV3Plus(
      num_classes or 1, depth=depth, stem=stem, rngs=nnx.Rngs(0)))
  expected = {k: tuple(v.get_value().shape)
              for k, v in pretrained.weight_variables(abstract_model).items()}
  if kind == 'backbone':
    expected = {k: s for k, s in expected.items() if k.startswith('backbone/')}

  converted = {}
  for key, value in tensors.items():
    flax_key = torch_key_to_flax(key, value.ndim)
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    converted[flax_key] = value.astype(np.float32)
  report = pretrained.key_mismatch_report(
      {flax_key_to_torch(k): _torch_shape(k, s) for k, s in expected.items()},
      {flax_key_to_torch(k): _torch_shape(k, v.shape)
       for k, v in converted.items()},
      f'{source} ({kind}, ResNet-{depth}, {stem} stem) does not match '
      'agmm_jax.model.deeplab (PyTorch names and shapes)')
  if report:
    raise ValueError(report)
  metadata = {'format': FORMAT, 'kind': kind, 'depth': depth, 'stem': stem,
              'num_classes': num_classes if kind == 'full' else None,
              'source': os.path.basename(source)}
  return converted, metadata


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a ``.pth`` file into ``{name: NumPy array}`` (imports torch)."""
  import torch  # Lazy: only the converter needs PyTorch.

  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no such file')
  loaded = torch.load(path, map_location='cpu', weights_only=True)
  for wrapper in ('state_dict', 'model'):
    if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
      loaded = loaded[wrapper]
  if not isinstance(loaded, dict):
    raise ValueError(f'{path}: expected a state_dict, got {type(loaded).__name__}')
  bad = [k for k, v in loaded.items() if not isinstance(v, torch.Tensor)]
  if bad:
    raise ValueError(f'{path}: entries that are not tensors: {bad[:10]}')
  return {k: v.detach().to(torch.float32).numpy() if v.is_floating_point()
          else v.detach().numpy() for k, v in loaded.items()}


def write_checkpoint(output_dir: str, weights: Mapping[str, np.ndarray],
                     metadata: Mapping[str, Any]) -> None:
  """Writes ``output_dir/state`` (Orbax) and ``output_dir/metadata.json``."""
  import orbax.checkpoint as ocp

  output_dir = os.path.abspath(output_dir)
  os.makedirs(output_dir, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(output_dir, pretrained.CHECKPOINT_STATE),
                    pretrained.unflatten_checkpoint(dict(weights)), force=True)
  checkpointer.wait_until_finished()
  with open(os.path.join(output_dir, pretrained.CHECKPOINT_METADATA), 'w') as f:
    json.dump(dict(metadata), f, indent=2)


def convert(input_path: str, output_dir: str, *, num_classes: int | None = None,
            drop_aux: bool = False) -> dict[str, Any]:
  """Converts ``input_path`` (.pth) into ``output_dir``; returns the metadata."""
  state_dict = load_torch_state_dict(input_path)
  weights, metadata = convert_state_dict(state_dict, num_classes=num_classes,
                                         drop_aux=drop_aux, source=input_path)
  write_checkpoint(output_dir, weights, metadata)
  return metadata


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--input', required=True, help='PyTorch .pth state dict')
  parser.add_argument('--output', required=True, help='output folder')
  parser.add_argument('--num_classes', type=int, default=None,
                      help='expected classes of a full model (checked)')
  parser.add_argument('--drop_aux', action='store_true',
                      help='drop aux_classifier.* of a full model')
  args = parser.parse_args(argv)
  try:
    metadata = convert(args.input, args.output, num_classes=args.num_classes,
                       drop_aux=args.drop_aux)
  except (ValueError, FileNotFoundError) as error:
    print(f'error: {error}', file=sys.stderr)
    return 1
  print(f'wrote {args.output}: {json.dumps(metadata)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
