"""Tests of data_prep.sparse_labels: specs, determinism, labels, thinning."""

import collections
import os

import numpy as np
from PIL import Image
import pytest

from data_prep import sparse_labels

SPECS = ['points:1', 'points:3:margin=2', 'clicks:25', 'scribbles:0.3',
         'scribbles:0.6:erode=0:width=3']


def make_dense(seed: int = 0, height: int = 40, width: int = 56) -> np.ndarray:
  """Rectangles of classes 0..4 on class 0, a void border and void specks."""
  rng = np.random.default_rng(seed)
  dense = np.zeros((height, width), np.uint8)
  dense[5:20, 4:30] = 1
  dense[22:38, 10:50] = 2
  dense[2:9, 40:54] = 3
  dense[30:33, 2:6] = 4   # a small region
  dense[0, :] = 255
  dense[rng.random(dense.shape) < 0.03] = 255
  return dense


def naive_regions(dense: np.ndarray, class_id: int) -> list[set]:
  """8-connected regions of ``class_id`` by explicit flood fill."""
  height, width = dense.shape
  seen = np.zeros(dense.shape, bool)
  regions = []
  for r in range(height):
    for c in range(width):
      if dense[r, c] != class_id or seen[r, c]:
        continue
      stack, region = [(r, c)], set()
      seen[r, c] = True
      while stack:
        y, x = stack.pop()
        region.add((y, x))
        for dy in (-1, 0, 1):
          for dx in (-1, 0, 1):
            ny, nx = y + dy, x + dx
            if (0 <= ny < height and 0 <= nx < width and not seen[ny, nx]
                and dense[ny, nx] == class_id):
              seen[ny, nx] = True
              stack.append((ny, nx))
      regions.append(region)
  return regions


def test_parse_spec():
  assert sparse_labels.parse_spec('clicks:20') == sparse_labels.SparseSpec(
      'clicks', count=20)
  spec = sparse_labels.parse_spec('points:2:margin=5:min_area=9')
  assert (spec.kind, spec.count, spec.margin, spec.min_area) == ('points', 2,
                                                                 5, 9)
  spec = sparse_labels.parse_spec('scribbles:0.3:erode=1:width=3')
  assert (spec.fraction, spec.erode, spec.width) == (0.3, 1, 3)
  assert sparse_labels.parse_spec(str(spec)) == spec
  assert sparse_labels.parse_spec('points') == sparse_labels.SparseSpec(
      'points')


@pytest.mark.parametrize('bad', ['lines:3', 'clicks', 'clicks:0',
                                 'points:1:erode=2', 'scribbles:1.5',
                                 'points:x', 'points:1:2'])
def test_parse_spec_rejects(bad):
  with pytest.raises(ValueError, match='sparse spec'):
    sparse_labels.parse_spec(bad)


@pytest.mark.parametrize('spec', SPECS)
def test_only_own_class_never_void(spec):
  for seed in range(3):
    dense = make_dense(seed)
    sparse = sparse_labels.generate(dense, spec, seed=seed, image_id='img')
    labeled = sparse != 255
    assert labeled.any()
    assert not (labeled & (dense == 255)).any()
    np.testing.assert_array_equal(sparse[labeled], dense[labeled])


@pytest.mark.parametrize('spec', SPECS)
def test_deterministic_per_seed_and_id(spec):
  dense = make_dense()
  first = sparse_labels.generate(dense, spec, seed=3, image_id='a')
  again = sparse_labels.generate(dense, spec, seed=3, image_id='a')
  other_seed = sparse_labels.generate(dense, spec, seed=4, image_id='a')
  other_id = sparse_labels.generate(dense, spec, seed=3, image_id='b')
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other_seed)
  assert not np.array_equal(first, other_id)


def test_points_per_region_against_flood_fill():
  dense = make_dense()
  sparse = sparse_labels.generate(dense, 'points:2:min_area=5', seed=0,
                                  image_id='x')
  for class_id in range(5):
    for region in naive_regions(dense, class_id):
      inside = sum(sparse[p] == class_id for p in region)
      if len(region) >= 5:
        assert inside == min(2, len(region)), (class_id, len(region))
      else:
        assert inside == 0


def test_points_respect_margin_when_possible():
  dense = np.zeros((40, 56), np.uint8)
  dense[8:30, 10:40] = 1      # room for margin 4
  dense[33:36, 5:50] = 2      # 3 rows: erosion by 4 empties it -> fallback
  margin = 4
  for seed in range(10):
    sparse = sparse_labels.generate(dense, f'points:1:margin={margin}',
                                    seed=seed, image_id='m')
    rows, cols = np.nonzero(sparse == 1)
    assert rows.size == 1
    r, c = rows[0], cols[0]
    # Every pixel within city-block distance `margin` is in the region.
    for dr in range(-margin, margin + 1):
      for dc in range(-(margin - abs(dr)), margin - abs(dr) + 1):
        assert 0 <= r + dr < 40 and 0 <= c + dc < 56
        assert dense[r + dr, c + dc] == 1
    assert (sparse == 2).sum() == 1


