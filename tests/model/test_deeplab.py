"""Tests of agmm_jax.model.deeplab that need no PyTorch.

Numerical equivalence with a PyTorch reference of the official architecture
(both stems, output strides 8/16, multi-grid, weight import) is in
tests/data_prep/test_convert_torch_weights.py.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from agmm_jax.model import dilated_conv
from agmm_jax.model import deeplab


def _abstract_model(**kwargs):
  num_classes = kwargs.pop('num_classes', 21)
  return nnx.eval_shape(
      lambda: deeplab.DeepLabV3Plus(num_classes, rngs=nnx.Rngs(0), **kwargs))


@pytest.mark.parametrize('depth,expected_millions', [(101, 59.47), (50, 40.48)])
def test_param_count_matches_official(depth, expected_millions):
  # Official DeepLabV3+ (deep stem, 21 classes, no aux head) as counted by
  # AGMM's util.count_params.
  model = _abstract_model(depth=depth, stem='deep')
  assert abs(deeplab.count_params(model) / 1e6 - expected_millions) < 0.005


def test_backbone_parameters_live_under_backbone():
  model = _abstract_model(depth=18, stem='torchvision', num_classes=3)
  total = deeplab.count_params(model)
  backbone = deeplab.count_params(model.backbone)
  # torchvision ResNet-18 without its 1000-way fc: 11,689,512 - 513,000.
  assert backbone == 11_176_512
  assert 0 < total - backbone


def _conv2_dilations(layer):
  """Dilation of each block's 3x3 conv (conv2 in both block types)."""
  return [block.conv2.kernel_dilation[0] for block in layer]


@pytest.mark.parametrize('output_stride,multi_grid,expected', [
    # layer3, layer4 dilations; the first block keeps the previous dilation.
    (32, False, ([1] * 6, [1, 1, 1])),
    (16, False, ([1] * 6, [1, 2, 2])),
    (8, False, ([1] + [2] * 5, [2, 4, 4])),
    # Multi-grid (2, 2, 4): first block previous * 2, then dilation * grid.
    (16, True, ([1] * 6, [2, 4, 8])),
    (8, True, ([1] + [2] * 5, [4, 8, 16])),
])
def test_dilations(output_stride, multi_grid, expected):
  model = _abstract_model(depth=50, output_stride=output_stride,
                          multi_grid=multi_grid)
  assert _conv2_dilations(model.backbone.layer3) == expected[0]
  assert _conv2_dilations(model.backbone.layer4) == expected[1]
  strides = [model.backbone.layer3[0].conv2.strides[0],
             model.backbone.layer4[0].conv2.strides[0]]
  assert strides == {32: [2, 2], 16: [2, 1], 8: [1, 1]}[output_stride]


@pytest.mark.parametrize('output_stride', [8, 16, 32])
def test_output_shapes(output_stride):
  model = _abstract_model(depth=18, output_stride=output_stride, num_classes=4)
  graphdef, state = nnx.split(model)

  def forward(state, images):
    module = nnx.merge(graphdef, state)
    return module.backbone(images), module(images)

  stages, (features, logits) = jax.eval_shape(
      forward, state, jax.ShapeDtypeStruct((2, 65, 63, 3), jnp.float32))
  # Stem /2 (33x32), max-pool /2 (17x16), then /2 per non-dilated stage.
  grids = {8: [(17, 16), (9, 8), (9, 8), (9, 8)],
           16: [(17, 16), (9, 8), (5, 4), (5, 4)],
           32: [(17, 16), (9, 8), (5, 4), (3, 2)]}[output_stride]
  channels = [64, 128, 256, 512]  # basic blocks: no expansion
  assert [s.shape for s in stages] == [
      (2, h, w, c) for (h, w), c in zip(grids, channels)]
  assert features.shape == (2, 17, 16, 256)
  assert logits.shape == (2, 65, 63, 4)
  assert features.dtype == logits.dtype == jnp.float32


