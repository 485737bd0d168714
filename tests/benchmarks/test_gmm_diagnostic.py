"""benchmarks/gmm_diagnostic.py: its pixel statistics against a naive loop."""

import numpy as np

from agmm_jax.data import labels as labels_lib
from benchmarks import gmm_diagnostic


def naive_quality(response, probs, sparse, dense):
  sums = dict.fromkeys(gmm_diagnostic.COUNTS + gmm_diagnostic.ERRORS, 0.0)
  batch, height, width, num_classes = probs.shape
  for b in range(batch):
    labeled = sorted({int(v) for v in sparse[b].ravel() if v >= 0})
    for i in range(height):
      for j in range(width):
        if sparse[b, i, j] != labels_lib.UNLABELED or dense[b, i, j] < 0:
          continue
        sums['pixels'] += 1
        truth = int(dense[b, i, j])
        if truth not in labeled:
          continue
        sums['covered'] += 1
        g_choice = max(labeled, key=lambda k: response[b, i, j, k])
        p_choice = max(labeled, key=lambda k: probs[b, i, j, k])
        sums['g_right'] += g_choice == truth
        sums['p_right'] += p_choice == truth
        sums['g_right_p_wrong'] += g_choice == truth and p_choice != truth
        sums['g_wrong_p_right'] += g_choice != truth and p_choice == truth
        for name, values in (('g_error', response), ('p_error', probs)):
          sums[name] += np.mean([abs(values[b, i, j, k] - (k == truth)) for k in labeled])
  return sums


def test_target_quality_matches_naive_loop():
  rng = np.random.default_rng(0)
  batch, height, width, num_classes = 3, 6, 7, 5
  dense = rng.integers(-1, num_classes, size=(batch, height, width))
  sparse = np.full_like(dense, labels_lib.UNLABELED)
  clicked = rng.random(dense.shape) < 0.2
  sparse[clicked] = np.maximum(dense[clicked], 0)
  sparse[:, -1, :] = labels_lib.PADDING
  sparse[2] = labels_lib.UNLABELED  # An image without a labeled pixel.
  response = rng.random((batch, height, width, num_classes))
  probs = rng.dirichlet(np.ones(num_classes), size=(batch, height, width))
  actual = gmm_diagnostic.target_quality(response, probs, sparse, dense)
  expected = naive_quality(response, probs, sparse, dense)
  assert expected['covered'] > 0 and expected['pixels'] > expected['covered']
  for name, value in expected.items():
    np.testing.assert_allclose(actual[name], value, rtol=1e-12, err_msg=name)
