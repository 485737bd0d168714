"""ResNet backbones and the DeepLabV3+ segmentation model (Flax NNX, NHWC).

The architecture follows the official AGMM code (``model/backbone/resnet.py``
and ``model/semseg/deeplabv3plus.py``) so that its PyTorch weights convert one
to one (``data_prep/convert_torch_weights.py``):

* ResNet-18/34 (basic blocks) and 50/101/152 (bottlenecks) with the
  ``'torchvision'`` stem (7x7/2 conv 64) or the ``'deep'`` stem (3x3/2 conv
  3->64, 3x3 conv 64->64, 3x3 conv 64->128, BN+ReLU between, then BN(128)+ReLU);
  both end with a 3x3/2 max-pool. ``layer1`` starts from the stem's width.
* Output stride 32/16/8 by replacing the stride of ``layer4`` (16) or of
  ``layer3`` and ``layer4`` (8) with dilation (torchvision semantics: the first
  block of a dilated stage keeps the previous dilation).
* Multi-grid: ``layer4``'s blocks get dilations ``previous * 2, d * 2, d * 4``
  (``d`` = the stage's dilation), exactly as the official ``_make_layer``.
* DeepLabV3+ head: ASPP (1x1, three 3x3 atrous, image pooling; 256 channels
  each), 1x1 projection + channel dropout 0.5; ``layer1`` features reduced to 48
  channels; concatenation with the ASPP output resized (align-corners bilinear)
  to the ``layer1`` resolution; two 3x3 convs of 256 (``fuse``); 1x1 classifier.

``DeepLabV3Plus(images [B, H, W, 3]) -> (features [B, h1, w1, 256],
logits [B, H, W, K])`` where ``h1 = ceil(H / 4)`` (the ``layer1`` grid) and the
features are the fused decoder features the official code returns as ``feat``;
logits are resized to ``(H, W)`` with align-corners bilinear. Both outputs are
float32 whatever the compute dtype.

Parameters are float32; ``dtype`` is the compute dtype of convolutions.
BatchNorm follows PyTorch (statistics in float32, eps 1e-5, running averages
with momentum 0.1 in PyTorch terms and the unbiased batch variance).

The official head sizes its ASPP as ``2048 // 8`` channels and reads 256
``layer1`` channels; for ResNet-18/34 this module keeps the 256 ASPP channels
and reads the 64 ``layer1`` channels the backbone actually has.
"""

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from agmm_jax.model import dilated_conv as dilated_conv_lib
from agmm_jax.model.resample import resize_bilinear_align_corners

Array = jax.Array

# Blocks per stage and block type for each supported depth.
RESNET_LAYERS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ('basic', (2, 2, 2, 2)),
    34: ('basic', (3, 4, 6, 3)),
    50: ('bottleneck', (3, 4, 6, 3)),
    101: ('bottleneck', (3, 4, 23, 3)),
    152: ('bottleneck', (3, 8, 36, 3)),
}
STEMS = ('torchvision', 'deep')
MULTI_GRID = (2, 2, 4)
ASPP_CHANNELS = 256
REDUCED_LOW_CHANNELS = 48
DECODER_CHANNELS = 256
PROJECT_DROPOUT = 0.5

