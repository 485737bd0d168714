"""The box loss terms against loops over boxes and pixels; a 2-step tiny run
with a box preset."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agmm_jax import methods
from agmm_jax.data import labels
from agmm_jax.data import weak_labels
from agmm_jax.methods import boxes as boxes_lib
from configs import presets

B, H, W, K = 2, 7, 9, 4


def make_inputs(seed, with_padding=True):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(B, H, W, K)).astype(np.float32) * 2
  label = np.full((B, H, W), labels.UNLABELED, np.int32)
  if with_padding:
    label[:, -2:, :] = labels.PADDING
    label[1, :, -3:] = labels.PADDING
  rows = []
  for _ in range(B):
    image_boxes = []
    for _ in range(int(rng.integers(1, 5))):
      y0, x0 = int(rng.integers(0, H - 1)), int(rng.integers(0, W - 1))
      image_boxes.append((int(rng.integers(0, K)), y0, x0,
                          int(rng.integers(y0 + 1, H + 1)),
                          int(rng.integers(x0 + 1, W + 1))))
    rows.append(weak_labels.pad_boxes(np.array(image_boxes), 6))
  inputs = methods.LossInputs(
      logits=jnp.asarray(logits), decoder_features=jnp.zeros((B, 2, 3, 5)),
      label=jnp.asarray(label), class_present=jnp.zeros((B, K)),
      fields={'boxes': jnp.asarray(np.stack(rows))})
  return inputs, logits, label, np.stack(rows)


def softmax(z):
  e = np.exp(z - z.max())
  return e / e.sum()


def allowed_set(image_boxes, y, x, background):
  """Classes of the boxes that contain (y, x), plus the background."""
  allowed = {c for c, y0, x0, y1, x1 in image_boxes.tolist()
             if c >= 0 and y0 <= y < y1 and x0 <= x < x1}
  if background >= 0:
    allowed.add(background)
  return allowed


def naive_pixel_terms(logits, label, boxes, background):
  """(box_outside, box_pce) by loops over pixels and boxes."""
  outside = pce = 0.0
  count = 0
  for b in range(B):
    for y in range(H):
      for x in range(W):
        allowed = allowed_set(boxes[b], y, x, background)
        if label[b, y, x] == labels.PADDING or not allowed:
          continue
        p = softmax(logits[b, y, x].astype(np.float64))
        outside += sum(-math.log(1 - p[k] + 1e-6) for k in range(K)
                       if k not in allowed)
        pce += -math.log(sum(p[k] for k in allowed))
        count += 1
  return outside / max(count, 1), pce / max(count, 1)


def naive_projection(logits, label, boxes, background):
  total, pairs = 0.0, 0
  for b in range(B):
    classes = {c for c in boxes[b][:, 0].tolist() if c >= 0 and c != background}
    for k in sorted(classes):
      target = np.zeros((H, W))
      for c, y0, x0, y1, x1 in boxes[b].tolist():
        if c == k:
          target[y0:y1, x0:x1] = 1
      mask = np.zeros((H, W))
      for y in range(H):
        for x in range(W):
          if label[b, y, x] != labels.PADDING:
            mask[y, x] = softmax(logits[b, y, x].astype(np.float64))[k]
      for axis in (0, 1):
        m, t = mask.max(axis), target.max(axis)
        total += 1 - 2 * (m * t).sum() / ((m ** 2).sum() + (t ** 2).sum()
                                          + 1e-5)
      pairs += 1
  return total / max(pairs, 1)


@pytest.mark.parametrize('seed', range(4))
@pytest.mark.parametrize('background', [-1, 0, 2])
def test_box_terms_match_loops(seed, background):
  inputs, logits, label, boxes = make_inputs(seed, with_padding=seed % 2 == 0)
  outside, pce = naive_pixel_terms(logits, label, boxes, background)
  np.testing.assert_allclose(
      boxes_lib.box_outside(inputs, background_class=background), outside,
      rtol=1e-5)
  np.testing.assert_allclose(
      boxes_lib.box_partial_cross_entropy(inputs, background_class=background),
      pce, rtol=1e-5)
  np.testing.assert_allclose(
      boxes_lib.box_projection(inputs, background_class=background),
      naive_projection(logits, label, boxes, background), rtol=1e-5)


def naive_fill(logits, label, boxes, inner_area, background):
  """box_fill by loops: each pixel's smallest containing box (the first of
  equal ones), labeled when the pixel centre lies in that box's inner box
  (sides scaled by sqrt(inner_area) about the centre)."""
  scale = math.sqrt(inner_area)
  total, count = 0.0, 0
  for b in range(B):
    for y in range(H):
      for x in range(W):
        if label[b, y, x] == labels.PADDING:
          continue
        best = None
        for c, y0, x0, y1, x1 in boxes[b].tolist():
          area = (y1 - y0) * (x1 - x0)
          if c >= 0 and y0 <= y < y1 and x0 <= x < x1 and (
              best is None or area < best[0]):
            best = (area, c, y0, x0, y1, x1)
        if best is None:
          target = background
        else:
          _, c, y0, x0, y1, x1 = best
          inner = (abs(y + 0.5 - (y0 + y1) / 2) < scale * (y1 - y0) / 2
                   and abs(x + 0.5 - (x0 + x1) / 2) < scale * (x1 - x0) / 2)
          target = c if inner else -1
        if target < 0:
          continue
        total += -math.log(softmax(logits[b, y, x].astype(np.float64))[target])
        count += 1
  return total / max(count, 1)


@pytest.mark.parametrize('seed', range(2))
@pytest.mark.parametrize('inner_area, background', [
    (1.0, -1), (1.0, 0), (0.25, -1), (0.2, 2), (0.5, -1)])
def test_box_fill_matches_loops(seed, inner_area, background):
  inputs, logits, label, boxes = make_inputs(seed, with_padding=seed % 2 == 0)
  np.testing.assert_allclose(
      boxes_lib.box_fill(inputs, inner_area=inner_area,
                         background_class=background),
      naive_fill(logits, label, boxes, inner_area, background), rtol=1e-5)


def test_box_fill_labels_the_smaller_of_nested_boxes():
  """A sheep box inside a grass box: the sheep box's pixels are sheep, the
  rest of the grass box grass; Box^i at a quarter of the area labels the
  centred half of each side."""
  boxes = jnp.asarray([[[1, 0, 0, 8, 8], [3, 2, 2, 6, 6],
                        [weak_labels.NO_BOX, 0, 0, 0, 0]]])
  target = np.asarray(boxes_lib.smallest_box_target(boxes, 9, 8, 1.0, -1))
  expected = np.full((9, 8), -1)
  expected[:8, :] = 1
  expected[2:6, 2:6] = 3
  np.testing.assert_array_equal(target, expected[None])
  inner = np.asarray(boxes_lib.smallest_box_target(boxes, 9, 8, 0.25, -1))
  # The grass box's inner 4 x 4 lies in the sheep box, which is in front:
  # only the sheep box's inner 2 x 2 is labeled.
  expected = np.full((9, 8), -1)
  expected[3:5, 3:5] = 3
  np.testing.assert_array_equal(inner, expected[None])


def test_bad_inner_area_is_one_line():
  config = presets.preset('box_fill')
  config.box_fill.inner_area = 0.0
  with pytest.raises(ValueError, match='box_fill.inner_area') as error:
    methods.build_loss(config)
  assert '\n' not in str(error.value)


def test_box_cover_counts_boxes_per_class_and_pixel():
  _, _, _, boxes = make_inputs(3)
  cover = np.asarray(boxes_lib.box_cover(jnp.asarray(boxes), H, W, K))
  for b in range(B):
    expected = np.zeros((H, W, K))
    for c, y0, x0, y1, x1 in boxes[b].tolist():
      if c >= 0:
        expected[y0:y1, x0:x1, c] += 1
    np.testing.assert_array_equal(cover[b], expected)


def test_box_pce_gradient_is_finite_where_no_class_is_allowed():
  inputs, *_ = make_inputs(1)

  def loss(logits):
    return boxes_lib.box_partial_cross_entropy(inputs._replace(logits=logits))

  grad = jax.grad(loss)(inputs.logits)
  assert np.isfinite(np.asarray(grad)).all()
  # Pixels in no box (no background class) get no gradient.
  cover = np.asarray(boxes_lib.box_cover(inputs.fields['boxes'], H, W, K))
  outside = cover.sum(-1) == 0
  assert outside.any()
  assert (np.asarray(grad)[outside] == 0).all()


def test_box_projection_is_zero_for_masks_that_fill_their_boxes():
  inputs, *_ = make_inputs(0, with_padding=False)
  boxes = np.array([[[1, 1, 2, 4, 6], [1, 5, 6, 7, 9]],
                    [[2, 0, 0, 3, 3], [weak_labels.NO_BOX, 0, 0, 0, 0]]])
  logits = np.full((B, H, W, K), -30.0, np.float32)
  logits[..., 0] = 0.0
  for b in range(B):
    for c, y0, x0, y1, x1 in boxes[b].tolist():
      if c >= 0:
        logits[b, y0:y1, x0:x1, c] = 30.0
  value = boxes_lib.box_projection(inputs._replace(
      logits=jnp.asarray(logits), fields={'boxes': jnp.asarray(boxes)}))
  assert float(value) < 1e-4
  # Shrinking one mask by a column costs exactly that dice on the x axis.
  logits[1, :, 2, 2] = -30.0
  value = boxes_lib.box_projection(inputs._replace(
      logits=jnp.asarray(logits), fields={'boxes': jnp.asarray(boxes)}))
  np.testing.assert_allclose(value, (1 - 2 * 2 / (2 + 3 + 1e-5)) / 2,
                             rtol=1e-4)


def test_batch_field_needs_boxes_in_the_records():
  with pytest.raises(ValueError, match='sparse spec boxes') as error:
    boxes_lib.padded_boxes({'image': np.zeros((3, 3, 3)),
                            'label': np.zeros((3, 3), np.int32)})
  assert '\n' not in str(error.value)
  field = boxes_lib.padded_boxes({'boxes': np.array([[1, 0, 0, 2, 2]])})
  assert field.shape == (boxes_lib.MAX_BOXES, 5)


@pytest.mark.parametrize('name', presets.BOX_PRESETS)
def test_box_presets_build_and_declare_the_boxes_field(name):
  loss = methods.build_loss(presets.preset(name))
  assert loss.needs.batch_fields == {'boxes': boxes_lib.padded_boxes}
  assert set(loss.terms) & {'box_outside', 'box_fill'}


def test_bad_background_class_is_one_line():
  config = presets.preset('box_pce')
  config.background_class = -3
  with pytest.raises(ValueError, match='loss_config.background_class'):
    methods.build_loss(config)


def test_two_step_tiny_run_with_a_box_preset(tmp_path):
  import main  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from tests import fixtures  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.data.dir = fixtures.make_folder_dataset_tfrecords(
      tmp_path, sparse='boxes:min_area=4', num_classes=4)
  common.set_method(config, 'boxinst')
  config.num_train_steps = 2
  config.eval_every_steps = 2
  config.checkpoint_every_steps = 2
  scores = main.run(config, str(tmp_path / 'run'))
  assert scores['step'] == 2
  assert np.isfinite(scores['miou'])
