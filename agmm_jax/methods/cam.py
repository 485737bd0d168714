"""Class activation maps (Zhou et al., "Learning Deep Features for
Discriminative Localization", CVPR 2016): image-level tags as supervision.

* The ``cam`` head: a 1x1 convolution without bias (IRN's classifier) from
  the decoder features ``f`` ``[B, h, w, C]`` to per-pixel class scores
  ``M_k(x) = sum_c w_ck f_c(x)`` ``[B, h, w, K]``. Global average pooling
  commutes with it, so the image's class logit ``z_k = GAP(M_k)`` is Zhou's
  GAP-then-linear classifier, and ``M`` is its class activation map.
* The ``cam_bce`` term: the multi-label binary cross-entropy of ``z``
  against the image's tags (the batch field ``tags``), ``mean_{b, k}
  -(t log s(z) + (1 - t) log(1 - s(z)))`` with ``s`` the sigmoid (PyTorch's
  ``multilabel_soft_margin_loss``), over the classes other than
  ``config.loss.background_class``. The pooling averages over the real
  grid points only (:func:`pooled_logits`), so padding of the crop does not
  dilute ``z``.
* :func:`class_activation_maps`: ``relu(M)`` restricted to the image's tags,
  each class divided by its maximum over the image (max-norm, IRN's
  ``cam / (max + 1e-5)``); :func:`cam_seeds` thresholds them into foreground
  seeds (the arg-max class where its map is at least ``foreground``),
  background (every map below ``background``; only when the dataset has a
  background class) and ignore (the rest), IRN's ``conf_fg_thres`` 0.30 and
  ``conf_bg_thres`` 0.05.

The pseudo-labels of the CAM stages (:mod:`agmm_jax.methods.cam_stages`)
follow IRN's ``make_cam.py`` and ``cam_to_ir_label.py``:

* :func:`upsampled_maps`: ``relu(M)`` of the image, upsampled to label
  resolution (align corners, as the model's logits), plus, with ``flip``, that
  of the image mirrored within its width, mirrored back (IRN sums its scales
  and flips before normalizing);
* :func:`normalized_maps`: restricted to the allowed classes (the image's
  tags, or for boxes each class's boxes: SPML's box seeds) and divided by
  their maximum over the real pixels;
* :func:`refined_seeds`: IRN's seeds: the arg-max allowed class where its map
  is at least ``foreground``, else a *rest* label, refined by a dense CRF on
  those hard labels (:func:`crf_labels`: IRN's ``crf_inference_label``, its
  unary ``unary_from_labels`` with confidence 0.7 over the allowed classes
  and the rest, its kernels, 10 mean-field iterations, by
  :func:`agmm_jax.methods.dense_crf.mean_field`); rest pixels are ignored,
  and with a background class IRN's second pass at ``background`` decides
  which rest pixels are background. Disallowed classes never win.
* :func:`cam_prediction`: the CAM's own segmentation (IRN's ``eval_cam.py``:
  the arg-max allowed class; with a background class, its score is the
  constant ``EVAL_BACKGROUND_SCORE``), which the classifier stage is
  evaluated by.
"""

from collections.abc import Mapping
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from agmm_jax.data import labels as labels_lib
from agmm_jax.evaluation import evaluator
from agmm_jax.methods import core
from agmm_jax.methods import dense_crf
from agmm_jax.model import resample

