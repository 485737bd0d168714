"""Sparse-supervision losses of AGMM: registry, terms and presets.

A loss term is a pure function ``term(inputs: LossInputs, **options) -> scalar``
registered by name with ``@register_loss(name)``. ``build_loss(loss_config)``
combines the terms named in ``loss_config.weights`` into one function that
returns ``(total, {term_name: value})``; the options of a term are the fields of
``loss_config[term_name]`` (for example ``loss_config.gmm.form``).

Label semantics follow ``agmm_jax.labels``: labeled pixels (``label >= 0``)
drive the supervised parts, real pixels (``label != PADDING``) the
self-supervised parts, and padding never contributes.

The ``released`` forms reproduce the official PyTorch code of Luffy03/AGMM-SASS
(``model/tools.py`` and ``train_voc.py``), whose labels encode unlabeled pixels
as ``num_classes`` and crop padding as 255. Their quirks are kept on purpose and
spelled out in each docstring: every resize is bilinear with
``align_corners=False`` (``F.interpolate``'s default, half-pixel centres, no
antialiasing), epsilons are 1e-6, the class set of the GMM is the set of classes
labeled inside the crop, and nothing is stop-gradiented.

Every term computes in float32 whatever the (lower) dtype of the logits or
features (float64 inputs stay float64, for gradient checks under x64), is
jit-able, and gives finite values and gradients when an image has no labeled
pixel (the official ``mean()`` over an empty set would be NaN; here such means
are 0).
"""

import functools
import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from agmm_jax import labels as labels_lib

# The epsilon of every log, division and normalization of the official code.
EPSILON = 1e-6

GMM_FORMS = ('released', 'paper')
PROTOTYPE_BATCH_REDUCTIONS = ('official_sum', 'mean')
PRESETS = ('agmm_released', 'agmm_paper', 'pce_only')
# The terms evaluated together at label resolution by label_grid_losses.
LABEL_GRID_TERMS = ('pce', 'absent_class', 'gmm')
# Label rows per step of the label-resolution loops (values do not depend on
# it; 16 was fastest of 8 / 16 / 32 / 64 at VOC shapes on the 2-core CPU).
ROWS_PER_CHUNK = 16


class LossInputs(NamedTuple):
  """What the losses see of one training batch.

  Attributes:
    logits: ``[B, H, W, K]`` float32 or bfloat16, at label resolution.
    decoder_features: ``[B, h, w, C]`` float32 or bfloat16, the decoder output
      before the classifier (stride 4 of the input).
    label: int32 ``[B, H, W]``: class ids, ``UNLABELED`` or ``PADDING``.
    class_present: float32 ``[B, K]``: 1 where the class occurs in the image's
      sparse labels, computed before cropping.
  """
  logits: jax.Array
  decoder_features: jax.Array
  label: jax.Array
  class_present: jax.Array


LossTerm = Callable[..., jax.Array]
LossFn = Callable[[LossInputs], tuple[jax.Array, dict[str, jax.Array]]]

_LOSS_TERMS: dict[str, LossTerm] = {}


def register_loss(name: str) -> Callable[[LossTerm], LossTerm]:
  """Decorator registering ``term(inputs, **options) -> scalar`` as ``name``."""

  def decorator(term: LossTerm) -> LossTerm:
    if name in _LOSS_TERMS:
      raise ValueError(f'loss term {name!r} is already registered')
    _LOSS_TERMS[name] = term
    return term

  return decorator


def registered_losses() -> tuple[str, ...]:
  """Names of all registered loss terms."""
  return tuple(sorted(_LOSS_TERMS))


def get_loss(name: str) -> LossTerm:
  """The registered term called ``name``; ValueError if there is none."""
  if name not in _LOSS_TERMS:
    raise ValueError(
        f'unknown loss term {name!r}; registered: {", ".join(registered_losses())}')
  return _LOSS_TERMS[name]


# ----------------------------------------------------------------------------
# Shared pieces.
# ----------------------------------------------------------------------------


