"""Box supervision: the constraints a bounding box puts on the mask.

The boxes reach the loss as the batch field ``boxes``: int32 ``[B, N, 5]``
rows ``(class, y0, x0, y1, x1)`` in crop pixels, half open, moved with the
crop by the input pipeline (``agmm_jax.data.weak_labels.crop_boxes``), then
padded with rows of class ``NO_BOX`` (-1) to ``N = MAX_BOXES`` (with more
boxes the largest are kept). With ``p = softmax(z)`` and ``A(x)`` the classes
a pixel may take: the classes of the boxes that contain it, plus the
background class ``b`` when the dataset has one
(``config.loss.background_class``; -1: none):

* ``box_outside``: a pixel outside every box of class ``k`` is not ``k``:
  ``mean_x sum_{k not in A(x)} -log(1 - p_k(x) + 1e-6)`` (AGMM's absent-class
  form, with the box instead of the image as the region);
* ``box_pce``: the partial-label cross-entropy ``mean_x -log sum_{k in A(x)}
  p_k(x)``;
* ``box_projection``: BoxInst's projection term (Tian et al., CVPR 2021):
  for each image and box class ``k`` (not ``b``), the max-projections of
  ``p_k`` on the x and y axes against those of the union of the class's
  boxes, each by the dice loss ``1 - 2 sum(m t) / (sum m^2 + sum t^2 +
  1e-5)``, summed over the two axes and averaged over the (image, class)
  pairs. BoxInst projects one instance's mask onto its own box; the union
  of a class's boxes is the semantic form, and it is exact for tight boxes:
  the projection of the class's mask on an axis equals that of the union of
  its regions' boxes.
* ``box_fill``: the boxes as labels, the baselines of Khoreva et al. ("Simple
  Does It", CVPR 2017): each pixel takes the class of the smallest box that
  contains it (where boxes overlap, the smaller one is taken to lie in
  front), cross-entropy ``mean_x -log p_t(x)(x)``. ``inner_area`` < 1 is
  their ``Box^i``: only the centred part of that box with this share of its
  area is labeled (same centre and aspect), the rest of it is ignored.
  Pixels in no box take the background class, or are ignored without one.
  Boxes are those of the crop (a box the crop cuts is its visible part).

Means run over the real pixels (not padding) where ``A(x)`` is not empty:
with a background class every pixel; without one (MSRC: every class is a
'stuff' or object class with its own boxes) a pixel in no box has no class
it may take (a region below the generator's ``min_area``, or void), and it
is left out rather than pushed away from every class. The pairwise colour
terms of :mod:`agmm_jax.methods.regularized` (``gatedcrf``, ``densecrf``,
``ncut``) supply BoxInst's second term; presets combine them
(configs/presets.py).
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from agmm_jax.data import labels as labels_lib
from agmm_jax.data import weak_labels
from agmm_jax.methods import core

BOXES_FIELD = 'boxes'
# Boxes per training crop in the batch field (MSRC at min_area 100: 3.07
# per training image on average, 8 at most).
MAX_BOXES = 32
# No background class (the option's default).
NO_BACKGROUND = -1
# BoxInst's dice epsilon (AdelaiDet dice_coefficient).
DICE_EPSILON = 1e-5


def padded_boxes(example: Mapping[str, np.ndarray]) -> np.ndarray:
  """The batch field: one crop's boxes as int32 ``[MAX_BOXES, 5]``."""
  if 'boxes' not in example:
    raise ValueError('the box loss terms need boxes in the training records: '
                     'prepare the training data with the sparse spec boxes '
                     '(e.g. --config.data.prepare.sparse=boxes)')
  return weak_labels.pad_boxes(example['boxes'], MAX_BOXES)


_NEEDS = core.Needs(batch_fields={BOXES_FIELD: padded_boxes})


