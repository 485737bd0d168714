"""SPML's pseudo-labels (``pseudo_softmaxrw_crf.py`` of twke18/SPML): the
stage-1 classifier's class maps refined by a random walk on the embedding's
affinity, then optionally by SPML's dense CRF; used by the second stage
(:mod:`agmm_jax.methods.spml_stage2`). Kept apart from :mod:`spml` (the
stage-1 loss) so that the loss module stays one screenful of contracts and
the refinement can serve other pseudo-label stages.
"""

import jax
import jax.numpy as jnp

from agmm_jax.data import labels as labels_lib
from agmm_jax.model import resample
from agmm_jax.methods import dense_crf
from agmm_jax.methods.spml import GRID_STRIDE
from agmm_jax.methods.spml import normalize

# The random walk of the pseudo-labels (``pseudo_softmaxrw_crf.py``): affinity
# ``exp(gamma (cos - 1))^beta``, the transition matrix squared ``doublings``
# times, on every ``WALK_STRIDE``-th label pixel (SPML: image size // 8).
WALK_BETA = 20.0
WALK_GAMMA = 5.0
WALK_DOUBLINGS = 6
WALK_STRIDE = 8
# SPML's dense CRF of the walked class maps (``bashscripts/voc12/
# train_spml_*.sh``: ``--crf_iter_max 10 --crf_pos_xy_std 1 --crf_pos_w 3
# --crf_bi_xy_std 67 --crf_bi_rgb_std 3 --crf_bi_w 4``; ``spml/models/crf.py``
# with pydensecrf's ``unary_from_softmax``: ``-log`` of the maps clipped to
# ``[1e-5, 1]``). Sigmas in pixels of the labels and 0..255 rgb units.
SPML_CRF_ITERATIONS = 10
CRF_SMOOTHNESS_SIGMA = 1.0
CRF_SMOOTHNESS_WEIGHT = 3.0
CRF_APPEARANCE_SIGMA_XY = 67.0
CRF_APPEARANCE_SIGMA_RGB = 3.0
CRF_APPEARANCE_WEIGHT = 4.0
CRF_PROBABILITY_FLOOR = 1e-5
# The appearance kernel by the bilateral grid at coarse cells (in sigmas): at
# sigma_rgb 3 the colour axes have 255 / (3 cell) cells each, so finer ones
# cost too much (a 180 x 240 image, 11 classes, shared 2-core CPU: 118 MiB
# and ~1.4 s per filter at 1.0 / 1.7; 553 MiB and ~9 s at 1.0 / 1.0).
CRF_APPROX = 'grid'
CRF_CELL_XY = 1.0
CRF_CELL_RGB = 1.7
CRF_MAX_GRID_MIB = 2048.0


def random_walk(embedding: jax.Array, probabilities: jax.Array, present: jax.Array,
                valid: jax.Array | None = None, *, beta: float = WALK_BETA,
                gamma: float = WALK_GAMMA, doublings: int = WALK_DOUBLINGS,
                flipped_embedding: jax.Array | None = None) -> jax.Array:
  """SPML's second-stage refinement of a classifier's output by a random walk
  on the embedding (``pseudo_softmaxrw_crf.py``), one image.

  Over the ``valid`` pixels ``V`` of the ``[h, w]`` grid (all by default):
  ``A_ij = exp(gamma (e_i . e_j - 1))^beta`` for ``i, j in V`` (0 otherwise),
  ``T = A / (column sums)``, squared ``doublings`` times (``T^(2^doublings)``,
  64 steps); the class maps ``c_k = p_k / max_{x in V} p_k`` on ``V`` (0
  elsewhere) with the classes absent from ``present`` zeroed; the result is
  ``c T``. With ``flipped_embedding`` ``f``, as SPML's flip:
  ``A_ij = ((exp(gamma (e_i . e_j - 1)) + exp(gamma (f_i . f_j - 1))) / 2)^beta``
  (each embedding normalized, the two affinities averaged before the power).

  Args:
    embedding: ``[h, w, D]`` (normalized here).
    probabilities: ``[h, w, K]`` softmax of the classifier.
    present: ``[K]``, nonzero for the classes of the image's sparse labels.
    valid: bool ``[h, w]``, the image's pixels (not padding), or None.
    flipped_embedding: ``[h, w, D]``, the embedding of the image's horizontal
      flip flipped back onto ``embedding``'s pixels, or None.

  Returns:
    ``[h, w, K]``, the walked class maps (argmax: the pseudo-labels); 0 off
    ``V``.
  """
  height, width, num_classes = probabilities.shape
  inside = (jnp.ones((height * width,), bool) if valid is None
            else valid.reshape(-1)).astype(jnp.float32)

  def cosines(x):
    flat = normalize(x.reshape(height * width, -1).astype(jnp.float32))
    return flat @ flat.T

  if flipped_embedding is None:
    affinity = jnp.exp(beta * gamma * (cosines(embedding) - 1.0))
  else:
    affinity = (0.5 * (jnp.exp(gamma * (cosines(embedding) - 1.0))
                       + jnp.exp(gamma * (cosines(flipped_embedding) - 1.0)))) ** beta
  affinity = affinity * inside[:, None] * inside[None, :]
  transition = affinity / jnp.maximum(jnp.sum(affinity, axis=0, keepdims=True), 1e-30)
  transition = jax.lax.fori_loop(0, doublings, lambda _, t: t @ t, transition)
  maps = probabilities.reshape(-1, num_classes).astype(jnp.float32) * inside[:, None]
  maps = maps / jnp.maximum(jnp.max(maps, axis=0, keepdims=True), 1e-12)
  maps = maps * (present > 0)
  return (maps.T @ transition).T.reshape(height, width, num_classes)


