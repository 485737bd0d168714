"""Tests of agmm_jax.evaluation.visualize."""

import numpy as np
from PIL import Image
import pytest

from agmm_jax.data import labels
from agmm_jax.data import augment
from agmm_jax.evaluation import visualize


def reference_voc_colormap(count):
  """The textbook bitget loop of the VOC development kit."""
  colors = []
  for index in range(count):
    red = green = blue = 0
    code = index
    for shift in range(8):
      red |= ((code >> 0) & 1) << (7 - shift)
      green |= ((code >> 1) & 1) << (7 - shift)
      blue |= ((code >> 2) & 1) << (7 - shift)
      code >>= 3
    colors.append((red, green, blue))
  return np.array(colors, np.uint8)


def test_voc_palette_known_entries_and_reference():
  colors = visualize.palette(256)
  assert colors.shape == (256, 3) and colors.dtype == np.uint8
  assert [tuple(c) for c in colors[:8]] == [
      (0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128),
      (128, 0, 128), (0, 128, 128), (128, 128, 128)]
  assert tuple(colors[15]) == (192, 128, 128)  # VOC 'person'
  assert tuple(colors[255]) == (224, 224, 192)  # VOC boundary
  np.testing.assert_array_equal(colors, reference_voc_colormap(256))
  np.testing.assert_array_equal(visualize.palette(21), colors[:21])


def test_cityscapes_palette_and_bad_names():
  colors = visualize.palette(20, name='cityscapes')
  assert tuple(colors[0]) == (128, 64, 128)  # road
  assert tuple(colors[18]) == (119, 11, 32)  # bicycle
  assert tuple(colors[19]) == (0, 0, 0)
  with pytest.raises(ValueError, match='name'):
    visualize.palette(5, name='camvid')


def test_colorize_and_overlay():
  class_ids = np.array([[0, 1, labels.UNLABELED], [2, labels.PADDING, 3]])
  colors = visualize.palette(4)
  colored = visualize.colorize(class_ids, colors)
  for (y, x), class_id in np.ndenumerate(class_ids):
    expected = colors[class_id] if class_id >= 0 else (0, 0, 0)
    np.testing.assert_array_equal(colored[y, x], expected)
  image = np.full((2, 3, 3), 200, np.uint8)
  blended = visualize.overlay(image, class_ids, alpha=0.25, colors=colors)
  np.testing.assert_array_equal(
      blended[0, 1], np.round(0.75 * 200 + 0.25 * colors[1]).astype(np.uint8))
  np.testing.assert_array_equal(blended[0, 2], image[0, 2])
  np.testing.assert_array_equal(blended[1, 1], image[1, 1])
  with pytest.raises(ValueError, match='no colour'):
    visualize.colorize(np.array([[4]]), colors)


def test_denormalize_inverts_imagenet_normalization():
  rgb = np.array([[[0, 128, 255], [10, 20, 30]]], np.uint8)
  normalized = (rgb / 255.0 - augment.IMAGENET_MEAN) / augment.IMAGENET_STD
  np.testing.assert_array_equal(visualize.denormalize(normalized), rgb)


def test_heatmap_endpoints_and_midpoint():
  colors = visualize.heatmap(np.array([[0.0, 0.5, 1.0, np.nan, 7.0]]))
  np.testing.assert_array_equal(
      colors[0], [(0, 0, 128), (128, 255, 128), (128, 0, 0), (0, 0, 128),
                  (128, 0, 0)])


def test_save_palette_png_reads_back_identical_indices(tmp_path):
  rng = np.random.default_rng(0)
  class_ids = rng.integers(labels.PADDING, 21, (6, 9))
  path = str(tmp_path / 'sub' / 'prediction.png')
  visualize.save_palette_png(path, class_ids, visualize.palette(21))
  with Image.open(path) as stored:
    assert stored.mode == 'P'
    indices = np.asarray(stored)
    stored_palette = np.array(stored.getpalette()[:21 * 3]).reshape(21, 3)
  np.testing.assert_array_equal(
      indices, np.where(class_ids < 0, labels.STORED_UNLABELED, class_ids))
  np.testing.assert_array_equal(stored_palette, visualize.palette(21))
  np.testing.assert_array_equal(
      labels.from_stored(indices, 21),
      np.where(class_ids < 0, labels.UNLABELED, class_ids))
  with pytest.raises(ValueError, match='does not fit'):
    visualize.save_palette_png(path, np.array([[255]]))