def box_cover(boxes: jax.Array, height: int, width: int,
              num_classes: int) -> jax.Array:
  """float32 ``[B, H, W, K]``: how many boxes of class ``k`` contain each
  pixel (padding rows count for no class)."""
  boxes = boxes.astype(jnp.int32)
  classes, y0, x0, y1, x1 = (boxes[..., i] for i in range(5))
  rows = jnp.arange(height)
  cols = jnp.arange(width)
  in_rows = ((rows >= y0[..., None]) & (rows < y1[..., None])).astype(jnp.float32)
  in_cols = ((cols >= x0[..., None]) & (cols < x1[..., None])).astype(jnp.float32)
  # one_hot of -1 is all zeros: a padding row covers nothing.
  one_hot = jax.nn.one_hot(classes, num_classes, dtype=jnp.float32)
  return jnp.einsum('bny,bnx,bnk->byxk', in_rows, in_cols, one_hot)


def allowed_mask(boxes: jax.Array, height: int, width: int, num_classes: int,
                 background_class: int) -> jax.Array:
  """bool ``[B, H, W, K]``: ``A(x)``, the classes of the boxes holding each
  pixel plus the background class, if any."""
  allowed = box_cover(boxes, height, width, num_classes) > 0
  if background_class != NO_BACKGROUND:
    allowed = allowed | (jnp.arange(num_classes) == background_class)
  return allowed


def allowed_classes(inputs: core.LossInputs,
                    background_class: int) -> tuple[jax.Array, jax.Array]:
  """``(allowed [B, H, W, K] bool, counted [B, H, W] bool)``: ``A(x)`` and
  the pixels the means run over (real, ``A(x)`` not empty)."""
  _, height, width, num_classes = inputs.logits.shape
  allowed = allowed_mask(inputs.field(BOXES_FIELD), height, width,
                         num_classes, background_class)
  counted = labels_lib.real_mask(inputs.label) & allowed.any(-1)
  return allowed, counted


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of ``values`` over ``mask`` (0 for an empty mask)."""
  mask = mask.astype(jnp.float32)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _check_background(*, background_class: int) -> None:
  if background_class < NO_BACKGROUND:
    raise ValueError(f'loss_config.background_class must be a class id or '
                     f'{NO_BACKGROUND} (none), got {background_class}')


@core.register_term('box_outside', needs=_NEEDS, check=_check_background,
                    shared=('background_class',))
def box_outside(inputs: core.LossInputs, *,
                background_class: int = NO_BACKGROUND) -> jax.Array:
  """``mean_x sum_{k not in A(x)} -log(1 - p_k(x) + 1e-6)`` (module
  docstring)."""
  allowed, counted = allowed_classes(inputs, background_class)
  probabilities = jax.nn.softmax(core.upcast(inputs.logits), axis=-1)
  penalty = -jnp.log(1.0 - probabilities + core.EPSILON)
  return _masked_mean(jnp.sum(jnp.where(allowed, 0.0, penalty), -1), counted)


@core.register_term('box_pce', needs=_NEEDS, check=_check_background,
                    shared=('background_class',))
def box_partial_cross_entropy(inputs: core.LossInputs, *,
                              background_class: int = NO_BACKGROUND
                              ) -> jax.Array:
  """``mean_x -log sum_{k in A(x)} p_k(x)`` (module docstring)."""
  allowed, counted = allowed_classes(inputs, background_class)
  logits = core.upcast(inputs.logits)
  inside = jax.nn.logsumexp(jnp.where(allowed, logits, -jnp.inf), axis=-1)
  # Pixels with no allowed class give -inf here; they are not counted, and
  # the where keeps their gradient finite.
  inside = jnp.where(counted, inside, 0.0)
  return _masked_mean(jax.nn.logsumexp(logits, axis=-1) - inside, counted)


def _check_fill(*, inner_area: float, background_class: int) -> None:
  _check_background(background_class=background_class)
  if not 0.0 < inner_area <= 1.0:
    raise ValueError('loss_config.box_fill.inner_area must be in (0, 1], '
                     f'got {inner_area}')


def smallest_box_target(boxes: jax.Array, height: int, width: int,
                        inner_area: float, background_class: int
                        ) -> jax.Array:
  """int32 ``[B, H, W]``: ``box_fill``'s label of each pixel (module
  docstring), ``labels.UNLABELED`` where it is ignored."""
  boxes = boxes.astype(jnp.int32)
  classes, y0, x0, y1, x1 = (boxes[..., i] for i in range(5))
  rows, cols = jnp.arange(height), jnp.arange(width)
  in_box = (((rows >= y0[..., None]) & (rows < y1[..., None]))[..., :, None]
            & ((cols >= x0[..., None]) & (cols < x1[..., None]))[..., None, :])
  in_box = in_box & (classes >= 0)[..., None, None]
  area = ((y1 - y0) * (x1 - x0)).astype(jnp.float32)
  # [B, H, W]: the index of the smallest box holding each pixel.
  smallest = jnp.argmin(
      jnp.where(in_box, area[..., None, None], jnp.inf), axis=1)
  # The inner box: half-extents scaled by sqrt(inner_area) about the centre;
  # at 1 a pixel centre r + 0.5 is inside exactly when y0 <= r < y1.
  scale = np.sqrt(inner_area)
  def inner(lo, hi, coords):
    centre, half = (lo + hi) / 2.0, scale * (hi - lo) / 2.0
    return jnp.abs(coords + 0.5 - centre[..., None]) < half[..., None]
  in_inner = (inner(y0, y1, rows)[..., :, None]
              & inner(x0, x1, cols)[..., None, :])
  pick = lambda values: jnp.take_along_axis(
      jnp.broadcast_to(values, in_box.shape), smallest[:, None], 1)[:, 0]
  box_class = pick(classes[..., None, None])
  outside = background_class if background_class != NO_BACKGROUND else (
      labels_lib.UNLABELED)
  return jnp.where(in_box.any(1),
                   jnp.where(pick(in_inner), box_class, labels_lib.UNLABELED),
                   outside).astype(jnp.int32)


@core.register_term('box_fill', needs=_NEEDS, check=_check_fill,
                    shared=('background_class',))
def box_fill(inputs: core.LossInputs, *, inner_area: float = 1.0,
             background_class: int = NO_BACKGROUND) -> jax.Array:
  """Cross-entropy toward the smallest box's class (module docstring)."""
  _, height, width, _ = inputs.logits.shape
  target = smallest_box_target(inputs.field(BOXES_FIELD), height, width,
                               inner_area, background_class)
  counted = labels_lib.real_mask(inputs.label) & (target >= 0)
  logits = core.upcast(inputs.logits)
  chosen = jnp.take_along_axis(logits, jnp.maximum(target, 0)[..., None],
                               -1)[..., 0]
  return _masked_mean(jax.nn.logsumexp(logits, axis=-1) - chosen, counted)


