"""SPML's second stage (agmm_jax.methods.spml_stage2): pseudo-labels against a dense
NumPy random walk, the detached stage-1 classifier's gradient, and both
stages through the trainer, stopped between them and resumed."""

import glob
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from agmm_jax.evaluation import evaluator
from agmm_jax.data import input_pipeline
from agmm_jax.data import labels as labels_lib
from agmm_jax.train import loop
from agmm_jax import methods
from agmm_jax.model import deeplab
from agmm_jax.methods import spml_stage2
from agmm_jax.data import tfrecord
from agmm_jax.methods import spml
from agmm_jax.methods import spml_walk
import main
from tests.conftest import TINY_NUM_CLASSES
from tests.methods.test_spml import spml_tiny_config
from tests.methods import test_dense_crf
from tests.train.test_trainer import read_event_tags

UNL = labels_lib.UNLABELED
PAD = labels_lib.PADDING


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference_walked_maps(embedding, probabilities, label, flipped_embedding=None):
  """One image, float64, from the definitions: the walk over the real points
  of every 8th pixel (with a flip: the two affinities averaged before the
  power), align-corners bilinear back, edge rows repeated. None without a
  labeled pixel."""
  height, width, num_classes = probabilities.shape
  points = embedding[::2, ::2]
  rows, cols = points.shape[:2]
  valid = (label[::8, ::8] != PAD).reshape(-1)
  present = np.array([np.any(label == k) for k in range(num_classes)])
  if not present.any():
    return None

  def affinity_of(points):
    flat = unit(points.reshape(rows * cols, -1))[valid]
    return np.exp(5.0 * (flat @ flat.T - 1.0))

  affinity = affinity_of(points)
  if flipped_embedding is not None:
    affinity = 0.5 * (affinity + affinity_of(flipped_embedding[::2, ::2]))
  affinity = affinity ** 20
  transition = np.linalg.matrix_power(affinity / affinity.sum(0, keepdims=True), 64)
  maps = probabilities[::8, ::8].reshape(rows * cols, -1)[valid]
  maps = maps / maps.max(0) * present
  walked = np.zeros((rows * cols, num_classes))
  walked[valid] = (maps.T @ transition).T
  walked = walked.reshape(rows, cols, num_classes)
  resized = np.zeros((height, width, num_classes))
  for y in range(height):
    for x in range(width):
      sy, sx = min(y / 8, rows - 1), min(x / 8, cols - 1)
      y0, x0 = int(np.floor(sy)), int(np.floor(sx))
      y1, x1 = min(y0 + 1, rows - 1), min(x0 + 1, cols - 1)
      fy, fx = sy - y0, sx - x0
      resized[y, x] = ((1 - fy) * (1 - fx) * walked[y0, x0] + (1 - fy) * fx * walked[y0, x1]
                       + fy * (1 - fx) * walked[y1, x0] + fy * fx * walked[y1, x1])
  return resized


def reference_pseudo_labels(embedding, probabilities, label):
  """One image: the argmax of :func:`reference_walked_maps`."""
  resized = reference_walked_maps(embedding, probabilities, label)
  if resized is None:
    return np.where(label == PAD, PAD, UNL)
  return np.where(label == PAD, PAD, np.argmax(resized, axis=-1))


def test_pseudo_labels_match_a_dense_random_walk():
  rng = np.random.default_rng(0)
  height, width, num_classes = 17, 21, 4
  label = np.full((3, height, width), UNL, np.int32)
  label[0, 2, 3], label[0, 9, 15], label[0, 5, 5] = 1, 3, 1
  label[0, 12:] = PAD          # a padded image: its last walked row is padding
  label[1, 0, 0], label[1, 16, 20] = 0, 2
  # Image 2 has no labeled pixel: nothing to walk from.
  embedding = rng.normal(size=(3, spml.grid_size(height), spml.grid_size(width), 6))
  # Clustered embeddings so that the walk mixes within groups, not globally.
  embedding[:, :, :3] += 3.0
  logits = 2.0 * rng.normal(size=(3, height, width, num_classes))
  probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  got = np.asarray(jax.jit(spml_walk.pseudo_labels)(
      jnp.asarray(embedding, jnp.float32), jnp.asarray(probabilities, jnp.float32),
      jnp.asarray(label)))
  for b in range(3):
    np.testing.assert_array_equal(
        got[b], reference_pseudo_labels(embedding[b], probabilities[b], label[b]), err_msg=b)
  assert np.all(got[2] == UNL)
  # Only the classes of the image's labels, on every real pixel of image 0.
  assert set(np.unique(got[0][label[0] != PAD])) <= {1, 3}
  assert np.all(got[0][label[0] == PAD] == PAD)