CAM_HEAD = 'cam'
TAGS_FIELD = 'tags'
# IRN (Ahn et al. 2019) cam_to_ir_label defaults.
FOREGROUND_THRESHOLD = 0.30
BACKGROUND_THRESHOLD = 0.05
# IRN's max-norm guard.
MAX_NORM_EPSILON = 1e-5
NO_BACKGROUND = -1
# IRN's cam_eval_thres: the background's score when a CAM is scored as a
# segmentation.
EVAL_BACKGROUND_SCORE = 0.15
# IRN's crf_inference_label (misc/imutils.py): t=10, gt_prob=0.7,
# addPairwiseGaussian(sxy=3, compat=3), addPairwiseBilateral(sxy=50, srgb=5,
# compat=10); sigmas in label pixels and 0..255 rgb units.
CRF_ITERATIONS = 10
CRF_LABEL_CONFIDENCE = 0.7
CRF_SMOOTHNESS_SIGMA = 3.0
CRF_SMOOTHNESS_WEIGHT = 3.0
CRF_APPEARANCE_SIGMA_XY = 50.0
CRF_APPEARANCE_SIGMA_RGB = 5.0
CRF_APPEARANCE_WEIGHT = 10.0
# The appearance kernel by the bilateral grid at cells of 1 sigma (xy) and
# 1.7 sigma (rgb, SPML's CRF's; at srgb 5 that is 30 cells per colour axis).
CRF_APPROX = 'grid'
CRF_CELL_XY = 1.0
CRF_CELL_RGB = 1.7
# The unary energy of a class the pixel may not take: exp(-1e4) is 0 in
# float32, so such a class has no marginal and sends no message.
DISALLOWED_ENERGY = 1e4


class CamHead(nnx.Module):
  """``M = conv_1x1(f)`` without bias: the class activation maps."""

  def __init__(self, in_features: int, *, num_classes: int, dtype: Any,
               rngs: nnx.Rngs):
    self.conv = nnx.Conv(in_features, num_classes, (1, 1), use_bias=False,
                         dtype=dtype, rngs=rngs)

  def __call__(self, features: jax.Array) -> jax.Array:
    return self.conv(features)

  @property
  def classifier_weights(self) -> jax.Array:
    """``w`` ``[C, K]``."""
    return self.conv.kernel[0, 0]


def image_tags(example: Mapping[str, np.ndarray]) -> np.ndarray:
  """The batch field: the crop's image-level tags, float32 ``[K]``."""
  if 'tags' not in example:
    raise ValueError('the CAM terms need tags in the training records: '
                     'prepare the training data with the sparse spec tags or '
                     'boxes (e.g. --config.data.prepare.sparse=tags)')
  return np.asarray(example['tags'], np.float32)


def pooled_logits(maps: jax.Array, valid: jax.Array) -> jax.Array:
  """``z`` ``[B, K]``: the mean of ``maps`` ``[B, h, w, K]`` over the grid
  points that sit on real pixels of ``valid`` ``[B, H, W]``.

  Grid point ``i`` sits on label row ``round(i (H - 1) / (h - 1))`` (the
  align-corners correspondence by which the model upsamples its logits),
  and likewise for columns.
  """
  _, height, width, _ = maps.shape

  def on_labels(size: int, label_size: int) -> np.ndarray:
    return np.round(np.arange(size) * (label_size - 1) / max(size - 1, 1)
                    ).astype(np.int32)

  rows = on_labels(height, valid.shape[1])
  cols = on_labels(width, valid.shape[2])
  weights = valid[:, rows][:, :, cols].astype(jnp.float32)
  total = jnp.einsum('bhwk,bhw->bk', core.upcast(maps), weights)
  return total / jnp.maximum(weights.sum((1, 2)), 1.0)[:, None]


def multilabel_bce(logits: jax.Array, tags: jax.Array,
                   counted: jax.Array) -> jax.Array:
  """``mean -(t log s(z) + (1 - t) log(1 - s(z)))`` over the ``counted``
  classes ``[K]`` of every image (log-sigmoid form, stable)."""
  losses = -(tags * jax.nn.log_sigmoid(logits)
             + (1.0 - tags) * jax.nn.log_sigmoid(-logits))
  weights = jnp.broadcast_to(counted.astype(jnp.float32), losses.shape)
  return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _check_background(*, background_class: int) -> None:
  if background_class < NO_BACKGROUND:
    raise ValueError(f'loss_config.background_class must be a class id or '
                     f'{NO_BACKGROUND} (none), got {background_class}')