def pseudo_labels(embedding: jax.Array, probabilities: jax.Array, label: jax.Array, *,
                  beta: float = WALK_BETA, gamma: float = WALK_GAMMA,
                  doublings: int = WALK_DOUBLINGS,
                  flipped_embedding: jax.Array | None = None,
                  rgb: jax.Array | None = None, crf_iterations: int = 0) -> jax.Array:
  """SPML's pseudo-labels of a batch (``pseudo_softmaxrw_crf.py``): the random
  walk on every ``WALK_STRIDE``-th label pixel (with ``flipped_embedding``,
  the flip's affinity averaged in, :func:`random_walk`), its maps resized back
  with align-corners bilinear interpolation (edge rows/columns repeated past
  the last walked pixel), with ``crf_iterations`` > 0 SPML's dense CRF of
  them (unary ``-log clip(maps, CRF_PROBABILITY_FLOOR, 1)``, the ``CRF_*``
  kernels, :func:`agmm_jax.methods.dense_crf.mean_field`), argmax.

  Args:
    embedding: ``[B, h, w, D]`` on the segment grid (``grid_size`` of the
      labels; every second grid pixel is walked).
    probabilities: ``[B, H, W, K]`` softmax of the stage-1 classifier (SPML's
      flip: averaged with the flip's, flipped back).
    label: int32 ``[B, H, W]``: the sparse labels (their classes are the
      image's ``present`` classes), ``PADDING`` outside the image.
    flipped_embedding: ``[B, h, w, D]``, the embedding of the flipped images
      flipped back onto ``embedding``'s pixels, or None (no flip).
    rgb: ``[B, H, W, 3]`` the images in 0..255, for the CRF.
    crf_iterations: mean-field iterations; 0: no CRF.

  Returns:
    int32 ``[B, H, W]``: a class on every real pixel of an image with a
    labeled pixel; ``UNLABELED`` on the real pixels of an image without one
    (nothing to walk from); ``PADDING`` where ``label`` is.
  """
  batch, height, width, num_classes = probabilities.shape
  step = WALK_STRIDE // GRID_STRIDE
  points = embedding[:, ::step, ::step]
  rows, cols = points.shape[1:3]
  if (rows, cols) != ((height - 1) // WALK_STRIDE + 1, (width - 1) // WALK_STRIDE + 1):
    raise ValueError(f'pseudo_labels: embedding grid {embedding.shape[1:3]} does not '
                     f'fit labels {height}x{width} at stride {GRID_STRIDE}')
  if crf_iterations > 0 and rgb is None:
    raise ValueError('pseudo_labels: the CRF (crf_iterations > 0) needs rgb')
  sampled = probabilities[:, ::WALK_STRIDE, ::WALK_STRIDE]
  valid = labels_lib.real_mask(label[:, ::WALK_STRIDE, ::WALK_STRIDE])
  present = labels_lib.labeled_class_counts(label, num_classes) > 0
  walk = dict(beta=beta, gamma=gamma, doublings=doublings)
  if flipped_embedding is None:
    walked = jax.vmap(lambda e, p, c, v: random_walk(e, p, c, v, **walk))(
        points, sampled, present, valid)
  else:
    walked = jax.vmap(lambda e, f, p, c, v: random_walk(e, p, c, v, flipped_embedding=f, **walk))(
        points, flipped_embedding[:, ::step, ::step], sampled, present, valid)
  resized = resample.resize_bilinear_align_corners(
      walked, ((rows - 1) * WALK_STRIDE + 1, (cols - 1) * WALK_STRIDE + 1))
  resized = jnp.pad(resized, ((0, 0), (0, max(height - resized.shape[1], 0)),
                              (0, max(width - resized.shape[2], 0)), (0, 0)), mode='edge')
  resized = resized[:, :height, :width]
  if crf_iterations > 0:
    resized = dense_crf.mean_field(
        -jnp.log(jnp.clip(resized, CRF_PROBABILITY_FLOOR, 1.0)), rgb,
        labels_lib.real_mask(label), iterations=crf_iterations,
        smoothness_sigma=CRF_SMOOTHNESS_SIGMA, smoothness_weight=CRF_SMOOTHNESS_WEIGHT,
        appearance_sigma_xy=CRF_APPEARANCE_SIGMA_XY,
        appearance_sigma_rgb=CRF_APPEARANCE_SIGMA_RGB,
        appearance_weight=CRF_APPEARANCE_WEIGHT, approx=CRF_APPROX, cell_xy=CRF_CELL_XY,
        cell_rgb=CRF_CELL_RGB)
  classes = jnp.argmax(resized, axis=-1).astype(jnp.int32)
  has_labels = jnp.any(present, axis=-1)[:, None, None]
  return jnp.where(labels_lib.real_mask(label),
                   jnp.where(has_labels, classes, labels_lib.UNLABELED),
                   labels_lib.PADDING).astype(jnp.int32)