def mirror_grid_reference(grid, width, stride):
  """One image ``[h, w, C]``: columns ``c`` with ``stride c < width`` take
  the grid's row, linearly interpolated over pixel positions ``stride * k``
  (clamped at the ends), at pixel ``width - 1 - stride c``."""
  out = grid.copy()
  positions = stride * np.arange(grid.shape[1])
  for c in range(grid.shape[1]):
    if stride * c < width:
      for y in range(grid.shape[0]):
        for k in range(grid.shape[2]):
          out[y, c, k] = np.interp(width - 1 - stride * c, positions, grid[y, :, k])
  return out


def test_flip_grid_horizontally_mirrors_within_each_width():
  rng = np.random.default_rng(3)
  grid = rng.normal(size=(4, 3, 6, 2))
  widths = np.array([23, 21, 14, 0])   # past the last grid pixel, on it, between, empty
  got = np.asarray(jax.jit(spml_stage2.flip_grid_horizontally, static_argnums=2)(
      jnp.asarray(grid, jnp.float32), jnp.asarray(widths), 4))
  for b, width in enumerate(widths):
    np.testing.assert_allclose(got[b], mirror_grid_reference(grid[b], width, 4),
                               rtol=1e-6, atol=1e-6, err_msg=b)
  pixels = rng.normal(size=(2, 3, 7, 2)).astype(np.float32)
  np.testing.assert_array_equal(
      spml_stage2.flip_grid_horizontally(jnp.asarray(pixels), jnp.asarray([7, 4]), 1),
      evaluator.flip_region_horizontally(jnp.asarray(pixels), jnp.asarray([7, 4])))


def fake_outputs(image, xp):
  """A stand-in network that is not flip-equivariant: per pixel, the image
  and its difference to the right neighbour (edge repeated); the embedding
  on every 4th pixel, the probabilities a softmax at every pixel."""
  right = xp.concatenate([image[:, :, 1:], image[:, :, -1:]], axis=2)
  features = xp.concatenate([image, right - image], axis=-1)
  logits = features @ xp.asarray(np.linspace(-1.0, 1.0, 18).reshape(6, 3))
  probabilities = xp.exp(logits) / xp.exp(logits).sum(-1, keepdims=True)
  return xp.tanh(features[:, ::4, ::4]), probabilities


