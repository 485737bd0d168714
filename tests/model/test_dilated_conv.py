"""agmm_jax.model.dilated_conv: the sub-grid and per-tap forms equal XLA's
dilated convolution; 'auto' is resolved by the backend, a forced slow form warns.

Rates: every dilation the configs give a 3x3 conv. ResNet OS8: layer3 2,
layer4 2 then 4; OS16: layer4 2 (the first block keeps the previous one);
multi-grid (2, 2, 4): layer4 4, 8, 16 at OS8 and 2, 4, 8 at OS16; ASPP:
6/12/18 (VOC, CamVid), 12/24/36 (Cityscapes), 1/2/3 (tiny). Sizes odd and
even, smaller and larger than the rate.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from agmm_jax.model import dilated_conv
from agmm_jax.model import deeplab

CONFIG_RATES = (2, 3, 4, 6, 8, 12, 16, 18, 24, 36)
SIZES = ((7, 10), (13, 12), (41, 41))


def _reference(x, kernel, rate):
  """XLA's dilated conv with the PyTorch padding rate * (k - 1) / 2."""
  pad = rate * (kernel.shape[0] - 1) // 2
  return jax.lax.conv_general_dilated(
      x, kernel, (1, 1), ((pad, pad), (pad, pad)), rhs_dilation=(rate, rate),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=jax.lax.Precision.HIGHEST)


def _form(conv_fn):
  """``(x, kernel, rate) -> y`` of a ``conv_general_dilated`` drop-in."""
  def conv(x, kernel, rate):
    pad = rate * (kernel.shape[0] - 1) // 2
    return conv_fn(
        x, kernel, (1, 1), ((pad, pad), (pad, pad)), rhs_dilation=(rate, rate),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        precision=jax.lax.Precision.HIGHEST)
  return conv


FORMS = {'space_to_batch': dilated_conv.space_to_batch_conv,
         'taps': dilated_conv.tap_sum_conv}


def _naive_dilated_conv(x, kernel, rate):
  """Direct loop over the taps in float64: y[i, j] = sum w[a, b] x[i + r(a-1), j + r(b-1)]."""
  x = np.asarray(x, np.float64)
  kernel = np.asarray(kernel, np.float64)
  batch, height, width, _ = x.shape
  padded = np.pad(x, ((0, 0), (rate, rate), (rate, rate), (0, 0)))
  out = np.zeros((batch, height, width, kernel.shape[-1]))
  for a in range(3):
    for b in range(3):
      window = padded[:, a * rate:a * rate + height, b * rate:b * rate + width]
      out += window @ kernel[a, b]
  return out


def _values_and_grads(conv):
  """jit of (values, input and kernel gradients) at every config rate."""
  def run(x, kernel, cotangent):
    outputs = []
    for rate in CONFIG_RATES:
      value, vjp = jax.vjp(lambda a, w, rate=rate: conv(a, w, rate), x, kernel)
      outputs.append((value, *vjp(cotangent)))
    return outputs
  return jax.jit(run)


