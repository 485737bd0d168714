"""PyTorch -> Flax conversion and numerical equivalence with a PyTorch reference.

The reference modules (references/torch_deeplab.py) are written from the
official AGMM layout (model/backbone/resnet.py, model/semseg/deeplabv3plus.py;
same key names) and are independent of agmm_jax. Their weights, BatchNorm running statistics
included, are randomized, saved to a .pth, converted with the converter's CLI
function, loaded into the Flax model and compared in eval mode.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip('torch')
tnn = torch.nn

from agmm_jax.model import deeplab  # pylint: disable=g-import-not-at-top
from agmm_jax.model import pretrained  # pylint: disable=g-import-not-at-top
from references.torch_deeplab import TORCH_DEPTHS, TorchDeepLabV3Plus, TorchResNet  # pylint: disable=g-import-not-at-top
from data_prep import convert_torch_weights  # pylint: disable=g-import-not-at-top

RTOL = 1e-4


def _randomize_(module, seed):
  """Random conv weights and BatchNorm affine + running statistics."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for sub in module.modules():
      if isinstance(sub, tnn.Conv2d):
        fan_in = sub.weight[0].numel()
        sub.weight.copy_(torch.randn(sub.weight.shape, generator=generator)
                         * (2.0 / fan_in) ** 0.5)
        if sub.bias is not None:
          sub.bias.copy_(torch.randn(sub.bias.shape, generator=generator) * 0.1)
      elif isinstance(sub, tnn.BatchNorm2d):
        n = sub.num_features
        sub.weight.copy_(0.5 + torch.rand(n, generator=generator))
        sub.bias.copy_(0.1 * torch.randn(n, generator=generator))
        sub.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
        sub.running_var.copy_(0.5 + torch.rand(n, generator=generator))
        sub.num_batches_tracked.fill_(7)
  return module


def _relative_error(actual, expected):
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


def _to_nhwc(tensor):
  return tensor.detach().numpy().transpose(0, 2, 3, 1)


def _convert(tmp_path, state_dict, name, *extra_args):
  pth = os.path.join(tmp_path, f'{name}.pth')
  torch.save(state_dict, pth)
  out_dir = os.path.join(tmp_path, name)
  code = convert_torch_weights.main(['--input', pth, '--output', out_dir,
                                     *extra_args])
  assert code == 0
  return out_dir


# ------------------------------ equivalence tests ----------------------------

# (depth, stem, output_stride, multi_grid, height, width)
EQUIVALENCE_CASES = [
    (50, 'deep', 8, False, 33, 33),
    (50, 'torchvision', 16, True, 35, 29),
    (18, 'deep', 8, True, 33, 37),
]


@pytest.mark.parametrize('depth,stem,output_stride,multi_grid,height,width',
                         EQUIVALENCE_CASES)
def test_full_model_matches_torch(tmp_path, depth, stem, output_stride,
                                  multi_grid, height, width):
  num_classes = 5
  reference = _randomize_(TorchDeepLabV3Plus(
      num_classes, depth, stem == 'deep', output_stride, multi_grid), seed=depth)
  reference.eval()
  images = np.random.default_rng(0).normal(
      size=(2, 3, height, width)).astype(np.float32)
  with torch.no_grad():
    feat, out = reference(torch.from_numpy(images))

  state_dict = {f'module.{k}': v for k, v in reference.state_dict().items()}
  out_dir = _convert(str(tmp_path), state_dict, 'full', '--num_classes',
                     str(num_classes))
  with open(os.path.join(out_dir, 'metadata.json')) as f:
    metadata = json.load(f)
  assert metadata['kind'] == 'full'
  assert (metadata['depth'], metadata['stem']) == (depth, stem)
  assert metadata['num_classes'] == num_classes

  # A full checkpoint overwrites every Param and BatchStat, so the (slow on
  # CPU) random init is skipped; eval mode never draws dropout keys.
  model = nnx.eval_shape(lambda: deeplab.DeepLabV3Plus(
      num_classes, depth=depth, stem=stem, output_stride=output_stride,
      multi_grid=multi_grid, rngs=nnx.Rngs(1)))
  pretrained.load_pretrained(model, out_dir)
  model.eval()
  features, logits = model(jnp.asarray(images.transpose(0, 2, 3, 1)))
  assert features.shape == _to_nhwc(feat).shape
  assert logits.shape == (2, height, width, num_classes)
  assert _relative_error(features, _to_nhwc(feat)) <= RTOL
  assert _relative_error(logits, _to_nhwc(out)) <= RTOL


