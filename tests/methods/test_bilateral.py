"""Tests of agmm_jax.methods.bilateral (the kernels) against a dense numpy
kernel written from the formula; the losses built on them are tested in
tests/methods/test_regularized.py."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agmm_jax.methods import bilateral as bl
from agmm_jax.methods import regularized

# The loss terms' default cells.
CELLS = dict(cell_xy=regularized.CELL_XY, cell_rgb=regularized.CELL_RGB)


def dense_kernel(rgb, sigma_xy, sigma_rgb):
  """``[N, N]`` Gaussian kernel of one ``[H, W, 3]`` image, by broadcasting."""
  h, w, _ = rgb.shape
  ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  pos = np.stack([ys, xs], -1).reshape(-1, 2).astype(np.float64)
  col = rgb.reshape(-1, 3).astype(np.float64)
  d2 = (((pos[:, None] - pos[None]) ** 2).sum(-1) / sigma_xy ** 2
        + ((col[:, None] - col[None]) ** 2).sum(-1) / sigma_rgb ** 2)
  return np.exp(-0.5 * d2)


def _smooth_image(rng, b, h, w):
  """Piecewise-smooth random photo-like image, 0..255."""
  coarse = rng.uniform(0, 255, (b, 3, 3, 3))
  ys = np.linspace(0, 2, h)
  xs = np.linspace(0, 2, w)
  out = np.zeros((b, h, w, 3))
  for i, y in enumerate(ys):
    for j, x in enumerate(xs):
      y0, x0 = min(int(y), 1), min(int(x), 1)
      ly, lx = y - y0, x - x0
      out[:, i, j] = ((1 - ly) * (1 - lx) * coarse[:, y0, x0]
                      + (1 - ly) * lx * coarse[:, y0, x0 + 1]
                      + ly * (1 - lx) * coarse[:, y0 + 1, x0]
                      + ly * lx * coarse[:, y0 + 1, x0 + 1])
  return np.clip(out + rng.normal(0, 3, out.shape), 0, 255)


def _softmax(logits):
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.fixture(name='batch')
def fixture_batch():
  rng = np.random.default_rng(0)
  rgb = rng.uniform(0, 255, (2, 6, 7, 3))
  valid = rng.uniform(size=(2, 6, 7)) > 0.25
  return rgb, valid


def test_exact_product_matches_dense_numpy(batch):
  rgb, valid = batch
  values = np.random.default_rng(1).normal(size=rgb.shape[:3] + (2,))
  with jax.enable_x64(True):
    # chunk_size 5 does not divide N = 42: exercises the padded last chunk.
    out = np.asarray(jax.jit(lambda *a: bl.bilateral_exact(
        *a[:2], 4.0, 30.0, a[2], chunk_size=5))(
            jnp.asarray(rgb), jnp.asarray(values), jnp.asarray(valid)))
  for n in range(2):
    m = valid[n].reshape(-1).astype(np.float64)
    kern = dense_kernel(rgb[n], 4.0, 30.0)
    want = m[:, None] * (kern @ (m[:, None] * values[n].reshape(-1, 2)))
    np.testing.assert_allclose(out[n].reshape(-1, 2), want, rtol=1e-10,
                               atol=1e-12)


@pytest.mark.parametrize('approx', ['exact', 'grid'])
def test_kernel_symmetric_and_positive(approx):
  rgb = _smooth_image(np.random.default_rng(2), 1, 5, 5)
  eye = np.eye(25).reshape(1, 5, 5, 25)
  kern = np.asarray(jax.jit(lambda r, e: bl.bilateral_filter(
      r, e, 3.0, 20.0, jnp.ones((1, 5, 5), bool), approx=approx,
      **CELLS))(
          jnp.asarray(rgb, jnp.float32), jnp.asarray(eye, jnp.float32)))
  kern = kern.reshape(25, 25)
  np.testing.assert_allclose(kern, kern.T, atol=1e-5)
  assert (kern >= 0).all() and (np.diag(kern) > 0.5).all()
  assert np.linalg.eigvalsh(kern.astype(np.float64)).min() > -1e-4
  if approx == 'exact':
    np.testing.assert_allclose(kern, dense_kernel(rgb[0], 3.0, 20.0),
                               rtol=1e-5, atol=1e-20)


def test_grid_approximates_exact_on_smooth_images():
  """Relative error of S^T W S within 5 % (CamVid numbers: module docstring)."""
  rng = np.random.default_rng(3)
  rgb = _smooth_image(rng, 2, 16, 16)
  probs = _softmax(3.0 * np.repeat(np.repeat(
      rng.normal(size=(2, 4, 4, 4)), 4, axis=1), 4, axis=2))
  valid = np.ones((2, 16, 16), bool)
  valid[1, :, 12:] = False
  args = (jnp.asarray(rgb, jnp.float32), jnp.asarray(probs, jnp.float32))
  for sigma_xy, sigma_rgb in [(8.0, 15.0), (50.0, 15.0)]:
    exact, grid = (
        np.asarray(jax.jit(lambda r, p, v, a=approx: bl.bilateral_filter(
            r, p, sigma_xy, sigma_rgb, v, approx=a, **CELLS))(
                *args, jnp.asarray(valid)))
        for approx in ('exact', 'grid'))
    energy = (probs * exact).sum((1, 2, 3))
    rel = np.abs((probs * grid).sum((1, 2, 3)) - energy) / energy
    assert rel.max() < 0.05, (sigma_xy, rel)
    assert np.abs(grid[~valid]).max() == 0.0


def test_grid_size_check():
  spec = bl.grid_spec(161, 161, 50.0, 15.0, **CELLS)
  assert spec.num_cells == np.prod(spec.shape)
  assert spec.memory_bytes(4, 22) == 4 * spec.num_cells * 22 * 4
  bl.check_grid_size('loss.densecrf', spec, 4, 22, 10 ** 9)
  with pytest.raises(ValueError, match=r'loss.densecrf: grid of \d+ cells'):
    bl.check_grid_size('loss.densecrf', spec, 4, 22, 10 ** 6)