@pytest.mark.parametrize('form', sorted(FORMS))
@pytest.mark.parametrize('height,width', SIZES)
def test_values_and_gradients_equal_xla(height, width, form):
  rng = np.random.default_rng(height * 100 + width)
  x = rng.normal(size=(2, height, width, 3)).astype(np.float32)
  kernel = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
  cotangent = rng.normal(size=(2, height, width, 4)).astype(np.float32)
  expected = _values_and_grads(_reference)(x, kernel, cotangent)
  actual = _values_and_grads(_form(FORMS[form]))(x, kernel, cotangent)
  for rate, (value, dx, dw), (expected_value, expected_dx, expected_dw) in zip(
      CONFIG_RATES, actual, expected):
    np.testing.assert_allclose(value, expected_value, rtol=1e-5, atol=1e-5,
                               err_msg=f'rate {rate}')
    np.testing.assert_allclose(dx, expected_dx, rtol=1e-5, atol=1e-5,
                               err_msg=f'rate {rate}')
    np.testing.assert_allclose(dw, expected_dw, rtol=1e-5, atol=1e-4,
                               err_msg=f'rate {rate}')
  # Both equal the definition written as a loop over the taps.
  np.testing.assert_allclose(actual[CONFIG_RATES.index(6)][0],
                             _naive_dilated_conv(x, kernel, 6),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('form', sorted(FORMS))
def test_other_convs_fall_through_to_xla(form):
  """Stride 2, rate 1, 1x1 and other paddings are XLA's own convs."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(1, 9, 8, 3)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 2)), jnp.float32)
  cases = [((2, 2), ((1, 1), (1, 1)), (1, 1)),
           ((1, 1), ((0, 0), (0, 0)), (2, 2)),  # VALID, not the PyTorch padding
           ((1, 1), 'SAME', (2, 2)),
           ((1, 1), ((1, 1), (1, 1)), (1, 1))]
  for strides, padding, rates in cases:
    jaxpr = jax.make_jaxpr(lambda a, w: FORMS[form](
        a, w, strides, padding, rhs_dilation=rates,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC')))(x, kernel)
    primitives = [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns]
    assert primitives == ['conv_general_dilated'], (strides, padding, rates)


def test_taps_in_the_padding_are_skipped():
  """At rate >= the grid only the centre tap reads the image: one matmul, and
  its gradients are matmuls too (no convolution left)."""
  x = jnp.ones((1, 11, 11, 3), jnp.float32)
  kernel = jnp.ones((3, 3, 3, 2), jnp.float32)
  conv = _form(dilated_conv.tap_sum_conv)
  jaxpr = jax.make_jaxpr(jax.grad(
      lambda a, w: jnp.sum(conv(a, w, 12)), argnums=(0, 1)))(x, kernel)
  primitives = [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns]
  assert 'conv_general_dilated' not in primitives
  assert primitives.count('dot_general') == 3  # Forward, input and weight grads.
  # Rate 6 on 11 rows: every tap reads some of the image.
  jaxpr = jax.make_jaxpr(lambda a, w: conv(a, w, 6))(x, kernel)
  assert [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns].count('dot_general') == 9


@pytest.mark.parametrize('strides', [(1, 1), (2, 2), (2, 1)])
def test_pointwise_dot_conv_equals_xla(strides):
  """A 1x1 conv as a dot: values, input and weight gradients equal XLA's
  conv and the definition x[:, ::s, ::s] @ w written in float64; all three
  are dots (no convolution left)."""
  rng = np.random.default_rng(sum(strides))
  x = rng.normal(size=(2, 7, 10, 5)).astype(np.float32)
  kernel = rng.normal(size=(1, 1, 5, 3)).astype(np.float32)

  def conv_with(conv_fn):
    return lambda a, w: conv_fn(
        a, w, strides, ((0, 0), (0, 0)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        precision=jax.lax.Precision.HIGHEST)

  def values_and_grads(conv):
    def run(a, w, cotangent):
      value, vjp = jax.vjp(conv, a, w)
      return (value, *vjp(cotangent))
    return jax.jit(run)

  out_shape = jax.eval_shape(conv_with(jax.lax.conv_general_dilated),
                             x, kernel).shape
  cotangent = rng.normal(size=out_shape).astype(np.float32)
  expected = values_and_grads(conv_with(jax.lax.conv_general_dilated))(
      x, kernel, cotangent)
  actual = values_and_grads(conv_with(dilated_conv.pointwise_dot_conv))(
      x, kernel, cotangent)
  for got, want in zip(actual, expected):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  naive = (x.astype(np.float64)[:, ::strides[0], ::strides[1]]
           @ kernel[0, 0].astype(np.float64))
  np.testing.assert_allclose(actual[0], naive, rtol=1e-5, atol=1e-5)
  jaxpr = jax.make_jaxpr(jax.grad(
      lambda a, w: jnp.sum(conv_with(dilated_conv.pointwise_dot_conv)(a, w)),
      argnums=(0, 1)))(x, kernel)
  text = str(jaxpr)  # With the forward's jaxpr inside custom_vjp_call.
  assert 'conv_general_dilated' not in text
  assert text.count('dot_general[') == 3


def test_pointwise_other_convs_fall_through_to_xla():
  """Padded 1x1, 3x3, grouped and SAME convs stay XLA's convolutions."""
  x = jnp.ones((1, 9, 8, 4), jnp.float32)
  cases = [((1, 1, 4, 2), ((1, 1), (1, 1)), 1),
           ((3, 3, 4, 2), ((1, 1), (1, 1)), 1),
           ((1, 1, 2, 2), ((0, 0), (0, 0)), 2),
           ((1, 1, 4, 2), 'SAME', 1)]
  for kernel_shape, padding, groups in cases:
    jaxpr = jax.make_jaxpr(lambda a, w: dilated_conv.pointwise_dot_conv(
        a, w, (1, 1), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=groups))(x, jnp.ones(kernel_shape, jnp.float32))
    primitives = [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns]
    assert primitives == ['conv_general_dilated'], (kernel_shape, padding)


def test_conv_function_picks_the_form_by_kernel_and_rate():
  assert dilated_conv.conv_function('taps', 1, 1) is dilated_conv.pointwise_dot_conv
  assert dilated_conv.conv_function('taps', 2, 3) is dilated_conv.tap_sum_conv
  assert dilated_conv.conv_function('taps', 1, 3) is jax.lax.conv_general_dilated
  for form in ('xla', 'space_to_batch'):
    assert dilated_conv.conv_function(form, 1, 1) is jax.lax.conv_general_dilated


def test_auto_is_resolved_by_the_backend():
  assert dilated_conv.resolve('auto', 'cpu') == 'taps'
  assert dilated_conv.resolve('auto', 'gpu') == 'xla'
  assert dilated_conv.resolve('auto', 'tpu') == 'xla'
  assert dilated_conv.resolve('xla', 'cpu') == 'xla'
  assert dilated_conv.resolve('auto') == dilated_conv.resolve(
      'auto', jax.default_backend())
  with pytest.raises(ValueError, match='dilated_conv'):
    dilated_conv.resolve('fft', 'cpu')


def test_a_forced_slow_choice_warns(caplog):
  """space_to_batch on CPU (17x slower) warns once, in one line; the same
  choice on GPU, or a fast one on CPU, does not."""
  with caplog.at_level('WARNING'):
    assert dilated_conv.resolve('space_to_batch', 'cpu') == 'space_to_batch'
  warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
  assert len(warnings) == 1 and '\n' not in warnings[0]
  assert 'space_to_batch' in warnings[0] and 'slower' in warnings[0]
  caplog.clear()
  with caplog.at_level('WARNING'):
    dilated_conv.resolve('space_to_batch', 'gpu')
    dilated_conv.resolve('taps', 'cpu')
    dilated_conv.resolve('xla', 'cpu')
    dilated_conv.resolve('auto', 'cpu')
  assert not [r for r in caplog.records if r.levelname == 'WARNING']


def test_model_forms_agree():
  """ASPP, a dilated residual block and a strided bottleneck of the model give
  the same outputs and gradients (input and parameters) with every form and
  the same parameters; the model passes the option to them
  (test_deeplab.test_build_model_reads_config)."""
  def build(form):
    rngs = nnx.Rngs(0)
    conv = deeplab.conv_factory(form)
    return nnx.List([
        # 1x1 convs (dots under 'taps'), a strided one in the shortcut.
        deeplab.Bottleneck(
            8, 2, stride=2, dilation=1, conv=conv, dtype=jnp.float32,
            rngs=rngs, downsample=deeplab.Downsample(
                8, 8, 2, conv=conv, dtype=jnp.float32, rngs=rngs)),
        deeplab.BasicBlock(8, 8, stride=1, dilation=2, downsample=None,
                          conv=conv, dtype=jnp.float32, rngs=rngs),
        deeplab.ASPP(8, (2, 3, 5), out_features=4, conv=conv,
                    dtype=jnp.float32, rngs=rngs)])
  xla_layers = build('xla')
  for form in sorted(FORMS):
    _assert_layers_agree(xla_layers, build(form))


def _assert_layers_agree(xla_layers, layers):
  nnx.update(layers, nnx.state(xla_layers))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 11, 8, 8)),
                  jnp.float32)

  @nnx.jit
  def outputs_and_grads(layers, x):
    layers.eval()
    def loss(layers, x):
      y = x
      for layer in layers:
        y = layer(y)
      return jnp.sum(jnp.sin(y)), y
    return nnx.grad(loss, argnums=(0, 1), has_aux=True)(layers, x)

  xla_grads, xla_y = outputs_and_grads(xla_layers, x)
  grads, y = outputs_and_grads(layers, x)
  np.testing.assert_allclose(y, xla_y, rtol=1e-5, atol=1e-5)
  for expected, actual in zip(jax.tree_util.tree_leaves(xla_grads),
                              jax.tree_util.tree_leaves(grads)):
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)
