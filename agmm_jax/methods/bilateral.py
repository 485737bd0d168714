"""The dense bilateral (RGBXY Gaussian) product ``W @ values``: exact and by
a bilateral grid, the kernels of the dense CRF and normalized cut losses
(:mod:`agmm_jax.methods.regularized`). Depends on jax and numpy only; every
function is jit-able with static shapes.

Conventions: ``rgb`` is the raw image, float 0..255, ``[B, H, W, 3]``;
``values`` ``[B, H, W, C]``; ``valid`` (bool or float, ``[B, H, W]``) marks
real pixels, crop padding is False. Pixels ``i`` have features
``f_i = (y_i / s_xy, x_i / s_xy, r_i / s_rgb, g_i / s_rgb, b_i / s_rgb)``
(pixel units, s = sigma) and the dense kernel is
``W_ij = exp(-|f_i - f_j|^2 / 2)`` over valid pixels, diagonal included.

The reference (meng-tang/rloss, ``pytorch/wrapper/bilateralfilter``) builds
features ``x / sigma_xy, y / sigma_xy, rgb / sigma_rgb`` on the 0..255 image
and runs Kraehenbuehl's permutohedral lattice (splat, ``[1/2, 1, 1/2]`` blur
along the d + 1 lattice axes, slice, times ``1 / (1 + 2^-d)``), unnormalized.
That approximates ``g W`` with ``W`` above, self term included (no diagonal
is removed), at a gain ``g`` of about 0.55 on CamVid photos at rloss'
settings (``benchmarks/bench_rloss_gain.py``), which the densecrf preset
weight accounts for (:mod:`agmm_jax.methods.regularized`).

Fast approximation, chosen by measurement (``benchmarks/bench_bilateral.py``,
CamVid photos, shared 2-core CPU, float32): a dense 5-D bilateral grid over
(y, x, r, g, b), cell = ``cell * sigma`` on each axis, multilinear splat and
slice, a separable blur with a sampled Gaussian whose discrete variance makes
the composite kernel (triangle * blur * triangle) have variance sigma^2, and
the gain ``(2 pi)^(5/2) / (cell_xy^2 cell_rgb^3)`` that makes its integral
match the Gaussian's. Color 0 and pixel 0 sit at the in-cell offset where a
point's self-weight is exactly 1 (clipped colors are common in photos).
Max over 2 images of the relative error of ``sum_k S_k^T W S_k`` (E) and of
``|W S - W_exact S|`` (WS), S a smoothed label softmax with K = 11, sigma_xy
50, sigma_rgb 15 (rloss at scale 0.5); jitted forward time after compile,
K = 21 (times are noisy: the 2 cores were shared with other jobs)::

  size     method            grid/img   E      WS     fwd B=1   fwd B=4
  81x81    exact             -          0      0        229 ms    598 ms
  81x81    grid cell 1.0/1.0   4.9 MiB  0.046  0.137     73 ms    392 ms
  81x81    grid cell 0.5/0.8  24.4 MiB  0.013  0.080    264 ms   3667 ms
  81x81    grid cell 0.5/0.6  54.1 MiB  0.014  0.043    536 ms   4405 ms
  161x161  exact             -          0      0       3258 ms   9406 ms
  161x161  grid cell 1.0/1.0  13.7 MiB  0.048  0.148    182 ms   1139 ms
  161x161  grid cell 0.5/0.8  62.4 MiB  0.033  0.090   1046 ms   3837 ms
  161x161  grid cell 0.5/0.6 138.4 MiB  0.014  0.047   1825 ms   7663 ms

(cell = cell_xy / cell_rgb in sigmas; grid/img for 21 channels). 0.5 / 0.8
keeps the loss within a few percent; 1.0 / 1.0 is the fast choice (~5 % on
the loss, ~15 % on the gradient); on CPU the exact product is competitive up
to about 81x81. Not measured: GPU / TPU. The cells are options of the loss
terms (their defaults are written there).

The grid has a static shape (image size and sigmas): ``grid_spec`` /
``check_grid_size`` report and bound its memory (the loss terms call them
when the loss is built at the training shape).
"""

import functools
import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_RGB_MAX = 255.0


def compute_dtype(*arrays):
  """float32, or float64 when an input is float64 (gradient checks)."""
  return jnp.result_type(jnp.float32, *[a.dtype for a in arrays])


