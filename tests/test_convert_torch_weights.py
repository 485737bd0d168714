"""PyTorch -> Flax conversion and numerical equivalence with a PyTorch reference.

The reference modules below are written here from the official AGMM layout
(model/backbone/resnet.py, model/semseg/deeplabv3plus.py; same key names) and
are independent of agmm_jax. Their weights, BatchNorm running statistics
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
tfun = torch.nn.functional

from agmm_jax import models  # pylint: disable=g-import-not-at-top
from data_prep import convert_torch_weights  # pylint: disable=g-import-not-at-top

RTOL = 1e-4


# ----------------------------- PyTorch reference -----------------------------


def _conv3x3(cin, cout, stride=1, dilation=1):
  return tnn.Conv2d(cin, cout, 3, stride=stride, padding=dilation,
                    dilation=dilation, bias=False)


class TorchBasicBlock(tnn.Module):
  expansion = 1

  def __init__(self, cin, planes, stride=1, downsample=None, dilation=1):
    super().__init__()
    self.conv1 = _conv3x3(cin, planes, stride, dilation)
    self.bn1 = tnn.BatchNorm2d(planes)
    self.conv2 = _conv3x3(planes, planes, 1, dilation)
    self.bn2 = tnn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = torch.relu(self.bn1(self.conv1(x)))
    return torch.relu(self.bn2(self.conv2(out)) + identity)


class TorchBottleneck(tnn.Module):
  expansion = 4

  def __init__(self, cin, planes, stride=1, downsample=None, dilation=1):
    super().__init__()
    self.conv1 = tnn.Conv2d(cin, planes, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(planes)
    self.conv2 = _conv3x3(planes, planes, stride, dilation)
    self.bn2 = tnn.BatchNorm2d(planes)
    self.conv3 = tnn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = tnn.BatchNorm2d(planes * 4)
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = torch.relu(self.bn1(self.conv1(x)))
    out = torch.relu(self.bn2(self.conv2(out)))
    return torch.relu(self.bn3(self.conv3(out)) + identity)


TORCH_DEPTHS = {18: (TorchBasicBlock, [2, 2, 2, 2]),
                50: (TorchBottleneck, [3, 4, 6, 3])}


class TorchResNet(tnn.Module):
  """Official layout: deep stem = Sequential(conv, bn, relu, conv, bn, relu, conv)."""

  def __init__(self, depth, deep_stem, dilate=(False, False, False),
               multi_grid=False):
    super().__init__()
    block, layers = TORCH_DEPTHS[depth]
    if deep_stem:
      self.conv1 = tnn.Sequential(
          tnn.Conv2d(3, 64, 3, 2, 1, bias=False), tnn.BatchNorm2d(64), tnn.ReLU(),
          tnn.Conv2d(64, 64, 3, 1, 1, bias=False), tnn.BatchNorm2d(64), tnn.ReLU(),
          tnn.Conv2d(64, 128, 3, 1, 1, bias=False))
      self.inplanes = 128
    else:
      self.conv1 = tnn.Conv2d(3, 64, 7, 2, 3, bias=False)
      self.inplanes = 64
    self.bn1 = tnn.BatchNorm2d(self.inplanes)
    self.maxpool = tnn.MaxPool2d(3, 2, 1)
    self.dilation = 1
    self.layer1 = self._make_layer(block, 64, layers[0])
    self.layer2 = self._make_layer(block, 128, layers[1], 2, dilate[0])
    self.layer3 = self._make_layer(block, 256, layers[2], 2, dilate[1])
    self.layer4 = self._make_layer(block, 512, layers[3], 2, dilate[2],
                                   multi_grid)

  def _make_layer(self, block, planes, blocks, stride=1, dilate=False,
                  multi_grid=False):
    previous_dilation = self.dilation
    if dilate:
      self.dilation *= stride
      stride = 1
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = tnn.Sequential(
          tnn.Conv2d(self.inplanes, planes * block.expansion, 1, stride,
                     bias=False),
          tnn.BatchNorm2d(planes * block.expansion))
    grids = [2, 2, 4] if multi_grid else [1] * blocks
    layers = [block(self.inplanes, planes, stride, downsample,
                    previous_dilation * grids[0])]
    self.inplanes = planes * block.expansion
    for i in range(1, blocks):
      layers.append(block(self.inplanes, planes,
                          dilation=self.dilation * grids[i]))
    return tnn.Sequential(*layers)

  def base_forward(self, x):
    x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    c1 = self.layer1(x)
    c2 = self.layer2(c1)
    c3 = self.layer3(c2)
    c4 = self.layer4(c3)
    return c1, c2, c3, c4


def _conv_bn_relu(cin, cout, k, dilation=1):
  return tnn.Sequential(
      tnn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation,
                 bias=False),
      tnn.BatchNorm2d(cout), tnn.ReLU())


class TorchASPPPooling(tnn.Module):

  def __init__(self, cin, cout):
    super().__init__()
    self.gap = tnn.Sequential(tnn.AdaptiveAvgPool2d(1),
                              tnn.Conv2d(cin, cout, 1, bias=False),
                              tnn.BatchNorm2d(cout), tnn.ReLU())

  def forward(self, x):
    return tfun.interpolate(self.gap(x), x.shape[-2:], mode='bilinear',
                            align_corners=True)


class TorchASPP(tnn.Module):

  def __init__(self, cin, rates):
    super().__init__()
    cout = 256
    self.b0 = _conv_bn_relu(cin, cout, 1)
    self.b1 = _conv_bn_relu(cin, cout, 3, rates[0])
    self.b2 = _conv_bn_relu(cin, cout, 3, rates[1])
    self.b3 = _conv_bn_relu(cin, cout, 3, rates[2])
    self.b4 = TorchASPPPooling(cin, cout)
    self.project = tnn.Sequential(tnn.Conv2d(5 * cout, cout, 1, bias=False),
                                  tnn.BatchNorm2d(cout), tnn.ReLU(),
                                  tnn.Dropout2d(0.5))

  def forward(self, x):
    return self.project(torch.cat(
        [self.b0(x), self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1))


class TorchDeepLabV3Plus(tnn.Module):

  def __init__(self, num_classes, depth, deep_stem, output_stride,
               multi_grid=False, rates=(6, 12, 18)):
    super().__init__()
    dilate = {32: (False, False, False), 16: (False, False, True),
              8: (False, True, True)}[output_stride]
    self.backbone = TorchResNet(depth, deep_stem, dilate, multi_grid)
    expansion = TORCH_DEPTHS[depth][0].expansion
    self.head = TorchASPP(512 * expansion, rates)
    self.reduce = tnn.Sequential(tnn.Conv2d(64 * expansion, 48, 1, bias=False),
                                 tnn.BatchNorm2d(48), tnn.ReLU())
    self.fuse = tnn.Sequential(
        tnn.Conv2d(256 + 48, 256, 3, padding=1, bias=False),
        tnn.BatchNorm2d(256), tnn.ReLU(),
        tnn.Conv2d(256, 256, 3, padding=1, bias=False),
        tnn.BatchNorm2d(256), tnn.ReLU())
    self.classifier = tnn.Conv2d(256, num_classes, 1, bias=True)

  def forward(self, x):
    h, w = x.shape[-2:]
    c1, _, _, c4 = self.backbone.base_forward(x)
    c4 = tfun.interpolate(self.head(c4), c1.shape[-2:], mode='bilinear',
                          align_corners=True)
    feat = self.fuse(torch.cat([self.reduce(c1), c4], 1))
    out = tfun.interpolate(self.classifier(feat), (h, w), mode='bilinear',
                           align_corners=True)
    return feat, out


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
  model = nnx.eval_shape(lambda: models.DeepLabV3Plus(
      num_classes, depth=depth, stem=stem, output_stride=output_stride,
      multi_grid=multi_grid, rngs=nnx.Rngs(1)))
  models.load_pretrained(model, out_dir)
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

  model = models.DeepLabV3Plus(3, depth=depth,
                               stem='deep' if deep_stem else 'torchvision',
                               output_stride=32, rngs=nnx.Rngs(2))
  head_kernel = np.asarray(model.classifier.kernel[...])
  models.load_pretrained(model, out_dir)
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
  model = nnx.eval_shape(lambda: models.DeepLabV3Plus(
      4, depth=34, stem='torchvision', rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r'missing: backbone/layer1/2/conv1/kernel'):
    models.load_pretrained(model, out_dir)


def test_cli_reports_missing_file(tmp_path, capsys):
  code = convert_torch_weights.main(
      ['--input', os.path.join(str(tmp_path), 'none.pth'),
       '--output', str(tmp_path)])
  assert code == 1
  assert 'none.pth: no such file' in capsys.readouterr().err