# Official backbone init: kaiming normal, fan_out, ReLU gain.
_backbone_kernel_init = nnx.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# PyTorch's default Conv2d init (kaiming uniform, a = sqrt(5)) for the head.
_head_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def _torch_default_bias_init(fan_in: int) -> Callable[..., Array]:
  """PyTorch's default conv bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


# Builds one conv of the model: ``conv(in_features, out_features,
# kernel_size, *, stride=1, dilation=1, use_bias=False, kernel_init=...,
# bias_init=..., dtype, rngs) -> nnx.Conv``; see ``conv_factory``.
ConvFactory = Callable[..., nnx.Conv]


def _conv(in_features: int, out_features: int, kernel_size: int, *,
          implementation: str, stride: int = 1, dilation: int = 1,
          use_bias: bool = False, kernel_init=_backbone_kernel_init,
          bias_init=nnx.initializers.zeros, dtype: Any,
          rngs: nnx.Rngs) -> nnx.Conv:
  """Conv with PyTorch padding ``dilation * (kernel_size - 1) // 2`` per side.

  ``implementation`` (a resolved ``config.model.dilated_conv``) picks how
  dilated (and, with ``'taps'``, 1x1) convs are computed
  (``agmm_jax.model.dilated_conv``); the parameters are the same.
  """
  pad = dilation * (kernel_size - 1) // 2
  return nnx.Conv(
      in_features, out_features, (kernel_size, kernel_size),
      strides=(stride, stride), padding=((pad, pad), (pad, pad)),
      kernel_dilation=(dilation, dilation), use_bias=use_bias,
      kernel_init=kernel_init, bias_init=bias_init, dtype=dtype,
      param_dtype=jnp.float32,
      conv_general_dilated=dilated_conv_lib.conv_function(
          implementation, dilation, kernel_size),
      rngs=rngs)


def conv_factory(dilated_conv: str = dilated_conv_lib.DEFAULT) -> ConvFactory:
  """The conv constructor every module of the model builds its convs with.

  ``dilated_conv`` is ``config.model.dilated_conv``, resolved by the backend
  (``agmm_jax.model.dilated_conv.resolve``: ``'auto'`` picks the fastest
  measured form; a form known to be slow here warns).
  """
  return functools.partial(_conv,
                           implementation=dilated_conv_lib.resolve(dilated_conv))


class BatchNorm(nnx.Module):
  """BatchNorm over the channel (last) axis with PyTorch semantics.

  Train mode (``use_running_average=False``) normalizes with the biased batch
  statistics over ``[B, H, W]`` (n values per channel),
  ``y = (x - mean) / sqrt(var + eps) * scale + bias``, and updates
  ``running = momentum * running + (1 - momentum) * batch`` with the unbiased
  variance ``var * n / (n - 1)`` (PyTorch momentum 0.1 == ``momentum=0.9``).
  Eval mode normalizes with the running statistics. Statistics and the
  normalization are computed in float32; the output has dtype ``dtype``.
  Under ``jit`` with a batch-sharded input the means are global, i.e. this is
  synchronized BatchNorm.
  """

  def __init__(self, num_features: int, *, momentum: float = 0.9,
               epsilon: float = 1e-5, use_running_average: bool = False,
               dtype: Any = jnp.float32):
    self.num_features = num_features
    self.momentum = momentum
    self.epsilon = epsilon
    self.use_running_average = use_running_average
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if self.use_running_average:
      mean, var = self.mean[...], self.var[...]
    else:
      reduce_axes = tuple(range(x.ndim - 1))
      count = int(np.prod([x.shape[a] for a in reduce_axes]))
      mean = jnp.mean(x32, axis=reduce_axes)
      # Two-pass variance: E[(x - mean)^2] does not cancel catastrophically.
      var = jnp.mean(jnp.square(x32 - mean), axis=reduce_axes)
      unbiased_var = var * (count / max(count - 1, 1))
      self.mean[...] = (self.momentum * self.mean[...] + (1.0 - self.momentum)
                        * jax.lax.stop_gradient(mean))
      self.var[...] = (self.momentum * self.var[...] + (1.0 - self.momentum)
                       * jax.lax.stop_gradient(unbiased_var))
    inv_std = jax.lax.rsqrt(var + self.epsilon) * self.scale[...]
    y = (x32 - mean) * inv_std + self.bias[...]
    return y.astype(self.dtype)


class ConvBNReLU(nnx.Module):
  """``relu(bn(conv(x)))``: conv without bias (PyTorch-init), BatchNorm.

  ``conv`` builds the conv (``conv_factory()`` if None)."""

  def __init__(self, in_features: int, out_features: int, kernel_size: int, *,
               dilation: int = 1, conv: ConvFactory | None = None,
               dtype: Any, rngs: nnx.Rngs):
    conv = conv or conv_factory()
    self.conv = conv(in_features, out_features, kernel_size, dilation=dilation,
                     kernel_init=_head_kernel_init, dtype=dtype, rngs=rngs)
    self.bn = BatchNorm(out_features, dtype=dtype)

  def __call__(self, x: Array) -> Array:
    return nnx.relu(self.bn(self.conv(x)))


class Downsample(nnx.Module):
  """Shortcut projection: 1x1 conv with stride, then BatchNorm."""

  def __init__(self, in_features: int, out_features: int, stride: int, *,
               conv: ConvFactory, dtype: Any, rngs: nnx.Rngs):
    self.conv = conv(in_features, out_features, 1, stride=stride, dtype=dtype,
                     rngs=rngs)
    self.bn = BatchNorm(out_features, dtype=dtype)

  def __call__(self, x: Array) -> Array:
    return self.bn(self.conv(x))


class BasicBlock(nnx.Module):
  """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``, two 3x3 convs.

  Both 3x3 convs use ``dilation`` (torchvision's BasicBlock rejects dilation;
  this is the usual DeepLab extension). ``conv1`` carries the stride.
  """

  expansion = 1

  def __init__(self, in_features: int, planes: int, *, stride: int,
               dilation: int, downsample: Downsample | None,
               conv: ConvFactory, dtype: Any, rngs: nnx.Rngs):
    self.conv1 = conv(in_features, planes, 3, stride=stride, dilation=dilation,
                      dtype=dtype, rngs=rngs)
    self.bn1 = BatchNorm(planes, dtype=dtype)
    self.conv2 = conv(planes, planes, 3, dilation=dilation, dtype=dtype,
                      rngs=rngs)
    self.bn2 = BatchNorm(planes, dtype=dtype)
    self.downsample = downsample

  def __call__(self, x: Array) -> Array:
    shortcut = x if self.downsample is None else self.downsample(x)
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return nnx.relu(y + shortcut)


class Bottleneck(nnx.Module):
  """1x1 (planes) -> 3x3 (planes, stride, dilation) -> 1x1 (4 planes) + shortcut."""

  expansion = 4

  def __init__(self, in_features: int, planes: int, *, stride: int,
               dilation: int, downsample: Downsample | None,
               conv: ConvFactory, dtype: Any, rngs: nnx.Rngs):
    self.conv1 = conv(in_features, planes, 1, dtype=dtype, rngs=rngs)
    self.bn1 = BatchNorm(planes, dtype=dtype)
    self.conv2 = conv(planes, planes, 3, stride=stride, dilation=dilation,
                      dtype=dtype, rngs=rngs)
    self.bn2 = BatchNorm(planes, dtype=dtype)
    self.conv3 = conv(planes, planes * self.expansion, 1, dtype=dtype,
                      rngs=rngs)
    self.bn3 = BatchNorm(planes * self.expansion, dtype=dtype)
    self.downsample = downsample

  def __call__(self, x: Array) -> Array:
    shortcut = x if self.downsample is None else self.downsample(x)
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = nnx.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return nnx.relu(y + shortcut)


class DeepStem(nnx.Module):
  """Three 3x3 convs 3->64 (stride 2) ->64 ->128 with BN+ReLU after the first two.

  The BatchNorm + ReLU after the third conv is ``ResNet.bn1``, as in the
  official code (its ``conv1`` Sequential ends with the conv).
  """

  def __init__(self, *, conv: ConvFactory, dtype: Any, rngs: nnx.Rngs):
    self.conv1 = conv(3, 64, 3, stride=2, dtype=dtype, rngs=rngs)
    self.bn1 = BatchNorm(64, dtype=dtype)
    self.conv2 = conv(64, 64, 3, dtype=dtype, rngs=rngs)
    self.bn2 = BatchNorm(64, dtype=dtype)
    self.conv3 = conv(64, 128, 3, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.bn2(self.conv2(x)))
    return self.conv3(x)


def output_stride_to_dilation(output_stride: int) -> tuple[bool, bool, bool]:
  """``replace_stride_with_dilation`` for layer2..4 giving ``output_stride``."""
  table = {32: (False, False, False), 16: (False, False, True),
           8: (False, True, True)}
  if output_stride not in table:
    raise ValueError(f'output_stride must be 8, 16 or 32, got {output_stride}')
  return table[output_stride]


class ResNet(nnx.Module):
  """ResNet trunk returning the four stage outputs ``(c1, c2, c3, c4)``.

  Shapes for input ``[B, H, W, 3]`` and output stride ``s``: ``c1`` is
  ``[B, H/4, W/4, 64 e]``, ``c2`` ``[.., H/8, .., 128 e]``, ``c3`` and ``c4``
  at ``H / min(16, s)`` and ``H / s`` with ``256 e`` and ``512 e`` channels
  (``e`` = block expansion, sizes rounded up as by the strided convs).
  ``conv`` builds every conv (``conv_factory()`` if None).
  """

  def __init__(self, depth: int = 101, *, stem: str = 'deep',
               output_stride: int = 8, multi_grid: bool = False,
               conv: ConvFactory | None = None, dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    if depth not in RESNET_LAYERS:
      raise ValueError(f'depth must be one of {sorted(RESNET_LAYERS)}, got {depth}')
    if stem not in STEMS:
      raise ValueError(f'stem must be one of {STEMS}, got {stem!r}')
    block_kind, layers = RESNET_LAYERS[depth]
    conv = conv or conv_factory()
    block_cls = BasicBlock if block_kind == 'basic' else Bottleneck
    self.depth = depth
    self.stem = stem
    self.expansion = block_cls.expansion
    if stem == 'torchvision':
      self.conv1 = conv(3, 64, 7, stride=2, dtype=dtype, rngs=rngs)
      stem_features = 64
    else:
      self.conv1 = DeepStem(conv=conv, dtype=dtype, rngs=rngs)
      stem_features = 128
    self.bn1 = BatchNorm(stem_features, dtype=dtype)

    dilate = output_stride_to_dilation(output_stride)
    self._in_features = stem_features
    self._dilation = 1
    self._conv = conv
    self.layer1 = self._make_layer(block_cls, 64, layers[0], stride=1,
                                   dilate=False, grids=None, dtype=dtype,
                                   rngs=rngs)
    self.layer2 = self._make_layer(block_cls, 128, layers[1], stride=2,
                                   dilate=dilate[0], grids=None, dtype=dtype,
                                   rngs=rngs)
    self.layer3 = self._make_layer(block_cls, 256, layers[2], stride=2,
                                   dilate=dilate[1], grids=None, dtype=dtype,
                                   rngs=rngs)
    self.layer4 = self._make_layer(block_cls, 512, layers[3], stride=2,
                                   dilate=dilate[2],
                                   grids=MULTI_GRID if multi_grid else None,
                                   dtype=dtype, rngs=rngs)
    self.out_features = self._in_features
    del self._in_features, self._dilation, self._conv

  def _make_layer(self, block_cls, planes: int, blocks: int, *, stride: int,
                  dilate: bool, grids: Sequence[int] | None, dtype: Any,
                  rngs: nnx.Rngs) -> nnx.List:
    """One stage; mirrors the official ``_make_layer`` incl. its multi-grid."""
    previous_dilation = self._dilation
    if dilate:
      self._dilation *= stride
      stride = 1
    out_features = planes * block_cls.expansion
    downsample = None
    if stride != 1 or self._in_features != out_features:
      downsample = Downsample(self._in_features, out_features, stride,
                              conv=self._conv, dtype=dtype, rngs=rngs)
    grids = tuple(grids) if grids is not None else (1,) * blocks
    if len(grids) < blocks:
      raise ValueError(f'multi-grid {grids} has fewer entries than {blocks} blocks')
    stage = [block_cls(self._in_features, planes, stride=stride,
                       dilation=previous_dilation * grids[0],
                       downsample=downsample,
                       conv=self._conv, dtype=dtype, rngs=rngs)]
    self._in_features = out_features
    for index in range(1, blocks):
      stage.append(block_cls(out_features, planes, stride=1,
                             dilation=self._dilation * grids[index],
                             downsample=None,
                             conv=self._conv, dtype=dtype, rngs=rngs))
    return nnx.List(stage)

  def __call__(self, x: Array) -> tuple[Array, Array, Array, Array]:
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    stages = []
    for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
      for block in layer:
        x = block(x)
      stages.append(x)
    return tuple(stages)


class ASPPPooling(nnx.Module):
  """Image pooling branch: global mean -> 1x1 conv -> BN -> ReLU -> broadcast.

  The official code resizes the 1x1 map with align-corners bilinear, which is
  exactly a broadcast.
  """

  def __init__(self, in_features: int, out_features: int, *,
               conv: ConvFactory, dtype: Any, rngs: nnx.Rngs):
    self.conv = conv(in_features, out_features, 1,
                     kernel_init=_head_kernel_init, dtype=dtype, rngs=rngs)
    self.bn = BatchNorm(out_features, dtype=dtype)

  def __call__(self, x: Array) -> Array:
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True)
    pooled = nnx.relu(self.bn(self.conv(pooled.astype(x.dtype))))
    return jnp.broadcast_to(pooled, x.shape[:3] + pooled.shape[3:])


class ASPP(nnx.Module):
  """ASPP: b0 1x1, b1..b3 3x3 atrous, b4 image pooling; concat; 1x1 project.

  ``[B, h, w, C_in] -> [B, h, w, 256]``; channel dropout (Dropout2d, p=0.5)
  after the projection in train mode. ``conv`` builds the convs
  (``conv_factory()`` if None).
  """

  def __init__(self, in_features: int, atrous_rates: Sequence[int], *,
               out_features: int = ASPP_CHANNELS,
               conv: ConvFactory | None = None, dtype: Any, rngs: nnx.Rngs):
    if len(atrous_rates) != 3:
      raise ValueError(f'aspp_rates must have 3 entries, got {atrous_rates}')
    conv = conv or conv_factory()
    self.b0 = ConvBNReLU(in_features, out_features, 1, conv=conv, dtype=dtype,
                         rngs=rngs)
    self.b1 = ConvBNReLU(in_features, out_features, 3,
                         dilation=int(atrous_rates[0]), conv=conv, dtype=dtype,
                         rngs=rngs)
    self.b2 = ConvBNReLU(in_features, out_features, 3,
                         dilation=int(atrous_rates[1]), conv=conv, dtype=dtype,
                         rngs=rngs)
    self.b3 = ConvBNReLU(in_features, out_features, 3,
                         dilation=int(atrous_rates[2]), conv=conv, dtype=dtype,
                         rngs=rngs)
    self.b4 = ASPPPooling(in_features, out_features, conv=conv, dtype=dtype,
                          rngs=rngs)
    self.project = ConvBNReLU(5 * out_features, out_features, 1, conv=conv,
                              dtype=dtype, rngs=rngs)
    # Dropout2d: one keep/drop decision per (sample, channel).
    self.dropout = nnx.Dropout(PROJECT_DROPOUT, broadcast_dims=(1, 2), rngs=rngs)

  def __call__(self, x: Array) -> Array:
    branches = [self.b0(x), self.b1(x), self.b2(x), self.b3(x), self.b4(x)]
    return self.dropout(self.project(jnp.concatenate(branches, axis=-1)))


class DeepLabV3Plus(nnx.Module):
  """DeepLabV3+ with a ResNet backbone (see the module docstring).

  Attributes ``backbone`` (the ResNet; gets the backbone learning rate),
  ``head`` (ASPP), ``reduce``, ``fuse`` and ``classifier``. ``conv`` builds
  every conv (``conv_factory()`` if None).
  """

  def __init__(self, num_classes: int, *, depth: int = 101, stem: str = 'deep',
               output_stride: int = 8, multi_grid: bool = False,
               aspp_rates: Sequence[int] = (6, 12, 18),
               extra_heads: Mapping[str, Callable[..., nnx.Module]] | None = None,
               conv: ConvFactory | None = None, dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    if num_classes < 1:
      raise ValueError(f'num_classes must be >= 1, got {num_classes}')
    self.num_classes = num_classes
    conv = conv or conv_factory()
    self.backbone = ResNet(depth, stem=stem, output_stride=output_stride,
                           multi_grid=multi_grid, conv=conv, dtype=dtype,
                           rngs=rngs)
    high_features = self.backbone.out_features
    low_features = 64 * self.backbone.expansion
    self.head = ASPP(high_features, aspp_rates, conv=conv, dtype=dtype,
                     rngs=rngs)
    self.reduce = ConvBNReLU(low_features, REDUCED_LOW_CHANNELS, 1, conv=conv,
                             dtype=dtype, rngs=rngs)
    self.fuse = nnx.List([
        ConvBNReLU(ASPP_CHANNELS + REDUCED_LOW_CHANNELS, DECODER_CHANNELS, 3,
                   conv=conv, dtype=dtype, rngs=rngs),
        ConvBNReLU(DECODER_CHANNELS, DECODER_CHANNELS, 3, conv=conv,
                   dtype=dtype, rngs=rngs),
    ])
    self.classifier = conv(
        DECODER_CHANNELS, num_classes, 1, use_bias=True,
        kernel_init=_head_kernel_init,
        bias_init=_torch_default_bias_init(DECODER_CHANNELS), dtype=dtype,
        rngs=rngs)
    # Heads a loss method declares (agmm_jax.methods.Needs.heads), each
    # ``factory(DECODER_CHANNELS, num_classes=, dtype=, rngs=)`` applied to
    # the features, or to another head's output (its ``input_head``).
    self.extra_heads = nnx.Dict({
        name: factory(DECODER_CHANNELS, num_classes=num_classes, dtype=dtype, rngs=rngs)
        for name, factory in sorted((extra_heads or {}).items())})

  def __call__(self, images: Array) -> tuple[Array, Array]:
    """``[B, H, W, 3]`` -> (features ``[B, h1, w1, 256]``, logits ``[B, H, W, K]``)."""
    height, width = images.shape[1], images.shape[2]
    c1, _, _, c4 = self.backbone(images)
    context = self.head(c4)
    context = resize_bilinear_align_corners(context, c1.shape[1:3])
    low = self.reduce(c1)
    features = jnp.concatenate([low, context.astype(low.dtype)], axis=-1)
    for layer in self.fuse:
      features = layer(features)
    logits = self.classifier(features).astype(jnp.float32)
    logits = resize_bilinear_align_corners(logits, (height, width))
    return features.astype(jnp.float32), logits

  def extra_outputs(self, features: Array) -> dict[str, Array]:
    """The extra heads' outputs (float32): on the decoder ``features``, or,
    for a head with an ``input_head`` attribute, on that head's output."""
    inputs = features.astype(self.classifier.dtype)
    outputs = {name: head(inputs).astype(jnp.float32)
               for name, head in self.extra_heads.items()
               if getattr(head, 'input_head', None) is None}
    for name, head in self.extra_heads.items():
      source = getattr(head, 'input_head', None)
      if source is not None:
        if source not in outputs:
          raise ValueError(f'head {name!r} reads head {source!r}, which is not '
                           'a head on the decoder features of this model')
        outputs[name] = head(outputs[source].astype(self.classifier.dtype)).astype(jnp.float32)
    return outputs


