"""The label convention's class counts against a loop over pixels."""

import numpy as np

from agmm_jax.data import labels


def test_labeled_class_counts_against_a_pixel_loop():
  rng = np.random.default_rng(0)
  num_classes = 5
  # Classes, unlabeled and padding pixels, and one class absent everywhere.
  label = rng.choice([0, 1, 3, 4, labels.UNLABELED, labels.PADDING],
                     size=(3, 6, 7)).astype(np.int32)
  expected = np.zeros((3, num_classes))
  for b, row, col in np.ndindex(label.shape):
    if label[b, row, col] >= 0:
      expected[b, label[b, row, col]] += 1
  counts = labels.labeled_class_counts(label, num_classes)
  np.testing.assert_array_equal(np.asarray(counts), expected)
  assert counts.dtype == np.float32 and expected[:, 2].sum() == 0