def test_flip_averaged_outputs_of_a_padded_batch_match_a_numpy_flip():
  rng = np.random.default_rng(4)
  height, width = 9, 15
  image = rng.normal(size=(3, height, width, 3)).astype(np.float32)
  label = np.full((3, height, width), UNL, np.int32)
  sizes = [(9, 15), (6, 10), (9, 13)]   # full; padded right and bottom; (13-1) % 4 == 0
  for b, (h, w) in enumerate(sizes):
    image[b, h:], image[b, :, w:] = 0.0, 0.0
    label[b, h:], label[b, :, w:] = PAD, PAD
  embedding, flipped_embedding, probabilities = jax.jit(
      lambda i, l: spml_stage2.flip_averaged_outputs(lambda x: fake_outputs(x, jnp), i, l))(
          jnp.asarray(image), jnp.asarray(label))
  plain_embedding, plain_probabilities = fake_outputs(image, np)
  np.testing.assert_allclose(embedding, plain_embedding, rtol=1e-6, atol=1e-6)
  for b, (_, w) in enumerate(sizes):
    flipped = image[b:b + 1].copy()
    flipped[:, :, :w] = flipped[:, :, :w][:, :, ::-1]
    flip_embedding, flip_probabilities = fake_outputs(flipped, np)
    back = flip_probabilities[0].copy()
    back[:, :w] = back[:, :w][:, ::-1]
    np.testing.assert_allclose(probabilities[b], 0.5 * (plain_probabilities[b] + back),
                               rtol=1e-5, atol=1e-6, err_msg=b)
    np.testing.assert_allclose(flipped_embedding[b],
                               mirror_grid_reference(flip_embedding[0], w, 4),
                               rtol=1e-5, atol=1e-6, err_msg=b)
  # A pointwise network is flip-equivariant: where the mirrored grid pixels
  # are grid pixels ((w - 1) % 4 == 0) the flip changes nothing.
  pointwise = lambda x: (x[:, ::4, ::4], jax.nn.softmax(x, axis=-1))
  embedding, flipped_embedding, probabilities = spml_stage2.flip_averaged_outputs(
      pointwise, jnp.asarray(image[2:]), jnp.asarray(label[2:]))
  np.testing.assert_allclose(flipped_embedding, embedding, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(probabilities, jax.nn.softmax(image[2:], axis=-1), rtol=1e-6)


def test_pseudo_labels_with_flip_and_crf_match_the_references(monkeypatch):
  """The walk with the flip's affinity averaged in, then SPML's CRF (its
  kernels, the exact bilateral product) against the dense NumPy walk and
  mean field."""
  monkeypatch.setattr(spml_walk, 'CRF_APPROX', 'exact')
  rng = np.random.default_rng(6)
  height, width, num_classes = 17, 21, 4
  label = np.full((2, height, width), UNL, np.int32)
  label[0, 2, 3], label[0, 9, 15], label[0, 5, 5] = 1, 3, 1
  label[0, 12:], label[0, :, 18:] = PAD, PAD
  label[1, 0, 0], label[1, 16, 20], label[1, 8, 8] = 0, 2, 3
  grid = (2, spml.grid_size(height), spml.grid_size(width), 6)
  embedding, flipped_embedding = rng.normal(size=grid), rng.normal(size=grid)
  embedding[..., :3] += 3.0
  flipped_embedding[..., :3] += 3.0
  logits = 2.0 * rng.normal(size=(2, height, width, num_classes))
  probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  rgb = rng.uniform(0.0, 255.0, size=(2, height, width, 3))
  rgb[:, :, :10] = rgb[:, :1, :1]
  got = np.asarray(jax.jit(lambda *a: spml_walk.pseudo_labels(
      *a[:3], flipped_embedding=a[3], rgb=a[4], crf_iterations=3))(
          *(jnp.asarray(x, jnp.float32) for x in (embedding, probabilities)),
          jnp.asarray(label), jnp.asarray(flipped_embedding, jnp.float32),
          jnp.asarray(rgb, jnp.float32)))
  params = dict(smoothness_sigma=spml_walk.CRF_SMOOTHNESS_SIGMA,
                smoothness_weight=spml_walk.CRF_SMOOTHNESS_WEIGHT,
                appearance_sigma_xy=spml_walk.CRF_APPEARANCE_SIGMA_XY,
                appearance_sigma_rgb=spml_walk.CRF_APPEARANCE_SIGMA_RGB,
                appearance_weight=spml_walk.CRF_APPEARANCE_WEIGHT)
  changed = 0
  for b in range(2):
    maps = reference_walked_maps(embedding[b], probabilities[b], label[b], flipped_embedding[b])
    marginals = test_dense_crf.reference_mean_field(
        -np.log(np.clip(maps, 1e-5, 1.0)), rgb[b], label[b] != PAD, 3, params)
    expected = np.where(label[b] == PAD, PAD, np.argmax(marginals, axis=-1))
    np.testing.assert_array_equal(got[b], expected, err_msg=b)
    changed += np.sum((np.argmax(maps, -1) != expected) & (label[b] != PAD))
  assert changed > 0   # the CRF moved some labels


def test_detached_classifier_sends_no_gradient_into_the_network():
  """Through the heads as the model wires them (``extra_outputs``): the
  classifier's loss has exactly zero gradient in the decoder features (so in
  everything under them) and in the embedding head, and a non-zero one in
  its own parameters."""
  loss = methods.build_loss(methods.loss_config({'spml_classifier': 1.0}))
  heads = nnx.Dict({name: factory(8, num_classes=TINY_NUM_CLASSES, dtype=jnp.float32,
                                  rngs=nnx.Rngs(0))
                    for name, factory in sorted(loss.needs.heads.items())})
  graphdef, params, rest = nnx.split(heads, nnx.Param, ...)
  rng = np.random.default_rng(1)
  features = jnp.asarray(rng.normal(size=(2, 9, 9, 8)), jnp.float32)
  label = np.full((2, 33, 33), UNL, np.int32)
  label[0, 4, 4], label[0, 20, 30], label[1, 10, 12] = 0, 2, 3

  @jax.jit
  def value_and_grad(params, features, label):
    def total(params, features):
      heads = nnx.merge(graphdef, params, rest, copy=True)
      model = type('Model', (), {'extra_heads': heads,
                                 'classifier': type('C', (), {'dtype': jnp.float32})})
      outputs = deeplab.DeepLabV3Plus.extra_outputs(model, features)
      inputs = methods.LossInputs(
          logits=jnp.zeros((2, 33, 33, TINY_NUM_CLASSES)), decoder_features=features,
          label=label, class_present=jnp.zeros((2, TINY_NUM_CLASSES)), outputs=outputs)
      return loss(inputs)[0]
    return jax.value_and_grad(total, argnums=(0, 1))(params, features)

  value, (grads, feature_grad) = value_and_grad(params, features, jnp.asarray(label))
  assert np.isfinite(value) and value > 0
  assert np.all(np.asarray(feature_grad) == 0.0)
  flat = {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(grads)}
  head = [k for k in flat if k.startswith(spml.CLASSIFIER_HEAD)]
  embedding = [k for k in flat if k.startswith(spml.EMBEDDING_HEAD)]
  assert head and embedding and len(head) + len(embedding) == len(flat)
  for key in embedding:
    assert np.all(flat[key] == 0.0), key
  for key in head:
    assert np.any(flat[key] != 0.0), key
  # No labeled pixel: finite, and no gradient at all.
  value, (grads, _) = value_and_grad(params, features, jnp.full((2, 33, 33), UNL, jnp.int32))
  assert np.isfinite(value)
  assert all(np.all(np.asarray(g) == 0.0) for g in jax.tree.leaves(grads))


def stage_config(data_dir, enabled):
  config = spml_tiny_config(data_dir)
  config.spml_stage2.enabled = enabled
  config.spml_stage2.num_train_steps = 2
  return config


def test_two_stages_stop_between_them_resume_and_finish(tiny_data_dir, tmp_path, monkeypatch):
  workdir = str(tmp_path)
  # Stage 1, then SIGTERM as the pass starts: a run stopped between its
  # stages (the workdir keeps one config: stage 2 is part of the run).
  write_pseudo_labels = spml_stage2.write_pseudo_labels

  def stopped_at_the_start(*args, **kwargs):
    monkeypatch.setattr(spml_stage2, 'write_pseudo_labels', write_pseudo_labels)
    os.kill(os.getpid(), signal.SIGTERM)
    kwargs.get('stop', args[-1])()

  monkeypatch.setattr(spml_stage2, 'write_pseudo_labels', stopped_at_the_start)
  with pytest.raises(loop.Preempted) as between:
    main.run(stage_config(tiny_data_dir, True), workdir)
  assert between.value.step == 2
  assert read_event_tags(workdir)['eval/miou'] == [2]
  assert not os.path.exists(os.path.join(workdir, spml_stage2.PSEUDO_LABEL_DIR))
  stage1_files = sorted(glob.glob(os.path.join(workdir, 'checkpoints', '*')))
  # A half-written pass left by a kill is redone.
  os.makedirs(os.path.join(workdir, spml_stage2.PSEUDO_LABEL_DIR + '.tmp'))

  # SIGTERM during stage 2's first step: saved, stopped, resumed.
  make_step = spml_stage2.make_stage2_step

  def make_step_stopped_once(*args, **kwargs):
    step = make_step(*args, **kwargs)

    def stopped_once(state, batch):
      monkeypatch.setattr(spml_stage2, 'make_stage2_step', make_step)
      os.kill(os.getpid(), signal.SIGTERM)
      return step(state, batch)
    return stopped_once

  monkeypatch.setattr(spml_stage2, 'make_stage2_step', make_step_stopped_once)
  with pytest.raises(loop.Preempted) as stopped:
    main.run(stage_config(tiny_data_dir, True), workdir)
  assert stopped.value.step == 3
  assert os.listdir(os.path.join(workdir, spml_stage2.STAGE2_DIR, 'checkpoints')) == ['1']
  scores = main.run(stage_config(tiny_data_dir, True), workdir)
  assert scores['step'] == 4 and np.isfinite(scores['miou'])
  assert sorted(glob.glob(os.path.join(workdir, 'checkpoints', '*'))) == stage1_files
  assert sorted(os.listdir(os.path.join(workdir, spml_stage2.STAGE2_DIR, 'checkpoints'))) == [
      '1', '2']
  tags = read_event_tags(workdir)
  # Stage 1 trained once; the workdir's last evaluation is the final model's.
  assert tags['train/loss'] == [1, 2]
  assert sorted(tags[f'{spml_stage2.STAGE2_DIR}/loss']) == [3, 4]
  assert sorted(tags['eval/miou']) == [2, 4]

  # The pseudo-labels: every training record, same images, a class on every
  # pixel of an image with labels.
  pseudo_dir = os.path.join(workdir, spml_stage2.PSEUDO_LABEL_DIR)
  assert not os.path.exists(pseudo_dir + '.tmp')
  metadata = input_pipeline.read_metadata(pseudo_dir)
  (shard,) = metadata['splits']['train']['shards']
  records = tfrecord.read_all_records(os.path.join(pseudo_dir, shard))
  assert len(records) == metadata['splits']['train']['num_examples'] == 6
  for record in records:
    _, label, _ = input_pipeline.decode_record(
        input_pipeline.RawRecord(record, 'pseudo'), num_classes=TINY_NUM_CLASSES,
        label_key=input_pipeline.LABEL_KEYS['sparse'])
    assert np.all(label >= 0) or np.all(label == UNL)
  written = os.path.getmtime(os.path.join(pseudo_dir, shard))

  # Eval mode restores the final model.
  config = stage_config(tiny_data_dir, True)
  config.mode = 'eval'
  config.eval.checkpoint = 'latest'
  np.testing.assert_array_equal(main.run(config, workdir)['confusion'], scores['confusion'])

  # A rerun trains nothing, rewrites nothing and reports the final model.
  again = main.run(stage_config(tiny_data_dir, True), workdir)
  assert again['step'] == 4 and again['miou'] == scores['miou']
  assert os.path.getmtime(os.path.join(pseudo_dir, shard)) == written
  assert sorted(read_event_tags(workdir)[f'{spml_stage2.STAGE2_DIR}/loss']) == [3, 4]


@pytest.mark.parametrize('field, value', [('num_train_steps', 0), ('walk_beta', -1.0),
                                          ('walk_gamma', float('inf')),
                                          ('walk_doublings', -1), ('crf_iterations', -1)])
def test_bad_stage2_values_name_the_field(field, value):
  config = spml_tiny_config('unused')
  config.spml_stage2[field] = value
  with pytest.raises(ValueError, match=f'config.spml_stage2.{field} must be'):
    spml_stage2.check_config(config)

def test_a_crf_grid_over_its_limit_names_the_field(tiny_data_dir, monkeypatch):
  config = spml_tiny_config(tiny_data_dir)
  assert config.spml_stage2.crf_iterations == 0 and config.spml_stage2.flip is False
  monkeypatch.setattr(spml_walk, 'CRF_MAX_GRID_MIB', 1e-3)
  spml_stage2.check_config(config)   # no CRF: no grid
  config.spml_stage2.crf_iterations = spml_walk.SPML_CRF_ITERATIONS
  with pytest.raises(ValueError, match=r'^config.spml_stage2.crf_iterations: grid of \d+ cells'):
    spml_stage2.check_config(config)


def test_default_stage2_steps_scale_as_spml_scripts():
  config = spml_tiny_config('unused')
  assert config.spml_stage2.num_train_steps == -1
  assert spml_stage2.stage2_steps(config, 1800) == 240   # 1800 x 4000 / 30000
  assert spml_stage2.stage2_steps(config, 2) == 1
  config.spml_stage2.num_train_steps = 7
  assert spml_stage2.stage2_steps(config, 1800) == 7
