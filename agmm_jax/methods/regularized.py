"""Regularized losses: dense CRF, normalized cut, gated CRF and entropy terms.

Terms (each a scalar of the batch; weights in ``config.loss.weights``):

* ``densecrf``: the dense CRF loss of rloss (Tang et al., ECCV 2018, "On
  Regularized Losses for Weakly-supervised CNN Segmentation"),
  ``-(1 / B) sum_b sum_k S_k^T W S_k`` (``form='rloss'``, the reference's
  formula at its ``weight`` 1 with the exact kernel in place of its lattice;
  scale below) or the Potts form
  ``(1 / B) sum_b sum_k S_k^T W (1 - S_k)`` (``form='potts'``, >= 0, the same
  gradient through the softmax);
* ``ncut``: the normalized cut loss (Tang et al., CVPR 2018),
  ``(1 / B) sum_b sum_k S_k^T W (1 - S_k) / (d^T S_k)``, ``d = W m``, each
  image's value in ``[0, K]``;
* ``gatedcrf``: the gated CRF loss (Obukhov et al., 2019) on the softmax area-
  pooled to the decoder grid, ``sum_ij k_ij (1 - S_i . S_j) / #valid``;
* ``entropy``: the mean entropy ``-sum_k p_k log p_k`` of the softmax over the
  unlabeled real pixels (no options; any method can add it with a weight).

``S`` is the softmax of ``LossInputs.logits`` (label resolution) times the
real-pixel mask ``m``; ``W`` the RGBXY Gaussian kernel of
:mod:`agmm_jax.methods.bilateral` on ``LossInputs.rgb()`` (0..255, the
augmented crop), over real pixels, diagonal included. Padding never
contributes and the image gets no gradient.

Scale of ``densecrf``: rloss' loss is ``-(w / N) sum_n sum_k S_k^T L S_k``
(``DenseCRFLoss.py``: ``N`` the batch, ``S`` the downscaled softmax times
the ROI, ``L S`` the *unnormalized* output of its permutohedral lattice on
``(x, y) / sigma_xy, rgb / sigma_rgb``, nothing removed from the diagonal),
i.e. ``(w / N) sum_k S_k^T L (1 - S_k)`` minus the constant ``1^T L 1``. The
lattice is ``L ~ g W`` with ``W`` the exact kernel above, self term
included (an isolated pixel keeps ~0.46 of its own value), and ``g`` is not
1: the unnormalized splat, blur ``[1/2, 1, 1/2]`` along the 6 lattice axes,
slice and factor ``1 / (1 + 2^-5)`` have no unit gain against the Gaussian.
Measured on 8 random 321x321 CamVid crops at rloss' settings
(``benchmarks/bench_rloss_gain.py``, docs/benchmarks.md):
``g = S^T L S / S^T W S = 0.549`` (std 0.015, 0.531..0.577; 0.546 against
this module's grid at the default cells). This term is ``-(1 / B) sum_b
sum_k S_k^T W S_k`` (``W`` by the grid, within ~1 % of exact), so rloss'
``--densecrfloss 2e-9`` gives the same loss here at
``DENSECRF_WEIGHT = RLOSS_DENSECRF_WEIGHT * RLOSS_LATTICE_GAIN`` (1.1e-9,
preset ``pce_densecrf``). Its values are large and negative (about minus the
number of downscaled pixels times their mean degree ``d = W 1`` for a
confident prediction: -3e7 on CamVid 321x321 crops, -2e5 for a uniform-ish
softmax).

Weight of ``ncut`` (preset ``pce_ncut``: 1): no published value was found.
The follow-up's code (rloss, ECCV 2018) ships only the DenseCRF layers, and
the CVPR 2018 paper (Tang et al., as far as it could be read here: abstract
and slides) states no normalized-cut weight or kernel. The one public
implementation on rloss' lattice found (``qscgy/ridge-detector``,
``--ncloss 0.1..0.5``, ``sigma_xy`` 40, ``sigma_rgb`` 15, scale 0.5) is tuned
for a 2-class ridge-detection task and normalizes differently (one ratio
``sum_k S_k^T L S_k / sum_k d^T S_k`` over all classes), so it does not
transfer. 1 is a unit weight, not a tuned one: the term is scale-free (a ratio
of kernel sums, so neither the image size nor a kernel gain changes it), each
class contributes at most 1 (``K - 1`` per image for a uniform softmax, 0 for
a piecewise-constant one that follows the kernel's clusters); its kernel is
rloss' dense CRF kernel.

rloss rescaling (``DenseCRFLoss.forward``; densecrf and ncut): image and mask
by nearest, the softmax bilinearly (``align_corners=False``, no
antialiasing, PyTorch's ``scale_factor`` sampling), to ``floor(H *
scale_factor)``; ``sigma_xy`` is multiplied by ``scale_factor``, ``sigma_rgb``
is not. The backward ``-2 W S / B`` (rloss form) reuses the forward product
(custom VJP), then flows through the bilinear resize to the softmax (which
reaches the padded pixels next to real ones, as in rloss, whose ROI is also
applied after the resize).

Gated CRF (``ModelLossSemsegGatedCRF`` of the authors' code): the reference
applies it to the decoder's stride-4 softmax, with the image and the mask
area-pooled to it (``adaptive_avg_pool2d``; a pooled mask below 1 is 0). Here
the label-resolution softmax is area-pooled by ``downscale`` (4: the decoder
grid ``ceil(H / 4)`` of the model's stride-4 features; 1: label resolution).
Kernel ``exp(-|f_i - f_j|^2 / 2)`` over the ``(2 radius + 1)^2`` window minus
the centre, ``f = (x / sigma_xy, y / sigma_xy, rgb / sigma_rgb)`` in pooled
pixels with the rgb ImageNet-normalized as the network sees it (so
``sigma_rgb = 0.1`` is 0.1 normalized units, ~5.8 on 0..255), normalized by
the number of valid pooled pixels of the batch (at least 1). The reference
training gates only the neighbour (``mask_src``); ``gate_destination=True``
(default) also gates the centre so that padding never contributes. Reference
loss weight 0.1 (preset ``pce_gatedcrf``).

Options live in each term's block (``config.loss.densecrf.cell_xy``,
``config.loss.ncut.scale_factor``): densecrf and ncut take the same kernel
options, but a run uses one of them, and each keeps its own.

Grid memory: the grid's shape depends on the crop, the batch and K, so the
size check is the terms' ``shape_check``: it runs when the loss is built with
the training shape (``build_loss(config.loss, TrainShape(...))``, as the
trainer does at start-up, before the model and the input pipeline) and fails
with one line naming the kernel options, ``config.data.crop_size``,
``config.global_batch_size`` and ``loss_config.<term>.max_grid_mib``. There
is no trace-time guard: built without a shape (tests, benchmarks), the caller
chose the shapes itself.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from agmm_jax.data import augment
from agmm_jax.data import labels as labels_lib
from agmm_jax.model import resample
from agmm_jax.methods import bilateral
from agmm_jax.methods import core

# rloss' defaults (README and train_withdensecrfloss.sh), shared by the
# densecrf and ncut terms.
RLOSS_SIGMA_XY = 100.0
RLOSS_SIGMA_RGB = 15.0
RLOSS_SCALE_FACTOR = 0.5
# rloss' --densecrfloss, a weight on its lattice's unnormalized product.
RLOSS_DENSECRF_WEIGHT = 2e-9
# S^T L S / S^T W S of rloss' lattice L against the exact kernel W at the
# settings above on CamVid crops (0.549, std 0.015; module docstring).
RLOSS_LATTICE_GAIN = 0.55
# The densecrf weight that gives rloss' loss: rloss' weight times the gain.
DENSECRF_WEIGHT = RLOSS_DENSECRF_WEIGHT * RLOSS_LATTICE_GAIN
# Grid cells in sigmas: within a few percent of the exact loss on CamVid
# (bilateral's module docstring); 1.0 / 1.0 is ~4x faster at ~5 % error.
CELL_XY = 0.5
CELL_RGB = 0.8
# One grid buffer [B, cells, K + 1] of float32; VOC crops at batch 16 need
# ~1.1 GiB with the default cells.
MAX_GRID_MIB = 2048.0
DENSECRF_FORMS = ('rloss', 'potts')
# The pipeline's normalization divides 0..255 rgb by 255 * std.
_IMAGENET_STD_255 = tuple(float(255.0 * s) for s in augment.IMAGENET_STD)


# ---------------------------------------------------------------- array level


def _rloss_downscale(rgb, probs, valid, scale, dtype):
  """rloss rescaling: nearest image and mask, bilinear softmax."""
  if scale == 1.0:
    return rgb.astype(dtype), probs.astype(dtype), valid.astype(dtype)
  _, h, w, _ = probs.shape
  iy = resample.nearest_scale_index(h, scale)
  ix = resample.nearest_scale_index(w, scale)
  rgb_s = rgb.astype(dtype)[:, iy][:, :, ix]
  valid_s = valid.astype(dtype)[:, iy][:, :, ix]
  probs_s = resample.resize_separable(
      probs.astype(dtype),
      resample.half_pixel_interpolation_matrix(h, len(iy), scale),
      resample.half_pixel_interpolation_matrix(w, len(ix), scale))
  return rgb_s, probs_s, valid_s


class _FilterConfig(NamedTuple):
  sigma_xy: float
  sigma_rgb: float
  approx: str
  cell_xy: float
  cell_rgb: float


def _masked_filter(cfg, rgb, probs, valid, with_degree):
  """``(S, W S, d)``: masked S, its filtering and ``d = W m`` (or None)."""
  s = probs * valid[..., None]
  values = jnp.concatenate([s, valid[..., None]], -1) if with_degree else s
  filtered = bilateral.bilateral_filter(
      rgb, values, cfg.sigma_xy, cfg.sigma_rgb, valid, approx=cfg.approx,
      cell_xy=cfg.cell_xy, cell_rgb=cfg.cell_rgb)
  if with_degree:
    return s, filtered[..., :-1], filtered[..., -1:]
  return s, filtered, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _crf_energy(cfg, potts, rgb, probs, valid):
  """Per-image ``sum_k S_k^T W S_k``, or ``sum_k S_k^T W (1 - S_k)``."""
  return _crf_energy_fwd(cfg, potts, rgb, probs, valid)[0]


def _crf_energy_fwd(cfg, potts, rgb, probs, valid):
  s, ws, d = _masked_filter(cfg, rgb, probs, valid, potts)
  quad = jnp.sum(s * ws, axis=(1, 2, 3))
  if potts:
    return jnp.sum(s * d, axis=(1, 2, 3)) - quad, (ws, d)
  return quad, (ws, d)


def _crf_energy_bwd(cfg, potts, res, g):
  # W is symmetric, so d(S^T W S)/dS = 2 W S: the backward reuses the forward
  # product and costs no filtering. W S and d vanish at invalid pixels.
  del cfg
  ws, d = res
  grad = (d - 2.0 * ws) if potts else 2.0 * ws
  return None, g[:, None, None, None] * grad, None


_crf_energy.defvjp(_crf_energy_fwd, _crf_energy_bwd)


def densecrf_loss(rgb, probs, valid, *, sigma_xy, sigma_rgb, scale_factor,
                  form, approx, cell_xy, cell_rgb):
  """Dense CRF loss of rloss at weight 1 (module docstring).

  After the rloss rescaling (``sigma_xy * scale_factor``), with ``S`` the
  softmax times the mask: ``form='rloss'``: ``-(1 / B) sum_b sum_k S_k^T W
  S_k``; ``form='potts'``: ``(1 / B) sum_b sum_k S_k^T W (1 - S_k)``, equal to
  the rloss form plus ``1^T W 1`` of the valid pixels (a constant of the
  image), so both train identically.

  Args:
    rgb: ``[B, H, W, 3]`` image, 0..255 (no gradient).
    probs: ``[B, H, W, K]`` softmax.
    valid: ``[B, H, W]`` real pixels.
    sigma_xy: spatial sigma in full-resolution pixels.
    sigma_rgb: color sigma, 0..255 units.
    scale_factor: rloss downscaling (1 keeps full resolution).
    form: one of ``DENSECRF_FORMS``.
    approx: ``'grid'`` or ``'exact'`` (``bilateral.APPROXIMATIONS``).
    cell_xy: grid cell along y, x in units of the scaled ``sigma_xy``.
    cell_rgb: grid cell along r, g, b in units of ``sigma_rgb``.

  Returns:
    Scalar, float32 (float64 for float64 inputs).
  """
  if form not in DENSECRF_FORMS:
    raise ValueError(f'unknown form {form!r}')
  dtype = bilateral.compute_dtype(rgb, probs)
  rgb_s, probs_s, valid_s = _rloss_downscale(
      jax.lax.stop_gradient(rgb), probs, valid, scale_factor, dtype)
  cfg = _FilterConfig(float(sigma_xy * scale_factor), float(sigma_rgb), approx,
                      float(cell_xy), float(cell_rgb))
  energy = _crf_energy(cfg, form == 'potts', rgb_s, probs_s, valid_s)
  sign = 1.0 if form == 'potts' else -1.0
  return sign * jnp.sum(energy) / probs.shape[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ncut_terms(cfg, rgb, probs, valid):
  """Per-image ``sum_k S_k^T W (1 - S_k) / (d^T S_k)``, ``d = W m``."""
  return _ncut_terms_fwd(cfg, rgb, probs, valid)[0]


def _ncut_terms_fwd(cfg, rgb, probs, valid):
  s, ws, d = _masked_filter(cfg, rgb, probs, valid, True)
  assoc = jnp.sum(s * ws, axis=(1, 2))  # [B, K]: S_k^T W S_k
  degree = jnp.sum(s * d, axis=(1, 2))  # [B, K]: d^T S_k
  # An empty class (d^T S_k = 0, hence S_k^T W S_k = 0) contributes 0.
  ok = degree > jnp.finfo(degree.dtype).tiny
  safe = jnp.where(ok, degree, 1.0)
  terms = jnp.where(ok, (degree - assoc) / safe, 0.0)
  return jnp.sum(terms, axis=1), (ws, d, assoc, safe, ok)


def _ncut_terms_bwd(cfg, res, g):
  # d/dS_k [(d^T S_k - S_k^T W S_k) / d^T S_k]
  #   = (S_k^T W S_k d - 2 d^T S_k W S_k) / (d^T S_k)^2.
  del cfg
  ws, d, assoc, safe, ok = res
  coef = jnp.where(ok, g[:, None] / safe ** 2, 0.0)[:, None, None, :]
  grad = coef * (assoc[:, None, None, :] * d - 2.0 * safe[:, None, None, :] * ws)
  return None, grad, None


_ncut_terms.defvjp(_ncut_terms_fwd, _ncut_terms_bwd)


def normalized_cut_loss(rgb, probs, valid, *, sigma_xy, sigma_rgb,
                        scale_factor, approx, cell_xy, cell_rgb):
  """Normalized cut loss, batch mean (module docstring).

  ``(1 / B) sum_b sum_k S_k^T W (1 - S_k) / (d^T S_k)`` with ``d = W m`` the
  degree over valid pixels, after the rloss rescaling; a class with
  ``d^T S_k = 0`` contributes 0. The gradient
  ``(S_k^T W S_k d - 2 d^T S_k W S_k) / (d^T S_k)^2`` reuses the forward
  products (custom VJP). Arguments as :func:`densecrf_loss`.
  """
  dtype = bilateral.compute_dtype(rgb, probs)
  rgb_s, probs_s, valid_s = _rloss_downscale(
      jax.lax.stop_gradient(rgb), probs, valid, scale_factor, dtype)
  cfg = _FilterConfig(float(sigma_xy * scale_factor), float(sigma_rgb), approx,
                      float(cell_xy), float(cell_rgb))
  return jnp.sum(_ncut_terms(cfg, rgb_s, probs_s, valid_s)) / probs.shape[0]


def gated_crf_loss(rgb, probs, valid, *, radius, sigma_xy, sigma_rgb, rgb_std,
                   downscale, gate_destination):
  """Gated CRF loss, Potts compatibility (module docstring).

  ``probs`` is area-pooled by ``downscale`` to ``ceil(h / downscale)`` (1:
  as given); ``rgb`` and ``valid`` are area-pooled to that grid and a pooled
  pixel is valid only if all its sources are. With
  ``f = (x / sigma_xy, y / sigma_xy, rgb / rgb_std / sigma_rgb)``:

    ``k_ij = exp(-|f_i - f_j|^2 / 2) m_j [m_i]`` for
    ``0 < |i - j|_inf <= radius``,
    ``loss = sum_ij k_ij (1 - S_i . S_j) / max(sum_i m_i, 1)``,

  summed over the batch; ``m_j`` always gates (which also drops the window's
  zero padding at the border), ``m_i`` only if ``gate_destination``. Windows
  are shifted slices, never N x N.

  Args:
    rgb: ``[B, H, W, 3]`` image, 0..255 (no gradient).
    probs: ``[B, h, w, K]`` softmax (h <= H, w <= W).
    valid: ``[B, H, W]`` real pixels.
    radius: window radius in pooled pixels.
    sigma_xy: spatial sigma in pooled pixels.
    sigma_rgb: color sigma in units of ``rgb / rgb_std``.
    rgb_std: per-channel divisor of the 0..255 rgb.
    downscale: pooling factor of ``probs``.
    gate_destination: also gate the centre pixel.

  Returns:
    Scalar, float32 (float64 for float64 inputs).
  """
  dtype = bilateral.compute_dtype(rgb, probs)
  probs = probs.astype(dtype)
  _, h, w, _ = probs.shape
  if downscale > 1:
    h, w = -(-h // downscale), -(-w // downscale)
    probs = resample.resize_separable(
        probs, resample.adaptive_average_matrix(probs.shape[1], h),
        resample.adaptive_average_matrix(probs.shape[2], w))
  matrix_h = resample.adaptive_average_matrix(rgb.shape[1], h)
  matrix_w = resample.adaptive_average_matrix(rgb.shape[2], w)
  color = resample.resize_separable(
      jax.lax.stop_gradient(rgb).astype(dtype), matrix_h, matrix_w
  ) / (jnp.asarray(rgb_std, dtype) * sigma_rgb)
  mask = resample.resize_separable(valid.astype(dtype)[..., None], matrix_h,
                                   matrix_w)[..., 0]
  # The reference zeroes every pooled pixel below 1; the tolerance absorbs
  # rounding of the pooling weights.
  mask = jnp.where(mask >= 1.0 - 1e-4, 1.0, 0.0).astype(dtype)

  pad = ((0, 0), (radius, radius), (radius, radius), (0, 0))
  color_p = jnp.pad(color, pad)
  probs_p = jnp.pad(probs, pad)
  mask_p = jnp.pad(mask, pad[:3])
  dst = mask if gate_destination else jnp.ones_like(mask)
  offsets = [(dy, dx) for dy in range(-radius, radius + 1)
             for dx in range(-radius, radius + 1) if (dy, dx) != (0, 0)]

  def add_offset(total, offset):
    # One window offset per step: a scan compiles once, an unrolled loop
    # (2 radius + 1)^2 - 1 times.
    dy, dx = offset[0], offset[1]

    def window(x):
      zero = jnp.zeros((), jnp.int32)
      start = (zero, radius + dy, radius + dx) + (zero,) * (x.ndim - 3)
      return jax.lax.dynamic_slice(x, start, (x.shape[0], h, w) + x.shape[3:])

    d2 = (dy * dy + dx * dx).astype(dtype) / sigma_xy ** 2 + jnp.sum(
        (color - window(color_p)) ** 2, axis=-1)
    kern = jnp.exp(-0.5 * d2) * window(mask_p) * dst
    return total + jnp.sum(
        kern * (1.0 - jnp.sum(probs * window(probs_p), axis=-1))), None

  total, _ = jax.lax.scan(add_offset, jnp.zeros((), dtype),
                          jnp.asarray(offsets, jnp.int32))
  return total / jnp.maximum(jnp.sum(mask), 1.0)


def entropy_loss(probs, mask):
  """Mean Shannon entropy ``-sum_k p_k log p_k`` over pixels where ``mask``.

  Args:
    probs: ``[B, H, W, K]`` softmax.
    mask: ``[B, H, W]`` pixels that count.

  Returns:
    Scalar; 0 when the mask is empty. ``p log p`` uses ``log(max(p, tiny))``
    so that ``p = 0`` gives 0 and a finite gradient.
  """
  dtype = bilateral.compute_dtype(probs)
  p = probs.astype(dtype)
  m = mask.astype(dtype)
  ent = -jnp.sum(p * jnp.log(jnp.maximum(p, jnp.finfo(dtype).tiny)), axis=-1)
  return jnp.sum(ent * m) / jnp.maximum(jnp.sum(m), 1.0)


# ---------------------------------------------------------------------- terms


def _require(term: str, option: str, value, ok: bool, limit: str) -> None:
  if not ok:
    raise ValueError(f'{core.option_key(term, option)} must be {limit}, got {value!r}')


def _check_rloss_options(term: str, *, sigma_xy, sigma_rgb, scale_factor,
                         approx, cell_xy, cell_rgb, max_grid_mib,
                         form=None) -> None:
  """Option check of densecrf and ncut (``form``: densecrf only)."""
  for option, value in (('sigma_xy', sigma_xy), ('sigma_rgb', sigma_rgb),
                        ('max_grid_mib', max_grid_mib)):
    _require(term, option, value, value > 0, '> 0')
  _require(term, 'scale_factor', scale_factor, 0 < scale_factor <= 1,
           'in (0, 1]')
  _require(term, 'approx', approx, approx in bilateral.APPROXIMATIONS,
           f'one of {bilateral.APPROXIMATIONS}')
  # The grid's blur adds variance 1 / cell^2 - 1 / 3 cells^2 (bilateral).
  for option, value in (('cell_xy', cell_xy), ('cell_rgb', cell_rgb)):
    _require(term, option, value, 0 < value < math.sqrt(3.0),
             'in (0, sqrt(3)) sigmas')
  if form is not None:
    _require(term, 'form', form, form in DENSECRF_FORMS,
             f'one of {DENSECRF_FORMS}')


def _check_grid_memory(term: str, shape: core.TrainShape, *, channels: int,
                       sigma_xy, sigma_rgb, scale_factor, approx, cell_xy,
                       cell_rgb, max_grid_mib) -> None:
  """Start-up bound on one grid buffer at the training shape: the loss sees
  ``[batch_size, crop_size, crop_size, K]`` (:class:`core.TrainShape`)."""
  if approx != 'grid':
    return
  scaled = int(math.floor(shape.crop_size * scale_factor))
  spec = bilateral.grid_spec(scaled, scaled, sigma_xy * scale_factor,
                             sigma_rgb, cell_xy, cell_rgb)
  key = functools.partial(core.option_key, term)
  bilateral.check_grid_size(
      f'{key("sigma_xy")}={sigma_xy}, {key("cell_xy")}={cell_xy}, '
      f'{key("sigma_rgb")}={sigma_rgb}, {key("cell_rgb")}={cell_rgb} at '
      f'config.data.crop_size={shape.crop_size} (x {key("scale_factor")}='
      f'{scale_factor}), config.global_batch_size={shape.batch_size} (limit '
      f'{key("max_grid_mib")}={max_grid_mib})', spec, shape.batch_size,
      channels, int(max_grid_mib * 2 ** 20))


def _softmax(inputs: core.LossInputs) -> jax.Array:
  return jax.nn.softmax(core.upcast(inputs.logits), axis=-1)


def _check_densecrf(**options) -> None:
  _check_rloss_options('densecrf', **options)


def _check_densecrf_grid(shape: core.TrainShape, *, form, **options) -> None:
  _check_grid_memory('densecrf', shape,
                     channels=shape.num_classes + (form == 'potts'), **options)


@core.register_term('densecrf', needs=core.Needs(image=True),
                    check=_check_densecrf, shape_check=_check_densecrf_grid)
def densecrf(inputs: core.LossInputs, *, sigma_xy: float = RLOSS_SIGMA_XY,
             sigma_rgb: float = RLOSS_SIGMA_RGB,
             scale_factor: float = RLOSS_SCALE_FACTOR, form: str = 'rloss',
             approx: str = 'grid', cell_xy: float = CELL_XY,
             cell_rgb: float = CELL_RGB,
             max_grid_mib: float = MAX_GRID_MIB) -> jax.Array:
  """Dense CRF loss (:func:`densecrf_loss`) of the label-resolution softmax;
  ``max_grid_mib`` bounds one grid buffer at the training shape when the loss
  is built (module docstring)."""
  del max_grid_mib
  return densecrf_loss(inputs.rgb(), _softmax(inputs), inputs.valid,
                       sigma_xy=sigma_xy, sigma_rgb=sigma_rgb,
                       scale_factor=scale_factor, form=form, approx=approx,
                       cell_xy=cell_xy, cell_rgb=cell_rgb)


def _check_ncut(**options) -> None:
  _check_rloss_options('ncut', **options)


def _check_ncut_grid(shape: core.TrainShape, **options) -> None:
  # K + 1 channels: the degree d = W m is filtered with S.
  _check_grid_memory('ncut', shape, channels=shape.num_classes + 1, **options)


@core.register_term('ncut', needs=core.Needs(image=True), check=_check_ncut,
                    shape_check=_check_ncut_grid)
def ncut(inputs: core.LossInputs, *, sigma_xy: float = RLOSS_SIGMA_XY,
         sigma_rgb: float = RLOSS_SIGMA_RGB,
         scale_factor: float = RLOSS_SCALE_FACTOR, approx: str = 'grid',
         cell_xy: float = CELL_XY, cell_rgb: float = CELL_RGB,
         max_grid_mib: float = MAX_GRID_MIB) -> jax.Array:
  """Normalized cut loss (:func:`normalized_cut_loss`) of the label-resolution
  softmax; ``max_grid_mib`` bounds one grid buffer (K + 1 channels: the
  degree) at the training shape when the loss is built."""
  del max_grid_mib
  return normalized_cut_loss(inputs.rgb(), _softmax(inputs), inputs.valid,
                             sigma_xy=sigma_xy, sigma_rgb=sigma_rgb,
                             scale_factor=scale_factor, approx=approx,
                             cell_xy=cell_xy, cell_rgb=cell_rgb)


def _check_gatedcrf(*, radius, sigma_xy, sigma_rgb, downscale,
                    gate_destination) -> None:
  for option, value in (('radius', radius), ('downscale', downscale)):
    _require('gatedcrf', option, value,
             isinstance(value, int) and not isinstance(value, bool) and value >= 1,
             'an integer >= 1')
  for option, value in (('sigma_xy', sigma_xy), ('sigma_rgb', sigma_rgb)):
    _require('gatedcrf', option, value, value > 0, '> 0')
  _require('gatedcrf', 'gate_destination', gate_destination,
           isinstance(gate_destination, bool), 'a bool')


@core.register_term('gatedcrf', needs=core.Needs(image=True),
                    check=_check_gatedcrf)
def gatedcrf(inputs: core.LossInputs, *, radius: int = 5, sigma_xy: float = 6.0,
             sigma_rgb: float = 0.1, downscale: int = 4,
             gate_destination: bool = True) -> jax.Array:
  """Gated CRF loss (:func:`gated_crf_loss`) of the softmax pooled by
  ``downscale`` (4: the decoder grid), reference kernel defaults."""
  return gated_crf_loss(inputs.rgb(), _softmax(inputs), inputs.valid,
                        radius=radius, sigma_xy=sigma_xy, sigma_rgb=sigma_rgb,
                        rgb_std=_IMAGENET_STD_255, downscale=downscale,
                        gate_destination=gate_destination)


@core.register_term('entropy')
def entropy(inputs: core.LossInputs) -> jax.Array:
  """Mean softmax entropy over the unlabeled real pixels (:func:`entropy_loss`)."""
  unlabeled = labels_lib.real_mask(inputs.label) & ~labels_lib.labeled_mask(inputs.label)
  return entropy_loss(_softmax(inputs), unlabeled)
