"""SPML (agmm_jax.methods.spml): the vMF pixel-to-segment loss against a naive
loop, K-means and prototypes against NumPy, the segments and each relation's
positive/negative sets on a hand-made two-image batch, the oversegmentation
field, finite values without labels, and the memory bank through training,
checkpoint and restore; the random walk against a dense matrix."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from agmm_jax.data import augment
from agmm_jax.storage import checkpoint
from agmm_jax.data import labels as labels_lib
from agmm_jax import methods
from agmm_jax.runtime import sharding as sharding_lib
from agmm_jax.train import trainer
from agmm_jax.train import state as train_state
from agmm_jax.methods import spml
from agmm_jax.methods import spml_walk
from configs import presets
from configs import tiny
from tests.conftest import TINY_NUM_CLASSES as NUM_TINY_CLASSES

UNL = labels_lib.UNLABELED
PAD = labels_lib.PADDING


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def naive_vmf(embedding, own, prototypes, same, different, weight, kappa):
  """The segsort+ loss pixel by pixel, segment by segment (float64)."""
  total, count = 0.0, 0.0
  for i in range(embedding.shape[0]):
    if weight[i] == 0:
      continue
    sims = [np.exp(kappa * float(embedding[i] @ prototypes[q]))
            for q in range(prototypes.shape[0])]
    positive = [sims[q] for q in range(len(sims)) if same[i, q] and q != own[i]]
    numerator = sum(positive) if positive else sims[own[i]]
    denominator = numerator + sum(sims[q] for q in range(len(sims)) if different[i, q])
    total += weight[i] * -np.log(numerator / denominator)
    count += weight[i]
  return total / max(count, 1.0)


def test_vmf_loss_matches_a_naive_loop():
  rng = np.random.default_rng(0)
  pixels, segments, dim = 13, 7, 5
  embedding = unit(rng.normal(size=(pixels, dim)))
  prototypes = unit(rng.normal(size=(segments, dim)))
  own = rng.integers(0, segments, pixels)
  segment_class = rng.integers(0, 3, segments)
  pixel_class = segment_class[own]
  same = pixel_class[:, None] == segment_class[None, :]
  different = ~same
  # Pixel 0: its own segment is its only positive (the own-segment fallback).
  same[0] = False
  same[0, own[0]] = True
  different[0] = np.arange(segments) != own[0]
  weight = (rng.random(pixels) > 0.2).astype(np.float64)
  for kappa in (6.0, 16.0):
    value = spml.vmf_contrastive(jnp.asarray(embedding, jnp.float32), jnp.asarray(own),
                                 jnp.asarray(prototypes, jnp.float32), jnp.asarray(same),
                                 jnp.asarray(different), jnp.asarray(weight, jnp.float32), kappa)
    np.testing.assert_allclose(value, naive_vmf(embedding, own, prototypes, same,
                                                different, weight, kappa), rtol=2e-5)


def numpy_kmeans(features, assignment, valid, num_clusters, iterations):
  for _ in range(iterations):
    sums = np.zeros((num_clusters, features.shape[1]))
    for i in np.flatnonzero(valid):
      sums[assignment[i]] += features[i]
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    prototypes = np.where(norms > 0, sums / np.maximum(norms, 1e-12), 0.0)
    assignment = np.argmax(features @ prototypes.T, axis=1)
  return assignment


def test_prototypes_and_kmeans_match_numpy():
  rng = np.random.default_rng(1)
  # Three well-separated directions plus noise; one cluster starts empty.
  centers = unit(rng.normal(size=(3, 6)))
  features = unit(centers[rng.integers(0, 3, 40)] + 0.3 * rng.normal(size=(40, 6)))
  initial = rng.integers(0, 3, 40)
  valid = rng.random(40) > 0.1
  for iterations in (0, 1, 10):
    got = spml.spherical_kmeans(jnp.asarray(features, jnp.float32), jnp.asarray(initial),
                                jnp.asarray(valid), 4, iterations)
    np.testing.assert_array_equal(got, numpy_kmeans(features, initial, valid, 4, iterations))
  weight = valid.astype(np.float64)
  means = spml.segment_means(jnp.asarray(features, jnp.float32), jnp.asarray(initial),
                             jnp.asarray(weight, jnp.float32), 4)
  for s in range(4):
    members = features[(initial == s) & valid]
    expected = unit(members.sum(0)) if len(members) else np.zeros(6)
    np.testing.assert_allclose(means[s], expected, atol=1e-6)
  # Rounding half to even, as torch.round: linspace(0, 1, 5)[2] = 0.5 -> 0.
  np.testing.assert_array_equal(spml.initial_clusters(5, 4, 2),
                                np.array([[0, 0, 2, 2]] * 3 + [[1, 1, 3, 3]] * 2))


def test_grid_labels_keep_clicks_between_grid_pixels():
  label = np.full((1, 9, 9), UNL, np.int32)
  label[0, 3, 5] = 2   # within the window of grid pixel (1, 1) = label (4, 4)
  label[0, 8, :] = PAD
  label[0, 0, 0] = 1
  got = np.asarray(spml.grid_labels(jnp.asarray(label)))
  expected = np.full((3, 3), UNL)
  expected[1, 1], expected[0, 0] = 2, 1
  expected[2, :] = PAD
  np.testing.assert_array_equal(got[0], expected)


# The hand-made batch: two images, 9x9 labels -> a 3x3 grid, 3 classes.
NUM_CLASSES = 3


def two_image_batch(labeled=True):
  rng = np.random.default_rng(2)
  grid_label = np.array([[[0, UNL, UNL], [UNL, 1, UNL], [UNL, UNL, PAD]],
                         [[2, 2, UNL], [UNL, UNL, UNL], [UNL, UNL, UNL]]], np.int32)
  if not labeled:
    grid_label = np.where(grid_label >= 0, UNL, grid_label)
  label = np.full((2, 9, 9), UNL, np.int32)
  label[:, ::4, ::4] = grid_label
  label[0, 7:, 7:] = PAD
  regions = np.array([[[0, 0, 1], [0, 2, 1], [2, 2, 1]],
                      [[0, 0, 0], [1, 1, 0], [1, 1, 1]]], np.int32)
  embedding = unit(rng.normal(size=(2, 3, 3, spml.EMBEDDING_DIM)))
  present = np.array([[1, 1, 0], [0, 0, 1]], np.float32) if labeled else np.zeros((2, 3), np.float32)
  inputs = methods.LossInputs(
      logits=jnp.zeros((2, 9, 9, NUM_CLASSES)), decoder_features=jnp.zeros((2, 3, 3, 4)),
      label=jnp.asarray(label), class_present=jnp.asarray(present),
      outputs={spml.EMBEDDING_HEAD: jnp.asarray(embedding, jnp.float32)},
      fields={spml.REGIONS_FIELD: jnp.asarray(regions)})
  return inputs, grid_label, regions, embedding


OPTIONS = dict(clusters_per_axis=2, kmeans_iterations=3, max_segments_per_image=8,
               lowlevel_concentration=16.0, annotation_concentration=6.0,
               cooccurrence_concentration=8.0, cooccurrence_excluded_class=-1)


# Jitted once for the module's tests (eager dispatch would take ~10x longer).
spml_losses = jax.jit(spml.spml_losses, static_argnames=tuple(OPTIONS))


def test_segments_are_clusters_times_regions_times_labels():
  inputs, grid_label, regions, embedding = two_image_batch()
  memory = spml.memory_init(2, NUM_CLASSES, max_segments_per_image=8, memory_batches=2)
  _, segments = spml_losses(inputs, memory, **OPTIONS)
  location = np.asarray(spml.location_features(3, 3)).reshape(9, 2)
  for b in range(2):
    features = unit(np.concatenate([embedding[b].reshape(9, -1), location], axis=1))
    valid = grid_label[b].reshape(-1) != PAD
    clusters = numpy_kmeans(features, np.asarray(spml.initial_clusters(3, 3, 2)).reshape(-1),
                            valid, 4, 3)
    triples = list(zip(clusters, regions[b].reshape(-1), grid_label[b].reshape(-1)))
    slot = np.asarray(segments.pixel_segment[b])
    kept = np.asarray(segments.pixel_in_segment[b])
    np.testing.assert_array_equal(kept, valid)
    for i in np.flatnonzero(valid):
      for j in np.flatnonzero(valid):
        assert (slot[i] == slot[j]) == (triples[i] == triples[j])
      assert segments.label[b, slot[i]] == triples[i][2]
      assert segments.region[b, slot[i]] == triples[i][1]
      members = (slot == slot[i]) & valid
      np.testing.assert_allclose(segments.prototypes[b, slot[i]],
                                 unit(embedding[b].reshape(9, -1)[members].sum(0)), atol=1e-5)
    used = len({t for t, v in zip(triples, valid) if v})
    assert (np.asarray(segments.label[b]) != spml.EMPTY).sum() == used


def relation_reference(inputs, segments, memory, grid_label, embedding):
  """Each relation's loss from its definition: loops over pixels and
  segments of the batch and the memory."""
  label = np.asarray(segments.label)
  region = np.asarray(segments.region)
  slot = np.asarray(segments.pixel_segment)
  kept = np.asarray(segments.pixel_in_segment)
  present = np.asarray(inputs.class_present)
  location = np.asarray(spml.location_features(3, 3)).reshape(9, 2)
  lowlevel = []
  for b in range(2):
    with_location = unit(np.concatenate([embedding[b].reshape(9, -1), location], axis=1))
    prototypes = np.asarray(segments.prototypes_with_location[b], np.float64)
    same = np.array([[region[b, q] == region[b, slot[b, i]] for q in range(8)]
                     for i in range(9)])
    different = np.array([[region[b, q] >= 0 and region[b, q] != region[b, slot[b, i]]
                           for q in range(8)] for i in range(9)])
    lowlevel.append(naive_vmf(with_location, slot[b], prototypes, same, different,
                              kept[b].astype(float), 16.0))
  # Batch segments, then the memory's (image, slot, segment order).
  prototypes = np.concatenate([np.asarray(segments.prototypes).reshape(-1, spml.EMBEDDING_DIM),
                               np.asarray(memory['prototypes']).reshape(-1, spml.EMBEDDING_DIM)])
  proto_label = np.concatenate([label.reshape(-1), np.asarray(memory['label']).reshape(-1)])
  proto_present = np.concatenate([np.repeat(present, 8, axis=0),
                                  np.repeat(np.asarray(memory['class_present']).reshape(-1, 3),
                                            8, axis=0)])
  pixels = embedding.reshape(18, -1)
  own = (slot + 8 * np.arange(2)[:, None]).reshape(-1)
  pixel_label = grid_label.reshape(-1)
  pixel_present = np.repeat(present, 9, axis=0)
  n, q_all = 18, len(proto_label)
  ann_same = np.zeros((n, q_all), bool)
  ann_diff = np.zeros((n, q_all), bool)
  occ_same = np.zeros((n, q_all), bool)
  occ_diff = np.zeros((n, q_all), bool)
  for i in range(n):
    for q in range(q_all):
      if proto_label[q] >= 0 and pixel_label[i] >= 0:
        ann_same[i, q] = proto_label[q] == pixel_label[i]
        ann_diff[i, q] = proto_label[q] != pixel_label[i]
      if proto_label[q] != spml.EMPTY:
        share = any(pixel_present[i, k] and proto_present[q, k] for k in range(3))
        occ_same[i, q], occ_diff[i, q] = share, not share
  kept = kept.reshape(-1)
  annotation = naive_vmf(pixels, own, prototypes, ann_same, ann_diff,
                         (kept & (pixel_label >= 0)).astype(float), 6.0)
  cooccurrence = naive_vmf(pixels, own, prototypes, occ_same, occ_diff, kept.astype(float), 8.0)
  return {'lowlevel': np.mean(lowlevel), 'annotation': annotation,
          'cooccurrence': cooccurrence}


@pytest.mark.parametrize('with_memory', [False, True])
def test_each_relation_matches_its_sets_on_a_two_image_batch(with_memory):
  inputs, grid_label, _, embedding = two_image_batch()
  memory = spml.memory_init(2, NUM_CLASSES, max_segments_per_image=8, memory_batches=2)
  if with_memory:
    # The batch's own segments pushed once (with swapped images' presence),
    # as after a previous step.
    _, previous = spml_losses(inputs, memory, **OPTIONS)
    memory = spml.memory_push(memory, previous, inputs.class_present[::-1])
  losses, segments = spml_losses(inputs, memory, **OPTIONS)
  expected = relation_reference(inputs, segments, memory, grid_label, embedding)
  for name, value in expected.items():
    np.testing.assert_allclose(losses[name], value, rtol=1e-4, err_msg=name)
  assert all(v > 0 for v in expected.values())


def test_finite_loss_and_gradient_without_labels_and_with_all_padding():
  loss = methods.build_loss(presets.preset('spml'))
  inputs, _, _, _ = two_image_batch(labeled=False)
  state = loss.init_state(2, NUM_CLASSES)
  all_padding = inputs._replace(label=jnp.full_like(inputs.label, PAD))

  @jax.jit
  def total(embedding, case):
    def weighted(embedding):
      outputs = {spml.EMBEDDING_HEAD: spml.normalize(embedding)}
      total, values, new_state = loss.apply(case._replace(outputs=outputs, state=state))
      return total, (values, new_state)
    return jax.value_and_grad(weighted, has_aux=True)(embedding)

  for case in (all_padding, inputs):
    (value, (values, new_state)), grad = total(case.outputs[spml.EMBEDDING_HEAD] + 0.1, case)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
  # Without labels the annotation relation is empty, the others are not.
  assert values['spml'] > 0
  assert new_state[spml.MEMORY_STATE]['label'].shape == (2, 2, 256)


def test_memory_push_order():
  inputs, _, _, _ = two_image_batch()
  memory = spml.memory_init(2, NUM_CLASSES, max_segments_per_image=8, memory_batches=2)
  _, first = spml_losses(inputs, memory, **OPTIONS)
  second = first._replace(label=first.label + 10)
  memory = spml.memory_push(memory, first, inputs.class_present)
  assert np.all(np.asarray(memory['label'][:, 1]) == spml.EMPTY)
  memory = spml.memory_push(memory, second, 2 * inputs.class_present)
  memory = spml.memory_push(memory, first, 3 * inputs.class_present)
  np.testing.assert_array_equal(memory['label'][:, 0], first.label)
  np.testing.assert_array_equal(memory['label'][:, 1], second.label)
  np.testing.assert_allclose(memory['class_present'][:, 1], 2 * inputs.class_present)
  np.testing.assert_allclose(memory['prototypes'][:, 0], first.prototypes)


def test_oversegmentation_field():
  rng = np.random.default_rng(4)
  flat = augment.normalize(np.full((33, 33, 3), 90, np.uint8))
  regions = spml.oversegment({'image': flat})
  assert regions.shape == (9, 9) and regions.dtype == np.int32
  assert regions.max() == 0
  halves = np.zeros((33, 33, 3), np.uint8)
  halves[:, 17:] = 250
  halves += rng.integers(0, 3, halves.shape).astype(np.uint8)
  regions = spml.oversegment({'image': augment.normalize(halves)})
  assert len(np.unique(regions[:, :4])) == 1 and len(np.unique(regions[:, 5:])) == 1
  assert regions[0, 0] != regions[0, -1]


def test_bad_options_name_the_key():
  with pytest.raises(ValueError, match='loss_config.spml.max_segments_per_image'):
    methods.build_loss(methods.loss_config({'spml': 1.0}, spml={'max_segments_per_image': 0}))
  with pytest.raises(ValueError, match='loss_config.spml.annotation_weight'):
    methods.build_loss(methods.loss_config({'spml': 1.0}, spml={'annotation_weight': -1.0}))
  inputs, _, _, _ = two_image_batch()
  with pytest.raises(ValueError, match="method state 'spml_memory'"):
    methods.build_loss(methods.loss_config({'spml': 1.0}))(inputs)


def spml_tiny_config(data_dir):
  """configs/tiny.py with the spml preset: 2 steps, one evaluation (one
  scale) and one checkpoint, at the end."""
  config = tiny.get_config()
  config.data.dir = data_dir
  config.loss = presets.preset('spml')
  config.num_train_steps = 2
  config.checkpoint_every_steps = 0
  config.eval_every_steps = 0
  config.image_summary_every_steps = 0
  config.eval.scales = (1.0,)
  config.eval.flip = False
  return config


def test_memory_bank_is_carried_checkpointed_and_restored(tiny_data_dir, tmp_path):
  config = spml_tiny_config(tiny_data_dir)
  config.checkpoint_every_steps = 1
  config.spml_stage2.enabled = False  # Stage 1's state only (test_spml_stage2.py).
  assert trainer.train_and_evaluate(config, str(tmp_path))['step'] == 2

  def saved(step):
    state = ocp.StandardCheckpointer().restore(str(tmp_path / 'checkpoints' / str(step) / 'state'))
    return jax.tree.map(np.asarray, state['method_state'][spml.MEMORY_STATE])

  first, second = saved(1), saved(2)
  assert first['label'].shape == (config.global_batch_size, 2, 256)
  # Step 1 filled slot 0 only; step 2 moved it to slot 1.
  assert np.any(first['label'][:, 0] != spml.EMPTY)
  assert np.all(first['label'][:, 1] == spml.EMPTY)
  assert np.any(second['label'][:, 0] != spml.EMPTY)
  for name in first:
    np.testing.assert_array_equal(second[name][:, 1], first[name][:, 0], err_msg=name)
  # Restored as the trainer resumes: into the structure and sharding of a
  # fresh train state with the loss's initial method state.
  loss = methods.build_loss(config.loss)
  mesh = sharding_lib.create_mesh(config.mesh)
  fresh, _, _ = train_state.create_train_state(
      config, NUM_TINY_CLASSES, mesh, 2, extra_heads=loss.needs.heads,
      method_state=loss.init_state(config.global_batch_size, NUM_TINY_CLASSES))
  checkpointer = checkpoint.Checkpointer(str(tmp_path), read_only=True)
  restored, step = checkpointer.restore_latest(checkpoint.abstract_like(fresh))
  checkpointer.close()
  assert step == 2
  memory = restored['method_state'][spml.MEMORY_STATE]
  for name in second:
    assert memory[name].sharding == fresh['method_state'][spml.MEMORY_STATE][name].sharding
    np.testing.assert_array_equal(np.asarray(memory[name]), second[name], err_msg=name)


def test_random_walk_matches_a_dense_matrix_reference():
  rng = np.random.default_rng(5)
  height, width, num_classes = 4, 5, 3
  embedding = rng.normal(size=(height, width, 8))
  logits = rng.normal(size=(height, width, num_classes))
  probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  present = np.array([1.0, 0.0, 1.0])
  flat = unit(embedding.reshape(-1, 8))
  affinity = np.exp(5.0 * (flat @ flat.T - 1.0)) ** 20
  transition = affinity / affinity.sum(0, keepdims=True)
  maps = probabilities.reshape(-1, num_classes)
  maps = maps / maps.max(0) * present
  expected = (maps.T @ np.linalg.matrix_power(transition, 64)).T
  got = spml_walk.random_walk(jnp.asarray(embedding, jnp.float32),
                         jnp.asarray(probabilities, jnp.float32), jnp.asarray(present))
  np.testing.assert_allclose(got, expected.reshape(height, width, num_classes),
                             rtol=1e-4, atol=1e-6)
  assert np.all(np.asarray(got)[..., 1] == 0)