def half_pixel_taps(in_size: int, out_size: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Linear interpolation taps of one axis, ``align_corners=False``.

  PyTorch's ``F.interpolate(mode='bilinear')`` (the official default) maps
  output index ``o`` to the source coordinate
  ``s(o) = max((o + 0.5) * in / out - 0.5, 0)`` and interpolates between
  ``lower = floor(s)`` and ``upper = min(lower + 1, in - 1)`` with weights
  ``1 - (s - lower)`` and ``s - lower``, without antialiasing when it
  downsamples.

  Returns:
    ``(lower, upper, upper_weight)``, each ``[out_size]`` (int64, int64,
    float64).
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f'resize sizes must be >= 1, got in={in_size} out={out_size}')
  source = np.maximum(
      (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5,
      0.0)
  lower = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
  upper = np.minimum(lower + 1, in_size - 1)
  return lower, upper, source - lower


def half_pixel_interpolation_matrix(in_size: int, out_size: int) -> np.ndarray:
  """float64 ``[out_size, in_size]`` matrix ``R`` of :func:`half_pixel_taps`.

  ``resized = R @ source``; rows sum to one and have at most two non-zeros.
  """
  lower, upper, upper_weight = half_pixel_taps(in_size, out_size)
  matrix = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(matrix, (rows, lower), 1.0 - upper_weight)
  np.add.at(matrix, (rows, upper), upper_weight)
  return matrix


@functools.lru_cache(maxsize=None)
def _axis_taps(in_size: int, out_size: int, transpose: bool
               ) -> tuple[np.ndarray, np.ndarray]:
  """Sparse rows of ``R`` (``transpose=False``) or ``R^T`` as gather tables.

  Returns ``(index, weight)``, each ``[rows, taps]``: row ``o`` of the matrix is
  ``sum_t weight[o, t] * e_{index[o, t]}``, zero-weight padded to a common
  number of taps. ``R`` has two taps per row; a row of ``R^T`` has as many as
  there are output pixels reading that source pixel (about ``out / in + 2``).
  """
  matrix = half_pixel_interpolation_matrix(in_size, out_size)
  if transpose:
    matrix = matrix.T
  taps = max(1, int(np.max(np.count_nonzero(matrix, axis=1))))
  index = np.zeros((matrix.shape[0], taps), np.int32)
  weight = np.zeros((matrix.shape[0], taps), np.float64)
  for row, values in enumerate(matrix):
    columns = np.flatnonzero(values)
    index[row, :len(columns)] = columns
    weight[row, :len(columns)] = values[columns]
  return index, weight


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _interpolate_axis(x: jax.Array, axis: int, in_size: int, out_size: int,
                      transpose: bool) -> jax.Array:
  """``R`` (or ``R^T``) of :func:`half_pixel_interpolation_matrix` along ``axis``.

  A sum of a few gathers with static indices instead of a dense matmul with a
  matrix that is almost all zeros (at 81 -> 321 the matmul does 40x the work).
  The VJP of ``R`` is ``R^T`` and vice versa, both gathers: autodiff of a
  gather would scatter-add, which is slow on CPU.
  """
  index, weight = _axis_taps(in_size, out_size, transpose)
  shape = [1] * x.ndim
  shape[axis] = index.shape[0]
  result = None
  for tap in range(index.shape[1]):
    term = (jnp.take(x, jnp.asarray(index[:, tap]), axis=axis)
            * jnp.asarray(weight[:, tap], x.dtype).reshape(shape))
    result = term if result is None else result + term
  return result


def _interpolate_axis_fwd(x, axis, in_size, out_size, transpose):
  return _interpolate_axis(x, axis, in_size, out_size, transpose), None


def _interpolate_axis_bwd(axis, in_size, out_size, transpose, _, cotangent):
  return (_interpolate_axis(cotangent, axis, in_size, out_size, not transpose),)


_interpolate_axis.defvjp(_interpolate_axis_fwd, _interpolate_axis_bwd)


def resize_bilinear_half_pixel(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Resizes ``[B, H, W, C]`` to ``[B, *size, C]`` like ``F.interpolate`` default.

  ``R_h x R_w^T`` with the :func:`half_pixel_interpolation_matrix` weights,
  applied as two-tap gathers per axis; the gradient is ``R_h^T y R_w``, also
  gathers. Computes in the dtype of ``x``.
  """
  for axis, in_size, out_size in zip((1, 2), x.shape[1:3], size):
    if in_size != out_size:
      x = _interpolate_axis(x, axis, int(in_size), int(out_size), False)
  return x


def _check_inputs(inputs: LossInputs) -> None:
  """Raises a one-line ValueError naming the LossInputs field of bad shape."""
  logits, features, label, present = inputs
  if logits.ndim != 4:
    raise ValueError(f'LossInputs.logits must be [B, H, W, K], got {logits.shape}')
  batch, height, width, num_classes = logits.shape
  if label.shape != (batch, height, width):
    raise ValueError(
        f'LossInputs.label must be {(batch, height, width)} like logits, got {label.shape}')
  if features.ndim != 4 or features.shape[0] != batch:
    raise ValueError(
        f'LossInputs.decoder_features must be [{batch}, h, w, C], got {features.shape}')
  if present.shape != (batch, num_classes):
    raise ValueError(
        f'LossInputs.class_present must be {(batch, num_classes)}, got {present.shape}')


def _upcast(x: jax.Array) -> jax.Array:
  """``x`` in its compute dtype: float32 for bfloat16/float16/float32 inputs.

  float64 stays float64 (only reachable with x64 enabled, for gradient checks).
  """
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def labeled_class_counts(label: jax.Array, num_classes: int, dtype=jnp.float32) -> jax.Array:
  """``n[b, k]``: the number of pixels of image b labeled k, ``[B, K]``."""

  def one_image(label):
    # Unlabeled and padding pixels get an out-of-range index, which 'drop' skips.
    class_ids = jnp.where(labels_lib.labeled_mask(label), label, num_classes)
    return jnp.zeros(num_classes, dtype).at[class_ids.reshape(-1)].add(1.0, mode='drop')

  return jax.vmap(one_image)(label)


@jax.custom_vjp
def _weighted_feature_sums(weights: jax.Array, features: jax.Array) -> jax.Array:
  """``sum_{i, j} weights[b, i, j, k] features[b, i, j, c]``: ``[B, K, C]``.

  ``weights`` (from the labels) gets no gradient. The VJP for ``features``
  is ``weights @ cotangent``, written out because autodiff of the einsum
  computes it as ``[B, C, h * w]`` and transposes that to ``[B, h, w, C]``.
  """
  return jnp.einsum('bhwk,bhwc->bkc', weights, features, precision=jax.lax.Precision.HIGHEST)


def _weighted_feature_sums_fwd(weights, features):
  return _weighted_feature_sums(weights, features), weights


def _weighted_feature_sums_bwd(weights, cotangent):
  return None, jnp.einsum('bhwk,bkc->bhwc', weights, cotangent,
                          precision=jax.lax.Precision.HIGHEST)


_weighted_feature_sums.defvjp(_weighted_feature_sums_fwd, _weighted_feature_sums_bwd)


def _pulled_labels(label: jax.Array, feature_size: tuple[int, int], num_classes: int,
                   dtype) -> jax.Array:
  """``up^T Y``: the one-hot labels pulled down to the feature grid, ``[B, h, w, K]``.

  ``up(f) = R_h f R_w^T`` is linear, so a sum of upsampled features over the
  labeled pixels of class k equals ``sum_{i, j} (R_h^T Y_k R_w)[i, j] f[i, j]``.
  Each labeled pixel's four bilinear taps are scatter-added: per image
  (vmapped, so a batch-sharded label stays sharded), all taps in one scatter,
  with flat indices into ``[h * w * K]`` (``[image, row, column, class]``
  indices, one scatter per tap, took twice as long).
  """
  feat_h, feat_w = feature_size
  height, width = label.shape[1:]
  row_lower, row_upper, row_weight = half_pixel_taps(feat_h, height)
  col_lower, col_upper, col_weight = half_pixel_taps(feat_w, width)
  size = feat_h * feat_w * num_classes
  taps = [(rows, row_weights, cols, col_weights)
          for rows, row_weights in ((row_lower, 1.0 - row_weight), (row_upper, row_weight))
          for cols, col_weights in ((col_lower, 1.0 - col_weight), (col_upper, col_weight))]

  def one_image(label):
    labeled = labels_lib.labeled_mask(label)
    # Unlabeled and padding pixels get an out-of-range index, which 'drop' skips.
    indices = jnp.concatenate([
        jnp.where(labeled, (rows[:, None] * feat_w + cols[None, :]) * num_classes + label,
                  size).reshape(-1)
        for rows, _, cols, _ in taps])
    tap_weights = np.concatenate([np.outer(row_weights, col_weights).reshape(-1)
                                  for _, row_weights, _, col_weights in taps])
    pulled = jnp.zeros(size, dtype).at[indices].add(jnp.asarray(tap_weights, dtype),
                                                    mode='drop')
    return pulled.reshape(feat_h, feat_w, num_classes)

  return jax.vmap(one_image)(label)


def class_prototypes(
    features: jax.Array, label: jax.Array, num_classes: int
) -> tuple[jax.Array, jax.Array]:
  """Per-image class means of the features over labeled pixels.

  As the official ``cal_protypes``: the features are first upsampled to the
  label resolution (bilinear, ``align_corners=False``), then

      mu[b, k] = sum_{x: y_b(x) = k} up(f_b)(x) / (n[b, k] + 1e-6),
      n[b, k] = #{x: y_b(x) = k},

  so absent classes get a zero vector. The upsampled features are never
  materialized: the label map is pulled down to the feature grid
  (:func:`_pulled_labels`, ``[B, h, w, K]``) and contracted with the features.

  Args:
    features: float ``[B, h, w, C]``.
    label: int32 ``[B, H, W]`` (``agmm_jax.labels`` convention).
    num_classes: K.

  Returns:
    ``(prototypes [B, K, C], counts [B, K])`` in the compute dtype.
  """
  prototypes, counts, _ = feature_moments(features, label, num_classes)
  return prototypes, counts


@jax.custom_vjp
def _prototypes_and_squared_distances(features: jax.Array, pulled: jax.Array,
                                      inverse_counts: jax.Array
                                      ) -> tuple[jax.Array, jax.Array]:
  """The paper form's moments: ``(mu [B, K, C], d^2 [B, h, w, K])``.

  ``mu[b, k] = inverse_counts[b, k] sum_s pulled[b, s, k] f[b, s]`` and
  ``d^2[b, s, k] = max(||f||^2 - 2 f.mu + ||mu||^2, 0)`` (the matmul
  expansion, no ``[B, h, w, K, C]`` array). ``pulled`` and ``inverse_counts``
  come from the labels and get no gradient. With ``g`` the cotangent of
  ``d^2`` where it is positive (0 where clamped) and ``g_mu`` that of ``mu``::

      g_mu' = g_mu + 2 (mu * sum_s g - g^T f)
      df    = 2 f * sum_k g + [g | pulled] @ [-2 mu ; inverse_counts * g_mu']

  Written out so that the feature gradient is one matmul over the
  concatenated class axis: autodiff makes three, each writing a ``[B, h, w,
  C]`` array.
  """
  precision = jax.lax.Precision.HIGHEST
  prototypes = jnp.einsum('bhwk,bhwc->bkc', pulled, features,
                          precision=precision) * inverse_counts[..., None]
  cross = jnp.einsum('bhwc,bkc->bhwk', features, prototypes, precision=precision)
  squared_norms = jnp.sum(jnp.square(features), axis=-1, keepdims=True)
  prototype_norms = jnp.sum(jnp.square(prototypes), axis=-1)[:, None, None, :]
  return prototypes, jnp.maximum(squared_norms - 2.0 * cross + prototype_norms, 0.0)


def _prototypes_and_squared_distances_fwd(features, pulled, inverse_counts):
  prototypes, squared_distance = _prototypes_and_squared_distances(
      features, pulled, inverse_counts)
  return (prototypes, squared_distance), (features, pulled, inverse_counts, prototypes,
                                          squared_distance)


def _prototypes_and_squared_distances_bwd(residuals, cotangents):
  features, pulled, inverse_counts, prototypes, squared_distance = residuals
  prototypes_grad, distance_grad = cotangents
  precision = jax.lax.Precision.HIGHEST
  distance_grad = jnp.where(squared_distance > 0, distance_grad, 0.0)
  prototypes_grad = prototypes_grad + 2.0 * (
      prototypes * jnp.sum(distance_grad, axis=(1, 2))[..., None]
      - jnp.einsum('bhwk,bhwc->bkc', distance_grad, features, precision=precision))
  features_grad = 2.0 * features * jnp.sum(distance_grad, axis=-1, keepdims=True) + jnp.einsum(
      'bhwk,bkc->bhwc', jnp.concatenate([distance_grad, pulled], axis=-1),
      jnp.concatenate([-2.0 * prototypes, inverse_counts[..., None] * prototypes_grad], axis=1),
      precision=precision)
  return features_grad, None, None


_prototypes_and_squared_distances.defvjp(_prototypes_and_squared_distances_fwd,
                                         _prototypes_and_squared_distances_bwd)


class FeatureMoments(NamedTuple):
  """What the feature-grid terms share, computed once per batch by
  :func:`feature_moments`.

  Attributes:
    prototypes: ``[B, K, C]`` class means (:func:`class_prototypes`).
    counts: ``[B, K]`` labeled pixels per image and class.
    squared_distance: ``[B, h, w, K]`` ``||f - mu_k||^2`` (the paper form's
      distance), or None when not asked for.
  """
  prototypes: jax.Array
  counts: jax.Array
  squared_distance: jax.Array | None


def feature_moments(features: jax.Array, label: jax.Array, num_classes: int, *,
                    squared_distance: bool = False) -> FeatureMoments:
  """The class prototypes and, with ``squared_distance``, the paper form's
  ``||f - mu_k||^2`` (:func:`_prototypes_and_squared_distances`).

  The GMM and prototype terms take them as an argument so that a loss with
  both computes them once, and their gradients meet before the matmul that
  carries them back to the features.
  """
  features = _upcast(features)
  pulled = _pulled_labels(label, features.shape[1:3], num_classes, features.dtype)
  counts = labeled_class_counts(label, num_classes, features.dtype)
  if not squared_distance:
    prototypes = _weighted_feature_sums(pulled, features) / (counts[..., None] + EPSILON)
    return FeatureMoments(prototypes, counts, None)
  prototypes, distance = _prototypes_and_squared_distances(
      features, pulled, 1.0 / (counts + EPSILON))
  return FeatureMoments(prototypes, counts, distance)


# ----------------------------------------------------------------------------
# Row chunks of the label grid.
# ----------------------------------------------------------------------------
#
# Everything at label resolution (softmax, pCE, absent-class, both GMM
# cross-entropies and their gradients, the paper's sigma) runs in a loop over
# chunks of label rows, every image and class at once in each step. Written as
# whole-array expressions, XLA materializes a dozen or more [B, H, W, K]
# intermediates, and on a CPU each is a pass over memory (35 MB at VOC shapes);
# a chunk's intermediates stay in cache. The loop is over rows, never images or
# classes, so a batch-sharded input stays data-parallel.


def _row_chunks(height: int, rows_per_chunk: int) -> tuple[int, int]:
  """``(rows, num_chunks)``: chunk height (at most ``height``) and count."""
  if int(rows_per_chunk) < 1:
    raise ValueError(f'rows_per_chunk must be >= 1, got {rows_per_chunk}')
  rows = min(int(rows_per_chunk), height)
  return rows, -(-height // rows)


def _row_slice(x: jax.Array, start: jax.Array, rows: int) -> jax.Array:
  return jax.lax.dynamic_slice_in_dim(x, start, rows, axis=1)


def _chunk_label(label: jax.Array, chunk: jax.Array, rows: int
                 ) -> tuple[jax.Array, jax.Array]:
  """First row and label rows ``[B, rows, W]`` of chunk number ``chunk``.

  The last chunk is moved up to end at the last row, and its rows that the
  previous chunk already covered are relabeled ``PADDING``, so that every row
  counts once (a chunk height need not divide the label height).
  """
  start = jnp.minimum(chunk * rows, label.shape[1] - rows)
  return start, jnp.where(_fresh_rows(start, chunk, rows)[None, :, None],
                          _row_slice(label, start, rows), labels_lib.PADDING)


def _chunk_pixels(label: jax.Array, chunk: jax.Array, rows: int, num_classes: int
                  ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """``(start, one_hot, labeled, real)`` of a row chunk, masks ``[B, rows, W, 1]``."""
  start, chunk_label = _chunk_label(label, chunk, rows)
  return (start, chunk_label[..., None] == jnp.arange(num_classes),
          labels_lib.labeled_mask(chunk_label)[..., None],
          labels_lib.real_mask(chunk_label)[..., None])


def _fresh_rows(start: jax.Array, chunk: jax.Array, rows: int) -> jax.Array:
  """``[rows]`` bool: the rows of chunk ``chunk`` (first row ``start``) that
  no earlier chunk covered (all but the overlap of a moved-up last chunk)."""
  return start + jnp.arange(rows) >= chunk * rows


def _row_taps(source_height: int, height: int, start: jax.Array, rows: int, dtype
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """:func:`half_pixel_taps` of label rows ``[start, start + rows)``:
  ``(lower [rows], upper [rows], upper_weight [rows])``."""
  lower, upper, upper_weight = half_pixel_taps(source_height, height)
  taps = jnp.asarray(np.stack([lower, upper]), jnp.int32)
  taps = jax.lax.dynamic_slice_in_dim(taps, start, rows, axis=1)
  weight = jax.lax.dynamic_slice_in_dim(jnp.asarray(upper_weight, dtype), start, rows)
  return taps[0], taps[1], weight


def _upsample_columns(x: jax.Array, width: int) -> jax.Array:
  """``x R_w^T`` along axis 2: ``[B, h, w, K]`` to ``[B, h, W, K]``, once per
  loop, so that a chunk of the upsampling is :func:`_upsample_rows` alone."""
  return _interpolate_axis(x, 2, x.shape[2], width, False)


@functools.lru_cache(maxsize=None)
def _row_span(source_height: int, height: int, rows: int) -> int:
  """The most source rows that ``rows`` consecutive rows of the upsampling
  from ``source_height`` to ``height`` rows read."""
  lower, upper, _ = half_pixel_taps(source_height, height)
  return int(np.max(upper[rows - 1:] - lower[:height - rows + 1])) + 1


def _row_band(source_height: int, height: int, start: jax.Array, rows: int, dtype
              ) -> tuple[jax.Array, jax.Array]:
  """``(first, band [rows, span])``: label rows ``[start, start + rows)`` of
  ``R_h`` restricted to the ``span`` source rows from ``first`` that they read."""
  span = _row_span(source_height, height, rows)
  lower, upper, weight = _row_taps(source_height, height, start, rows, dtype)
  first = jnp.minimum(lower[0], source_height - span)
  band = (jax.nn.one_hot(lower - first, span, dtype=dtype) * (1.0 - weight[:, None])
          + jax.nn.one_hot(upper - first, span, dtype=dtype) * weight[:, None])
  return first, band


def _batched_band_product(band: jax.Array, x: jax.Array) -> jax.Array:
  """``band @ x[b]`` for every image b: ``[m, n]`` and ``[B, n, W, K]`` to
  ``[B, m, W, K]``. A batched product over ``W * K`` reads x in its own
  layout; an einsum over axis 1 made XLA transpose it first."""
  batch, _, width, num_classes = x.shape
  product = jax.lax.dot_general(
      jnp.broadcast_to(band, (batch,) + band.shape),
      x.reshape(batch, x.shape[1], width * num_classes),
      (((2,), (1,)), ((0,), (0,))), precision=jax.lax.Precision.HIGHEST)
  return product.reshape(batch, band.shape[0], width, num_classes)


def _upsample_rows(x_columns: jax.Array, start: jax.Array, rows: int, height: int
                   ) -> jax.Array:
  """Rows ``[start, start + rows)`` of the upsampling to ``height`` rows of
  ``x_columns`` (``[B, h, W, K]``, from :func:`_upsample_columns`): the
  chunk's band of ``R_h`` times the few source rows it reads, ``[B, rows, W, K]``."""
  first, band = _row_band(x_columns.shape[1], height, start, rows, x_columns.dtype)
  return _batched_band_product(
      band, jax.lax.dynamic_slice_in_dim(x_columns, first, band.shape[1], axis=1))


def _add_pulled_rows(accumulator: jax.Array, y: jax.Array, start: jax.Array,
                     height: int) -> jax.Array:
  """``accumulator`` plus the row half of the adjoint of the upsampling.

  ``y`` is ``[B, rows, W, K]`` on label rows ``[start, start + rows)`` of a
  label grid ``height`` rows high; ``accumulator`` is ``[B, h, W, K]``
  (source rows, label columns). :func:`_pull_columns` of the sum over all
  chunks completes the adjoint. Rows first, because the chunk's label rows
  read only a few source rows: their ``[span, rows]`` band of ``R_h^T`` is one
  small matmul and one in-place update of ``span`` rows, where the column
  half per chunk would be a gather of ``out / in + 2`` taps over the chunk.
  """
  first, band = _row_band(accumulator.shape[1], height, start, y.shape[1], y.dtype)
  current = jax.lax.dynamic_slice_in_dim(accumulator, first, band.shape[1], axis=1)
  return jax.lax.dynamic_update_slice_in_dim(
      accumulator, current + _batched_band_product(band.T, y), first, axis=1)


def _pull_columns(x: jax.Array, source_width: int) -> jax.Array:
  """``x R_w`` along axis 2: ``[B, h, W, K]`` to ``[B, h, w, K]``."""
  return _interpolate_axis(x, 2, source_width, x.shape[2], True)


# ----------------------------------------------------------------------------
# GMM response.
# ----------------------------------------------------------------------------


def _active_class_slots(active: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Each image's active classes first: the slot layout of :func:`mean_abs_distance`.

  Returns ``(slot_class [B, K], slot_active [B, K], slots_used)``: slot ``j``
  of image ``b`` holds class ``slot_class[b, j]`` (active classes in
  increasing id, then the inactive ones), ``slot_active[b, j]`` says whether
  that class is active, and ``slots_used`` is the largest number of active
  classes of an image (a scalar, the loop's trip count).
  """
  slot_class = jnp.argsort(active <= 0, axis=-1, stable=True)
  slot_active = jnp.take_along_axis(active > 0, slot_class, axis=-1)
  return slot_class, slot_active, jnp.max(jnp.sum(slot_active, axis=-1))


@jax.custom_vjp
def mean_abs_distance(features: jax.Array, prototypes: jax.Array,
                      active: jax.Array) -> jax.Array:
  """``d[b, p, k] = active[b, k] * mean_c |features[b, p, c] - prototypes[b, k, c]|``.

  The official GMM multiplies the distance by the crop-level class presence
  right away, so only the (image, class) pairs with ``active[b, k] > 0`` are
  needed; the others are 0. Each image's active classes are moved to its first
  slots (:func:`_active_class_slots`) and a loop over slots ``j`` computes
  slot ``j`` of every image at once, ``[B, P]`` per step, for as many steps as
  the image with the most active classes needs: a VOC crop has a handful of
  the 21 classes. The working set is one ``[B, P, C]`` difference, no
  ``[B, P, K, C]`` array exists in either pass, and every step is elementwise
  over the batch axis, so a batch-sharded input stays sharded (no device
  computes another device's images).

  Args:
    features: ``[B, P, C]``.
    prototypes: ``[B, K, C]``.
    active: ``[B, K]``, 0 or 1 (no gradient flows into it).

  Returns:
    ``[B, P, K]``. The gradient uses ``sign(0) = 0`` as PyTorch's ``abs``.
  """
  num_classes = active.shape[-1]
  slot_class, slot_active, slots_used = _active_class_slots(active)

  def one_slot(slot, distances):
    prototype = jnp.take_along_axis(prototypes, slot_class[:, slot, None, None], axis=1)
    slot_distance = jnp.mean(jnp.abs(features - prototype), axis=-1)
    target = jax.nn.one_hot(slot_class[:, slot], num_classes, dtype=features.dtype)
    target = target * slot_active[:, slot, None].astype(features.dtype)
    return distances + slot_distance[:, :, None] * target[:, None, :]

  return jax.lax.fori_loop(0, slots_used, one_slot,
                           jnp.zeros(features.shape[:2] + (num_classes,), features.dtype))


def _mean_abs_distance_fwd(features, prototypes, active):
  return mean_abs_distance(features, prototypes, active), (features, prototypes, active)


def _mean_abs_distance_bwd(residuals, cotangent):
  """Per active slot, with ``s = sign(f_b - mu_bk)`` (``[B, P, C]``) and
  ``g = cotangent[b, :, k] / C``: ``df_b += g s`` and ``dmu_bk = -sum_p g s``."""
  features, prototypes, active = residuals
  num_classes = active.shape[-1]
  slot_class, slot_active, slots_used = _active_class_slots(active)

  def one_slot(slot, grads):
    features_grad, prototypes_grad = grads
    prototype = jnp.take_along_axis(prototypes, slot_class[:, slot, None, None], axis=1)
    scale = jnp.take_along_axis(cotangent, slot_class[:, slot, None, None], axis=2)
    scale = scale * (slot_active[:, slot, None, None] / features.shape[-1]).astype(features.dtype)
    weighted = scale * jnp.sign(features - prototype)
    target = jax.nn.one_hot(slot_class[:, slot], num_classes, dtype=features.dtype)
    return (features_grad + weighted,
            prototypes_grad - target[:, :, None] * jnp.sum(weighted, axis=1)[:, None, :])

  features_grad, prototypes_grad = jax.lax.fori_loop(
      0, slots_used, one_slot, (jnp.zeros_like(features), jnp.zeros_like(prototypes)))
  return features_grad, prototypes_grad, jnp.zeros_like(active)


mean_abs_distance.defvjp(_mean_abs_distance_fwd, _mean_abs_distance_bwd)


def _softmax_and_log(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(softmax, log_softmax)`` over the last axis, one ``exp`` per entry
  (``jax.nn.log_softmax`` followed by ``exp`` would take two)."""
  shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
  exponentials = jnp.exp(shifted)
  total = jnp.sum(exponentials, axis=-1, keepdims=True)
  return exponentials * (1.0 / total), shifted - jnp.log(total)


def _prediction_pass(logits: jax.Array, label: jax.Array, class_present: jax.Array,
                     feature_size: tuple[int, int], rows_per_chunk: int, dtype, *,
                     terms: tuple[str, ...] = (), grid_weights: dict[str, jax.Array] | None = None,
                     with_sigma_weights: bool = False) -> dict[str, jax.Array]:
  """Everything at label resolution that needs the softmax but not ``G``.

  One loop over row chunks. With ``p = softmax(z)``, ``a`` the absent-class
  and ``w`` the GMM class weights of ``grid_weights``
  (:func:`_label_grid_weights`) and ``up^T`` the adjoint of the bilinear
  upsampling from the feature grid (a pull-down), the sums of the ``terms``
  (:func:`label_grid_losses`) before normalization::

      pce            = -sum_{x labeled} log p_{y(x)}(x)
      absent_class   = -sum_{x real} sum_k a_k log(1 - p_k + e)
      gmm_prediction = -sum_{x real} sum_k w_k log(1 - p_k + e)           (the G-free part)
      gmm_slope      = up^T[real w (log(p + e) - log(1 - p + e))]   [B, h, w, K]

  so that the prediction cross-entropy of the GMM term is
  ``gmm_prediction - sum_s G(s) gmm_slope(s)`` for any response ``G`` on the
  feature grid: it is linear in ``up(G)``. With ``with_sigma_weights``, also the
  paper's sigma weights ``u = p * class_present`` on unlabeled pixels:
  ``sigma_weights = up^T u [B, h, w, K]`` and ``sigma_total = sum_x u [B, K]``.
  Differentiable in ``logits`` by autodiff (used so only for the sigma
  weights; the terms' gradient is written by hand in ``_label_grid_sums_bwd``).
  """
  batch, height, width = label.shape
  num_classes = logits.shape[-1]
  rows, num_chunks = _row_chunks(height, rows_per_chunk)
  present = class_present.astype(dtype)[:, None, None, :]
  if grid_weights is not None:
    absent = grid_weights['absent'][:, None, None, :]
    gmm_class = grid_weights['gmm_class'][:, None, None, :]

  def one_chunk(chunk, sums):
    start, one_hot, labeled, real = _chunk_pixels(label, chunk, rows, num_classes)
    probs, log_probs = _softmax_and_log(_row_slice(logits, start, rows).astype(dtype))
    added, pulled = {}, {}
    if 'pce' in terms:
      added['pce'] = -jnp.sum(jnp.where(one_hot, log_probs, 0.0))
    if 'absent_class' in terms or 'gmm' in terms:
      log_complement = jnp.log(1.0 - probs + EPSILON)
    if 'absent_class' in terms:
      added['absent_class'] = -jnp.sum(jnp.where(real, absent * log_complement, 0.0))
    if 'gmm' in terms:
      added['gmm_prediction'] = -jnp.sum(jnp.where(real, gmm_class * log_complement, 0.0))
      pulled['gmm_slope'] = jnp.where(
          real, gmm_class * (jnp.log(probs + EPSILON) - log_complement), 0.0)
    if with_sigma_weights:
      unlabeled_probs = jnp.where(real & ~labeled, probs * present, 0.0)
      added['sigma_total'] = jnp.sum(unlabeled_probs, axis=(1, 2))
      pulled['sigma_weights'] = unlabeled_probs
    for name, value in pulled.items():
      sums = {**sums, name: _add_pulled_rows(sums[name], value, start, height)}
    return {name: value + added[name] if name in added else value
            for name, value in sums.items()}

  half_pulled = jnp.zeros((batch, feature_size[0], width, num_classes), dtype)
  initial = {name: jnp.zeros((), dtype) for name in terms if name != 'gmm'}
  if 'gmm' in terms:
    initial['gmm_prediction'] = jnp.zeros((), dtype)
    initial['gmm_slope'] = half_pulled
  if with_sigma_weights:
    initial['sigma_total'] = jnp.zeros((batch, num_classes), dtype)
    initial['sigma_weights'] = half_pulled
  sums = jax.lax.fori_loop(0, num_chunks, one_chunk, initial)
  for name in ('gmm_slope', 'sigma_weights'):
    if name in sums:
      sums[name] = _pull_columns(sums[name], feature_size[1])
  return sums


def gmm_feature_response(inputs: LossInputs, *, form: str = 'released',
                         sigma_stop_gradient: bool = True,
                         rows_per_chunk: int = ROWS_PER_CHUNK,
                         sigma_weights: tuple[jax.Array, jax.Array] | None = None,
                         moments: FeatureMoments | None = None
                         ) -> tuple[jax.Array, jax.Array]:
  """The GMM response ``G`` on the feature grid and the classes it covers.

  Both forms compute ``G`` on the feature grid ``[B, h, w, K]``; the loss
  reads it upsampled bilinearly (``align_corners=False``, ``up``) to the
  label grid and gated by ``m[b, k]``, the classes labeled inside crop b
  (:func:`gmm_response`). Prototypes ``mu[b, k]`` are :func:`class_prototypes`
  (features upsampled to the label grid, averaged over the labeled pixels of
  the crop) in both forms.

  ``released`` (the official ``GMM``), with ``r`` the real-pixel mask
  bilinearly *downsampled* to the feature grid (``preserve``: fractional at
  the padding border)::

      d[b, k](i, j) = mean_c |f_b(i, j, c) - mu[b, k, c]| * m[b, k] * r_b(i, j)
      G = exp(-d^2)

  ``paper`` (the CVPR equations)::

      d_k^2 = ||f - mu_k||^2                                    (Euclidean)
      sigma_k^2 = sum_{x unlabeled} P_k(x) up(d_k^2)(x) / (sum_{x unlabeled} P_k(x) + 1e-6)
      G_k = exp(-d_k^2 / (2 sigma_k^2 + 1e-6))

  Choices the paper leaves open, and what is used here:

  * prototypes: per image over the labeled pixels of the crop, exactly as the
    released form;
  * resolution: as the released form, ``d^2`` and ``G`` live on the feature
    grid, so the two forms differ only in distance and sigma. ``d^2`` is the
    matmul expansion ``||f||^2 - 2 f.mu + ||mu||^2`` (clamped at 0);
  * sigma is a weighted mean over the *label* grid's unlabeled pixels of the
    upsampled ``d^2``, so the unlabeled set is exact; it is evaluated on the
    feature grid as ``sum_s (up^T w)(s) d^2(s)``, the same number, with the
    weights ``w`` pulled down one row chunk at a time;
  * ``P_k``: the softmax prediction restricted to pre-crop present classes
    (the official ``clean_mask``), over real unlabeled pixels only;
  * sigma is stop-gradiented by default (the official code, in its commented
    adaptive variant, detaches it), see ``sigma_stop_gradient``;
  * 1e-6 guards the divisions; a class without weighted unlabeled pixels gets
    ``sigma^2 = 0``, i.e. a response that is 1 at the prototype and ~0 elsewhere;
  * ``m_k`` gates G as in the released form.

  Args:
    inputs: the batch.
    form: ``'released'`` or ``'paper'``.
    sigma_stop_gradient: paper form only: no gradient through ``sigma^2``.
    rows_per_chunk: label rows per step of the paper form's sigma loop.
    sigma_weights: paper form only: the pulled-down weights and their totals
      (``sigma_weights``, ``sigma_total`` of ``_prediction_pass``), when the
      caller's own pass over the label grid computed them; else computed here.
    moments: :func:`feature_moments` of the batch (with ``squared_distance``
      for the paper form), when the caller shares them with other terms; else
      computed here.

  Returns:
    ``(G [B, h, w, K], m [B, K])`` in the compute dtype.
  """
  if form not in GMM_FORMS:
    raise ValueError(f'gmm form must be one of {GMM_FORMS}, got {form!r}')
  features = _upcast(inputs.decoder_features)
  batch, feat_h, feat_w, channels = features.shape
  num_classes = inputs.logits.shape[-1]
  if moments is None:
    moments = feature_moments(features, inputs.label, num_classes,
                              squared_distance=form == 'paper')
  elif form == 'paper' and moments.squared_distance is None:
    raise ValueError('the paper form needs feature_moments(..., squared_distance=True)')
  prototypes, counts, squared_distance = moments
  labeled_in_crop = (counts > 0).astype(features.dtype)
  if form == 'released':
    real = labels_lib.real_mask(inputs.label).astype(features.dtype)[..., None]
    preserve = resize_bilinear_half_pixel(real, (feat_h, feat_w))
    distance = mean_abs_distance(
        features.reshape(batch, feat_h * feat_w, channels), prototypes, labeled_in_crop)
    distance = distance.reshape(batch, feat_h, feat_w, num_classes) * preserve
    return jnp.exp(-jnp.square(distance)), labeled_in_crop
  if sigma_weights is None:
    passed = _prediction_pass(inputs.logits, inputs.label, inputs.class_present,
                              (feat_h, feat_w), rows_per_chunk, features.dtype,
                              with_sigma_weights=True)
    sigma_weights = passed['sigma_weights'], passed['sigma_total']
  pulled_weights, total_weight = sigma_weights
  sigma_sq = (jnp.sum(pulled_weights * squared_distance, axis=(1, 2))
              / (total_weight + EPSILON))
  if sigma_stop_gradient:
    sigma_sq = jax.lax.stop_gradient(sigma_sq)
  response = jnp.exp(-squared_distance / (2.0 * sigma_sq[:, None, None, :] + EPSILON))
  return response, labeled_in_crop


def gmm_response(inputs: LossInputs, *, form: str = 'released',
                 sigma_stop_gradient: bool = True) -> jax.Array:
  """The GMM response of ``form`` at label resolution, ``[B, H, W, K]``:
  ``up(G) * m`` with ``(G, m)`` from :func:`gmm_feature_response`."""
  response, labeled_in_crop = gmm_feature_response(
      inputs, form=form, sigma_stop_gradient=sigma_stop_gradient)
  return (resize_bilinear_half_pixel(response, inputs.label.shape[1:])
          * labeled_in_crop[:, None, None, :])


# ----------------------------------------------------------------------------
# Label-grid terms: pCE, absent-class, GMM.
# ----------------------------------------------------------------------------


def _label_grid_weights(label: jax.Array, class_present: jax.Array, num_classes: int,
                        dtype) -> dict[str, jax.Array]:
  """Normalizers of the label-grid terms (see :func:`label_grid_losses`)."""
  labeled_in_crop = (labeled_class_counts(label, num_classes, dtype) > 0).astype(dtype)
  return {
      'labeled_pixels': jnp.maximum(jnp.sum(labels_lib.labeled_mask(label)), 1).astype(dtype),
      'real_pixels': jnp.maximum(jnp.sum(labels_lib.real_mask(label)), 1).astype(dtype),
      'absent': 1.0 - class_present.astype(dtype),
      # The halving and the class average of the official BCE, in one factor.
      'gmm_class': labeled_in_crop / (2.0 * (jnp.sum(labeled_in_crop, -1, keepdims=True)
                                             + EPSILON)),
  }


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _label_grid_sums(logits: jax.Array, feature_response: jax.Array | None,
                     label: jax.Array, weights: dict[str, jax.Array],
                     passed: dict[str, jax.Array], terms: tuple[str, ...],
                     rows_per_chunk: int) -> tuple[jax.Array, ...]:
  """The values of ``terms`` (see :func:`label_grid_losses`), one per name.

  ``weights`` are :func:`_label_grid_weights` and ``passed`` the
  :func:`_prediction_pass` of the same inputs: the forward adds only the part
  of the GMM term that is not linear in ``up(G)``. The VJP is the whole
  derivative in ``logits`` and ``feature_response``; ``weights`` and
  ``passed`` get none.
  """
  return _label_grid_sums_fwd(logits, feature_response, label, weights, passed,
                              terms, rows_per_chunk)[0]


def _label_grid_sums_fwd(logits, feature_response, label, weights, passed, terms,
                         rows_per_chunk):
  dtype = jnp.promote_types(logits.dtype, jnp.float32)
  num_classes = logits.shape[-1]
  height, width = label.shape[1:]
  values = {}
  if 'pce' in terms:
    values['pce'] = passed['pce'] / weights['labeled_pixels']
  if 'absent_class' in terms:
    values['absent_class'] = passed['absent_class'] / weights['real_pixels']
  gmm_slope = None
  if 'gmm' in terms:
    rows, num_chunks = _row_chunks(height, rows_per_chunk)
    gmm_class = weights['gmm_class'][:, None, None, :]
    response_columns = _upsample_columns(feature_response, width)

    def one_chunk(chunk, total):
      start, one_hot, labeled, _ = _chunk_pixels(label, chunk, rows, num_classes)
      response = _upsample_rows(response_columns, start, rows, height)
      # For the 0/1 target, t log a + (1 - t) log b is log(t ? a : b): one log.
      return total - jnp.sum(jnp.where(labeled, gmm_class * jnp.log(jnp.where(
          one_hot, response + EPSILON, 1.0 - response + EPSILON)), 0.0))

    response_sum = jax.lax.fori_loop(0, num_chunks, one_chunk, jnp.zeros((), dtype))
    gmm_slope = passed['gmm_slope']
    prediction_sum = passed['gmm_prediction'] - jnp.sum(feature_response * gmm_slope)
    values['gmm'] = (prediction_sum / weights['real_pixels']
                     + response_sum / weights['labeled_pixels'])
  return (tuple(values[name] for name in terms),
          (logits, feature_response, label, weights, gmm_slope))


def _label_grid_sums_bwd(terms, rows_per_chunk, residuals, cotangents):
  """Per chunk, with ``p = softmax(z)`` and the cotangents ``c_t`` of the terms
  divided by their pixel counts (``n_l`` labeled, ``n_r`` real)::

      dL/dp = real (c_absent a / (1 - p + e) + c_gmm w (-G / (p + e) + (1 - G) / (1 - p + e)))
      dL/dz = p (dL/dp - <p, dL/dp>) + labeled c_pce (p - onehot)
      dL/dG = w (real c_gmm / n_r (log(1 - p + e) - log(p + e))
                 + labeled c_gmm / n_l (onehot ? -1 / (G + e) : 1 / (1 - G + e)))

  (``a`` absent-class weights, ``w`` the GMM class weights), and ``dL/dG`` is
  pulled down to the feature grid by the adjoint of the upsampling. Its first
  line pulled down is ``-c_gmm / n_r * gmm_slope`` of the forward's pass, so
  the loop adds only the labeled pixels' part.
  """
  logits, feature_response, label, weights, gmm_slope = residuals
  dtype = jnp.promote_types(logits.dtype, jnp.float32)
  num_classes = logits.shape[-1]
  height, width = label.shape[1:]
  rows, num_chunks = _row_chunks(height, rows_per_chunk)
  cotangent = dict(zip(terms, cotangents))
  pce_scale = cotangent.get('pce', 0.0) / weights['labeled_pixels']
  absent_scale = (cotangent.get('absent_class', 0.0) / weights['real_pixels']
                  * weights['absent'][:, None, None, :])
  gmm_class = cotangent.get('gmm', 0.0) * weights['gmm_class'][:, None, None, :]
  prediction_scale = gmm_class / weights['real_pixels']
  response_scale = gmm_class / weights['labeled_pixels']

  def one_chunk(chunk, grads):
    logits_grad, response_grad = grads
    start, one_hot, labeled, real = _chunk_pixels(label, chunk, rows, num_classes)
    probs = jax.nn.softmax(_row_slice(logits, start, rows).astype(dtype), axis=-1)
    complement = 1.0 - probs + EPSILON
    probs_grad = None
    if 'absent_class' in terms:
      probs_grad = absent_scale / complement
    if 'gmm' in terms:
      response = _upsample_rows(response_columns, start, rows, height)
      prediction_grad = prediction_scale * (
          (1.0 - response) / complement - response / (probs + EPSILON))
      probs_grad = prediction_grad if probs_grad is None else probs_grad + prediction_grad
      # -1 / (G + e) for the labeled class, 1 / (1 - G + e) for the others.
      chunk_response_grad = jnp.where(labeled, response_scale / jnp.where(
          one_hot, -(response + EPSILON), 1.0 - response + EPSILON), 0.0)
      response_grad = _add_pulled_rows(response_grad, chunk_response_grad, start, height)
    chunk_grad = jnp.zeros_like(probs)
    if probs_grad is not None:
      probs_grad = jnp.where(real, probs_grad, 0.0)
      chunk_grad = probs * (probs_grad - jnp.sum(probs * probs_grad, axis=-1, keepdims=True))
    if 'pce' in terms:
      chunk_grad = chunk_grad + jnp.where(labeled, pce_scale * (probs - one_hot), 0.0)
    # Rows of the moved-up last chunk that an earlier chunk wrote keep that value.
    fresh = _fresh_rows(start, chunk, rows)[None, :, None, None]
    chunk_grad = jnp.where(fresh, chunk_grad.astype(logits.dtype),
                           _row_slice(logits_grad, start, rows))
    logits_grad = jax.lax.dynamic_update_slice_in_dim(logits_grad, chunk_grad, start, axis=1)
    return logits_grad, response_grad

  response_grad = None
  if 'gmm' in terms:
    feat_h, feat_w = feature_response.shape[1:3]
    response_columns = _upsample_columns(feature_response, width)
    response_grad = jnp.zeros((logits.shape[0], feat_h, width, num_classes), dtype)
  logits_grad, response_grad = jax.lax.fori_loop(
      0, num_chunks, one_chunk, (jnp.zeros_like(logits), response_grad))
  if 'gmm' in terms:
    response_grad = (_pull_columns(response_grad, feat_w)
                     - cotangent['gmm'] / weights['real_pixels'] * gmm_slope
                     ).astype(feature_response.dtype)
  return logits_grad, response_grad, None, None, None


_label_grid_sums.defvjp(_label_grid_sums_fwd, _label_grid_sums_bwd)


def label_grid_losses(inputs: LossInputs, terms: tuple[str, ...] = LABEL_GRID_TERMS, *,
                      form: str = 'released', sigma_stop_gradient: bool = True,
                      rows_per_chunk: int = ROWS_PER_CHUNK,
                      moments: FeatureMoments | None = None) -> dict[str, jax.Array]:
  """The label-resolution terms ``terms`` (a subset of ``LABEL_GRID_TERMS``) at once.

  With ``p = softmax(z)`` at each label pixel, ``c[b, k]`` the pre-crop class
  presence, ``m[b, k]`` the classes labeled inside crop b and ``G`` the GMM
  response of ``form`` upsampled to the label grid (:func:`gmm_response`):

  * ``pce`` = ``mean_{x labeled} -log p_{y(x)}(x)`` (the official
    ``CrossEntropyLoss(ignore_index=255)``);
  * ``absent_class`` = ``mean_{x real} sum_k -(1 - c_k) log(1 - p_k(x) + 1e-6)``
    (the official ``get_cls_loss``: summed over classes, averaged over pixels);
  * ``gmm`` = ``mean_{x real} BCE_m(G, p)(x) + mean_{x labeled} BCE_m(onehot(y), G)(x)``
    (the official ``cal_gmm_loss``), with ``BCE_m(t, q) = sum_k m_k (-(t log(q +
    1e-6) + (1 - t) log(1 - q + 1e-6)) / 2) / (sum_k m_k + 1e-6)``.

  Means are over all qualifying pixels of the batch and 0 for an empty set.
  Gradients flow through both ``G`` and ``p`` (no stop-gradient, as released).

  Every pass over the label grid is a loop over row chunks (all images and
  classes in each step): one computes the softmax and everything that does not
  need ``G`` (:func:`_prediction_pass`; the paper form's sigma weights too, so
  its ``G`` needs no pass of its own), a second the labeled pixels' GMM
  cross-entropy, and one more the gradient, written by hand (formulas in
  ``_label_grid_sums_bwd``) so that no per-term gradient array is stored.

  Args:
    inputs: the batch.
    terms: names of the terms to compute.
    form, sigma_stop_gradient: options of the ``gmm`` term.
    rows_per_chunk: label rows per loop step; the values do not depend on it.
    moments: shared :func:`feature_moments` for the ``gmm`` term, if any.

  Returns:
    ``{term: scalar}`` in the compute dtype.
  """
  _check_inputs(inputs)
  terms = tuple(terms)
  unknown = set(terms) - set(LABEL_GRID_TERMS)
  if unknown or not terms:
    raise ValueError(f'label_grid_losses computes some of {LABEL_GRID_TERMS}, got {terms}')
  rows_per_chunk = int(rows_per_chunk)
  dtype = jnp.promote_types(inputs.logits.dtype, jnp.float32)
  weights = _label_grid_weights(inputs.label, inputs.class_present,
                                inputs.logits.shape[-1], dtype)
  share_sigma = 'gmm' in terms and form == 'paper' and sigma_stop_gradient
  # Not differentiated here: the VJP of _label_grid_sums is the terms' whole
  # derivative, and the sigma these weights give is stop-gradiented.
  passed = jax.lax.stop_gradient(_prediction_pass(
      inputs.logits, inputs.label, inputs.class_present, inputs.decoder_features.shape[1:3],
      rows_per_chunk, dtype, terms=terms, grid_weights=weights, with_sigma_weights=share_sigma))
  feature_response = None
  if 'gmm' in terms:
    feature_response, _ = gmm_feature_response(
        inputs, form=form, sigma_stop_gradient=sigma_stop_gradient,
        rows_per_chunk=rows_per_chunk, moments=moments,
        sigma_weights=((passed.pop('sigma_weights'), passed.pop('sigma_total'))
                       if share_sigma else None))
  values = _label_grid_sums(inputs.logits, feature_response, inputs.label, weights,
                            passed, terms, rows_per_chunk)
  return dict(zip(terms, values))


@register_loss('pce')
def partial_cross_entropy(inputs: LossInputs) -> jax.Array:
  """Cross-entropy over labeled pixels only (:func:`label_grid_losses`)."""
  return label_grid_losses(inputs, ('pce',))['pce']


@register_loss('absent_class')
def absent_class_loss(inputs: LossInputs) -> jax.Array:
  """Pushes down classes absent from the image's sparse labels: ``-log(1 - p_k)``
  summed over the classes absent before cropping, averaged over real pixels
  (:func:`label_grid_losses`)."""
  return label_grid_losses(inputs, ('absent_class',))['absent_class']


@register_loss('gmm')
def gmm_loss(inputs: LossInputs, *, form: str = 'released',
             sigma_stop_gradient: bool = True) -> jax.Array:
  """GMM self-supervision: prediction vs. GMM response, response vs. labels
  (:func:`label_grid_losses`; ``G`` from :func:`gmm_feature_response`)."""
  return label_grid_losses(inputs, ('gmm',), form=form,
                           sigma_stop_gradient=sigma_stop_gradient)['gmm']


# ----------------------------------------------------------------------------
# Prototype separation term.
# ----------------------------------------------------------------------------


@register_loss('prototype')
def prototype_loss(inputs: LossInputs, *, batch_reduction: str = 'official_sum',
                   moments: FeatureMoments | None = None) -> jax.Array:
  """Pushes the feature means of different classes apart.

  The official ``cal_protypes`` + ``proto_loss``. With per-image prototypes
  ``mu[b, k]`` (:func:`class_prototypes`), ``m[b, k] = 1`` if class k is
  labeled inside crop b and ``n_k = sum_b m[b, k]``, the batch class vectors are

  * ``'official_sum'`` (released code): ``v_k = (sum_b mu[b, k]) * n_k /
    (n_k + 1e-6)``, i.e. the *sum* over images, not the mean;
  * ``'mean'``: ``v_k = sum_b mu[b, k] / n_k``, the mean over the images that
    contain k.

  The loss is ``sum_{i < j, n_i, n_j > 0} exp(-(mean_c |v_i - v_j|)^2) /
  (#pairs + 1e-6)``, 0 with fewer than two present classes.

  Args:
    inputs: the batch.
    batch_reduction: ``'official_sum'`` or ``'mean'``, see above.
    moments: the batch's :func:`feature_moments` when shared with the GMM
      term; else the prototypes are computed here.
  """
  _check_inputs(inputs)
  if batch_reduction not in PROTOTYPE_BATCH_REDUCTIONS:
    raise ValueError(f'prototype batch_reduction must be one of '
                     f'{PROTOTYPE_BATCH_REDUCTIONS}, got {batch_reduction!r}')
  num_classes = inputs.logits.shape[-1]
  if moments is None:
    moments = feature_moments(inputs.decoder_features, inputs.label, num_classes)
  prototypes, counts, _ = moments
  images_with_class = jnp.sum((counts > 0).astype(prototypes.dtype), axis=0)
  summed = jnp.sum(prototypes, axis=0)
  if batch_reduction == 'official_sum':
    class_vectors = summed * (images_with_class / (images_with_class + EPSILON))[:, None]
  else:
    class_vectors = summed / jnp.maximum(images_with_class, 1.0)[:, None]
  pair_distance = jnp.mean(
      jnp.abs(class_vectors[:, None, :] - class_vectors[None, :, :]), axis=-1)
  present = images_with_class > 0
  upper = jnp.triu(jnp.ones((num_classes, num_classes), bool), k=1)
  pairs = (upper & present[:, None] & present[None, :]).astype(class_vectors.dtype)
  return jnp.sum(pairs * jnp.exp(-jnp.square(pair_distance))) / (jnp.sum(pairs) + EPSILON)


# ----------------------------------------------------------------------------
# Presets and the combined loss.
# ----------------------------------------------------------------------------


def preset_config(name: str) -> ml_collections.ConfigDict:
  """The loss configuration of a named preset.

  * ``agmm_released``: pce + absent_class + prototype + gmm, all weight 1, the
    forms of the official code (``loss = seg_loss + gmm_loss + proto_loss +
    cls_loss`` of ``train_voc.py`` / ``train_city.py``);
  * ``agmm_paper``: the same terms with the paper's GMM and the batch *mean* of
    the prototypes;
  * ``pce_only``: the partial cross-entropy baseline.

  Every preset carries the option blocks ``prototype`` and ``gmm`` so that
  configs can override any field, including weights of terms it leaves out,
  and ``rows_per_chunk`` (:func:`label_grid_losses`).
  """
  if name not in PRESETS:
    raise ValueError(f'unknown loss preset {name!r}; choose one of {PRESETS}')
  config = ml_collections.ConfigDict()
  if name == 'pce_only':
    config.weights = ml_collections.ConfigDict({'pce': 1.0})
  else:
    config.weights = ml_collections.ConfigDict(
        {'pce': 1.0, 'absent_class': 1.0, 'prototype': 1.0, 'gmm': 1.0})
  config.prototype = ml_collections.ConfigDict(
      {'batch_reduction': 'mean' if name == 'agmm_paper' else 'official_sum'})
  config.gmm = ml_collections.ConfigDict(
      {'form': 'paper' if name == 'agmm_paper' else 'released',
       'sigma_stop_gradient': True})
  config.rows_per_chunk = ROWS_PER_CHUNK
  return config


def _term_options(loss_config: ml_collections.ConfigDict, name: str) -> dict[str, Any]:
  """The option block ``loss_config[name]`` as keyword arguments."""
  if name not in loss_config:
    return {}
  options = loss_config[name]
  return options.to_dict() if isinstance(options, ml_collections.ConfigDict) else dict(options)


def build_loss(loss_config: ml_collections.ConfigDict) -> LossFn:
  """Builds ``fn(inputs) -> (total, {term: value})`` from a loss config.

  ``total = sum_t weights[t] * term_t(inputs, **loss_config[t])`` over the
  terms with a non-zero weight; the dict holds the unweighted values. The
  label-resolution terms among them (``LABEL_GRID_TERMS``) are computed
  together by one :func:`label_grid_losses` call (``loss_config.rows_per_chunk``
  rows per loop step, default ``ROWS_PER_CHUNK``), the others one by one; the
  GMM and prototype terms share one :func:`feature_moments`. The
  terms are checked once here (unknown name, bad option) so that a bad config
  fails before the first step with an error naming the config key.
  """
  if 'weights' not in loss_config:
    raise ValueError('loss_config.weights is missing')
  terms = []
  for name, weight in loss_config.weights.items():
    if name not in _LOSS_TERMS:
      raise ValueError(f'loss_config.weights.{name}: unknown loss term; '
                       f'registered: {", ".join(registered_losses())}')
    if float(weight) != 0.0:
      terms.append((name, float(weight), _LOSS_TERMS[name], _term_options(loss_config, name)))
  if not terms:
    raise ValueError('loss_config.weights: every weight is 0')
  for name, _, term, options in terms:
    if 'moments' in options:
      raise ValueError(f'loss_config.{name}.moments: computed by the loss, not a config option')
    try:
      inspect.signature(term).bind(None, **options)
    except TypeError as error:
      raise ValueError(f'loss_config.{name}: bad options {sorted(options)}: {error}') from None
    if name == 'gmm' and options.get('form', 'released') not in GMM_FORMS:
      raise ValueError(f'loss_config.gmm.form must be one of {GMM_FORMS}, '
                       f'got {options["form"]!r}')
    if name == 'prototype' and options.get(
        'batch_reduction', 'official_sum') not in PROTOTYPE_BATCH_REDUCTIONS:
      raise ValueError(f'loss_config.prototype.batch_reduction must be one of '
                       f'{PROTOTYPE_BATCH_REDUCTIONS}, got {options["batch_reduction"]!r}')
  rows_per_chunk = loss_config.get('rows_per_chunk', ROWS_PER_CHUNK)
  if not isinstance(rows_per_chunk, int) or rows_per_chunk < 1:
    raise ValueError(f'loss_config.rows_per_chunk must be an integer >= 1, '
                     f'got {rows_per_chunk!r}')
  grid_terms = tuple(name for name, _, _, _ in terms if name in LABEL_GRID_TERMS)
  grid_options = next((options for name, _, _, options in terms if name == 'gmm'), {})
  share_moments = 'gmm' in grid_terms and any(name == 'prototype' for name, _, _, _ in terms)

  def loss_fn(inputs: LossInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
    shared = {}
    if share_moments:
      _check_inputs(inputs)
      shared['moments'] = feature_moments(
          inputs.decoder_features, inputs.label, inputs.logits.shape[-1],
          squared_distance=grid_options.get('form', 'released') == 'paper')
    values = {}
    if grid_terms:
      values.update(label_grid_losses(inputs, grid_terms, rows_per_chunk=rows_per_chunk,
                                      **grid_options, **shared))
    for name, _, term, options in terms:
      if name not in grid_terms:
        values[name] = term(inputs, **options, **(shared if name == 'prototype' else {}))
    total = sum(weight * values[name] for name, weight, _, _ in terms)
    return total, {name: values[name] for name, _, _, _ in terms}

  return loss_fn