def dice_loss(prediction: jax.Array, target: jax.Array) -> jax.Array:
  """BoxInst's ``1 - 2 sum(m t) / (sum m^2 + sum t^2 + 1e-5)`` over the last
  axis."""
  intersection = jnp.sum(prediction * target, -1)
  union = jnp.sum(prediction ** 2, -1) + jnp.sum(target ** 2, -1) + DICE_EPSILON
  return 1.0 - 2.0 * intersection / union


@core.register_term('box_projection', needs=_NEEDS, check=_check_background,
                    shared=('background_class',))
def box_projection(inputs: core.LossInputs, *,
                   background_class: int = NO_BACKGROUND) -> jax.Array:
  """BoxInst's projection term per (image, box class) (module docstring)."""
  _, height, width, num_classes = inputs.logits.shape
  cover = box_cover(inputs.field(BOXES_FIELD), height, width, num_classes) > 0
  real = labels_lib.real_mask(inputs.label)[..., None]
  probabilities = jax.nn.softmax(core.upcast(inputs.logits), axis=-1)
  probabilities = jnp.where(real, probabilities, 0.0)
  target = cover.astype(jnp.float32)
  # [B, K, W] on the x axis (max over rows), [B, K, H] on the y axis.
  loss = (dice_loss(jnp.moveaxis(probabilities.max(1), -1, 1),
                    jnp.moveaxis(target.max(1), -1, 1))
          + dice_loss(jnp.moveaxis(probabilities.max(2), -1, 1),
                      jnp.moveaxis(target.max(2), -1, 1)))
  pairs = cover.any((1, 2))
  if background_class != NO_BACKGROUND:
    pairs = pairs & (jnp.arange(num_classes) != background_class)
  return _masked_mean(loss, pairs)
