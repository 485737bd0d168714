"""Bilinear resizing with ``align_corners=True`` semantics (PyTorch's).

``torch.nn.functional.interpolate(x, size, mode='bilinear', align_corners=True)``
maps output index ``o`` of an axis of length ``out`` to the source coordinate

    s(o) = o * (in - 1) / (out - 1)        (s = 0 when out == 1)

and linearly interpolates between the source samples ``floor(s)`` and
``floor(s) + 1`` (clamped to ``in - 1``). ``jax.image.resize`` uses half-pixel
centres instead, so the official AGMM resizes need this separate function.

Each axis is resized by multiplying with a dense ``[out, in]`` interpolation
matrix built with NumPy at trace time (sizes are static). Two matmuls keep the
op fast on accelerators, make the gradient a plain transposed matmul (no
scatter-add) and keep the function ``jit``-friendly.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def interpolation_matrix(in_size: int, out_size: int) -> np.ndarray:
  """Align-corners linear interpolation weights of one axis.

  Args:
    in_size: length of the source axis (>= 1).
    out_size: length of the resized axis (>= 1).

  Returns:
    float64 ``[out_size, in_size]`` matrix ``W`` with ``resized = W @ source``;
    every row sums to one and has at most two non-zero entries.
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f'resize sizes must be >= 1, got in={in_size} out={out_size}')
  scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
  source = np.arange(out_size, dtype=np.float64) * scale
  lower = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
  upper = np.minimum(lower + 1, in_size - 1)
  upper_weight = source - lower
  matrix = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(matrix, (rows, lower), 1.0 - upper_weight)
  np.add.at(matrix, (rows, upper), upper_weight)
  return matrix


def resize_bilinear_align_corners(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Resizes the spatial axes of ``x`` like PyTorch align-corners bilinear.

  Args:
    x: floating array ``[B, H, W, C]`` (NHWC) or ``[B, H, W]``.
    size: target ``(H_out, W_out)``.

  Returns:
    ``[B, H_out, W_out, C]`` (or ``[B, H_out, W_out]``) in the dtype of ``x``.
    Lower-precision inputs (bfloat16, float16) are interpolated in float32 and
    cast back, so the weights are exact and rows sum to one.
  """
  x = jnp.asarray(x)
  if x.ndim not in (3, 4):
    raise ValueError(f'resize expects [B, H, W] or [B, H, W, C], got shape {x.shape}')
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f'resize expects a floating array, got {x.dtype}')
  out_h, out_w = (int(s) for s in size)
  in_h, in_w = x.shape[1], x.shape[2]
  if (in_h, in_w) == (out_h, out_w):
    return x
  squeeze_channels = x.ndim == 3
  if squeeze_channels:
    x = x[..., None]
  input_dtype = x.dtype
  compute_dtype = jnp.promote_types(input_dtype, jnp.float32)
  rows = jnp.asarray(interpolation_matrix(in_h, out_h), compute_dtype)
  cols = jnp.asarray(interpolation_matrix(in_w, out_w), compute_dtype)
  # HIGHEST: TPUs would otherwise multiply float32 in reduced precision.
  precision = jax.lax.Precision.HIGHEST
  y = jnp.einsum('oh,bhwc->bowc', rows, x.astype(compute_dtype), precision=precision)
  y = jnp.einsum('pw,bowc->bopc', cols, y, precision=precision)
  if squeeze_channels:
    y = y[..., 0]
  return y.astype(input_dtype)
