"""Tests of agmm_jax.model.resample (align corners) against a naive loop and PyTorch's interpolate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agmm_jax.model.resample import interpolation_matrix
from agmm_jax.model.resample import resize_bilinear_align_corners

# (in_h, in_w, out_h, out_w): up, down, mixed, to/from size 1, identity.
SIZE_CASES = [(5, 7, 9, 13), (9, 13, 4, 5), (6, 4, 3, 11), (1, 1, 5, 3),
              (5, 4, 1, 1), (3, 2, 3, 2), (41, 41, 321, 321)]


def naive_resize(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """Per-pixel align-corners bilinear of NHWC x, in float64."""
  batch, in_h, in_w, channels = x.shape
  y = np.zeros((batch, out_h, out_w, channels), np.float64)
  for i in range(out_h):
    sy = i * (in_h - 1) / (out_h - 1) if out_h > 1 else 0.0
    y0 = min(int(np.floor(sy)), in_h - 1)
    y1 = min(y0 + 1, in_h - 1)
    wy = sy - y0
    for j in range(out_w):
      sx = j * (in_w - 1) / (out_w - 1) if out_w > 1 else 0.0
      x0 = min(int(np.floor(sx)), in_w - 1)
      x1 = min(x0 + 1, in_w - 1)
      wx = sx - x0
      y[:, i, j] = ((1 - wy) * (1 - wx) * x[:, y0, x0] + (1 - wy) * wx * x[:, y0, x1]
                    + wy * (1 - wx) * x[:, y1, x0] + wy * wx * x[:, y1, x1])
  return y


@pytest.mark.parametrize('in_h,in_w,out_h,out_w', SIZE_CASES)
def test_matches_naive_loop(in_h, in_w, out_h, out_w):
  x = np.random.default_rng(0).normal(size=(2, in_h, in_w, 3)).astype(np.float32)
  actual = resize_bilinear_align_corners(jnp.asarray(x), (out_h, out_w))
  assert actual.shape == (2, out_h, out_w, 3)
  assert actual.dtype == jnp.float32
  np.testing.assert_allclose(actual, naive_resize(x, out_h, out_w),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('in_h,in_w,out_h,out_w', SIZE_CASES)
def test_matches_torch(in_h, in_w, out_h, out_w):
  torch = pytest.importorskip('torch')
  x = np.random.default_rng(1).normal(size=(2, in_h, in_w, 4)).astype(np.float32)
  expected = torch.nn.functional.interpolate(
      torch.from_numpy(x.transpose(0, 3, 1, 2)), size=(out_h, out_w),
      mode='bilinear', align_corners=True).numpy().transpose(0, 2, 3, 1)
  actual = resize_bilinear_align_corners(jnp.asarray(x), (out_h, out_w))
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_three_dim_input_and_corners():
  x = np.random.default_rng(2).normal(size=(2, 4, 6)).astype(np.float32)
  actual = np.asarray(resize_bilinear_align_corners(jnp.asarray(x), (7, 11)))
  assert actual.shape == (2, 7, 11)
  np.testing.assert_allclose(actual, naive_resize(x[..., None], 7, 11)[..., 0],
                             rtol=1e-5, atol=1e-5)
  # Align corners: the four corner pixels are copied exactly.
  np.testing.assert_array_equal(actual[:, [0, 0, -1, -1], [0, -1, 0, -1]],
                                x[:, [0, 0, -1, -1], [0, -1, 0, -1]])


def test_dtype_preserved_and_bfloat16_close():
  x = np.random.default_rng(3).normal(size=(1, 5, 5, 2)).astype(np.float32)
  out16 = resize_bilinear_align_corners(jnp.asarray(x, jnp.bfloat16), (9, 8))
  assert out16.dtype == jnp.bfloat16
  reference = naive_resize(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32),
                           9, 8)
  np.testing.assert_allclose(np.asarray(out16, np.float32), reference,
                             rtol=1e-2, atol=1e-2)


def test_interpolation_matrix_rows_sum_to_one():
  matrix = interpolation_matrix(7, 20)
  np.testing.assert_allclose(matrix.sum(axis=1), 1.0, rtol=0, atol=1e-12)
  assert ((matrix != 0).sum(axis=1) <= 2).all()


def test_gradient_matches_finite_differences_under_jit():
  x = np.random.default_rng(4).normal(size=(1, 3, 4, 2))
  weights = np.random.default_rng(5).normal(size=(1, 5, 7, 2))

  def loss(v):
    return jnp.sum(resize_bilinear_align_corners(v, (5, 7)) * weights)

  with jax.enable_x64():
    grad = jax.jit(jax.grad(loss))(jnp.asarray(x, jnp.float64))
    # The map is linear, so central differences are exact up to rounding.
    eps = 1e-3
    numeric = np.zeros_like(x)
    for index in np.ndindex(x.shape):
      step = np.zeros_like(x)
      step[index] = eps
      numeric[index] = (loss(jnp.asarray(x + step)) -
                        loss(jnp.asarray(x - step))) / (2 * eps)
  np.testing.assert_allclose(grad, numeric, rtol=1e-7, atol=1e-9)


def test_rejects_bad_input():
  with pytest.raises(ValueError, match='floating'):
    resize_bilinear_align_corners(jnp.zeros((1, 2, 2), jnp.int32), (3, 3))
  with pytest.raises(ValueError, match=r'\[B, H, W\] or \[B, H, W, C\]'):
    resize_bilinear_align_corners(jnp.zeros((2, 2)), (3, 3))
