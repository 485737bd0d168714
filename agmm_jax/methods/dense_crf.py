"""Mean-field inference of a fully connected CRF (Kraehenbuehl and Koltun,
NIPS 2011) with Potts compatibilities, as ``pydensecrf``'s ``DenseCRF2D``
with ``addPairwiseGaussian`` and ``addPairwiseBilateral`` at their default
``DIAG_KERNEL`` and ``NORMALIZE_SYMMETRIC``: the post-processing of SPML's
pseudo-labels (:mod:`agmm_jax.methods.spml_stage2`). Batched, jit-able, over the
valid pixels only.

With ``U`` the unary ``[N, K]`` (``-log p``), kernels ``k_m`` over the valid
pixels (their diagonal included: ``pydensecrf``'s permutohedral filter does
not remove the pixel itself) and ``d_m = k_m 1``, ``pydensecrf`` runs
``Q = softmax(-U)`` and ``iterations`` times

  ``Q <- softmax(-U + sum_m w_m D_m^-1/2 k_m D_m^-1/2 Q)``

(its Potts compatibility ``-w Q`` subtracted from the energy). The
smoothness kernel ``exp(-|p_i - p_j|^2 / (2 s^2))`` is an exact separable
Gaussian (truncated at ``GAUSSIAN_RADIUS_SIGMAS`` sigmas); the appearance
kernel is :func:`agmm_jax.methods.bilateral.bilateral_filter`'s, exact or by
its grid. The symmetric normalization makes every kernel's overall gain (the
grid's, the permutohedral lattice's) cancel.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from agmm_jax.methods import bilateral

# exp(-18) ~ 1.5e-8 of the centre tap is dropped: below float32's resolution.
GAUSSIAN_RADIUS_SIGMAS = 6.0
# pydensecrf's guard of the normalization 1 / sqrt(k 1 + 1e-20).
_NORM_EPSILON = 1e-20


def gaussian_blur(values: jax.Array, valid: jax.Array, sigma: float) -> jax.Array:
  """``out_i = m_i sum_j exp(-|p_i - p_j|^2 / (2 sigma^2)) m_j v_j`` over
  pixel positions ``p`` (``m`` the valid mask), separable along y and x,
  taps beyond ``GAUSSIAN_RADIUS_SIGMAS`` sigmas dropped.

  Args:
    values: ``[B, H, W, C]``.
    valid: bool or float ``[B, H, W]``.
    sigma: in pixels, > 0.

  Returns:
    float ``[B, H, W, C]``, 0 at invalid pixels.
  """
  mask = valid.astype(values.dtype)[..., None]
  out = values * mask
  radius = max(1, math.ceil(GAUSSIAN_RADIUS_SIGMAS * sigma))
  taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  for axis in (1, 2):
    size = out.shape[axis]
    pad = [(0, 0)] * out.ndim
    pad[axis] = (radius, radius)
    padded = jnp.pad(out, pad)
    out = sum(float(t) * jax.lax.slice_in_dim(padded, k, k + size, axis=axis)
              for k, t in enumerate(taps))
  return out * mask


def mean_field(unary: jax.Array, rgb: jax.Array, valid: jax.Array, *, iterations: int,
               smoothness_sigma: float, smoothness_weight: float,
               appearance_sigma_xy: float, appearance_sigma_rgb: float,
               appearance_weight: float, approx: str, cell_xy: float,
               cell_rgb: float) -> jax.Array:
  """The marginals ``Q`` after ``iterations`` mean-field updates (module
  docstring).

  Args:
    unary: ``[B, H, W, K]`` energies (``-log p``).
    rgb: ``[B, H, W, 3]`` image, 0..255, for the appearance kernel.
    valid: bool ``[B, H, W]``, the real pixels (others neither send nor
      receive messages).
    iterations: >= 0 updates.
    smoothness_sigma, smoothness_weight: the Gaussian kernel's sigma (pixels)
      and Potts weight.
    appearance_sigma_xy, appearance_sigma_rgb, appearance_weight: the
      bilateral kernel's sigmas (pixels, rgb units) and Potts weight.
    approx, cell_xy, cell_rgb: the bilateral product
      (:func:`agmm_jax.methods.bilateral.bilateral_filter`).

  Returns:
    float32 ``[B, H, W, K]``, a distribution over classes at every pixel.
  """
  unary = unary.astype(jnp.float32)
  ones = valid.astype(jnp.float32)[..., None]

  def smoothness(x):
    return gaussian_blur(x, valid, smoothness_sigma)

  def appearance(x):
    return bilateral.bilateral_filter(
        rgb, x, appearance_sigma_xy, appearance_sigma_rgb, valid, approx=approx,
        cell_xy=cell_xy, cell_rgb=cell_rgb)

  kernels = []
  for kernel, weight in ((smoothness, smoothness_weight), (appearance, appearance_weight)):
    norm = jax.lax.rsqrt(jnp.maximum(kernel(ones), 0.0) + _NORM_EPSILON) * ones
    kernels.append((kernel, weight, norm))

  def update(_, q):
    energy = -unary
    for kernel, weight, norm in kernels:
      energy = energy + weight * norm * kernel(norm * q)
    return jax.nn.softmax(energy, axis=-1)

  return jax.lax.fori_loop(0, iterations, update, jax.nn.softmax(-unary, axis=-1))
