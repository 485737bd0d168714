"""agmm_jax.methods.dense_crf against dense NumPy kernels: the Gaussian blur
and pydensecrf's mean-field iteration (symmetric normalization, Potts)."""

import jax
import jax.numpy as jnp
import numpy as np

from agmm_jax.methods import dense_crf


def dense_kernel(positions, sigma_xy, colors=None, sigma_rgb=None):
  """``[N, N]`` exp(-|dp|^2 / (2 sigma_xy^2) [- |dI|^2 / (2 sigma_rgb^2)]),
  float64, nothing truncated."""
  d2 = ((positions[:, None] - positions[None]) ** 2).sum(-1) / sigma_xy**2
  if colors is not None:
    d2 = d2 + ((colors[:, None] - colors[None]) ** 2).sum(-1) / sigma_rgb**2
  return np.exp(-0.5 * d2)


def reference_mean_field(unary, rgb, valid, iterations, params):
  """One image: ``Q <- softmax(-U + sum_m w_m D^-1/2 K_m D^-1/2 Q)`` over
  the valid pixels with explicit kernels (module docstring of dense_crf)."""
  height, width, num_classes = unary.shape
  yy, xx = np.meshgrid(np.arange(height), np.arange(width), indexing='ij')
  keep = valid.reshape(-1)
  positions = np.stack([yy, xx], -1).reshape(-1, 2)[keep].astype(np.float64)
  colors = rgb.reshape(-1, 3)[keep].astype(np.float64)
  kernels = [
      (params['smoothness_weight'], dense_kernel(positions, params['smoothness_sigma'])),
      (params['appearance_weight'], dense_kernel(positions, params['appearance_sigma_xy'],
                                                 colors, params['appearance_sigma_rgb']))]
  u = unary.reshape(-1, num_classes)[keep].astype(np.float64)

  def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  q = softmax(-u)
  for _ in range(iterations):
    energy = -u
    for weight, kernel in kernels:
      norm = 1.0 / np.sqrt(kernel.sum(1))
      energy = energy + weight * norm[:, None] * (kernel @ (norm[:, None] * q))
    q = softmax(energy)
  out = np.zeros((height * width, num_classes))
  out[keep] = q
  return out.reshape(height, width, num_classes)


def test_gaussian_blur_matches_a_dense_kernel():
  rng = np.random.default_rng(0)
  values = rng.normal(size=(2, 7, 9, 3))
  valid = np.ones((2, 7, 9), bool)
  valid[1, 5:], valid[1, :, 6:] = False, False   # padding bottom and right
  got = np.asarray(jax.jit(dense_crf.gaussian_blur, static_argnums=2)(
      jnp.asarray(values, jnp.float32), jnp.asarray(valid), 1.3))
  yy, xx = np.meshgrid(np.arange(7), np.arange(9), indexing='ij')
  kernel = dense_kernel(np.stack([yy, xx], -1).reshape(-1, 2).astype(float), 1.3)
  for b in range(2):
    m = valid[b].reshape(-1, 1)
    expected = m * (kernel @ (m * values[b].reshape(-1, 3)))
    np.testing.assert_allclose(got[b].reshape(-1, 3), expected, rtol=1e-5, atol=1e-5)


def test_mean_field_matches_a_dense_numpy_reference():
  rng = np.random.default_rng(1)
  batch, height, width, num_classes = 2, 6, 7, 3
  # Walked-map-like inputs in [0, 1], one class absent (clipped to the floor).
  maps = rng.uniform(size=(batch, height, width, num_classes))
  maps[..., 2] = 0.0
  unary = -np.log(np.clip(maps, 1e-5, 1.0))
  rgb = rng.uniform(0, 255, size=(batch, height, width, 3))
  rgb[:, :, :4] = rgb[:, :1, :1]   # a flat region
  valid = np.ones((batch, height, width), bool)
  valid[1, 4:], valid[1, :, 5:] = False, False
  params = dict(smoothness_sigma=1.0, smoothness_weight=3.0, appearance_sigma_xy=4.0,
                appearance_sigma_rgb=30.0, appearance_weight=4.0)
  fn = jax.jit(lambda u, c, v: dense_crf.mean_field(
      u, c, v, iterations=5, approx='exact', cell_xy=0.0, cell_rgb=0.0, **params))
  got = np.asarray(fn(jnp.asarray(unary, jnp.float32), jnp.asarray(rgb, jnp.float32),
                      jnp.asarray(valid)))
  for b in range(batch):
    expected = reference_mean_field(unary[b], rgb[b], valid[b], 5, params)
    np.testing.assert_allclose(got[b][valid[b]], expected[valid[b]], rtol=1e-4, atol=1e-5)
  # The pairwise terms change the labels somewhere (the test is not vacuous).
  assert np.any(np.argmax(got[0], -1) != np.argmax(-unary[0], -1))
