"""Boxes follow the training augmentation pixel for pixel; the pipeline
delivers tags and boxes to a method's batch fields."""

import numpy as np
from PIL import Image
import pytest

from agmm_jax.data import augment
from agmm_jax.data import input_pipeline
from agmm_jax.data import labels
from agmm_jax.data import weak_labels
from tests import fixtures
from tests.data import test_input_pipeline

MAX_BOXES = 32


def mask_bbox(mask):
  """(y0, x0, y1, x1) of a mask's pixels, or None when it is empty."""
  rows, cols = np.nonzero(mask)
  if not rows.size:
    return None
  return rows.min(), cols.min(), rows.max() + 1, cols.max() + 1


@pytest.mark.parametrize('seed', range(25))
def test_crop_boxes_equal_the_box_masks_moved_like_labels(seed):
  rng = np.random.default_rng(seed)
  height, width = rng.integers(5, 40, 2)
  crop = int(rng.integers(4, 30))
  count = 6
  y0 = rng.integers(0, height, count)
  x0 = rng.integers(0, width, count)
  y1 = y0 + 1 + rng.integers(0, height - y0)
  x1 = x0 + 1 + rng.integers(0, width - x0)
  boxes = np.stack([np.arange(count), y0, x0, y1, x1], 1).astype(np.int32)
  image = Image.fromarray(np.zeros((height, width, 3), np.uint8))
  geometry = augment.sample_geometry(height, width, crop_size=crop,
                                     scale_range=(0.3, 2.5), rng=rng)
  rows, cols = augment.label_sources((height, width), geometry.scaled_size,
                                     geometry.offset, crop)
  moved = weak_labels.crop_boxes(boxes, row_sources=rows, col_sources=cols,
                                 crop_size=crop, flip=geometry.flip)
  moved_by_class = {int(b[0]): tuple(b[1:]) for b in moved}
  # The reference: each box drawn on a label map, moved as labels are.
  for box, mask in zip(boxes, weak_labels.box_masks(boxes, height, width)):
    _, label = augment.rescale_pad_crop(image, mask.astype(np.int32),
                                        geometry.scaled_size, geometry.offset,
                                        crop)
    if geometry.flip:
      label = label[:, ::-1]
    expected = mask_bbox(label == 1)
    assert moved_by_class.get(int(box[0])) == expected
    if expected is not None:
      # A moved box is a rectangle of the moved mask, not just its bbox.
      assert (label[expected[0]:expected[2], expected[1]:expected[3]] == 1).all()


@pytest.mark.parametrize('factor', [2, 3])
def test_downscale_boxes_equal_the_downscaled_masks(factor):
  rng = np.random.default_rng(factor)
  height, width = 23, 17
  boxes = np.array([[c, rng.integers(0, 10), rng.integers(0, 8),
                     rng.integers(11, height + 1), rng.integers(9, width + 1)]
                    for c in range(5)] + [[5, 22, 16, 23, 17]], np.int32)
  scaled = weak_labels.downscale_boxes(boxes, factor, height, width)
  scaled_by_class = {int(b[0]): tuple(b[1:]) for b in scaled}
  offset = factor // 2
  for box, mask in zip(boxes, weak_labels.box_masks(boxes, height, width)):
    small = mask[offset::factor, offset::factor][:height // factor,
                                                 :width // factor]
    assert scaled_by_class.get(int(box[0])) == mask_bbox(small)


def test_train_iterator_delivers_boxes_that_cover_the_labels(tmp_path):
  data_dir = fixtures.make_folder_dataset_tfrecords(
      tmp_path, sparse='boxes:min_area=1', num_classes=4)
  config = test_input_pipeline.DataConfig(data_dir, train_labels='dense',
                                          crop_size=24)
  fields = {'padded_boxes': lambda ex: weak_labels.pad_boxes(ex['boxes'],
                                                             MAX_BOXES),
            'image_tags': lambda ex: ex['tags']}
  iterator = input_pipeline.create_train_iterator(
      config, batch_size_per_process=3, seed=0, batch_fields=fields)
  for _ in range(4):
    batch = next(iterator)
    assert batch['padded_boxes'].shape == (3, MAX_BOXES, 5)
    np.testing.assert_array_equal(batch['class_present'], batch['image_tags'])
    for label, boxes in zip(batch['label'], batch['padded_boxes']):
      boxes = boxes[boxes[:, 0] != weak_labels.NO_BOX]
      assert len(boxes)
      assert (boxes[:, 1:3] >= 0).all() and (boxes[:, 3:] <= 24).all()
      assert (boxes[:, 1] < boxes[:, 3]).all()
      assert (boxes[:, 2] < boxes[:, 4]).all()
      masks = weak_labels.box_masks(boxes, 24, 24)
      # min_area=1: every labeled pixel lies in a box of its class, and
      # every pixel outside all boxes is void or padding.
      for class_id in range(4):
        covered = masks[boxes[:, 0] == class_id].any(axis=0)
        assert covered[label == class_id].all()
      assert (label[~masks.any(axis=0)] < 0).all()
    assert (batch['label'] != labels.PADDING).any()

