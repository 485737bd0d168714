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


# The pseudo-label path of the CAM stages (agmm_jax.methods.cam_stages).

def naive_normalized(maps, allowed, valid):
  out = np.zeros(maps.shape)
  for b in range(maps.shape[0]):
    for k in range(maps.shape[-1]):
      values = np.zeros(maps.shape[1:3])
      for y in range(maps.shape[1]):
        for x in range(maps.shape[2]):
          if valid[b, y, x] and allowed[b, y, x, k]:
            values[y, x] = max(maps[b, y, x, k], 0.0)
      out[b, :, :, k] = values / (values.max() + 1e-5)
  return out


def random_case(seed, box_like=True):
  rng = np.random.default_rng(seed)
  maps = rng.normal(size=(B, H, W, K)).astype(np.float32)
  tags = rng.random((B, K)) < 0.6
  tags[:, 1] = True
  allowed = np.broadcast_to(tags[:, None, None, :], (B, H, W, K)).copy()
  if box_like:
    allowed &= rng.random((B, H, W, K)) < 0.7
  valid = np.ones((B, H, W), bool)
  valid[1, :, -2:] = False
  return maps, allowed, valid


@pytest.mark.parametrize('seed', range(2))
def test_normalized_maps_match_a_loop(seed):
  maps, allowed, valid = random_case(seed)
  got = cam.normalized_maps(jnp.asarray(maps), jnp.asarray(allowed), jnp.asarray(valid))
  np.testing.assert_allclose(got, naive_normalized(maps, allowed, valid),
                             rtol=1e-5, atol=1e-6)


def test_seeds_without_crf_are_cam_seeds_with_tags():
  rng = np.random.default_rng(4)
  maps = (rng.random((B, H, W, K)) ** 3).astype(np.float32)
  tags = np.ones((B, 1, 1, K), bool)
  valid = np.ones((B, H, W), bool)
  for background in (-1, 0):
    got = cam.refined_seeds(jnp.asarray(maps), jnp.asarray(tags), jnp.asarray(valid),
                            None, background_class=background, crf_iterations=0)
    np.testing.assert_array_equal(
        got, cam.cam_seeds(jnp.asarray(maps), background_class=background))


@pytest.mark.parametrize('background', [-1, 2])
def test_seeds_without_crf_match_a_loop_with_per_pixel_classes(background):
  maps, allowed, valid = random_case(5)
  maps = np.abs(maps) / 3
  got = np.asarray(cam.refined_seeds(
      jnp.asarray(maps), jnp.asarray(allowed), jnp.asarray(valid), None,
      background_class=background, crf_iterations=0))
  for b, y, x in np.ndindex(B, H, W):
    if not valid[b, y, x]:
      assert got[b, y, x] == labels.PADDING
      continue
    scores = {k: maps[b, y, x, k] for k in range(K)
              if allowed[b, y, x, k] and k != background}
    best = max(scores.values(), default=-1.0)
    if best >= cam.FOREGROUND_THRESHOLD:
      expected = max(scores, key=scores.get)
    elif background >= 0 and best < cam.BACKGROUND_THRESHOLD:
      expected = background
    else:
      expected = labels.UNLABELED
    assert got[b, y, x] == expected, (b, y, x)
  assert len(np.unique(got)) >= 3


def naive_label_unary(labels_in, allowed, confidence):
  out = np.zeros(labels_in.shape + (K + 1,))
  for b, y, x in np.ndindex(labels_in.shape):
    channels = list(allowed[b, y, x]) + [True]
    n = sum(channels)
    for c in range(K + 1):
      if c == labels_in[b, y, x]:
        out[b, y, x, c] = -math.log(confidence)
      elif channels[c]:
        out[b, y, x, c] = -math.log((1 - confidence) / max(n - 1, 1))
      else:
        out[b, y, x, c] = cam.DISALLOWED_ENERGY
  return out


def test_label_unary_is_pydensecrf_unary_from_labels_over_the_allowed_classes():
  maps, allowed, _ = random_case(6)
  labels_in = np.asarray(cam.thresholded_labels(jnp.asarray(np.abs(maps)),
                                                jnp.asarray(allowed), 0.5))
  assert (labels_in == K).any() and (labels_in < K).any()
  got = cam.label_unary(jnp.asarray(labels_in), jnp.asarray(allowed))
  np.testing.assert_allclose(got, naive_label_unary(labels_in, allowed, 0.7), rtol=1e-6)