def _features(rgb, sigma_xy, sigma_rgb, dtype):
  """Per-pixel features ``[B, H*W, 5]``: (y, x) / sigma_xy, rgb / sigma_rgb."""
  b, h, w, _ = rgb.shape
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=dtype), jnp.arange(w, dtype=dtype),
                        indexing='ij')
  xy = jnp.broadcast_to(jnp.stack([yy, xx], -1)[None] / sigma_xy, (b, h, w, 2))
  feats = jnp.concatenate([xy, rgb.astype(dtype) / sigma_rgb], axis=-1)
  return feats.reshape(b, h * w, 5)


def bilateral_exact(rgb, values, sigma_xy, sigma_rgb, valid, *,
                    chunk_size=512):
  """Exact dense bilateral product ``W @ values`` restricted to valid pixels.

  ``out_i = m_i sum_j W_ij m_j v_j`` with ``W_ij = exp(-|p_i - p_j|^2 /
  (2 sigma_xy^2) - |I_i - I_j|^2 / (2 sigma_rgb^2))`` (``W_ii = 1``) and
  ``m`` the validity mask. O(N^2) time; rows are processed ``chunk_size`` at a
  time so memory is ``O(B * chunk_size * N)``. For tests and small images.

  Args:
    rgb: ``[B, H, W, 3]`` image, 0..255.
    values: ``[B, H, W, C]`` values to filter.
    sigma_xy: spatial bandwidth in pixels.
    sigma_rgb: color bandwidth in rgb units.
    valid: ``[B, H, W]`` bool/float mask of real pixels.
    chunk_size: rows of ``W`` built at once.

  Returns:
    ``[B, H, W, C]``, zero at invalid pixels.
  """
  b, h, w, c = values.shape
  n = h * w
  dtype = compute_dtype(rgb, values)
  feats = _features(jax.lax.stop_gradient(rgb), sigma_xy, sigma_rgb, dtype)
  mask = valid.reshape(b, n).astype(dtype)
  v = values.reshape(b, n, c).astype(dtype) * mask[..., None]
  chunk = min(chunk_size, n)
  num_chunks = -(-n // chunk)
  rows = jnp.pad(feats, ((0, 0), (0, num_chunks * chunk - n), (0, 0)))
  rows = jnp.moveaxis(rows.reshape(b, num_chunks, chunk, 5), 1, 0)

  def row_block(f_rows):  # [B, chunk, 5] -> [B, chunk, C]
    # Summing per-feature squared differences keeps float32 exact-ish (no
    # |a|^2 + |b|^2 - 2ab cancellation).
    d2 = sum((f_rows[:, :, None, d] - feats[:, None, :, d]) ** 2
             for d in range(5))
    return jnp.einsum('bij,bjc->bic', jnp.exp(-0.5 * d2), v)

  out = jax.lax.map(row_block, rows)
  out = jnp.moveaxis(out, 0, 1).reshape(b, num_chunks * chunk, c)[:, :n]
  return (out * mask[..., None]).reshape(b, h, w, c)


# ------------------------------------------------------------- bilateral grid


class GridSpec(NamedTuple):
  """Static geometry of the 5-D bilateral grid of one image.

  Attributes:
    shape: cells along (y, x, r, g, b).
    step_xy: cell size along y and x, in pixels.
    step_rgb: cell size along r, g, b, in rgb units (``255 / integer``).
    offset_xy: grid coordinate of pixel 0, in cells.
    offset_rgb: grid coordinate of rgb value 0, in cells.
    taps_xy: blur taps along y and x (sum 1, odd length).
    taps_rgb: blur taps along r, g, b.
    gain: ``prod_axes sqrt(2 pi) / cell``, integral matching of the Gaussian.
  """
  shape: tuple
  step_xy: float
  step_rgb: float
  offset_xy: float
  offset_rgb: float
  taps_xy: tuple
  taps_rgb: tuple
  gain: float

  @property
  def num_cells(self) -> int:
    return int(np.prod(self.shape))

  def memory_bytes(self, batch: int, channels: int, itemsize: int = 4) -> int:
    """Bytes of one grid buffer ``[batch, cells, channels]``; the blur holds
    about two at a time."""
    return batch * self.num_cells * channels * itemsize


def _blur_taps(cell: float) -> np.ndarray:
  """Sampled-Gaussian taps whose discrete variance is ``1 / cell^2 - 1 / 3``.

  Splat and slice are linear interpolations (triangle kernels of variance 1/6
  cell^2 each), so the blur adds the rest up to the target variance of one
  sigma^2 = (1 / cell)^2 cells^2. The taps span 3 standard deviations: a
  shorter support flattens the fitted Gaussian and biases the kernel's peak.
  """
  var = 1.0 / cell ** 2 - 1.0 / 3.0
  if var <= 0.0:
    raise ValueError(f'cell {cell} must be below sqrt(3) sigma')
  radius = max(1, math.ceil(3.0 * math.sqrt(var)))
  # A radius-r kernel cannot exceed the variance r (r + 1) / 3 of a box.
  while radius * (radius + 1) / 3.0 <= 1.05 * var:
    radius += 1
  ks = np.arange(-radius, radius + 1, dtype=np.float64)

  def taps_for(s):
    t = np.exp(-0.5 * (ks / s) ** 2)
    return t / t.sum()

  lo, hi = 1e-3, 10.0 * radius
  for _ in range(100):  # discrete variance grows with s: bisection
    mid = 0.5 * (lo + hi)
    if (taps_for(mid) * ks ** 2).sum() < var:
      lo = mid
    else:
      hi = mid
  return taps_for(0.5 * (lo + hi))


def _exact_self_offset(taps: np.ndarray, cell: float) -> float:
  """Fraction t of a cell where the 1-D composite kernel at distance 0 is 1.

  A point at fraction t has self-weight ``g ((1 - u) c0 + u c1)`` with
  ``u = 2 t (1 - t)``, ``c0, c1`` the center and first taps and ``g`` the
  per-axis gain: too high on a vertex, too low mid-cell. Photos have many
  pixels with exactly the same clipped colors 0 and 255, so those are put at
  t, where identical colors get weight 1 as in the exact kernel; likewise
  pixel 0, which matters when the image spans few sigma_xy (all its pixels
  then sit near the first vertex).
  """
  r = len(taps) // 2
  c0, c1 = taps[r], taps[r + 1]
  g = math.sqrt(2.0 * math.pi) / cell
  u = (g * c0 - 1.0) / (g * (c0 - c1))
  u = min(max(u, 0.0), 0.5)
  return 0.5 * (1.0 - math.sqrt(1.0 - 2.0 * u))


def grid_spec(height: int, width: int, sigma_xy: float, sigma_rgb: float,
              cell_xy: float, cell_rgb: float) -> GridSpec:
  """Static grid geometry for an image of ``height x width`` pixels.

  ``cell_*`` are cell sizes in units of the corresponding sigma; the rgb cell
  is rounded so that 0..255 spans a whole number of cells. Each axis has
  ``floor(extent / step) + 2`` cells (the interpolation corners): no blur
  margin is needed because cells outside the data range are never sliced.
  """
  n_rgb = max(1, round(_RGB_MAX / (sigma_rgb * cell_rgb)))
  step_rgb = _RGB_MAX / n_rgb
  cell_rgb = step_rgb / sigma_rgb
  taps_xy, taps_rgb = _blur_taps(cell_xy), _blur_taps(cell_rgb)
  step_xy = sigma_xy * cell_xy
  offset_xy = _exact_self_offset(taps_xy, cell_xy)
  shape = (int((height - 1) / step_xy + offset_xy) + 2,
           int((width - 1) / step_xy + offset_xy) + 2,
           n_rgb + 2, n_rgb + 2, n_rgb + 2)
  gain = (2.0 * math.pi) ** 2.5 / (cell_xy ** 2 * cell_rgb ** 3)
  return GridSpec(shape, float(step_xy), float(step_rgb), offset_xy,
                  _exact_self_offset(taps_rgb, cell_rgb),
                  tuple(float(t) for t in taps_xy),
                  tuple(float(t) for t in taps_rgb), gain)


def check_grid_size(field: str, spec: GridSpec, batch: int, channels: int,
                    max_bytes: int) -> None:
  """Raises a one-line ``ValueError`` when one grid buffer would not fit.

  Args:
    field: config field named in the message.
    spec: from ``grid_spec``.
    batch: images filtered together.
    channels: filtered channels (K, or K + 1 with the degree).
    max_bytes: limit on one grid buffer.
  """
  need = spec.memory_bytes(batch, channels)
  if need > max_bytes:
    raise ValueError(
        f'{field}: grid of {spec.num_cells} cells x {batch} images x '
        f'{channels} channels = {need} bytes exceeds limit {max_bytes}')


def _blur_matrix(n: int, taps: tuple) -> np.ndarray:
  """``[n, n]`` banded Toeplitz matrix of the symmetric ``taps``, zero outside.

  One small matmul per axis compiles far faster than one slice per tap, and
  grid axes are short (tens of cells).
  """
  r = len(taps) // 2
  mat = np.zeros((n, n))
  for k, t in enumerate(taps):
    mat += t * np.eye(n, k=k - r)
  return mat


def _grid_one(rgb, values, spec):
  """Grid filter of one image: rgb ``[H, W, 3]``, values ``[H, W, C]``."""
  h, w, c = values.shape
  dtype = values.dtype
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=dtype), jnp.arange(w, dtype=dtype),
                        indexing='ij')
  col = (jnp.clip(rgb.astype(dtype), 0.0, _RGB_MAX) / spec.step_rgb
         + spec.offset_rgb)
  coords = [yy / spec.step_xy + spec.offset_xy,
            xx / spec.step_xy + spec.offset_xy,
            col[..., 0], col[..., 1], col[..., 2]]
  coords = [a.reshape(h * w) for a in coords]
  base = [jnp.floor(a).astype(jnp.int32) for a in coords]
  frac = [a - jnp.floor(a) for a in coords]
  strides = np.cumprod((1,) + spec.shape[:0:-1])[::-1]
  # All 32 corners at once, [32, N]: one scatter and one gather compile much
  # faster than 32 of each.
  offs = np.array(list(itertools.product((0, 1), repeat=5)), np.int32)
  idx = sum((base[d][None] + offs[:, d, None]) * int(strides[d])
            for d in range(5))
  wt = functools.reduce(jnp.multiply, [
      jnp.where(offs[:, d, None] == 1, frac[d][None], 1.0 - frac[d][None])
      for d in range(5)])
  v = values.reshape(h * w, c)
  grid = jnp.zeros((spec.num_cells, c), dtype).at[idx.reshape(-1)].add(
      (wt[..., None] * v[None]).reshape(-1, c))
  grid = grid.reshape(spec.shape + (c,))
  for axis, n in enumerate(spec.shape):
    mat = _blur_matrix(n, spec.taps_xy if axis < 2 else spec.taps_rgb)
    grid = jnp.moveaxis(
        jnp.tensordot(jnp.asarray(mat, dtype), grid, axes=([1], [axis])),
        0, axis)
  grid = grid.reshape(spec.num_cells, c)
  out = jnp.einsum('kn,knc->nc', wt, grid[idx])
  return (spec.gain * out).reshape(h, w, c)


