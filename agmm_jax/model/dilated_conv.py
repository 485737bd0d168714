"""Dilated (atrous) convolution in three interchangeable forms.

``config.model.dilated_conv`` picks how the model's dilated 3x3 convolutions
(ResNet's dilated stages, the ASPP branches) are computed; all give the same
values and gradients (tests/model/test_dilated_conv.py):

* ``'xla'``: ``lax.conv_general_dilated`` with ``rhs_dilation`` (what XLA and
  cuDNN make of it).
* ``'taps'``: one matmul per kernel tap on the part of the grid where the
  tap reads inside the image (``tap_sum_conv``). The padding a large rate
  adds is never multiplied, in the forward or in either gradient: on CPU
  this form is faster than XLA's dilated conv at every rate the configs use,
  up to 5x for ASPP's rate 18 on a 21x21 grid, and ASPP's rates 12 and 18 on
  an 11x11 grid reduce to their centre tap (docs/benchmarks.md, issue 32).
  This form also runs the 1x1 convs (a single tap, any stride) as one
  ``dot_general`` (``pointwise_dot_conv``): XLA:CPU computes a 1x1 conv's
  weight gradient as a convolution whose window is the whole grid, about 3x
  slower than the same product as a dot on one core; the dot form's forward
  and gradients take 0.46-0.75x the conv's at ResNet-50's 1x1 shapes and
  ResNet-50's OS8 step 0.75x (one core, docs/benchmarks.md).
* ``'space_to_batch'``: the atrous convolution as a dense one on interleaved
  sub-grids. With rate ``r``, a kernel of odd size ``k`` and the PyTorch
  padding ``p = r (k - 1) / 2`` on each side,

      y[i, j] = sum_{a, b} w[a, b] x[i + r (a - c), j + r (b - c)],  c = (k-1)/2,

  and writing ``i = r q + s`` (``0 <= s < r``) gives
  ``y[r q + s, .] = sum_a w[a, .] x_s[q + a - c, .]`` with the sub-grid
  ``x_s[q] = x[r q + s]``: a dense convolution with padding ``c`` of each of
  the ``r * r`` sub-grids. The input is zero-padded at the end to a multiple
  of ``r`` (so the sub-grids have equal sizes ``ceil(H / r)``; the added zeros
  are exactly the zeros the dilated padding reads), the sub-grids are moved to
  the batch axis, convolved densely, moved back and cropped to ``H x W``.

The sub-grid form exists because XLA computes the input gradient of a dilated
convolution on GPU with slow "indexed" implicit-GEMM kernels (issue 17), while
dense 3x3 convolutions and their gradients map to cuDNN's fast kernels. On
CPU it is 17x slower than XLA's (docs/benchmarks.md), and ``resolve`` warns
when a config forces it there.

``'auto'`` (the default) is resolved by the backend (``resolve``): ``'taps'``
on CPU, ``'xla'`` on GPU and TPU, where the taps form is unmeasured so far.
"""

import functools
from typing import Any, Sequence

from absl import logging
import jax
from jax import lax
import jax.numpy as jnp

Array = jax.Array

DILATED_CONV_IMPLEMENTATIONS = ('xla', 'taps', 'space_to_batch')
DEFAULT = 'auto'
# Backend -> the form 'auto' resolves to (docs/benchmarks.md); other
# backends get 'xla'.
_AUTO = {'cpu': 'taps'}
# Backend -> forms measured to be much slower there than the 'auto' one.
_SLOW = {'cpu': ('space_to_batch',)}
_NHWC_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')


def resolve(setting: str, platform: str | None = None) -> str:
  """The implementation ``config.model.dilated_conv = setting`` means here.

  ``platform`` is the JAX backend (``jax.default_backend()`` if None).
  ``'auto'`` becomes the backend's fastest measured form; a form known to be
  slow on this backend is kept (the config asked for it) with a one-line
  warning. Raises ValueError for an unknown setting.
  """
  if setting != 'auto' and setting not in DILATED_CONV_IMPLEMENTATIONS:
    raise ValueError(f'model.dilated_conv must be auto or one of '
                     f'{DILATED_CONV_IMPLEMENTATIONS}, got {setting!r}')
  platform = platform or jax.default_backend()
  if setting == 'auto':
    return _AUTO.get(platform, 'xla')
  if setting in _SLOW.get(platform, ()):
    logging.warning(
        "model.dilated_conv=%r is much slower than %r on %s (docs/"
        "benchmarks.md); set it to 'auto' unless you are measuring it",
        setting, _AUTO.get(platform, 'xla'), platform)
  return setting