@pytest.mark.parametrize('depth,deep_stem', [(18, False), (18, True)])
def test_backbone_only_import_matches_torch(tmp_path, depth, deep_stem):
  reference = _randomize_(TorchResNet(depth, deep_stem), seed=3)
  reference.eval()
  state_dict = dict(reference.state_dict())
  # ImageNet checkpoints carry the classifier; the converter drops it.
  state_dict['fc.weight'] = torch.zeros(1000, 512 * TORCH_DEPTHS[depth][0].expansion)
  state_dict['fc.bias'] = torch.zeros(1000)
  out_dir = _convert(str(tmp_path), state_dict, 'backbone')
  with open(os.path.join(out_dir, 'metadata.json')) as f:
    metadata = json.load(f)
  assert metadata['kind'] == 'backbone'
  assert metadata['stem'] == ('deep' if deep_stem else 'torchvision')

  model = deeplab.DeepLabV3Plus(3, depth=depth,
                               stem='deep' if deep_stem else 'torchvision',
                               output_stride=32, rngs=nnx.Rngs(2))
  head_kernel = np.asarray(model.classifier.kernel[...])
  pretrained.load_pretrained(model, out_dir)
  np.testing.assert_array_equal(model.classifier.kernel[...], head_kernel)
  model.eval()
  images = np.random.default_rng(1).normal(size=(1, 3, 40, 36)).astype(np.float32)
  with torch.no_grad():
    expected = reference.base_forward(torch.from_numpy(images))
  actual = model.backbone(jnp.asarray(images.transpose(0, 2, 3, 1)))
  for stage_actual, stage_expected in zip(actual, expected):
    assert stage_actual.shape == _to_nhwc(stage_expected).shape
    assert _relative_error(stage_actual, _to_nhwc(stage_expected)) <= RTOL


# ------------------------------ converter errors -----------------------------


@pytest.fixture(scope='module')
def resnet18_full_state_dict():
  reference = _randomize_(TorchDeepLabV3Plus(4, 18, False, 8), seed=5)
  return {k: v.numpy() for k, v in reference.state_dict().items()}


def test_bad_keys_are_all_listed(resnet18_full_state_dict):
  state_dict = dict(resnet18_full_state_dict)
  del state_dict['backbone.layer2.1.bn2.running_var']
  state_dict['head.b9.0.weight'] = np.zeros((1, 1, 1, 1), np.float32)
  state_dict['reduce.0.weight'] = np.zeros((48, 32, 1, 1), np.float32)
  with pytest.raises(ValueError) as error:
    convert_torch_weights.convert_state_dict(state_dict, source='bad.pth')
  message = str(error.value)
  assert message.startswith('bad.pth (full, ResNet-18, torchvision stem)')
  assert '1 missing, 1 unexpected, 1 wrong-shape' in message
  assert 'missing: backbone.layer2.1.bn2.running_var' in message
  assert 'unexpected: head.b9.0.weight' in message
  assert ('wrong shape: reduce.0.weight: expected (48, 64, 1, 1), '
          'got (48, 32, 1, 1)') in message


def test_aux_classifier_needs_drop_aux(resnet18_full_state_dict):
  state_dict = dict(resnet18_full_state_dict)
  state_dict['aux_classifier.classifier.weight'] = np.zeros((4, 256, 1, 1))
  with pytest.raises(ValueError, match='unexpected: aux_classifier'):
    convert_torch_weights.convert_state_dict(state_dict)
  weights, metadata = convert_torch_weights.convert_state_dict(
      state_dict, drop_aux=True)
  assert metadata['num_classes'] == 4
  assert not any(k.startswith('aux_classifier') for k in weights)


def test_num_classes_mismatch_is_an_error(resnet18_full_state_dict):
  with pytest.raises(ValueError, match='--num_classes 21 but classifier'):
    convert_torch_weights.convert_state_dict(resnet18_full_state_dict,
                                             num_classes=21)


def test_conversion_layout(resnet18_full_state_dict):
  weights, _ = convert_torch_weights.convert_state_dict(resnet18_full_state_dict)
  torch_kernel = resnet18_full_state_dict['backbone.layer3.0.downsample.0.weight']
  np.testing.assert_array_equal(
      weights['backbone/layer3/0/downsample/conv/kernel'],
      torch_kernel.transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      weights['head/b4/bn/var'],
      resnet18_full_state_dict['head.b4.gap.2.running_var'])
  np.testing.assert_array_equal(
      weights['fuse/1/bn/scale'], resnet18_full_state_dict['fuse.4.weight'])
  assert not any('num_batches_tracked' in k for k in weights)
  for key in resnet18_full_state_dict:
    if not key.endswith('num_batches_tracked'):
      ndim = resnet18_full_state_dict[key].ndim
      flax_key = convert_torch_weights.torch_key_to_flax(key, ndim)
      assert convert_torch_weights.flax_key_to_torch(flax_key) == key


def test_load_pretrained_rejects_other_architecture(tmp_path,
                                                    resnet18_full_state_dict):
  weights, metadata = convert_torch_weights.convert_state_dict(
      resnet18_full_state_dict)
  out_dir = os.path.join(str(tmp_path), 'r18')
  convert_torch_weights.write_checkpoint(out_dir, weights, metadata)
  model = nnx.eval_shape(lambda: deeplab.DeepLabV3Plus(
      4, depth=34, stem='torchvision', rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r'missing: backbone/layer1/2/conv1/kernel'):
    pretrained.load_pretrained(model, out_dir)


def test_cli_reports_missing_file(tmp_path, capsys):
  code = convert_torch_weights.main(
      ['--input', os.path.join(str(tmp_path), 'none.pth'),
       '--output', str(tmp_path)])
  assert code == 1
  assert 'none.pth: no such file' in capsys.readouterr().err
