"""SPML's second stage (agmm_jax.spml_stage2): pseudo-labels against a dense
NumPy random walk, the detached stage-1 classifier's gradient, and both
stages through the trainer, stopped between them and resumed."""

import glob
import io
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from agmm_jax import input_pipeline
from agmm_jax import labels as labels_lib
from agmm_jax import methods
from agmm_jax import models
from agmm_jax import spml_stage2
from agmm_jax import tfrecord
from agmm_jax import train
from agmm_jax.methods import spml
from benchmarks import pseudo_label_quality
import main
from tests.conftest import TINY_NUM_CLASSES
from tests.test_spml import spml_tiny_config
from tests import fixtures
from tests.test_train import read_event_tags

UNL = labels_lib.UNLABELED
PAD = labels_lib.PADDING


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference_pseudo_labels(embedding, probabilities, label):
  """One image, float64, from the definitions: the walk over the real points
  of every 8th pixel, align-corners bilinear back, edge rows repeated."""
  height, width, num_classes = probabilities.shape
  points = embedding[::2, ::2]
  rows, cols = points.shape[:2]
  valid = (label[::8, ::8] != PAD).reshape(-1)
  present = np.array([np.any(label == k) for k in range(num_classes)])
  if not present.any():
    return np.where(label == PAD, PAD, UNL)
  flat = unit(points.reshape(rows * cols, -1))[valid]
  affinity = np.exp(5.0 * (flat @ flat.T - 1.0)) ** 20
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
  got = np.asarray(jax.jit(spml.pseudo_labels)(
      jnp.asarray(embedding, jnp.float32), jnp.asarray(probabilities, jnp.float32),
      jnp.asarray(label)))
  for b in range(3):
    np.testing.assert_array_equal(
        got[b], reference_pseudo_labels(embedding[b], probabilities[b], label[b]), err_msg=b)
  assert np.all(got[2] == UNL)
  # Only the classes of the image's labels, on every real pixel of image 0.
  assert set(np.unique(got[0][label[0] != PAD])) <= {1, 3}
  assert np.all(got[0][label[0] == PAD] == PAD)


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
      outputs = models.DeepLabV3Plus.extra_outputs(model, features)
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
  # Stage 1 only, as a run stopped before its second stage.
  first = main.run(stage_config(tiny_data_dir, False), workdir)
  assert first['step'] == 2
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
  with pytest.raises(train.Preempted) as stopped:
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
                                          ('walk_doublings', -1)])
def test_bad_stage2_values_name_the_field(field, value):
  config = spml_tiny_config('unused')
  config.spml_stage2[field] = value
  with pytest.raises(ValueError, match=f'config.spml_stage2.{field} must be'):
    spml_stage2.check_config(config)

def test_default_stage2_steps_scale_as_spml_scripts():
  config = spml_tiny_config('unused')
  assert config.spml_stage2.num_train_steps == -1
  assert spml_stage2.stage2_steps(config, 1800) == 240   # 1800 x 4000 / 30000
  assert spml_stage2.stage2_steps(config, 2) == 1
  config.spml_stage2.num_train_steps = 7
  assert spml_stage2.stage2_steps(config, 1800) == 7


def test_pseudo_label_quality_counts_every_pixel(tmp_path):
  """benchmarks/pseudo_label_quality on a prepared folder whose sparse
  labels (points, a subset of the dense ones) stand for pseudo-labels: the
  confusion is diagonal and its counts equal a per-pixel count of the PNGs."""
  data_dir = fixtures.make_folder_dataset_tfrecords(tmp_path, num_shards=1)
  confusion, pseudo_labeled, dense_labeled = (
      pseudo_label_quality.confusion_of_pseudo_labels(data_dir))
  expected = np.zeros_like(confusion)
  expected_dense = 0
  for data in tfrecord.read_all_records(
      os.path.join(data_dir, 'train-00000-of-00001.tfrecord')):
    example = tfrecord.decode_example(data)
    dense, sparse = (np.asarray(Image.open(io.BytesIO(example[
        f'label/{kind}/encoded']))) for kind in ('dense', 'sparse'))
    for true_class, pseudo_class in zip(dense.ravel(), sparse.ravel()):
      expected_dense += int(true_class != 255)
      if true_class != 255 and pseudo_class != 255:
        expected[true_class, pseudo_class] += 1
  np.testing.assert_array_equal(confusion, expected)
  assert pseudo_labeled == expected.sum() > 0
  assert np.count_nonzero(confusion - np.diag(np.diag(confusion))) == 0
  assert dense_labeled == expected_dense > pseudo_labeled