def _applies(lhs_shape: Sequence[int], kernel_shape: Sequence[int],
             window_strides: Sequence[int],
             padding: Any, lhs_dilation: Sequence[int] | None,
             rhs_dilation: Sequence[int] | None, dimension_numbers: Any,
             feature_group_count: int, batch_group_count: int) -> bool:
  """True for the case the sub-grid form handles: a 2-D NHWC/HWIO conv with
  stride 1, one rate ``r > 1`` on both axes, odd kernel sizes and the
  symmetric padding ``r (k - 1) / 2``, no input dilation, no groups."""
  if rhs_dilation is None or len(kernel_shape) != 4 or len(lhs_shape) != 4:
    return False
  rates = tuple(rhs_dilation)
  if len(set(rates)) != 1 or rates[0] <= 1:
    return False
  rate = rates[0]
  if isinstance(padding, str) or len(padding) != 2:
    return False
  if (lax.conv_dimension_numbers(lhs_shape, kernel_shape, dimension_numbers)
      != lax.conv_dimension_numbers(lhs_shape, kernel_shape, _NHWC_DIMENSIONS)):
    return False
  return (tuple(window_strides) == (1, 1)
          and (lhs_dilation is None or tuple(lhs_dilation) == (1, 1))
          and feature_group_count == 1 and batch_group_count == 1
          and all(size % 2 == 1 for size in kernel_shape[:2])
          and all(tuple(pad) == (rate * (size - 1) // 2,) * 2
                  for pad, size in zip(padding, kernel_shape[:2])))


def _applies_pointwise(lhs_shape: Sequence[int], kernel_shape: Sequence[int],
                       window_strides: Sequence[int], padding: Any,
                       lhs_dilation: Sequence[int] | None,
                       dimension_numbers: Any, feature_group_count: int,
                       batch_group_count: int) -> bool:
  """True for a 2-D NHWC/HWIO 1x1 conv without padding, input dilation or
  groups (any stride): the case ``pointwise_dot_conv`` writes as a dot."""
  if len(kernel_shape) != 4 or len(lhs_shape) != 4:
    return False
  if isinstance(padding, str) or len(padding) != 2:
    return False
  if (lax.conv_dimension_numbers(lhs_shape, kernel_shape, dimension_numbers)
      != lax.conv_dimension_numbers(lhs_shape, kernel_shape, _NHWC_DIMENSIONS)):
    return False
  return (tuple(kernel_shape[:2]) == (1, 1)
          and all(tuple(pad) == (0, 0) for pad in padding)
          and (lhs_dilation is None or tuple(lhs_dilation) == (1, 1))
          and feature_group_count == 1 and batch_group_count == 1
          and len(window_strides) == 2)


def _xla_conv(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
              dimension_numbers, feature_group_count, batch_group_count,
              precision, preferred_element_type, out_sharding) -> Array:
  """``lax.conv_general_dilated`` unchanged: the convolutions the sub-grid and
  tap forms do not rewrite (``out_sharding`` passed on, as given)."""
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type, out_sharding=out_sharding)


