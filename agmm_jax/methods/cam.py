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

The stages that train this head alone and turn its maps into pseudo-labels
are built on the stage model (issue 31); this module is their CAM.
"""

from collections.abc import Mapping
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from agmm_jax.data import labels as labels_lib
from agmm_jax.methods import core

CAM_HEAD = 'cam'
TAGS_FIELD = 'tags'
# IRN (Ahn et al. 2019) cam_to_ir_label defaults.
FOREGROUND_THRESHOLD = 0.30
BACKGROUND_THRESHOLD = 0.05
# IRN's max-norm guard.
MAX_NORM_EPSILON = 1e-5
NO_BACKGROUND = -1


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
