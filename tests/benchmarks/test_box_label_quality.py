"""benchmarks/box_label_quality.py against loops over the boxes and pixels of
a prepared fixture dataset, and its one-line error."""

import numpy as np
import pytest

from agmm_jax.data import labels
from benchmarks import box_label_quality
from tests import fixtures

K = 4


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return fixtures.make_folder_dataset_tfrecords(
      tmp_path_factory.mktemp('boxes'), sparse='boxes:min_area=4',
      num_classes=K)


def naive_fill(boxes, height, width):
  """The smallest box holding each pixel (first of equal ones), by loops."""
  target = np.full((height, width), labels.UNLABELED)
  for y in range(height):
    for x in range(width):
      best = None
      for c, y0, x0, y1, x1 in boxes.tolist():
        if y0 <= y < y1 and x0 <= x < x1 and (
            best is None or (y1 - y0) * (x1 - x0) < best[0]):
          best = ((y1 - y0) * (x1 - x0), c)
      if best is not None:
        target[y, x] = best[1]
  return target


def test_counts_match_loops(data_dir):
  seen = 0
  for boxes, dense in box_label_quality.records(data_dir, 'train'):
    seen += 1
    height, width = dense.shape
    confusion, labeled = box_label_quality.fill_confusion(
        boxes, dense, K, 1.0, -1)
    target = naive_fill(boxes, height, width)
    expected = np.zeros((K, K), np.int64)
    truth_allowed = alone = sizes = covered = 0
    for y in range(height):
      for x in range(width):
        if dense[y, x] == labels.UNLABELED:
          continue
        if target[y, x] != labels.UNLABELED:
          expected[dense[y, x], target[y, x]] += 1
        allowed = {c for c, y0, x0, y1, x1 in boxes.tolist()
                   if y0 <= y < y1 and x0 <= x < x1}
        if allowed:
          covered += 1
          sizes += len(allowed)
          truth_allowed += dense[y, x] in allowed
          alone += allowed == {dense[y, x]}
    np.testing.assert_array_equal(confusion, expected)
    assert labeled == expected.sum()
    np.testing.assert_array_equal(
        box_label_quality.allowed_counts(boxes, dense, K, -1),
        [covered, truth_allowed, alone, sizes])
  assert seen == 6


def test_main_prints_tables_and_bad_data_is_one_line(data_dir, tmp_path,
                                                     capsys):
  assert box_label_quality.main([f'--data_dir={data_dir}',
                                 '--inner_area=1,0.2']) == 0
  out = capsys.readouterr().out
  assert '| box_fill, inner_area=0.2 |' in out and '| box_pce: A(x) |' in out
  no_boxes = fixtures.make_folder_dataset_tfrecords(tmp_path, num_classes=K)
  assert box_label_quality.main([f'--data_dir={no_boxes}']) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'holds no boxes' in err[0]
