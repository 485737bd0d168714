"""SPML, pixel-to-segment contrastive learning (Ke et al., "Universal Weakly
Supervised Segmentation by Pixel-to-Segment Contrastive Learning", ICLR 2021;
code twke18/SPML), as the ``spml`` term.

Everything lives on the *segment grid*: every ``GRID_STRIDE``-th label pixel
(``x[:, ::4, ::4]``, the decoder grid, 81 x 81 for a 321 crop), where the
``spml_embedding`` head (a 1x1 convolution of the decoder features to 64
channels, L2-normalized, as SPML's ASPP embedding) lives.

Segments (SPML's ``segment_by_kmeans``, SegSort's alignment), per image:

* a low-level oversegmentation of the image alone, the ``spml_regions`` batch
  field: scikit-image's Felzenszwalb graph segmentation of the crop sampled
  on the grid (:func:`oversegment`; SPML reads HED-owt-ucm regions made in
  MATLAB instead). A flat image is one region;
* spherical K-means of ``normalize([e, y - 0.5, x - 0.5])`` (the embedding and
  the pixel's location in [0, 1]), started from a ``6 x 6`` grid of clusters
  (``initialize_cluster_labels``), 10 iterations of ``mu_c = normalize(sum
  f)`` and ``c(i) = argmax_c f_i . mu_c``, over the real pixels;
* a segment is a non-empty intersection of a cluster, a region and a grid
  label value (class or unlabeled): SPML partitions by the panoptic label
  ``semantic * divisor + instance``, so every segment is pure in its sparse
  label. The segments of an image are the first ``max_segments_per_image``
  keys in sorted order (fixed shape under jit); pixels of further segments
  leave the loss (none with 20 clicks per CamVid crop, docs/benchmarks.md);
* prototypes ``mu_s = normalize(sum_{i in s} e_i)`` (differentiable) and, for
  the low-level relation, ``normalize(sum f_i)`` with the location.

The loss (SegSort's ``segsort+`` grouping, ``_calculate_log_likelihood``): for
a pixel ``i`` of segment ``o(i)``, concentration ``kappa``, the segments ``Q``
it is compared with, ``Same_i`` and ``Diff_i`` of them,

  ``s_iq = exp(kappa e_i . mu_q)``,
  ``num_i = sum_{q in Same_i, q != o(i)} s_iq`` if that set is non-empty,
  else ``s_i,o(i)``,
  ``l_i = -log(num_i / (num_i + sum_{q in Diff_i} s_iq))``,

averaged over the pixels of the relation. The relations (SPML's
``segsort_softmax.SegsortSoftmax.losses``):

* low-level (``img_sim``): pixels and segments of the same image, embedding
  and prototypes with location; Same = segments of the pixel's region, Diff =
  the others; averaged per image, then over the images;
* semantic annotation (``sem_ann``): labeled pixels against the labeled
  segments of the batch and the memory bank; Same = the segment's label
  equals the pixel's, Diff = another class;
* semantic co-occurrence (``sem_occ``): every segmented pixel against every
  segment of the batch and the memory bank; Same = the two images share a
  class of ``class_present`` (``cooccurrence_excluded_class`` left out:
  SPML drops VOC's background, class 0), Diff = they share none;
* feature affinity: not computed. SPML's training code constructs it but never
  adds it to the loss, and the paper turns it off for points and scribbles.

``spml = lowlevel_weight l_low + annotation_weight l_ann + cooccurrence_weight
l_occ``. The defaults are SPML's VOC points script (``train_spml_point.sh``:
concentrations 16 / 6 / 8, weights 0.1 each, memory of 2 batches, 6 x 6
clusters, 10 iterations); the ``spml_scribble`` preset sets the scribble
script's (co-occurrence concentration 12, weights 0.1 / 1.0 / 0.5).

The stage-1 classifier, whose probabilities the second stage walks: SPML's
is a small head on the *detached* embedding (``segsort_softmax``: 3x3 conv to
128 channels, BatchNorm, ReLU, dropout 0.75, 1x1 conv) trained by
cross-entropy on the sparse labels (scaled by the annotation weight there;
with a detached input that only scales its rate). Both forms are here:

* the presets: the model's own classifier trained by the ``pce`` term next to
  ``spml``; its gradient reaches the backbone, which SPML's does not, and the
  stage-1 evaluations are of a trained classifier;
* the ``spml_classifier`` term (``--config.loss.weights.spml_classifier=0.1
  --config.loss.weights.pce=0`` for SPML's points form): SPML's head as the
  ``spml_classifier`` head (:class:`ClassifierHead`), which reads the
  embedding head's output (``input_head``) through a stop-gradient, so no
  gradient of it reaches the embedding, the decoder or the backbone; its
  logits are resized to the labels and scored as pCE. The model's own
  classifier then stays untrained in stage 1 (its evaluations mean nothing)
  and the second stage's classifier is the one evaluated.

The second stage (``agmm_jax/methods/spml_stage2.py``, run by the trainer after the
first; its docstring maps it to SPML's scripts): ``spml_walk.pseudo_labels``
walks the stage-1 classifier's probabilities on the embedding
(``spml_walk.random_walk``,
``beta`` 20, ``gamma`` 5, 6 squarings, on every ``WALK_STRIDE``-th label
pixel as SPML's image size // 8; optionally with SPML's flip and dense CRF)
over the training split, and the model's classifier is trained on the
pseudo-labels over the fixed network.

The memory bank (method state, ``Needs(state=...)``): the prototypes, labels
and class presence of the segments of the last ``memory_batches`` batches,
``[B, M, S, ...]`` with the global batch first so that it is sharded like the
batch; slot 0 is the previous batch. It carries no gradient.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from skimage import segmentation

from agmm_jax.data import augment
from agmm_jax.data import labels as labels_lib
from agmm_jax.model import deeplab
from agmm_jax.model import resample
from agmm_jax.methods import core
from agmm_jax.methods import label_grid

EMBEDDING_HEAD = 'spml_embedding'
CLASSIFIER_HEAD = 'spml_classifier'
REGIONS_FIELD = 'spml_regions'
MEMORY_STATE = 'spml_memory'
# SPML's ``EMBEDDING_DIM``.
EMBEDDING_DIM = 64
# The decoder grid, where the embedding lives.
GRID_STRIDE = 4
# Felzenszwalb on the grid: about 30 regions per 81 x 81 CamVid crop
# (benchmarks/bench_spml.py prints the count and the cost).
FELZENSZWALB_SCALE = 100.0
FELZENSZWALB_SIGMA = 0.8
FELZENSZWALB_MIN_SIZE = 20
# SPML's stage-1 softmax classifier (``segsort_softmax.SegsortSoftmax``):
# 3x3 conv to twice the embedding width, BatchNorm, ReLU, dropout 0.75, 1x1
# conv to the classes.
CLASSIFIER_DROPOUT = 0.75
# Segment slot of no segment (sorts after every real key).
_NO_KEY = np.iinfo(np.int32).max
# Segment label of an empty (or memory-less) slot; real slots are classes or
# labels_lib.UNLABELED.
EMPTY = labels_lib.PADDING


class EmbeddingHead(nnx.Module):
  """``normalize(conv_1x1(f))``: the 64-d unit-length pixel embedding."""

  def __init__(self, in_features: int, *, num_classes: int, dtype: Any, rngs: nnx.Rngs):
    del num_classes  # 64 channels whatever the classes.
    self.conv = nnx.Conv(in_features, EMBEDDING_DIM, (1, 1), dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return normalize(core.upcast(self.conv(x)))


class ClassifierHead(nnx.Module):
  """SPML's stage-1 softmax classifier on the *detached* embedding:
  ``conv_1x1(dropout(relu(bn(conv_3x3(normalize(sg(e)))))))`` to ``[B, h, w,
  K]`` logits on the segment grid. Its input is the ``spml_embedding`` head's
  output (``input_head``), so its gradient never reaches the embedding, the
  decoder or the backbone."""

  input_head = EMBEDDING_HEAD

  def __init__(self, in_features: int, *, num_classes: int, dtype: Any, rngs: nnx.Rngs):
    del in_features  # It reads the embedding, not the decoder features.
    self.hidden = deeplab.ConvBNReLU(EMBEDDING_DIM, 2 * EMBEDDING_DIM, 3, dtype=dtype,
                                    rngs=rngs)
    self.dropout = nnx.Dropout(CLASSIFIER_DROPOUT, rngs=rngs)
    self.classifier = nnx.Conv(2 * EMBEDDING_DIM, num_classes, (1, 1), use_bias=True,
                               dtype=dtype, rngs=rngs)

  def __call__(self, embedding: jax.Array) -> jax.Array:
    fixed = normalize(core.upcast(jax.lax.stop_gradient(embedding))).astype(embedding.dtype)
    return self.classifier(self.dropout(self.hidden(fixed)))


def normalize(x: jax.Array) -> jax.Array:
  """``x / max(||x||, 1e-12)`` along the last axis; a zero vector stays zero
  (with a finite gradient: the clamp comes before the square root)."""
  squared = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(squared, 1e-24))


def grid_size(size: int) -> int:
  """Grid pixels along an axis of ``size`` label pixels."""
  return (size - 1) // GRID_STRIDE + 1


def oversegment(example: dict[str, np.ndarray]) -> np.ndarray:
  """The ``spml_regions`` field: int32 ``[h, w]`` region ids ``0..n-1`` of
  Felzenszwalb's segmentation of the RGB crop sampled on the grid."""
  image = example['image'][::GRID_STRIDE, ::GRID_STRIDE]
  rgb = image * (255.0 * augment.IMAGENET_STD) + 255.0 * augment.IMAGENET_MEAN
  rgb = np.clip(np.round(rgb), 0, 255).astype(np.uint8)
  regions = segmentation.felzenszwalb(
      rgb, scale=FELZENSZWALB_SCALE, sigma=FELZENSZWALB_SIGMA,
      min_size=FELZENSZWALB_MIN_SIZE)
  return regions.astype(np.int32)