def test_batch_norm_matches_numpy_reference():
  rng = np.random.default_rng(0)
  x = rng.normal(2.0, 3.0, size=(2, 3, 4, 5)).astype(np.float32)
  bn = deeplab.BatchNorm(5)
  bn.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, 5), jnp.float32)
  bn.bias[...] = jnp.asarray(rng.normal(size=5), jnp.float32)
  scale, bias = np.asarray(bn.scale[...]), np.asarray(bn.bias[...])

  y = np.asarray(bn(jnp.asarray(x)))
  flat = x.reshape(-1, 5).astype(np.float64)
  mean, var = flat.mean(0), flat.var(0)
  np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5) * scale + bias,
                             rtol=1e-5, atol=1e-5)
  # PyTorch: running = 0.9 running + 0.1 batch, with the unbiased variance.
  np.testing.assert_allclose(bn.mean[...], 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * flat.var(0, ddof=1),
                             rtol=1e-5)

  bn.eval()
  running_mean, running_var = np.asarray(bn.mean[...]), np.asarray(bn.var[...])
  y_eval = np.asarray(bn(jnp.asarray(x)))
  np.testing.assert_allclose(
      y_eval, (x - running_mean) / np.sqrt(running_var + 1e-5) * scale + bias,
      rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(bn.mean[...], running_mean)


def test_batch_norm_single_value_per_channel_is_finite():
  # The ASPP pooling branch sees one value per channel when the batch is 1.
  bn = deeplab.BatchNorm(3, dtype=jnp.bfloat16)
  y = bn(jnp.ones((1, 1, 1, 3), jnp.bfloat16))
  assert y.dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(y, np.float32)).all()
  assert np.isfinite(np.asarray(bn.var[...])).all()


def test_aspp_dropout_drops_whole_channels():
  aspp = deeplab.ASPP(8, (1, 2, 3), dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5, 5, 8)),
                  jnp.float32)
  aspp.eval()
  kept = np.asarray(aspp(x))
  aspp.dropout.deterministic = False
  dropped = np.asarray(aspp(x))
  # Dropout2d(0.5): each (sample, channel) map is either zeroed or doubled.
  is_zero = np.all(dropped == 0, axis=(1, 2))
  np.testing.assert_allclose(np.where(is_zero[:, None, None, :], 0, 2 * kept),
                             dropped, rtol=1e-6, atol=1e-6)
  assert 0.3 < is_zero.mean() < 0.7


@pytest.fixture(scope='module')
def small_model():
  """ResNet-18 DeepLabV3+ (the cheapest real configuration) and an input."""
  model = deeplab.DeepLabV3Plus(3, depth=18, stem='deep', output_stride=16,
                               multi_grid=True, rngs=nnx.Rngs(0))
  images = jnp.asarray(np.random.default_rng(2).normal(size=(2, 33, 33, 3)),
                       jnp.float32)
  return model, images


def test_train_and_eval_modes(small_model):
  model, images = small_model
  model.eval()
  before = jax.tree_util.tree_map(np.asarray, nnx.state(model, nnx.BatchStat))
  _, logits_a = model(images)
  _, logits_b = model(images)
  np.testing.assert_array_equal(logits_a, logits_b)
  after_eval = nnx.state(model, nnx.BatchStat)
  jax.tree_util.tree_map(np.testing.assert_array_equal, before, after_eval)

  model.train()
  _, train_logits = model(images)
  changed = jax.tree_util.tree_map(
      lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
      before, nnx.state(model, nnx.BatchStat))
  assert all(jax.tree_util.tree_leaves(changed))
  assert not np.allclose(train_logits, logits_a)
  model.eval()


