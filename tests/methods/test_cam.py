"""Class activation maps against naive per-class weighted sums, the tag BCE
against its formula, the seeds against a loop."""

import math

from flax import nnx
import jax.numpy as jnp
import numpy as np
import pytest

from agmm_jax import methods
from agmm_jax.data import labels
from agmm_jax.methods import cam

B, H, W, C, K = 2, 5, 6, 3, 4


def naive_cams(features, weights, tags):
  maps = np.zeros(features.shape[:3] + (weights.shape[1],))
  for b in range(features.shape[0]):
    for k in range(weights.shape[1]):
      if not tags[b, k]:
        continue
      for y in range(features.shape[1]):
        for x in range(features.shape[2]):
          value = sum(weights[c, k] * features[b, y, x, c]
                      for c in range(features.shape[3]))
          maps[b, y, x, k] = max(value, 0.0)
      maps[b, :, :, k] /= maps[b, :, :, k].max() + 1e-5
  return maps


@pytest.mark.parametrize('seed', range(3))
def test_class_activation_maps_match_naive_weighted_sums(seed):
  rng = np.random.default_rng(seed)
  features = rng.normal(size=(B, H, W, C)).astype(np.float32)
  weights = rng.normal(size=(C, K)).astype(np.float32)
  tags = (rng.random((B, K)) < 0.6).astype(np.float32)
  got = cam.class_activation_maps(jnp.asarray(features), jnp.asarray(weights),
                                  jnp.asarray(tags))
  np.testing.assert_allclose(got, naive_cams(features, weights, tags),
                             rtol=1e-5, atol=1e-6)


def test_head_is_the_weighted_sum_of_its_weights():
  rng = np.random.default_rng(0)
  head = cam.CamHead(C, num_classes=K, dtype=jnp.float32, rngs=nnx.Rngs(0))
  features = rng.normal(size=(B, H, W, C)).astype(np.float32)
  weights = np.asarray(head.classifier_weights)
  expected = np.einsum('bhwc,ck->bhwk', features, weights)
  np.testing.assert_allclose(head(jnp.asarray(features)), expected, rtol=1e-5,
                             atol=1e-6)
  all_tags = np.ones((B, K), np.float32)
  np.testing.assert_allclose(
      cam.class_activation_maps(jnp.asarray(features), head.classifier_weights,
                                jnp.asarray(all_tags)),
      naive_cams(features, weights, all_tags), rtol=1e-5, atol=1e-6)


def naive_bce(maps, label, tags, background):
  total, count = 0.0, 0
  for b in range(maps.shape[0]):
    real = label[b] != labels.PADDING
    for k in range(maps.shape[-1]):
      if k == background:
        continue
      z = maps[b, :, :, k][real].mean()
      s = 1 / (1 + math.exp(-z))
      total += -(tags[b, k] * math.log(s) + (1 - tags[b, k]) * math.log(1 - s))
      count += 1
  return total / count


@pytest.mark.parametrize('background', [-1, 1])
def test_cam_bce_matches_the_formula(background):
  rng = np.random.default_rng(1)
  # The CAM grid is the label grid here, so the pooling is the plain mean
  # over real pixels.
  maps = rng.normal(size=(B, H, W, K)).astype(np.float32) * 3
  label = np.full((B, H, W), labels.UNLABELED, np.int32)
  label[0, -2:] = labels.PADDING
  label[1, :, :2] = labels.PADDING
  tags = np.array([[1, 0, 0, 1], [0, 1, 1, 1]], np.float32)
  inputs = methods.LossInputs(
      logits=jnp.zeros((B, H, W, K)), decoder_features=jnp.zeros((B, H, W, C)),
      label=jnp.asarray(label), class_present=jnp.asarray(tags),
      outputs={'cam': jnp.asarray(maps)}, fields={'tags': jnp.asarray(tags)})
  np.testing.assert_allclose(cam.cam_bce(inputs, background_class=background),
                             naive_bce(maps, label, tags, background),
                             rtol=1e-5)


def test_pooling_on_a_coarser_grid_counts_the_points_on_real_pixels():
  maps = np.zeros((1, 2, 2, 1), np.float32)
  maps[0, :, 0, 0] = 4.0
  valid = np.ones((1, 8, 8), bool)
  valid[0, :, 4:] = False  # The right half is padding.
  got = cam.pooled_logits(jnp.asarray(maps), jnp.asarray(valid))
  np.testing.assert_allclose(got, [[4.0]], rtol=1e-6)


@pytest.mark.parametrize('background', [-1, 0])
def test_cam_seeds_match_a_loop(background):
  rng = np.random.default_rng(2)
  maps = rng.random((B, H, W, K)).astype(np.float32) ** 3
  seeds = np.asarray(cam.cam_seeds(jnp.asarray(maps),
                                   background_class=background))
  for b in range(B):
    for y in range(H):
      for x in range(W):
        scores = [0.0 if k == background else float(maps[b, y, x, k])
                  for k in range(K)]
        best = max(scores)
        if background >= 0 and best < cam.BACKGROUND_THRESHOLD:
          expected = background
        elif best >= cam.FOREGROUND_THRESHOLD:
          expected = scores.index(best)
        else:
          expected = labels.UNLABELED
        assert seeds[b, y, x] == expected
  assert (seeds == labels.UNLABELED).any() and (seeds >= 0).any()


def test_cam_term_declares_its_head_and_tags_field():
  loss = methods.build_loss(methods.loss_config({'cam_bce': 1.0}))
  assert loss.needs.heads == {'cam': cam.CamHead}
  assert loss.needs.batch_fields == {'tags': cam.image_tags}
  with pytest.raises(ValueError, match='sparse spec tags') as error:
    cam.image_tags({'image': np.zeros((2, 2, 3))})
  assert '\n' not in str(error.value)
  np.testing.assert_array_equal(cam.image_tags({'tags': [0, 1]}), [0, 1])