def space_to_batch_conv(lhs: Array, rhs: Array, window_strides: Sequence[int],
                        padding: Any, lhs_dilation: Sequence[int] | None = None,
                        rhs_dilation: Sequence[int] | None = None,
                        dimension_numbers: Any = None,
                        feature_group_count: int = 1,
                        batch_group_count: int = 1, precision: Any = None,
                        preferred_element_type: Any = None,
                        out_sharding: Any = None) -> Array:
  """``lax.conv_general_dilated`` with dilated convs done on sub-grids.

  Same signature and result as ``lax.conv_general_dilated`` (a drop-in for
  ``nnx.Conv(conv_general_dilated=...)``). The sub-grid form (module
  docstring) is used for ``lhs [B, H, W, C]`` NHWC, ``rhs [k, k', C, O]``
  HWIO, stride 1, rate ``r > 1`` on both axes and padding ``r (k - 1) / 2``
  per side; any other convolution is passed to ``lax.conv_general_dilated``
  unchanged. Output ``[B, H, W, O]``.
  """
  if out_sharding is not None or not _applies(
      lhs.shape, rhs.shape, window_strides, padding, lhs_dilation, rhs_dilation,
      dimension_numbers, feature_group_count, batch_group_count):
    return _xla_conv(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                     dimension_numbers, feature_group_count, batch_group_count,
                     precision, preferred_element_type, out_sharding)
  rate = int(rhs_dilation[0])
  batch, height, width, channels = lhs.shape
  kernel_height, kernel_width = rhs.shape[:2]
  rows, cols = -(-height // rate), -(-width // rate)
  lhs = jnp.pad(lhs, ((0, 0), (0, rows * rate - height),
                      (0, cols * rate - width), (0, 0)))
  # [B, rows, r, cols, r, C] -> [r, r, B, rows, cols, C]: sub-grid (s, t)
  # holds x[r q + s, r q' + t].
  grids = lhs.reshape(batch, rows, rate, cols, rate, channels)
  grids = grids.transpose(2, 4, 0, 1, 3, 5).reshape(
      rate * rate * batch, rows, cols, channels)
  out = lax.conv_general_dilated(
      grids, rhs, (1, 1),
      ((kernel_height // 2,) * 2, (kernel_width // 2,) * 2),
      dimension_numbers=_NHWC_DIMENSIONS, precision=precision,
      preferred_element_type=preferred_element_type)
  features = out.shape[-1]
  out = out.reshape(rate, rate, batch, rows, cols, features)
  out = out.transpose(2, 3, 0, 4, 1, 5).reshape(
      batch, rows * rate, cols * rate, features)
  return out[:, :height, :width]


def _tap_range(size: int, offset: int) -> tuple[int, int]:
  """Output positions ``[start, stop)`` whose input ``i + offset`` is inside."""
  return max(0, -offset), min(size, size - offset)


def tap_sum_conv(lhs: Array, rhs: Array, window_strides: Sequence[int],
                 padding: Any, lhs_dilation: Sequence[int] | None = None,
                 rhs_dilation: Sequence[int] | None = None,
                 dimension_numbers: Any = None, feature_group_count: int = 1,
                 batch_group_count: int = 1, precision: Any = None,
                 preferred_element_type: Any = None,
                 out_sharding: Any = None) -> Array:
  """``lax.conv_general_dilated`` with dilated convs as one matmul per tap.

  Same signature and result as ``lax.conv_general_dilated``. For the case
  ``space_to_batch_conv`` handles (NHWC/HWIO, stride 1, rate ``r > 1``,
  padding ``r (k - 1) / 2``), tap ``(a, b)`` reads the input shifted by
  ``(r (a - c), r (b - c))``; its product ``x_shifted @ w[a, b]`` is
  computed only on the output rows and columns whose shifted input lies
  inside the image (outside it the padding is zero) and zero-padded back,
  and the taps are summed. A tap that lies wholly in the padding (offset >=
  the grid size: ASPP's rates 12 and 18 on an 11x11 grid) is skipped. The
  gradients (autodiff of slices, dots and pads) are likewise restricted to
  the in-image parts, which is where the saving over XLA's dilated conv and
  its gradients lies when the rate is large against the grid. Any other
  convolution is passed to ``lax.conv_general_dilated`` unchanged.
  """
  if out_sharding is not None or not _applies(
      lhs.shape, rhs.shape, window_strides, padding, lhs_dilation, rhs_dilation,
      dimension_numbers, feature_group_count, batch_group_count):
    return _xla_conv(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                     dimension_numbers, feature_group_count, batch_group_count,
                     precision, preferred_element_type, out_sharding)
  rate = int(rhs_dilation[0])
  _, height, width, _ = lhs.shape
  kernel_height, kernel_width = rhs.shape[:2]
  out = None
  for a in range(kernel_height):
    row_offset = rate * (a - kernel_height // 2)
    row_start, row_stop = _tap_range(height, row_offset)
    for b in range(kernel_width):
      col_offset = rate * (b - kernel_width // 2)
      col_start, col_stop = _tap_range(width, col_offset)
      if row_start >= row_stop or col_start >= col_stop:
        continue  # The tap reads only padding.
      window = lhs[:, row_start + row_offset:row_stop + row_offset,
                   col_start + col_offset:col_stop + col_offset]
      product = jnp.einsum('nhwc,co->nhwo', window, rhs[a, b],
                           precision=precision,
                           preferred_element_type=preferred_element_type)
      product = lax.pad(product, jnp.zeros((), product.dtype),
                        ((0, 0, 0), (row_start, height - row_stop, 0),
                         (col_start, width - col_stop, 0), (0, 0, 0)))
      out = product if out is None else out + product
  return out


def pointwise_dot_conv(lhs: Array, rhs: Array, window_strides: Sequence[int],
                       padding: Any, lhs_dilation: Sequence[int] | None = None,
                       rhs_dilation: Sequence[int] | None = None,
                       dimension_numbers: Any = None,
                       feature_group_count: int = 1,
                       batch_group_count: int = 1, precision: Any = None,
                       preferred_element_type: Any = None,
                       out_sharding: Any = None) -> Array:
  """``lax.conv_general_dilated`` with 1x1 convs as one ``dot_general``.

  Same signature and result as ``lax.conv_general_dilated``. A 1x1 NHWC/HWIO
  conv without padding (stride ``s``) is ``x[:, ::s, ::s] @ w[0, 0]``; its
  weight gradient is then a dot over the batch and grid (which XLA:CPU runs
  about 3x faster than the equivalent convolution, docs/benchmarks.md). Any
  other convolution is passed to ``lax.conv_general_dilated`` unchanged
  (the rate of a 1x1 kernel does not matter: it has one tap).
  """
  if out_sharding is not None or not _applies_pointwise(
      lhs.shape, rhs.shape, window_strides, padding, lhs_dilation,
      dimension_numbers, feature_group_count, batch_group_count):
    return _xla_conv(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                     dimension_numbers, feature_group_count, batch_group_count,
                     precision, preferred_element_type, out_sharding)
  row_stride, col_stride = (int(s) for s in window_strides)
  if (row_stride, col_stride) != (1, 1):
    lhs = lhs[:, ::row_stride, ::col_stride]
  return _pointwise_matmul(lhs, rhs[0, 0], precision, preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _pointwise_matmul(x: Array, kernel: Array, precision: Any,
                      preferred_element_type: Any) -> Array:
  """``[B, H, W, C] @ [C, O] -> [B, H, W, O]``; its weight gradient is one
  dot contracting the grid of both operands (``_pointwise_matmul_backward``)."""
  return jnp.einsum('nhwc,co->nhwo', x, kernel, precision=precision,
                    preferred_element_type=preferred_element_type)


def _pointwise_matmul_forward(x, kernel, precision, preferred_element_type):
  return _pointwise_matmul(x, kernel, precision, preferred_element_type), (
      x, kernel)


def _pointwise_matmul_backward(precision, preferred_element_type, residuals,
                               cotangent):
  """Autodiff's weight gradient ends in a transpose that XLA:CPU turns into
  a copy of the cotangent (C x grid) before the dot; contracting the grid
  axis of both ``[grid, C]`` operands in one ``dot_general`` leaves the
  transposition to the matmul (8-17% off a bottleneck block's step,
  docs/benchmarks.md)."""
  del preferred_element_type  # The gradients take their primals' dtypes.
  x, kernel = residuals
  channels, features = kernel.shape
  cotangent = cotangent.astype(x.dtype)
  input_grad = jnp.einsum('nhwo,co->nhwc', cotangent, kernel.astype(x.dtype),
                          precision=precision)
  kernel_grad = lax.dot_general(
      x.reshape(-1, channels), cotangent.reshape(-1, features),
      (((0,), (0,)), ((), ())), precision=precision,
      preferred_element_type=jnp.float32)
  return input_grad, kernel_grad.astype(kernel.dtype)


_pointwise_matmul.defvjp(_pointwise_matmul_forward, _pointwise_matmul_backward)


def conv_function(implementation: str, dilation: int, kernel_size: int = 3):
  """The ``conv_general_dilated`` an ``nnx.Conv`` of ``dilation`` and
  ``kernel_size`` should use.

  ``implementation`` is a resolved ``config.model.dilated_conv`` (one of
  ``DILATED_CONV_IMPLEMENTATIONS``, see ``resolve``). Undilated convs use
  XLA's, except the 1x1 convs of ``'taps'`` (``pointwise_dot_conv``).
  """
  forms = {'xla': lax.conv_general_dilated, 'taps': tap_sum_conv,
           'space_to_batch': space_to_batch_conv}
  if implementation not in forms:
    raise ValueError(f'model.dilated_conv must be one of '
                     f'{DILATED_CONV_IMPLEMENTATIONS} once resolved, got '
                     f'{implementation!r}')
  if implementation == 'taps' and kernel_size == 1:
    return pointwise_dot_conv
  return forms[implementation] if dilation > 1 else lax.conv_general_dilated