def test_clicks_uniform_over_non_void_pixels():
  dense = make_dense()
  counts = collections.Counter()
  for seed in range(150):
    sparse = sparse_labels.generate(dense, 'clicks:20', seed=seed,
                                    image_id='c')
    assert (sparse != 255).sum() == 20
    counts.update(sparse[sparse != 255].tolist())
  valid = dense[dense != 255]
  total = sum(counts.values())
  for class_id in range(5):
    expected = np.mean(valid == class_id)
    assert abs(counts[class_id] / total - expected) < 0.03, class_id


def test_clicks_fewer_pixels_than_clicks():
  dense = np.full((6, 6), 255, np.uint8)
  dense[2, 3] = 1
  dense[4, 4] = 0
  sparse = sparse_labels.generate(dense, 'clicks:20', seed=0, image_id='t')
  np.testing.assert_array_equal(sparse, dense)


def test_thin_bar_gives_one_pixel_line_in_the_middle():
  mask = np.zeros((20, 60), bool)
  mask[6:13, 5:55] = True    # 7 rows: centre row 9
  skeleton = sparse_labels.thin(mask)
  assert not (skeleton & ~mask).any()
  rows, cols = np.nonzero(skeleton)
  assert set(rows.tolist()) <= {8, 9, 10}
  assert cols.max() - cols.min() >= 40
  # One pixel wide: no 2x2 block is fully on.
  blocks = (skeleton[:-1, :-1] & skeleton[1:, :-1] & skeleton[:-1, 1:]
            & skeleton[1:, 1:])
  assert not blocks.any()


def test_thin_keeps_regions_connected():
  mask = np.zeros((40, 40), bool)
  mask[5:35, 5:12] = True
  mask[28:35, 5:35] = True   # an L shape
  skeleton = sparse_labels.thin(mask)
  regions = naive_regions(skeleton.astype(np.uint8), 1)
  assert len(regions) == 1
  assert len(regions[0]) >= 40


def test_scribble_length_is_fraction_of_skeleton():
  dense = np.zeros((20, 60), np.uint8)
  dense[6:13, 5:55] = 1
  skeleton_length = int(sparse_labels.thin(dense == 1).sum())
  for fraction in (0.25, 0.5, 1.0):
    sparse = sparse_labels.generate(dense, f'scribbles:{fraction}:erode=0',
                                    seed=1, image_id='s')
    assert (sparse == 1).sum() == max(1, round(fraction * skeleton_length))
    pieces = naive_regions((sparse == 1).astype(np.uint8), 1)
    assert len(pieces) == 1   # a connected scribble


def test_stats_and_overlay():
  dense = make_dense()
  sparse = sparse_labels.generate(dense, 'points:1', seed=0, image_id='o')
  stats = sparse_labels.SparseStats(5)
  stats.add(sparse, dense)
  result = stats.to_dict()
  assert result['labeled_pixels'] == int((sparse != 255).sum())
  assert result['labeled_fraction'] == pytest.approx(
      (sparse != 255).sum() / sparse.size)
  assert result['classes_covered'] == 5
  assert result['image_class_coverage'] == 1.0
  image = np.full(dense.shape + (3,), 200, np.uint8)
  shown = sparse_labels.overlay(image, sparse)
  assert shown.shape == image.shape and shown.dtype == np.uint8
  r, c = np.argwhere(sparse != 255)[0]
  assert not np.array_equal(shown[r, c], [100, 100, 100])


def test_cli_writes_pngs_and_overlays(tmp_path, capsys):
  dense_dir = tmp_path / 'labels'
  image_dir = tmp_path / 'images'
  dense_dir.mkdir()
  image_dir.mkdir()
  raw = make_dense()
  raw[raw == 255] = 9       # a dataset whose void value is 9
  Image.fromarray(raw).save(dense_dir / 'a.png')
  Image.fromarray(np.zeros(raw.shape + (3,), np.uint8)).save(
      image_dir / 'a.jpg')
  out = tmp_path / 'out'
  code = sparse_labels.main([
      f'--dense_dir={dense_dir}', '--num_classes=5', '--void_value=9',
      '--spec=clicks:10', f'--output_dir={out}', f'--image_dir={image_dir}',
      '--overlays=1'])
  assert code == 0
  sparse = np.asarray(Image.open(out / 'a.png'))
  assert (sparse != 255).sum() == 10
  assert not (sparse[raw == 9] != 255).any()
  assert os.path.exists(out / 'overlays' / 'a.png')
  assert 'labeled fraction' in capsys.readouterr().out