def build_model(model_config: Any, num_classes: int, *, rngs: nnx.Rngs,
                extra_heads: Mapping[str, Callable[..., nnx.Module]] | None = None
                ) -> DeepLabV3Plus:
  """Builds ``DeepLabV3Plus`` from ``config.model`` (see docs/design.md).

  Reads ``depth``, ``stem``, ``output_stride``, ``multi_grid``, ``aspp_rates``,
  ``dilated_conv`` ('auto' | 'xla' | 'taps' | 'space_to_batch',
  ``agmm_jax.model.dilated_conv``; 'auto' is resolved by the backend) and
  ``compute_dtype`` ('float32' | 'bfloat16' | 'float16'); every field is
  required (configs/common.py holds the defaults). ``extra_heads`` are the
  loss's declared heads (``build_loss(config.loss).needs.heads``). Pretrained
  weights are not loaded here; call ``load_pretrained(model,
  config.model.pretrained)``.
  """
  compute_dtype = str(model_config.compute_dtype)
  if compute_dtype not in ('float32', 'bfloat16', 'float16'):
    raise ValueError(f'model.compute_dtype must be float32, bfloat16 or float16, '
                     f'got {compute_dtype!r}')
  return DeepLabV3Plus(
      num_classes,
      depth=int(model_config.depth),
      stem=str(model_config.stem),
      output_stride=int(model_config.output_stride),
      multi_grid=bool(model_config.multi_grid),
      aspp_rates=tuple(int(r) for r in model_config.aspp_rates),
      extra_heads=extra_heads,
      conv=conv_factory(str(model_config.dilated_conv)),
      dtype=jnp.dtype(compute_dtype),
      rngs=rngs)


def count_params(model: nnx.Module) -> int:
  """Number of scalar ``nnx.Param`` entries (works on abstract models too)."""
  leaves = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
  return int(sum(int(np.prod(leaf.shape)) for leaf in leaves))
