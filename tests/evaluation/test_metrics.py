"""Tests of agmm_jax.evaluation.metrics against naive NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agmm_jax.data import labels
from agmm_jax.evaluation import metrics

NUM_CLASSES = 5


def naive_confusion(prediction, label, num_classes):
  """Pixel-by-pixel loop, rows = ground truth."""
  confusion = np.zeros((num_classes, num_classes), np.int64)
  for p, g in zip(prediction.ravel(), label.ravel()):
    if 0 <= g < num_classes and 0 <= p < num_classes:
      confusion[g, p] += 1
  return confusion


def test_confusion_matrix_matches_naive_loop_and_ignores_void_and_padding():
  rng = np.random.default_rng(0)
  prediction = rng.integers(0, NUM_CLASSES, (3, 7, 6))
  label = rng.integers(labels.PADDING, NUM_CLASSES, (3, 7, 6))
  confusion_fn = jax.jit(metrics.confusion_matrix, static_argnums=2)
  confusion = confusion_fn(jnp.asarray(prediction), jnp.asarray(label),
                           NUM_CLASSES)
  assert confusion.dtype == jnp.int32
  np.testing.assert_array_equal(
      confusion, naive_confusion(prediction, label, NUM_CLASSES))
  assert int(confusion.sum()) == int((label >= 0).sum())


def test_confusion_matrix_ignores_unpredicted_pixels_and_checks_shapes():
  label = jnp.array([[0, 1, 2, labels.UNLABELED]])
  prediction = jnp.array([[0, -1, 2, 1]])
  np.testing.assert_array_equal(
      metrics.confusion_matrix(prediction, label, 3),
      [[1, 0, 0], [0, 0, 0], [0, 0, 1]])
  with pytest.raises(ValueError, match='prediction shape'):
    metrics.confusion_matrix(prediction[:, :2], label, 3)


def test_segmentation_scores_against_hand_computed_values():
  # class 0: tp 3, gt 4, pred 4 -> IoU 3/5; class 1: tp 1, gt 2, pred 1 ->
  # IoU 1/2; class 2: absent from gt, predicted once -> IoU 0; class 3: absent
  # everywhere -> NaN, excluded.
  confusion = np.array([[3, 0, 1, 0],
                        [1, 1, 0, 0],
                        [0, 0, 0, 0],
                        [0, 0, 0, 0]])
  scores = metrics.segmentation_scores(confusion)
  np.testing.assert_allclose(scores['per_class_iou'][:3], [0.6, 0.5, 0.0])
  assert np.isnan(scores['per_class_iou'][3])
  np.testing.assert_allclose(scores['miou'], (0.6 + 0.5 + 0.0) / 3)
  np.testing.assert_allclose(scores['pixel_accuracy'], 4 / 6)
  np.testing.assert_allclose(scores['mean_class_accuracy'], (3 / 4 + 1 / 2) / 2)


def test_segmentation_scores_empty_confusion_is_nan_without_warnings():
  with np.errstate(all='raise'):
    scores = metrics.segmentation_scores(np.zeros((3, 3), np.int32))
  assert np.isnan(scores['miou']) and np.isnan(scores['pixel_accuracy'])
  with pytest.raises(ValueError, match='square'):
    metrics.segmentation_scores(np.zeros((3, 2)))


def test_segmentation_scores_match_official_formula_on_random_data():
  rng = np.random.default_rng(1)
  confusion = rng.integers(0, 50, (NUM_CLASSES, NUM_CLASSES))
  # Official AGMM: iu = diag / (rowsum + colsum - diag); mIoU = nanmean(iu).
  official_iou = np.diag(confusion) / (
      confusion.sum(1) + confusion.sum(0) - np.diag(confusion))
  scores = metrics.segmentation_scores(confusion)
  np.testing.assert_allclose(scores['per_class_iou'], official_iou)
  np.testing.assert_allclose(scores['miou'], np.nanmean(official_iou))


def test_format_iou_table_lists_every_class():
  table = metrics.format_iou_table(np.array([0.5, np.nan]), ['cat', 'dog'],
                                   miou=0.5, pixel_accuracy=0.75)
  lines = table.splitlines()
  assert lines[1].split() == ['cat', '50.00']
  assert lines[2].split() == ['dog', 'n/a']
  assert lines[3].split() == ['mIoU', '50.00']
  assert lines[4].split() == ['pixel', 'accuracy', '75.00']
  with pytest.raises(ValueError, match='class names'):
    metrics.format_iou_table(np.array([0.5]), ['a', 'b'], 0.5, 0.5)