def test_bfloat16_compute_is_close_to_float32(small_model):
  model, images = small_model
  model.eval()
  features32, logits32 = model(images)
  # Every weight comes from the float32 model, so skip the random init;
  # eval mode never draws dropout keys.
  model16 = nnx.eval_shape(lambda: deeplab.DeepLabV3Plus(
      3, depth=18, stem='deep', output_stride=16, multi_grid=True,
      dtype=jnp.bfloat16, rngs=nnx.Rngs(1)))
  nnx.update(model16, nnx.state(model, (nnx.Param, nnx.BatchStat)))
  model16.eval()
  assert model16.backbone.layer1[0].conv1.kernel[...].dtype == jnp.float32
  features16, logits16 = model16(images)
  assert features16.dtype == logits16.dtype == jnp.float32
  for low, high in ((features16, features32), (logits16, logits32)):
    error = np.linalg.norm(low - high) / np.linalg.norm(high)
    assert error < 5e-2


def test_jitted_gradient_is_finite(small_model):
  model, images = small_model
  model.train()

  @nnx.jit
  def grads(module, images):
    def loss(module):
      features, logits = module(images)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + jnp.mean(features)
    return nnx.grad(loss)(module)

  gradient = grads(model, images)
  model.eval()
  leaves = jax.tree_util.tree_leaves(gradient)
  assert all(np.isfinite(np.asarray(leaf)).all() for leaf in leaves)
  assert np.abs(np.asarray(gradient['backbone']['conv1']['conv1']['kernel'])).max() > 0
  assert np.abs(np.asarray(gradient['classifier']['kernel'])).max() > 0


def test_build_model_reads_config():
  config = ml_collections.ConfigDict({
      'depth': 34, 'stem': 'torchvision', 'output_stride': 16,
      'multi_grid': True, 'aspp_rates': (1, 2, 3), 'compute_dtype': 'bfloat16',
      'dilated_conv': 'space_to_batch', 'pretrained': ''})
  model = nnx.eval_shape(lambda: deeplab.build_model(config, 7,
                                                    rngs=nnx.Rngs(0)))
  assert len(model.backbone.layer3) == 6
  assert isinstance(model.backbone.conv1, nnx.Conv)
  assert model.head.b2.conv.kernel_dilation == (2, 2)
  assert _conv2_dilations(model.backbone.layer4) == [2, 4, 8]
  assert model.classifier.kernel.get_value().shape == (1, 1, 256, 7)
  assert model.classifier.dtype == jnp.bfloat16
  assert model.head.b2.conv.conv_general_dilated is dilated_conv.space_to_batch_conv
  assert model.head.b0.conv.conv_general_dilated is jax.lax.conv_general_dilated
  config.compute_dtype = 'float64'
  with pytest.raises(ValueError, match='compute_dtype'):
    deeplab.build_model(config, 7, rngs=nnx.Rngs(0))
  config.compute_dtype = 'float32'
  config.dilated_conv = 'auto'  # The backend's form; the tests run on CPU.
  model = nnx.eval_shape(lambda: deeplab.build_model(config, 7,
                                                    rngs=nnx.Rngs(0)))
  assert model.head.b2.conv.conv_general_dilated is dilated_conv.tap_sum_conv
  assert (model.backbone.layer4[1].conv1.conv_general_dilated
          is dilated_conv.tap_sum_conv)
  # 'taps' writes the 1x1 convs as dots, strided ones included; plain 3x3
  # convs stay XLA's.
  assert model.head.b0.conv.conv_general_dilated is dilated_conv.pointwise_dot_conv
  assert (model.backbone.layer2[0].downsample.conv.conv_general_dilated
          is dilated_conv.pointwise_dot_conv)
  assert model.backbone.layer1[0].conv1.conv_general_dilated is jax.lax.conv_general_dilated
  config.dilated_conv = 'fft'
  with pytest.raises(ValueError, match='dilated_conv'):
    deeplab.build_model(config, 7, rngs=nnx.Rngs(0))


def test_bad_arguments():
  with pytest.raises(ValueError, match='depth'):
    _abstract_model(depth=20)
  with pytest.raises(ValueError, match='stem'):
    _abstract_model(stem='resnet_d')
  with pytest.raises(ValueError, match='output_stride'):
    _abstract_model(output_stride=4)
