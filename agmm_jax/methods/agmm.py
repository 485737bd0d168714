"""AGMM (Wu et al., CVPR 2023): the GMM and prototype terms, both forms.

Per image and class k, ``mu_k`` is the mean of the decoder features over the
pixels labeled k, ``d_k(x)`` the distance of ``f(x)`` to ``mu_k`` and
``G_k = exp(-d^2 / ...)`` a Gaussian response; ``G`` supervises the prediction
on all pixels with a binary cross-entropy and the labels supervise ``G``
(term ``gmm``); a prototype term pushes the class means apart (``prototype``).
With ``pce`` and ``absent_class`` (:mod:`agmm_jax.methods.pce`) they make the
AGMM loss; the ``agmm`` group computes the four in one softmax pass over the
label grid with one set of class prototypes.

Two forms (``gmm.form``): ``released`` reproduces the official PyTorch code of
Luffy03/AGMM-SASS (``model/tools.py`` and ``train_voc.py``), ``paper`` the
CVPR equations with an adaptive sigma. The released quirks are kept on purpose
and spelled out in each docstring: every resize is bilinear with
``align_corners=False`` (``F.interpolate``'s default, half-pixel centres, no
antialiasing), epsilons are 1e-6, the class set of the GMM is the set of
classes labeled inside the crop, and nothing is stop-gradiented.

Every term computes in float32 whatever the (lower) dtype of the logits or
features (float64 inputs stay float64, for gradient checks under x64), is
jit-able, and gives finite values and gradients when an image has no labeled
pixel (the official ``mean()`` over an empty set would be NaN; here such means
are 0).
"""

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from agmm_jax.data import labels as labels_lib
from agmm_jax.model import resample
from agmm_jax.methods import core
from agmm_jax.methods import label_grid
# The agmm group covers pce's terms, so they must be registered first.
from agmm_jax.methods import pce  # pylint: disable=unused-import
from agmm_jax.methods.core import EPSILON

GMM_FORMS = ('released', 'paper')
PROTOTYPE_BATCH_REDUCTIONS = ('official_sum', 'mean')


# ----------------------------------------------------------------------------
# Class prototypes (shared by the GMM and prototype terms).
# ----------------------------------------------------------------------------


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
  row_lower, row_upper, row_weight = resample.half_pixel_taps(feat_h, height)
  col_lower, col_upper, col_weight = resample.half_pixel_taps(feat_w, width)
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
    label: int32 ``[B, H, W]`` (``agmm_jax.data.labels`` convention).
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
  features = core.upcast(features)
  pulled = _pulled_labels(label, features.shape[1:3], num_classes, features.dtype)
  counts = labels_lib.labeled_class_counts(label, num_classes, features.dtype)
  if not squared_distance:
    prototypes = _weighted_feature_sums(pulled, features) / (counts[..., None] + EPSILON)
    return FeatureMoments(prototypes, counts, None)
  prototypes, distance = _prototypes_and_squared_distances(
      features, pulled, 1.0 / (counts + EPSILON))
  return FeatureMoments(prototypes, counts, distance)


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


