"""A PyTorch reference of the official AGMM DeepLabV3+ (NCHW).

Written from the official layout (model/backbone/resnet.py,
model/semseg/deeplabv3plus.py; same key names) and independent of agmm_jax:
tests/data_prep/test_convert_torch_weights.py checks the Flax model against it, and
benchmarks/gpu_suite.py times a PyTorch train step of it beside agmm_jax's.
``TorchDeepLabV3Plus(x [B, 3, H, W]) -> (features [B, 256, H/4, W/4],
logits [B, K, H, W])``.
"""

import torch
from torch import nn as tnn
from torch.nn import functional as tfun


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
                34: (TorchBasicBlock, [3, 4, 6, 3]),
                50: (TorchBottleneck, [3, 4, 6, 3]),
                101: (TorchBottleneck, [3, 4, 23, 3]),
                152: (TorchBottleneck, [3, 8, 36, 3])}


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