def grid_labels(label: jax.Array) -> jax.Array:
  """int32 ``[B, h, w]``: the label on the grid. A grid pixel takes the class
  of a labeled pixel within its ``GRID_STRIDE``-wide window (the largest
  class id where several meet) so that clicks between grid pixels are kept
  (SPML dilates its points instead), else its own label (unlabeled or
  padding)."""
  s = GRID_STRIDE
  classes = jnp.where(labels_lib.labeled_mask(label), label, -1)
  pooled = jax.lax.reduce_window(
      classes, -1, jax.lax.max, (1, s, s), (1, 1, 1),
      ((0, 0), (s // 2, s - 1 - s // 2), (s // 2, s - 1 - s // 2)))
  sampled = label[:, ::s, ::s]
  pooled = pooled[:, ::s, ::s]
  return jnp.where(pooled >= 0, pooled, sampled)


def location_features(height: int, width: int) -> jax.Array:
  """``[h, w, 2]``: ``(y, x)`` in [0, 1] minus 0.5 (SPML's location)."""
  y = jnp.linspace(0.0, 1.0, height) - 0.5
  x = jnp.linspace(0.0, 1.0, width) - 0.5
  return jnp.stack(jnp.meshgrid(y, x, indexing='ij'), axis=-1)


def initial_clusters(height: int, width: int, per_axis: int) -> jax.Array:
  """int32 ``[h, w]``: SPML's ``initialize_cluster_labels``,
  ``round(linspace(0, n-1, h))[y] + n * round(linspace(0, n-1, w))[x]``."""
  y = jnp.round(jnp.linspace(0, per_axis - 1, height)).astype(jnp.int32)
  x = jnp.round(jnp.linspace(0, per_axis - 1, width)).astype(jnp.int32)
  return y[:, None] + per_axis * x[None, :]


def segment_means(features: jax.Array, segment: jax.Array, weight: jax.Array,
                  num_segments: int) -> jax.Array:
  """``[S, C]``: ``normalize(sum_{i: segment_i = s} weight_i f_i)`` of
  ``features [N, C]``, ``segment`` int ``[N]`` and ``weight [N]``; an empty
  segment is the zero vector."""
  sums = jax.ops.segment_sum(features * weight[:, None], segment,
                             num_segments=num_segments)
  return normalize(sums)


def spherical_kmeans(features: jax.Array, initial: jax.Array, valid: jax.Array,
                     num_clusters: int, iterations: int) -> jax.Array:
  """int32 ``[N]``: von Mises-Fisher K-means of unit ``features [N, C]``
  from the assignment ``initial [N]`` over the pixels where ``valid``:
  ``iterations`` times, ``mu_c = normalize(sum_{c(i) = c} f_i)`` then
  ``c(i) = argmax_c f_i . mu_c`` (first index on ties)."""
  weight = valid.astype(features.dtype)

  def step(assignment, _):
    prototypes = segment_means(features, assignment, weight, num_clusters)
    return jnp.argmax(features @ prototypes.T, axis=-1).astype(jnp.int32), None

  assignment, _ = jax.lax.scan(step, initial.astype(jnp.int32), None, length=iterations)
  return assignment


class Segments(NamedTuple):
  """The segments of a batch (module docstring), ``S`` slots per image.

  Attributes:
    pixel_segment: int32 ``[B, N]``, the pixel's slot (``N = h w``).
    pixel_in_segment: bool ``[B, N]``: the pixel belongs to a kept segment
      (a real pixel within the first ``S`` segments).
    prototypes: ``[B, S, D]`` unit, differentiable in the embedding.
    prototypes_with_location: ``[B, S, D + 2]`` unit.
    label: int32 ``[B, S]``: the segment's class, ``UNLABELED``, or ``EMPTY``
      for an unused slot.
    region: int32 ``[B, S]``: the segment's oversegmentation region.
  """
  pixel_segment: jax.Array
  pixel_in_segment: jax.Array
  prototypes: jax.Array
  prototypes_with_location: jax.Array
  label: jax.Array
  region: jax.Array


def image_segments(embedding: jax.Array, regions: jax.Array, label: jax.Array,
                   num_classes: int, *, clusters_per_axis: int,
                   kmeans_iterations: int, max_segments: int) -> tuple[Segments, jax.Array]:
  """The segments of one image: ``embedding [h, w, D]`` unit, ``regions``
  int ``[h, w]`` (ids ``< h w``), grid ``label`` int ``[h, w]``.

  Returns the :class:`Segments` of the image (no batch axis) and the pixel
  features with location ``[N, D + 2]``. A segment is keyed ``(cluster * h w
  + region) * (K + 1) + label + 1``; the kept segments are the
  ``max_segments`` smallest keys.
  """
  height, width, _ = embedding.shape
  num_pixels = height * width
  valid = labels_lib.real_mask(label).reshape(-1)
  flat = embedding.reshape(num_pixels, -1)
  location = location_features(height, width).reshape(num_pixels, 2).astype(flat.dtype)
  with_location = normalize(jnp.concatenate([flat, location], axis=-1))
  num_clusters = clusters_per_axis * clusters_per_axis
  clusters = spherical_kmeans(
      jax.lax.stop_gradient(with_location),
      initial_clusters(height, width, clusters_per_axis).reshape(-1), valid,
      num_clusters, kmeans_iterations)
  pixel_label = label.reshape(-1)
  region = jnp.clip(regions.reshape(-1).astype(jnp.int32), 0, num_pixels - 1)
  key = (clusters * num_pixels + region) * (num_classes + 1) + pixel_label + 1
  key = jnp.where(valid, key, _NO_KEY)
  keys = jnp.unique(key, size=max_segments, fill_value=_NO_KEY)
  slot = jnp.clip(jnp.searchsorted(keys, key), 0, max_segments - 1).astype(jnp.int32)
  kept = valid & (keys[slot] == key)
  weight = kept.astype(flat.dtype)
  used = keys != _NO_KEY
  segments = Segments(
      pixel_segment=slot, pixel_in_segment=kept,
      prototypes=segment_means(flat, slot, weight, max_segments),
      prototypes_with_location=segment_means(with_location, slot, weight, max_segments),
      label=jnp.where(used, keys % (num_classes + 1) - 1, EMPTY).astype(jnp.int32),
      region=jnp.where(used, (keys // (num_classes + 1)) % num_pixels, -1).astype(jnp.int32))
  return segments, with_location


def vmf_contrastive(embedding: jax.Array, own: jax.Array, prototypes: jax.Array,
                    same: jax.Array, different: jax.Array, pixel_weight: jax.Array,
                    concentration: float) -> jax.Array:
  """SegSort's ``segsort+`` vMF loss, the weighted mean over pixels of
  ``-log(num_i / (num_i + sum_{q in Diff_i} s_iq))`` (module docstring).

  Args:
    embedding: ``[P, D]`` unit pixel embeddings.
    own: int ``[P]``, the pixel's own segment (a column of ``prototypes``).
    prototypes: ``[Q, D]``.
    same, different: bool ``[P, Q]``, ``Same_i`` and ``Diff_i``.
    pixel_weight: ``[P]``, 0 for pixels outside the relation.
    concentration: ``kappa``.

  Returns:
    The scalar ``sum_i w_i l_i / max(sum_i w_i, 1)``.
  """
  # Shifted by kappa (cosines <= 1): the same ratios, exp(.) in (e^-2k, 1].
  similarity = jnp.exp(concentration * (embedding @ prototypes.T - 1.0))
  columns = jnp.arange(prototypes.shape[0])
  is_own = columns[None, :] == own[:, None]
  own_similarity = jnp.sum(jnp.where(is_own, similarity, 0.0), axis=-1)
  others = same & ~is_own
  numerator = jnp.where(jnp.any(others, axis=-1),
                        jnp.sum(jnp.where(others, similarity, 0.0), axis=-1),
                        own_similarity)
  denominator = numerator + jnp.sum(jnp.where(different, similarity, 0.0), axis=-1)
  per_pixel = jnp.log(denominator) - jnp.log(numerator)
  return jnp.sum(pixel_weight * per_pixel) / jnp.maximum(jnp.sum(pixel_weight), 1.0)


def memory_init(batch_size: int, num_classes: int, *, max_segments_per_image: int,
                memory_batches: int, **_: Any) -> dict[str, jax.Array]:
  """The empty memory bank of a global batch of ``batch_size`` images:
  ``prototypes [B, M, S, D]`` zeros, ``label [B, M, S]`` ``EMPTY`` and
  ``class_present [B, M, K]`` zeros."""
  shape = (batch_size, memory_batches, max_segments_per_image)
  return {'prototypes': jnp.zeros(shape + (EMBEDDING_DIM,), jnp.float32),
          'label': jnp.full(shape, EMPTY, jnp.int32),
          'class_present': jnp.zeros((batch_size, memory_batches, num_classes),
                                     jnp.float32)}


def memory_push(memory: dict[str, jax.Array], segments: Segments,
                class_present: jax.Array) -> dict[str, jax.Array]:
  """The bank with this batch's segments in slot 0 and the older slots moved
  back by one (the oldest dropped); no gradient."""
  newest = {'prototypes': jax.lax.stop_gradient(segments.prototypes),
            'label': segments.label, 'class_present': class_present}
  return {name: jnp.concatenate([newest[name][:, None].astype(memory[name].dtype),
                                 memory[name][:, :-1]], axis=1)
          for name in memory}


def _embedding(inputs: core.LossInputs) -> jax.Array:
  """The head output ``[B, h, w, D]`` on the segment grid, float32."""
  embedding = core.upcast(inputs.output(EMBEDDING_HEAD))
  expected = tuple(grid_size(n) for n in inputs.label.shape[1:3])
  if embedding.shape[1:3] != expected:
    raise ValueError(f"loss term 'spml': the {EMBEDDING_HEAD!r} head is "
                     f'{embedding.shape[1:3]}, the segment grid of the labels '
                     f'{expected} (decoder stride must be {GRID_STRIDE})')
  return embedding


def _tags(class_present: jax.Array, excluded_class: int) -> jax.Array:
  """``class_present`` without the excluded class (-1: none)."""
  keep = jnp.arange(class_present.shape[-1]) != excluded_class
  return class_present * keep


def spml_losses(inputs: core.LossInputs, memory: dict[str, jax.Array], *,
                clusters_per_axis: int, kmeans_iterations: int,
                max_segments_per_image: int, lowlevel_concentration: float,
                annotation_concentration: float, cooccurrence_concentration: float,
                cooccurrence_excluded_class: int
                ) -> tuple[dict[str, jax.Array], Segments]:
  """The three relations' losses ``{'lowlevel', 'annotation', 'cooccurrence'}``
  and the batch's segments (module docstring)."""
  core.check_inputs(inputs)
  embedding = _embedding(inputs)
  batch, height, width, dim = embedding.shape
  num_classes = inputs.logits.shape[-1]
  label = grid_labels(inputs.label)
  regions = inputs.field(REGIONS_FIELD)
  if regions.shape != label.shape:
    raise ValueError(f"loss term 'spml': field {REGIONS_FIELD!r} is "
                     f'{regions.shape}, the segment grid {label.shape}')
  segments, with_location = jax.vmap(
      lambda e, r, l: image_segments(
          e, r, l, num_classes, clusters_per_axis=clusters_per_axis,
          kmeans_iterations=kmeans_iterations,
          max_segments=max_segments_per_image))(embedding, regions, label)
  slots = max_segments_per_image
  pixels = embedding.reshape(batch, height * width, dim)
  pixel_label = label.reshape(batch, -1)
  kept = segments.pixel_in_segment
  pixel_region = jnp.take_along_axis(segments.region, segments.pixel_segment, axis=1)

  def lowlevel(with_location, own, region, kept, protos, segment_region):
    same = region[:, None] == segment_region[None, :]
    different = ~same & (segment_region[None, :] >= 0)
    return vmf_contrastive(with_location, own, protos, same, different,
                           kept.astype(protos.dtype), lowlevel_concentration)

  per_image = jax.vmap(lowlevel)(with_location, segments.pixel_segment, pixel_region,
                                 kept, segments.prototypes_with_location, segments.region)
  has_pixels = jnp.any(kept, axis=1).astype(per_image.dtype)
  lowlevel_loss = jnp.sum(per_image * has_pixels) / jnp.maximum(jnp.sum(has_pixels), 1.0)

  # Batch and memory segments, flattened: [Q] = B S + B M S.
  protos = jnp.concatenate([segments.prototypes.reshape(-1, dim),
                            memory['prototypes'].reshape(-1, dim)])
  proto_label = jnp.concatenate([segments.label.reshape(-1), memory['label'].reshape(-1)])
  tags = _tags(inputs.class_present.astype(jnp.float32), cooccurrence_excluded_class)
  proto_tags = jnp.concatenate([
      jnp.repeat(tags, slots, axis=0),
      jnp.repeat(_tags(memory['class_present'], cooccurrence_excluded_class).reshape(
          -1, num_classes), slots, axis=0)])
  own = (segments.pixel_segment + slots * jnp.arange(batch)[:, None]).reshape(-1)
  flat_pixels = pixels.reshape(-1, dim)
  flat_label = pixel_label.reshape(-1)
  flat_kept = kept.reshape(-1)

  labeled_proto = proto_label >= 0
  annotation_same = (flat_label[:, None] == proto_label[None, :]) & labeled_proto[None, :]
  annotation_different = (flat_label[:, None] != proto_label[None, :]) & labeled_proto[None, :]
  annotation_weight = (flat_kept & (flat_label >= 0)).astype(flat_pixels.dtype)
  annotation_loss = vmf_contrastive(flat_pixels, own, protos, annotation_same,
                                    annotation_different, annotation_weight,
                                    annotation_concentration)

  # Share a class: [B, Q] per image, then the pixel's image's row.
  shares = (tags @ proto_tags.T) > 0
  used_proto = proto_label != EMPTY
  pixel_image = jnp.repeat(jnp.arange(batch), height * width)
  cooccurrence_same = shares[pixel_image] & used_proto[None, :]
  cooccurrence_different = ~shares[pixel_image] & used_proto[None, :]
  cooccurrence_loss = vmf_contrastive(flat_pixels, own, protos, cooccurrence_same,
                                      cooccurrence_different,
                                      flat_kept.astype(flat_pixels.dtype),
                                      cooccurrence_concentration)
  return ({'lowlevel': lowlevel_loss, 'annotation': annotation_loss,
           'cooccurrence': cooccurrence_loss}, segments)


def _check_options(*, clusters_per_axis: int, kmeans_iterations: int,
                   max_segments_per_image: int, memory_batches: int,
                   cooccurrence_excluded_class: int, **concentrations_and_weights: float
                   ) -> None:
  for option, value, low in (('clusters_per_axis', clusters_per_axis, 1),
                             ('kmeans_iterations', kmeans_iterations, 0),
                             ('max_segments_per_image', max_segments_per_image, 1),
                             ('memory_batches', memory_batches, 1),
                             ('cooccurrence_excluded_class', cooccurrence_excluded_class, -1)):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise ValueError(f'loss_config.spml.{option} must be an int >= {low}, got {value!r}')
  for option, value in concentrations_and_weights.items():
    if not 0 <= float(value) < float('inf'):
      raise ValueError(f'loss_config.spml.{option} must be a finite number >= 0, '
                       f'got {value!r}')


@core.register_term('spml', needs=core.Needs(
    heads={EMBEDDING_HEAD: EmbeddingHead},
    batch_fields={REGIONS_FIELD: oversegment},
    state={MEMORY_STATE: memory_init}), check=_check_options)
def spml_loss(inputs: core.LossInputs, *, clusters_per_axis: int = 6,
              kmeans_iterations: int = 10, max_segments_per_image: int = 256,
              memory_batches: int = 2, lowlevel_concentration: float = 16.0,
              annotation_concentration: float = 6.0,
              cooccurrence_concentration: float = 8.0,
              lowlevel_weight: float = 0.1, annotation_weight: float = 0.1,
              cooccurrence_weight: float = 0.1,
              cooccurrence_excluded_class: int = -1
              ) -> tuple[jax.Array, dict[str, Any]]:
  """``(spml, {MEMORY_STATE: new bank})``: the weighted sum of the three
  relations (module docstring) and the memory bank with this batch pushed.

  Options: ``clusters_per_axis`` (SPML's 6: 36 clusters), ``kmeans_iterations``
  (10), ``max_segments_per_image`` (slots per image), ``memory_batches`` (2),
  the concentrations and weights of the three relations (SPML's VOC points
  values), ``cooccurrence_excluded_class`` (a class left out of the
  co-occurrence tags, -1 none; SPML leaves out VOC's background, 0).
  """
  memory = core.term_state(inputs, 'spml', MEMORY_STATE)
  losses, segments = spml_losses(
      inputs, memory, clusters_per_axis=clusters_per_axis,
      kmeans_iterations=kmeans_iterations,
      max_segments_per_image=max_segments_per_image,
      lowlevel_concentration=lowlevel_concentration,
      annotation_concentration=annotation_concentration,
      cooccurrence_concentration=cooccurrence_concentration,
      cooccurrence_excluded_class=cooccurrence_excluded_class)
  total = (lowlevel_weight * losses['lowlevel'] + annotation_weight * losses['annotation']
           + cooccurrence_weight * losses['cooccurrence'])
  return total, {MEMORY_STATE: memory_push(memory, segments, inputs.class_present)}


@core.register_term('spml_classifier', needs=core.Needs(
    heads={EMBEDDING_HEAD: EmbeddingHead, CLASSIFIER_HEAD: ClassifierHead}),
    check=label_grid.check_rows_per_chunk, shared=('rows_per_chunk',))
def spml_classifier_loss(inputs: core.LossInputs, *,
                         rows_per_chunk: int = label_grid.ROWS_PER_CHUNK) -> jax.Array:
  """Cross-entropy over the labeled pixels of the ``spml_classifier`` head's
  logits, resized to the labels as the model resizes its own (SPML's
  ``softmax_loss`` of ``segsort_softmax``); trains that head only."""
  logits = resample.resize_bilinear_align_corners(
      core.upcast(inputs.output(CLASSIFIER_HEAD)), inputs.label.shape[1:3])
  return label_grid.label_grid_losses(inputs._replace(logits=logits), ('pce',),
                                      rows_per_chunk=rows_per_chunk)['pce']


# SPML's second stage (pseudo-labels, then the final classifier) follows the
# embedding's training: the method's stage plan.
core.register_stages('spml', 'agmm_jax.methods.spml_stage2:stages')
