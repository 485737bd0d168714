"""agmm_jax.model.dilated_conv: the sub-grid form equals XLA's dilated convolution.

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


def _sub_grid(x, kernel, rate):
  pad = rate * (kernel.shape[0] - 1) // 2
  return dilated_conv.space_to_batch_conv(
      x, kernel, (1, 1), ((pad, pad), (pad, pad)), rhs_dilation=(rate, rate),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=jax.lax.Precision.HIGHEST)


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


@pytest.mark.parametrize('height,width', SIZES)
def test_values_and_gradients_equal_xla(height, width):
  rng = np.random.default_rng(height * 100 + width)
  x = rng.normal(size=(2, height, width, 3)).astype(np.float32)
  kernel = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
  cotangent = rng.normal(size=(2, height, width, 4)).astype(np.float32)
  expected = _values_and_grads(_reference)(x, kernel, cotangent)
  actual = _values_and_grads(_sub_grid)(x, kernel, cotangent)
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


def test_other_convs_fall_through_to_xla():
  """Stride 2, rate 1, 1x1 and other paddings are XLA's own convs."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(1, 9, 8, 3)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 2)), jnp.float32)
  cases = [((2, 2), ((1, 1), (1, 1)), (1, 1)),
           ((1, 1), ((0, 0), (0, 0)), (2, 2)),  # VALID, not the PyTorch padding
           ((1, 1), 'SAME', (2, 2)),
           ((1, 1), ((1, 1), (1, 1)), (1, 1))]
  for strides, padding, rates in cases:
    jaxpr = jax.make_jaxpr(lambda a, w: dilated_conv.space_to_batch_conv(
        a, w, strides, padding, rhs_dilation=rates,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC')))(x, kernel)
    primitives = [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns]
    assert primitives == ['conv_general_dilated'], (strides, padding, rates)


def test_model_forms_agree():
  """ASPP and a dilated residual block of the model give the same outputs and
  gradients (input and parameters) with either form and the same parameters;
  the model passes the option to them (test_models.test_build_model_reads_config)."""
  def build(form):
    rngs = nnx.Rngs(0)
    return nnx.List([
        deeplab.BasicBlock(8, 8, stride=1, dilation=2, downsample=None,
                          dilated_conv=form, dtype=jnp.float32, rngs=rngs),
        deeplab.ASPP(8, (2, 3, 5), out_features=4, dilated_conv=form,
                    dtype=jnp.float32, rngs=rngs)])
  xla_layers, sub_grid_layers = build('xla'), build('space_to_batch')
  nnx.update(sub_grid_layers, nnx.state(xla_layers))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 11, 8, 8)),
                  jnp.float32)

  @nnx.jit
  def outputs_and_grads(layers, x):
    layers.eval()
    def loss(layers, x):
      y = layers[1](layers[0](x))
      return jnp.sum(jnp.sin(y)), y
    return nnx.grad(loss, argnums=(0, 1), has_aux=True)(layers, x)

  xla_grads, xla_y = outputs_and_grads(xla_layers, x)
  grads, y = outputs_and_grads(sub_grid_layers, x)
  np.testing.assert_allclose(y, xla_y, rtol=1e-5, atol=1e-5)
  for expected, actual in zip(jax.tree_util.tree_leaves(xla_grads),
                              jax.tree_util.tree_leaves(grads)):
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)