def bilateral_grid(rgb, values, sigma_xy, sigma_rgb, valid, *, cell_xy,
                   cell_rgb):
  """Bilateral-grid approximation of ``bilateral_exact`` (same contract).

  Splat the masked values onto the 5-D grid of ``grid_spec`` with multilinear
  weights, blur each axis, slice back with the same weights; the result is
  ``P^T B P v`` with ``B`` symmetric, so the approximate ``W`` is symmetric and
  positive semi-definite and its vjp is the same filter. rgb is clipped to
  0..255. Cost O(32 N C + cells C taps).
  """
  b, h, w, c = values.shape
  dtype = compute_dtype(rgb, values)
  spec = grid_spec(h, w, sigma_xy, sigma_rgb, cell_xy, cell_rgb)
  mask = valid.astype(dtype)[..., None]
  v = values.astype(dtype) * mask
  out = jax.vmap(functools.partial(_grid_one, spec=spec))(
      jax.lax.stop_gradient(rgb), v)
  return out * mask


APPROXIMATIONS = ('grid', 'exact')


def bilateral_filter(rgb, values, sigma_xy, sigma_rgb, valid, *, approx,
                     cell_xy, cell_rgb):
  """``W @ values`` by ``approx`` in ``APPROXIMATIONS``: :func:`bilateral_grid`
  or :func:`bilateral_exact` (which has no cells)."""
  if approx == 'exact':
    return bilateral_exact(rgb, values, sigma_xy, sigma_rgb, valid)
  if approx == 'grid':
    return bilateral_grid(rgb, values, sigma_xy, sigma_rgb, valid,
                          cell_xy=cell_xy, cell_rgb=cell_rgb)
  raise ValueError(f'unknown approx {approx!r}')