@core.register_term('cam_bce', needs=core.Needs(
    heads={CAM_HEAD: CamHead}, batch_fields={TAGS_FIELD: image_tags}),
                    check=_check_background, shared=('background_class',))
def cam_bce(inputs: core.LossInputs, *,
            background_class: int = NO_BACKGROUND) -> jax.Array:
  """The multi-label BCE of the pooled class activation maps (module
  docstring)."""
  maps = inputs.output(CAM_HEAD)
  logits = pooled_logits(maps, labels_lib.real_mask(inputs.label))
  counted = jnp.arange(maps.shape[-1]) != background_class
  return multilabel_bce(logits, inputs.field(TAGS_FIELD).astype(jnp.float32),
                        counted)


def class_activation_maps(features: jax.Array, classifier_weights: jax.Array,
                          tags: jax.Array) -> jax.Array:
  """Max-normalized CAMs of the tagged classes.

  Args:
    features: ``[B, h, w, C]`` the features the classifier reads.
    classifier_weights: ``[C, K]``.
    tags: ``[B, K]``, 1 for the image's classes.

  Returns:
    float32 ``[B, h, w, K]``: ``relu(sum_c w_ck f_c) / (max_x relu(...) +
    1e-5)`` for the tagged classes, 0 for the others.
  """
  maps = jnp.einsum('bhwc,ck->bhwk', core.upcast(features),
                    core.upcast(classifier_weights))
  maps = jax.nn.relu(maps) * (tags[:, None, None, :] > 0)
  peak = maps.max(axis=(1, 2), keepdims=True)
  return maps / (peak + MAX_NORM_EPSILON)


def cam_seeds(maps: jax.Array, *, background_class: int = NO_BACKGROUND,
              foreground: float = FOREGROUND_THRESHOLD,
              background: float = BACKGROUND_THRESHOLD) -> jax.Array:
  """int32 ``[B, h, w]`` pseudo-labels of normalized CAMs (module docstring):
  the arg-max class where its map is ``>= foreground``; ``background_class``
  where every map is ``< background`` (when there is one); ``UNLABELED``
  elsewhere. The background class's own map is not a foreground score."""
  num_classes = maps.shape[-1]
  if background_class != NO_BACKGROUND:
    maps = jnp.where(jnp.arange(num_classes) == background_class, 0.0, maps)
  score = maps.max(-1)
  seeds = jnp.where(score >= foreground, maps.argmax(-1), labels_lib.UNLABELED)
  if background_class != NO_BACKGROUND:
    seeds = jnp.where(score < background, background_class, seeds)
  return seeds.astype(jnp.int32)


def upsampled_maps(maps_fn: Any, image: jax.Array, width: jax.Array,
                   size: tuple[int, int], *, flip: bool) -> jax.Array:
  """float32 ``[B, H, W, K]``: ``relu`` of ``maps_fn(image)`` (the CAM head on
  the decoder grid) resized to ``size`` (align corners); with ``flip``, plus
  the maps of the image mirrored within its ``width`` ``[B]``, mirrored back
  (padding stays on the right)."""

  def maps_at_labels(images):
    return resample.resize_bilinear_align_corners(
        jax.nn.relu(core.upcast(maps_fn(images))), size)

  maps = maps_at_labels(image)
  if flip:
    mirrored = evaluator.flip_region_horizontally(image, width)
    maps = maps + evaluator.flip_region_horizontally(maps_at_labels(mirrored), width)
  return maps


def normalized_maps(maps: jax.Array, allowed: jax.Array,
                    valid: jax.Array) -> jax.Array:
  """float32 ``[B, H, W, K]``: ``relu(maps)`` where ``allowed`` (bool,
  broadcast to ``maps``: ``[B, 1, 1, K]`` tags or ``[B, H, W, K]`` box
  masks) on the ``valid`` ``[B, H, W]`` pixels, each class divided by its
  maximum there plus ``MAX_NORM_EPSILON``; 0 elsewhere."""
  maps = jax.nn.relu(core.upcast(maps)) * allowed * valid[..., None]
  peak = maps.max(axis=(1, 2), keepdims=True)
  return maps / (peak + MAX_NORM_EPSILON)