def test_crf_labels_match_a_dense_mean_field(monkeypatch):
  from tests.methods.test_dense_crf import reference_mean_field
  monkeypatch.setattr(cam, 'CRF_APPROX', 'exact')
  rng = np.random.default_rng(7)
  maps, allowed, valid = random_case(7)
  labels_in = np.asarray(cam.thresholded_labels(jnp.asarray(np.abs(maps)),
                                                jnp.asarray(allowed), 0.6))
  rgb = rng.uniform(0, 255, (B, H, W, 3)).astype(np.float32)
  rgb[:, :, :3] = 20.0  # a flat region the smoothing can fill
  got = np.asarray(cam.crf_labels(jnp.asarray(labels_in), jnp.asarray(allowed),
                                  jnp.asarray(rgb), jnp.asarray(valid), iterations=3))
  unary = naive_label_unary(labels_in, allowed, cam.CRF_LABEL_CONFIDENCE)
  params = dict(smoothness_sigma=cam.CRF_SMOOTHNESS_SIGMA,
                smoothness_weight=cam.CRF_SMOOTHNESS_WEIGHT,
                appearance_sigma_xy=cam.CRF_APPEARANCE_SIGMA_XY,
                appearance_sigma_rgb=cam.CRF_APPEARANCE_SIGMA_RGB,
                appearance_weight=cam.CRF_APPEARANCE_WEIGHT)
  for b in range(B):
    expected = reference_mean_field(unary[b], rgb[b], valid[b], 3, params).argmax(-1)
    np.testing.assert_array_equal(got[b][valid[b]], expected[valid[b]])
    # Never a class the pixel may not take.
    taken = np.concatenate([allowed[b], np.ones((H, W, 1), bool)], -1)
    assert np.take_along_axis(taken, got[b][..., None], -1).all()
  assert (got != labels_in).any(), 'the CRF changed nothing: a weak test'


@pytest.mark.parametrize('background', [-1, 0])
def test_cam_prediction_matches_a_loop(background):
  maps, allowed, _ = random_case(8)
  maps = np.abs(maps) / 4
  got = np.asarray(cam.cam_prediction(jnp.asarray(maps), jnp.asarray(allowed),
                                      background_class=background))
  for b, y, x in np.ndindex(B, H, W):
    scores = {k: maps[b, y, x, k] for k in range(K)
              if allowed[b, y, x, k] and k != background}
    if background >= 0:
      scores[background] = cam.EVAL_BACKGROUND_SCORE
    expected = max(sorted(scores), key=scores.get) if scores else labels.UNLABELED
    assert got[b, y, x] == expected


def test_upsampled_maps_flip_sums_the_mirror_within_the_width():
  rng = np.random.default_rng(9)
  image = rng.normal(size=(B, H, W, 3)).astype(np.float32)
  width = np.array([W, W - 2], np.int32)
  ramp = 0.3 * np.arange(W, dtype=np.float32)[None, None, :, None]

  def maps_fn(images):   # not mirror-symmetric: depends on the column
    return images[..., :2] + ramp

  got = np.asarray(cam.upsampled_maps(maps_fn, jnp.asarray(image), jnp.asarray(width),
                                      (H, W), flip=True))
  expected = np.zeros((B, H, W, 2))
  for b, y, x in np.ndindex(B, H, W):
    own = np.maximum(image[b, y, x, :2] + 0.3 * x, 0)
    # The mirror's map at its column w-1-x reads this pixel at column w-1-x;
    # padding columns stay where they are.
    mirror_x = width[b] - 1 - x if x < width[b] else x
    expected[b, y, x] = own + np.maximum(image[b, y, x, :2] + 0.3 * mirror_x, 0)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_crf_on_fewer_class_channels_gives_the_same_labels():
  rng = np.random.default_rng(10)
  maps, allowed, valid = random_case(10)
  allowed[..., 3] = False      # at most 3 classes per image
  labels_in = np.asarray(cam.thresholded_labels(jnp.asarray(np.abs(maps)),
                                                jnp.asarray(allowed), 0.6))
  rgb = rng.uniform(0, 255, (B, H, W, 3)).astype(np.float32)
  rgb[:, :, 2:] = 30.0  # a flat region the smoothing can fill
  args = (jnp.asarray(labels_in), jnp.asarray(allowed), jnp.asarray(rgb), jnp.asarray(valid))
  full = np.asarray(cam.crf_labels(*args, iterations=3))
  np.testing.assert_array_equal(cam.crf_labels(*args, iterations=3, max_classes=3), full)
  assert (full != labels_in).any()
  # With too few channels the classes past them become rest (K).
  two = np.asarray(cam.crf_labels(*args, iterations=3, max_classes=1))
  first = [np.flatnonzero(allowed[b].any((0, 1)))[0] for b in range(B)]
  for b in range(B):
    assert np.isin(two[b], [first[b], K]).all()
