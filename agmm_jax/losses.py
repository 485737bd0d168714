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


def _interpolate_grid(x: jax.Array, source_size: tuple[int, int],
                      resized_size: tuple[int, int], transpose: bool) -> jax.Array:
  """``R_h x R_w^T`` (``transpose=False``, ``x`` on the source grid) or
  ``R_h^T x R_w`` (``x`` on the resized grid), two gathers per axis."""
  if tuple(source_size) == tuple(resized_size):
    return x
  for axis, in_size, out_size in zip((1, 2), source_size, resized_size):
    x = _interpolate_axis(x, axis, int(in_size), int(out_size), transpose)
  return x


def resize_bilinear_half_pixel(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Resizes ``[B, H, W, C]`` to ``[B, *size, C]`` like ``F.interpolate`` default.

  ``R_h x R_w^T`` with the :func:`half_pixel_interpolation_matrix` weights,
  applied as two-tap gathers per axis; the gradient is
  :func:`resize_bilinear_half_pixel_transpose`. Computes in the dtype of ``x``.
  """
  return _interpolate_grid(x, x.shape[1:3], size, transpose=False)


def resize_bilinear_half_pixel_transpose(y: jax.Array, size: tuple[int, int]) -> jax.Array:
  """The adjoint of :func:`resize_bilinear_half_pixel`: ``[B, H, W, C]`` on the
  resized grid to ``[B, *size, C]`` on the source grid, ``R_h^T y R_w``.

  ``sum_x y(x) * resize(D)(x) == sum_s transpose(y)(s) * D(s)``: a weighted sum
  over the resized grid equals one over the (smaller) source grid.
  """
  return _interpolate_grid(y, size, y.shape[1:3], transpose=True)


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


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """``sum(values * mask) / sum(mask)``, 0 when the mask is empty."""
  mask = mask.astype(values.dtype)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def class_prototypes(
    features: jax.Array, label: jax.Array, num_classes: int
) -> tuple[jax.Array, jax.Array]:
  """Per-image class means of the features over labeled pixels.

  As the official ``cal_protypes``: the features are first upsampled to the
  label resolution (bilinear, ``align_corners=False``), then

      mu[b, k] = sum_{x: y_b(x) = k} up(f_b)(x) / (n[b, k] + 1e-6),
      n[b, k] = #{x: y_b(x) = k},

  so absent classes get a zero vector. The upsampled features are never
  materialized: ``up(f) = R_h f R_w^T`` is linear, so the sum equals
  ``sum_{i, j} (R_h^T Y_k R_w)[i, j] f[i, j]``. The label map ``Y`` is pulled
  down to the feature grid by a scatter-add of each labeled pixel's four
  bilinear taps (``[B, h, w, K]``), then contracted with the features.

  Args:
    features: float ``[B, h, w, C]``.
    label: int32 ``[B, H, W]`` (``agmm_jax.labels`` convention).
    num_classes: K.

  Returns:
    ``(prototypes [B, K, C], counts [B, K])`` in the compute dtype.
  """
  features = _upcast(features)
  batch, feat_h, feat_w, _ = features.shape
  height, width = label.shape[1:]
  labeled = labels_lib.labeled_mask(label).astype(features.dtype)
  class_ids = jnp.where(labels_lib.labeled_mask(label), label, 0)
  images = jnp.arange(batch)[:, None, None]
  row_lower, row_upper, row_weight = half_pixel_taps(feat_h, height)
  col_lower, col_upper, col_weight = half_pixel_taps(feat_w, width)
  pulled = jnp.zeros((batch, feat_h, feat_w, num_classes), features.dtype)
  for rows, row_weights in ((row_lower, 1.0 - row_weight), (row_upper, row_weight)):
    for cols, col_weights in ((col_lower, 1.0 - col_weight), (col_upper, col_weight)):
      tap_weights = jnp.asarray(np.outer(row_weights, col_weights), features.dtype)
      pulled = pulled.at[images, rows[None, :, None], cols[None, None, :], class_ids].add(
          labeled * tap_weights)
  sums = jnp.einsum('bhwk,bhwc->bkc', pulled, features,
                    precision=jax.lax.Precision.HIGHEST)
  counts = jnp.zeros((batch, num_classes), features.dtype).at[
      images, class_ids].add(labeled)
  return sums / (counts[..., None] + EPSILON), counts


# ----------------------------------------------------------------------------
# pCE and absent-class terms.
# ----------------------------------------------------------------------------


@register_loss('pce')
def partial_cross_entropy(inputs: LossInputs) -> jax.Array:
  """Cross-entropy over labeled pixels only.

  ``mean_{x: y(x) >= 0} -log softmax(z(x))[y(x)]`` over the whole batch (the
  official ``nn.CrossEntropyLoss(ignore_index=255)``); 0 without labeled pixels.
  """
  _check_inputs(inputs)
  log_probs = jax.nn.log_softmax(_upcast(inputs.logits), axis=-1)
  # A one-hot contraction instead of a gather: its gradient needs no scatter.
  one_hot = jax.nn.one_hot(inputs.label, log_probs.shape[-1], dtype=log_probs.dtype)
  label_log_probs = jnp.sum(one_hot * log_probs, axis=-1)
  return _masked_mean(-label_log_probs, labels_lib.labeled_mask(inputs.label))


@register_loss('absent_class')
def absent_class_loss(inputs: LossInputs) -> jax.Array:
  """Pushes down classes absent from the image's sparse labels.

  The official ``get_cls_loss``: with ``p = softmax(z)`` and ``c[b, k]`` the
  pre-crop class presence,

      l(x) = sum_k -(1 - c[b, k]) * log(1 - p_k(x) + 1e-6),

  summed (not averaged) over classes and averaged over the real pixels of the
  batch (the official ``mask != 255``); 0 if there is no real pixel.
  """
  _check_inputs(inputs)
  probs = jax.nn.softmax(_upcast(inputs.logits), axis=-1)
  absent = 1.0 - inputs.class_present.astype(probs.dtype)
  per_pixel = -jnp.sum(absent[:, None, None, :] * jnp.log(1.0 - probs + EPSILON), axis=-1)
  return _masked_mean(per_pixel, labels_lib.real_mask(inputs.label))


# ----------------------------------------------------------------------------
# Prototype separation term.
# ----------------------------------------------------------------------------


@register_loss('prototype')
def prototype_loss(inputs: LossInputs, *, batch_reduction: str = 'official_sum') -> jax.Array:
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
  """
  _check_inputs(inputs)
  if batch_reduction not in PROTOTYPE_BATCH_REDUCTIONS:
    raise ValueError(f'prototype batch_reduction must be one of '
                     f'{PROTOTYPE_BATCH_REDUCTIONS}, got {batch_reduction!r}')
  num_classes = inputs.logits.shape[-1]
  prototypes, counts = class_prototypes(inputs.decoder_features, inputs.label, num_classes)
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
# GMM term.
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


def _class_averaged_bce(target: jax.Array, prediction: jax.Array,
                        present: jax.Array) -> jax.Array:
  """Per-pixel BCE averaged over present classes, as in ``cal_gmm_loss``.

  ``sum_k m_k * (-(t log(q + 1e-6) + (1 - t) log(1 - q + 1e-6)) / 2) /
  (sum_k m_k + 1e-6)`` for ``[B, H, W, K]`` target/prediction and ``[B, K]``
  mask ``m``; returns ``[B, H, W]``. A boolean target is the one-hot case.
  """
  if target.dtype == jnp.bool_:
    # For a 0/1 target, t log a + (1 - t) log b is log(t ? a : b) exactly:
    # one log per element instead of two.
    bce = -jnp.log(jnp.where(target, prediction + EPSILON,
                             1.0 - prediction + EPSILON)) / 2.0
  else:
    bce = -(target * jnp.log(prediction + EPSILON)
            + (1.0 - target) * jnp.log(1.0 - prediction + EPSILON)) / 2.0
  present = present[:, None, None, :]
  return jnp.sum(bce * present, axis=-1) / (jnp.sum(present, axis=-1) + EPSILON)


def gmm_responses_released(features: jax.Array, label: jax.Array,
                           num_classes: int) -> jax.Array:
  """The official ``GMM`` response ``G`` at label resolution, ``[B, H, W, K]``.

  With per-image prototypes ``mu`` (:func:`class_prototypes`), ``m[b, k]`` the
  crop-level presence (``build_cur_cls_label``) and ``r`` the real-pixel mask
  bilinearly *downsampled* to the feature grid (``preserve``: fractional at the
  padding border),

      d[b, k](i, j) = mean_c |f_b(i, j, c) - mu[b, k, c]| * m[b, k] * r_b(i, j)
      G = up(exp(-d^2)) * m[b, k],

  computed on the feature grid and upsampled bilinearly (``align_corners=False``)
  to the label grid. The prediction that the official function also receives is
  only used for its size there.
  """
  features = _upcast(features)
  batch, feat_h, feat_w, channels = features.shape
  height, width = label.shape[1:]
  prototypes, counts = class_prototypes(features, label, num_classes)
  present = (counts > 0).astype(features.dtype)
  real = labels_lib.real_mask(label).astype(features.dtype)[..., None]
  preserve = resize_bilinear_half_pixel(real, (feat_h, feat_w))
  distance = mean_abs_distance(
      features.reshape(batch, feat_h * feat_w, channels), prototypes, present)
  distance = distance.reshape(batch, feat_h, feat_w, num_classes) * preserve
  response = resize_bilinear_half_pixel(jnp.exp(-jnp.square(distance)), (height, width))
  return response * present[:, None, None, :]


def gmm_responses_paper(features: jax.Array, label: jax.Array, probs: jax.Array,
                        *, sigma_stop_gradient: bool = True) -> jax.Array:
  """The CVPR-paper GMM response ``G`` at label resolution, ``[B, H, W, K]``.

      d_k(x)^2 = ||f(x) - mu_k||^2                       (Euclidean)
      sigma_k^2 = sum_{x unlabeled} P_k(x) up(d_k^2)(x) / (sum_{x unlabeled} P_k(x) + 1e-6)
      G_k = up(exp(-d_k^2 / (2 sigma_k^2 + 1e-6))) * m_k

  Choices the paper leaves open, and what is used here:

  * prototypes ``mu_k``: per image, over the labeled pixels of the crop, from
    features upsampled to the label grid, exactly as the released form
    (:func:`class_prototypes`);
  * resolution: as the released form, ``d^2`` and ``G`` live on the feature
    grid and ``G`` is upsampled bilinearly (``align_corners=False``, ``up``) to
    the label grid, so the two forms differ only in the distance and sigma.
    ``d^2`` is computed by the matmul expansion ``||f||^2 - 2 f.mu + ||mu||^2``
    (clamped at 0);
  * sigma is a weighted mean over the *label* grid's unlabeled pixels of the
    upsampled ``d^2``, so the unlabeled set is exact; it is evaluated on the
    feature grid as ``sum_s (up^T w)(s) d^2(s)``, the same number;
  * ``P_k``: the softmax prediction restricted to pre-crop present classes
    (the official ``clean_mask``), over real unlabeled pixels only;
  * sigma is stop-gradiented by default (the official code, in its commented
    adaptive variant, detaches it), see ``sigma_stop_gradient``;
  * 1e-6 guards the divisions; a class without weighted unlabeled pixels gets
    ``sigma^2 = 0``, i.e. a response that is 1 at the prototype and ~0 elsewhere;
  * ``m_k`` (class labeled inside the crop) gates G as in the released form.

  Args:
    features: float ``[B, h, w, C]``.
    label: int32 ``[B, H, W]``.
    probs: ``[B, H, W, K]`` cleaned softmax prediction ``P``.
    sigma_stop_gradient: stop gradients through ``sigma^2``.
  """
  features = _upcast(features)
  num_classes = probs.shape[-1]
  feat_h, feat_w = features.shape[1:3]
  height, width = label.shape[1:]
  prototypes, counts = class_prototypes(features, label, num_classes)
  present = (counts > 0).astype(features.dtype)
  precision = jax.lax.Precision.HIGHEST
  cross = jnp.einsum('bhwc,bkc->bhwk', features, prototypes, precision=precision)
  squared_norms = jnp.sum(jnp.square(features), axis=-1, keepdims=True)
  prototype_norms = jnp.sum(jnp.square(prototypes), axis=-1)[:, None, None, :]
  squared_distance = jnp.maximum(squared_norms - 2.0 * cross + prototype_norms, 0.0)
  unlabeled = (label == labels_lib.UNLABELED).astype(features.dtype)[..., None]
  weights = probs.astype(features.dtype) * unlabeled
  pulled_weights = resize_bilinear_half_pixel_transpose(weights, (feat_h, feat_w))
  sigma_sq = (jnp.sum(pulled_weights * squared_distance, axis=(1, 2))
              / (jnp.sum(weights, axis=(1, 2)) + EPSILON))
  if sigma_stop_gradient:
    sigma_sq = jax.lax.stop_gradient(sigma_sq)
  response = jnp.exp(-squared_distance / (2.0 * sigma_sq[:, None, None, :] + EPSILON))
  response = resize_bilinear_half_pixel(response, (height, width))
  return response * present[:, None, None, :]


def gmm_response(inputs: LossInputs, *, form: str = 'released',
                 sigma_stop_gradient: bool = True) -> jax.Array:
  """The GMM response ``G`` of ``form`` at label resolution, ``[B, H, W, K]``.

  ``released``: :func:`gmm_responses_released`; ``paper``:
  :func:`gmm_responses_paper` with ``P`` the softmax prediction restricted to
  the pre-crop present classes (the official ``clean_mask``).
  """
  if form not in GMM_FORMS:
    raise ValueError(f'gmm form must be one of {GMM_FORMS}, got {form!r}')
  num_classes = inputs.logits.shape[-1]
  if form == 'released':
    return gmm_responses_released(inputs.decoder_features, inputs.label,
                                  num_classes)
  probs = jax.nn.softmax(_upcast(inputs.logits), axis=-1)
  cleaned = probs * inputs.class_present.astype(probs.dtype)[:, None, None, :]
  return gmm_responses_paper(inputs.decoder_features, inputs.label, cleaned,
                             sigma_stop_gradient=sigma_stop_gradient)


@register_loss('gmm')
def gmm_loss(inputs: LossInputs, *, form: str = 'released',
             sigma_stop_gradient: bool = True) -> jax.Array:
  """GMM self-supervision: prediction vs. GMM response, response vs. labels.

  With ``p = softmax(z)``, G from :func:`gmm_responses_released` (``form=
  'released'``) or :func:`gmm_responses_paper` (``form='paper'``), ``m[b, k]``
  the classes labeled inside crop b, and ``BCE_m`` the class-averaged BCE of
  :func:`_class_averaged_bce` (halved, averaged over present classes with
  ``+1e-6``), the official ``cal_gmm_loss`` is

      loss = mean_{x real} BCE_m(target=G, prediction=p)(x)
           + mean_{x labeled} BCE_m(target=onehot(y), prediction=G)(x),

  with means over all qualifying pixels of the batch (0 for an empty set).
  Gradients flow through both G and p (no stop-gradient, as released).

  Args:
    inputs: the batch.
    form: ``'released'`` or ``'paper'``.
    sigma_stop_gradient: paper form only, see :func:`gmm_responses_paper`.
  """
  _check_inputs(inputs)
  num_classes = inputs.logits.shape[-1]
  probs = jax.nn.softmax(_upcast(inputs.logits), axis=-1)
  response = gmm_response(inputs, form=form,
                          sigma_stop_gradient=sigma_stop_gradient)
  one_hot = inputs.label[..., None] == jnp.arange(num_classes)
  present = jnp.any(one_hot, axis=(1, 2)).astype(probs.dtype)
  prediction_loss = _masked_mean(_class_averaged_bce(response, probs, present),
                                 labels_lib.real_mask(inputs.label))
  response_loss = _masked_mean(_class_averaged_bce(one_hot, response, present),
                               labels_lib.labeled_mask(inputs.label))
  return prediction_loss + response_loss


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
  configs can override any field, including weights of terms it leaves out.
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

  def loss_fn(inputs: LossInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
    values = {name: term(inputs, **options) for name, _, term, options in terms}
    total = sum(weight * values[name] for name, weight, _, _ in terms)
    return total, values

  return loss_fn