def _foreground_classes(allowed: jax.Array, num_classes: int,
                        background_class: int) -> jax.Array:
  """``allowed`` without the background class."""
  return allowed & (jnp.arange(num_classes) != background_class)


def thresholded_labels(maps: jax.Array, allowed: jax.Array,
                       threshold: float) -> jax.Array:
  """int32 ``[B, H, W]``: the arg-max allowed class where its map is
  ``>= threshold``, else ``K`` (the rest label)."""
  num_classes = maps.shape[-1]
  allowed = jnp.broadcast_to(allowed, maps.shape)
  scores = jnp.where(allowed, maps, -1.0)
  best = scores.max(-1)
  return jnp.where(best >= threshold, scores.argmax(-1), num_classes).astype(jnp.int32)


def label_unary(labels: jax.Array, allowed: jax.Array,
                confidence: float = CRF_LABEL_CONFIDENCE) -> jax.Array:
  """float32 ``[B, H, W, K + 1]``: pydensecrf's ``unary_from_labels`` over
  the ``n`` labels a pixel may take (its allowed classes and the rest label
  ``K``): ``-log confidence`` for its label, ``-log((1 - confidence) / (n -
  1))`` for the others, ``DISALLOWED_ENERGY`` for the classes it may not
  take."""
  batch, height, width = labels.shape
  num_classes = allowed.shape[-1]
  channels = jnp.concatenate([
      jnp.broadcast_to(allowed, (batch, height, width, num_classes)),
      jnp.ones((batch, height, width, 1), bool)], axis=-1)
  count = channels.sum(-1, keepdims=True).astype(jnp.float32)
  other = -jnp.log((1.0 - confidence) / jnp.maximum(count - 1.0, 1.0))
  chosen = labels[..., None] == jnp.arange(num_classes + 1)
  return jnp.where(chosen, -jnp.log(confidence),
                   jnp.where(channels, other, DISALLOWED_ENERGY)).astype(jnp.float32)


def _crf_marginals(labels: jax.Array, allowed: jax.Array, rgb: jax.Array,
                   valid: jax.Array, iterations: int) -> jax.Array:
  """The dense CRF's marginals ``[B, H, W, K + 1]`` of :func:`crf_labels`."""
  return dense_crf.mean_field(
      label_unary(labels, allowed), rgb, valid, iterations=iterations,
      smoothness_sigma=CRF_SMOOTHNESS_SIGMA, smoothness_weight=CRF_SMOOTHNESS_WEIGHT,
      appearance_sigma_xy=CRF_APPEARANCE_SIGMA_XY,
      appearance_sigma_rgb=CRF_APPEARANCE_SIGMA_RGB,
      appearance_weight=CRF_APPEARANCE_WEIGHT, approx=CRF_APPROX,
      cell_xy=CRF_CELL_XY, cell_rgb=CRF_CELL_RGB)