def gmm_feature_response(inputs: core.LossInputs, *, form: str,
                         sigma_stop_gradient: bool,
                         rows_per_chunk: int = label_grid.ROWS_PER_CHUNK,
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
      (``sigma_weights``, ``sigma_total`` of ``label_grid.prediction_pass``), when the
      caller's own pass over the label grid computed them; else computed here.
    moments: :func:`feature_moments` of the batch (with ``squared_distance``
      for the paper form), when the caller shares them with other terms; else
      computed here.

  Returns:
    ``(G [B, h, w, K], m [B, K])`` in the compute dtype.
  """
  if form not in GMM_FORMS:
    raise ValueError(f'gmm form must be one of {GMM_FORMS}, got {form!r}')
  features = core.upcast(inputs.decoder_features)
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
    preserve = resample.resize_bilinear_half_pixel(real, (feat_h, feat_w))
    distance = mean_abs_distance(
        features.reshape(batch, feat_h * feat_w, channels), prototypes, labeled_in_crop)
    distance = distance.reshape(batch, feat_h, feat_w, num_classes) * preserve
    return jnp.exp(-jnp.square(distance)), labeled_in_crop
  if sigma_weights is None:
    passed = label_grid.prediction_pass(inputs.logits, inputs.label, inputs.class_present,
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


def gmm_response(inputs: core.LossInputs, *, form: str, sigma_stop_gradient: bool,
                 rows_per_chunk: int = label_grid.ROWS_PER_CHUNK) -> jax.Array:
  """The GMM response of ``form`` at label resolution, ``[B, H, W, K]``:
  ``up(G) * m`` with ``(G, m)`` from :func:`gmm_feature_response` (the
  trainer's summary map of the ``gmm`` term)."""
  response, labeled_in_crop = gmm_feature_response(
      inputs, form=form, sigma_stop_gradient=sigma_stop_gradient,
      rows_per_chunk=rows_per_chunk)
  return (resample.resize_bilinear_half_pixel(response, inputs.label.shape[1:])
          * labeled_in_crop[:, None, None, :])


def _check_gmm_options(*, form: str, sigma_stop_gradient: bool, rows_per_chunk: int) -> None:
  del sigma_stop_gradient
  if form not in GMM_FORMS:
    raise ValueError(f'loss_config.gmm.form must be one of {GMM_FORMS}, got {form!r}')
  label_grid.check_rows_per_chunk(rows_per_chunk)


def _label_grid_terms(inputs: core.LossInputs, terms: tuple[str, ...], *,
                      rows_per_chunk: int, gmm: Mapping[str, Any] | None,
                      moments: 'FeatureMoments | None') -> dict[str, jax.Array]:
  """:func:`label_grid.label_grid_losses` of ``terms``, with ``G`` of the
  ``gmm`` options ``gmm`` (when given) from :func:`gmm_feature_response`; the
  paper form's sigma weights come from the same softmax pass."""
  if gmm is None:
    return label_grid.label_grid_losses(inputs, terms, rows_per_chunk=rows_per_chunk)

  def response(sigma_weights):
    return gmm_feature_response(
        inputs, form=gmm['form'], sigma_stop_gradient=gmm['sigma_stop_gradient'],
        rows_per_chunk=rows_per_chunk, sigma_weights=sigma_weights, moments=moments)[0]

  return label_grid.label_grid_losses(
      inputs, terms, rows_per_chunk=rows_per_chunk, gmm_response=response,
      with_sigma_weights=gmm['form'] == 'paper' and gmm['sigma_stop_gradient'])


@core.register_term('gmm', summary=gmm_response, check=_check_gmm_options,
                    shared=('rows_per_chunk',))
def gmm_loss(inputs: core.LossInputs, *, form: str = 'released',
             sigma_stop_gradient: bool = True,
             rows_per_chunk: int = label_grid.ROWS_PER_CHUNK) -> jax.Array:
  """GMM self-supervision: prediction vs. GMM response, response vs. labels
  (:func:`label_grid.label_grid_losses`; ``G`` from :func:`gmm_feature_response`).

  Options: ``form`` (``'released'`` or ``'paper'``); ``sigma_stop_gradient``
  (paper form: no gradient through ``sigma^2``); ``rows_per_chunk``.
  """
  gmm = {'form': form, 'sigma_stop_gradient': sigma_stop_gradient}
  return _label_grid_terms(inputs, ('gmm',), rows_per_chunk=rows_per_chunk, gmm=gmm,
                           moments=None)['gmm']


# ----------------------------------------------------------------------------
# Prototype separation term.
# ----------------------------------------------------------------------------


def _check_prototype_options(*, batch_reduction: str) -> None:
  if batch_reduction not in PROTOTYPE_BATCH_REDUCTIONS:
    raise ValueError(f'loss_config.prototype.batch_reduction must be one of '
                     f'{PROTOTYPE_BATCH_REDUCTIONS}, got {batch_reduction!r}')


@core.register_term('prototype', check=_check_prototype_options)
def prototype_loss(inputs: core.LossInputs, *,
                   batch_reduction: str = 'official_sum') -> jax.Array:
  """Pushes the feature means of different classes apart
  (:func:`prototype_separation` of the batch's :func:`feature_moments`)."""
  core.check_inputs(inputs)
  moments = feature_moments(inputs.decoder_features, inputs.label, inputs.logits.shape[-1])
  return prototype_separation(moments, batch_reduction=batch_reduction)


def prototype_separation(moments: FeatureMoments, *, batch_reduction: str) -> jax.Array:
  """The official ``cal_protypes`` + ``proto_loss``.

  With per-image prototypes ``mu[b, k]`` (:func:`class_prototypes`),
  ``m[b, k] = 1`` if class k is labeled inside crop b and ``n_k = sum_b m[b,
  k]``, the batch class vectors are

  * ``'official_sum'`` (released code): ``v_k = (sum_b mu[b, k]) * n_k /
    (n_k + 1e-6)``, i.e. the *sum* over images, not the mean;
  * ``'mean'``: ``v_k = sum_b mu[b, k] / n_k``, the mean over the images that
    contain k.

  The loss is ``sum_{i < j, n_i, n_j > 0} exp(-(mean_c |v_i - v_j|)^2) /
  (#pairs + 1e-6)``, 0 with fewer than two present classes.
  """
  _check_prototype_options(batch_reduction=batch_reduction)
  prototypes, counts, _ = moments
  num_classes = counts.shape[-1]
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
# The AGMM loss in one go.
# ----------------------------------------------------------------------------


@core.register_group('agmm', ('pce', 'absent_class', 'gmm', 'prototype'))
def agmm_terms(inputs: core.LossInputs,
               options: Mapping[str, Mapping[str, Any]]) -> dict[str, jax.Array]:
  """Any two or more of pce, absent_class, gmm and prototype, each equal to
  its registered term: the label-grid terms in one softmax pass
  (:func:`_label_grid_terms`), and the GMM and prototype terms on one
  :func:`feature_moments`, so that their gradients meet before the one matmul
  that carries them back to the features."""
  gmm = options.get('gmm')
  moments = None
  if 'prototype' in options:
    core.check_inputs(inputs)
    moments = feature_moments(
        inputs.decoder_features, inputs.label, inputs.logits.shape[-1],
        squared_distance=gmm is not None and gmm['form'] == 'paper')
  values = {}
  grid_terms = tuple(name for name in label_grid.LABEL_GRID_TERMS if name in options)
  if grid_terms:
    values.update(_label_grid_terms(
        inputs, grid_terms, rows_per_chunk=options[grid_terms[0]]['rows_per_chunk'],
        gmm=gmm, moments=moments))
  if moments is not None:
    values['prototype'] = prototype_separation(moments, **options['prototype'])
  return values