def crf_labels(labels: jax.Array, allowed: jax.Array, rgb: jax.Array,
               valid: jax.Array, *, iterations: int = CRF_ITERATIONS,
               max_classes: int | None = None) -> jax.Array:
  """int32 ``[B, H, W]`` in ``0..K``: IRN's ``crf_inference_label`` of the
  hard ``labels`` (``K``: rest) over the allowed classes and the rest
  (:func:`label_unary`, the ``CRF_*`` kernels on ``rgb`` 0..255, messages
  between ``valid`` pixels only), the arg-max marginal.

  ``max_classes`` (< K): the CRF runs on that many class channels per image
  (its allowed classes in id order; the CRF's cost is linear in channels and
  a disallowed class has no marginal, so with at most ``max_classes``
  allowed classes per image the result is the same); pixels of further
  classes become rest.
  """
  num_classes = allowed.shape[-1]
  allowed = jnp.broadcast_to(allowed, labels.shape + (num_classes,))
  if max_classes is None or max_classes >= num_classes:
    return _crf_marginals(labels, allowed, rgb, valid, iterations).argmax(-1).astype(jnp.int32)
  present = allowed.any(axis=(1, 2))
  # The present classes first, in id order.
  slots = jnp.argsort(~present, axis=-1, stable=True)[:, :max_classes]
  slot_on = jnp.take_along_axis(present, slots, -1)[:, None, None, :]
  slot_allowed = jnp.take_along_axis(allowed, slots[:, None, None, :], -1) & slot_on
  match = (labels[..., None] == slots[:, None, None, :]) & slot_on
  slot_labels = jnp.where(match.any(-1), match.argmax(-1), max_classes)
  chosen = _crf_marginals(slot_labels, slot_allowed, rgb, valid, iterations).argmax(-1)
  classes = jnp.take_along_axis(slots[:, None, None, :],
                                jnp.minimum(chosen, max_classes - 1)[..., None], -1)[..., 0]
  return jnp.where(chosen < max_classes, classes, num_classes).astype(jnp.int32)


def refined_seeds(maps: jax.Array, allowed: jax.Array, valid: jax.Array,
                  rgb: jax.Array | None, *, background_class: int = NO_BACKGROUND,
                  foreground: float = FOREGROUND_THRESHOLD,
                  background: float = BACKGROUND_THRESHOLD,
                  crf_iterations: int = CRF_ITERATIONS,
                  max_classes: int | None = None) -> jax.Array:
  """int32 ``[B, H, W]`` pseudo-labels of normalized maps (IRN's
  ``cam_to_ir_label``, module docstring): a class where the foreground pass
  (:func:`thresholded_labels` at ``foreground``, then :func:`crf_labels` when
  ``crf_iterations`` > 0) gives one; ``background_class`` (when there is one)
  where both it and the pass at ``background`` give the rest label;
  ``UNLABELED`` on the other real pixels, ``PADDING`` off ``valid``. Without
  the CRF and with tags this is :func:`cam_seeds`. ``max_classes``: of
  :func:`crf_labels`."""
  num_classes = maps.shape[-1]
  allowed = _foreground_classes(allowed, num_classes, background_class)

  def labels_at(threshold):
    labels = thresholded_labels(maps, allowed, threshold)
    if crf_iterations > 0:
      labels = crf_labels(labels, allowed, rgb, valid, iterations=crf_iterations,
                          max_classes=max_classes)
    return labels

  confident = labels_at(foreground)
  seeds = jnp.where(confident < num_classes, confident, labels_lib.UNLABELED)
  if background_class != NO_BACKGROUND:
    unsure = labels_at(background)
    seeds = jnp.where((confident == num_classes) & (unsure == num_classes),
                      background_class, seeds)
  return jnp.where(valid, seeds, labels_lib.PADDING).astype(jnp.int32)


def cam_prediction(maps: jax.Array, allowed: jax.Array, *,
                   background_class: int = NO_BACKGROUND,
                   background_score: float = EVAL_BACKGROUND_SCORE) -> jax.Array:
  """int32 ``[B, H, W]``: the arg-max allowed class of normalized maps; with
  a background class, that class scores ``background_score`` everywhere
  (IRN's ``eval_cam.py``). A pixel with no allowed class gets the background
  class, or ``UNLABELED`` (not predicted) without one."""
  num_classes = maps.shape[-1]
  allowed = jnp.broadcast_to(
      _foreground_classes(allowed, num_classes, background_class), maps.shape)
  scores = jnp.where(allowed, maps, -1.0)
  if background_class != NO_BACKGROUND:
    scores = scores.at[..., background_class].set(background_score)
  return jnp.where(scores.max(-1) >= 0.0, scores.argmax(-1),
                   labels_lib.UNLABELED).astype(jnp.int32)


core.register_stages('cam', 'agmm_jax.methods.cam_stages:stages')
