"""Predict mode reads images as viewers show them (any bit depth and mode,
EXIF orientation) and walks subfolders, mirroring them in its output."""

import os

import numpy as np
from PIL import Image
import pytest

from agmm_jax.data import input_pipeline
from configs import tiny
import main

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
# EXIF tag 0x0112 value 6: the stored pixels are shown turned 90 degrees
# clockwise.
ORIENTATION_TAG, TURNED_CLOCKWISE = 0x0112, 6


def normalized(rgb8: np.ndarray) -> np.ndarray:
  return (rgb8 / 255.0 - MEAN) / STD


def turned_photo(path, stored: np.ndarray) -> None:
  exif = Image.Exif()
  exif[ORIENTATION_TAG] = TURNED_CLOCKWISE
  Image.fromarray(stored).save(path, exif=exif.tobytes())


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
  grey16 = np.random.default_rng(0).integers(0, 65536, (6, 9), np.uint16)
  Image.fromarray(grey16).save(tmp_path / 'g.png')
  with Image.open(tmp_path / 'g.png') as image:
    assert image.mode.startswith('I')  # What the test is about.
  loaded = input_pipeline.load_image_for_predict(tmp_path / 'g.png')
  grey8 = np.floor(grey16 / 65535.0 * 255.0 + 0.5)
  np.testing.assert_allclose(loaded, normalized(np.stack([grey8] * 3, -1)),
                             atol=1e-5)


@pytest.mark.parametrize('mode', ['L', 'P', 'RGBA', 'LA', 'CMYK', '1'])
def test_8_bit_modes_are_their_rgb(tmp_path, mode):
  rgb = np.random.default_rng(1).integers(0, 256, (5, 7, 3), np.uint8)
  image = Image.fromarray(rgb).convert(mode)
  path = tmp_path / ('a.jpg' if mode == 'CMYK' else 'a.png')
  image.save(path)
  with Image.open(path) as saved:
    expected = np.asarray(saved.convert('RGB'))
  np.testing.assert_allclose(input_pipeline.load_image_for_predict(path),
                             normalized(expected), atol=1e-5)


def test_exif_orientation_is_applied(tmp_path):
  stored = np.random.default_rng(2).integers(0, 256, (4, 6, 3), np.uint8)
  turned_photo(tmp_path / 'p.png', stored)
  loaded = input_pipeline.load_image_for_predict(tmp_path / 'p.png')
  assert loaded.shape == (6, 4, 3)
  np.testing.assert_allclose(loaded, normalized(np.rot90(stored, k=-1)),
                             atol=1e-5)


def _labels(path) -> np.ndarray:
  with Image.open(path) as label:
    return np.asarray(label)


def test_predict_walks_subfolders_and_reads_as_shown(tiny_trained_run,
                                                     tiny_data_dir, tmp_path):
  workdir, _ = tiny_trained_run
  rng = np.random.default_rng(3)
  inputs = tmp_path / 'in'
  for folder in ('sub/deeper', '.hidden', 'out'):
    (inputs / folder).mkdir(parents=True)
  rgb = rng.integers(0, 256, (20, 30, 3), np.uint8)
  Image.fromarray(rgb).save(inputs / 'plain.png')
  turned_photo(inputs / 'sub' / 'turned.png', rgb)
  Image.fromarray(np.rot90(rgb, k=-1).copy()).save(
      inputs / 'sub' / 'deeper' / 'as_shown.png')
  grey8 = rng.integers(0, 256, (20, 30), np.uint8)
  Image.fromarray(grey8.astype(np.uint16) * 257).save(inputs / 'grey16.png')
  Image.fromarray(grey8).save(inputs / 'sub' / 'grey8.png')
  Image.fromarray(rgb).save(inputs / '.hidden' / 'skipped.png')
  Image.fromarray(rgb).save(inputs / 'out' / 'old_output.png')
  config = tiny.get_config()
  config.data.dir = tiny_data_dir
  config.mode = 'predict'
  config.predict.input_dir = str(inputs)
  config.predict.output_dir = str(inputs / 'out')  # Inside: not walked.
  written = main.run(config, workdir)
  out = inputs / 'out'
  assert sorted(os.path.relpath(p, out) for p in written) == [
      'grey16.png', 'plain.png', 'sub/deeper/as_shown.png', 'sub/grey8.png',
      'sub/turned.png']
  assert os.path.isfile(out / 'sub' / 'deeper' / 'as_shown_overlay.jpg')
  np.testing.assert_array_equal(_labels(out / 'sub' / 'turned.png'),
                                _labels(out / 'sub' / 'deeper' / 'as_shown.png'))
  np.testing.assert_array_equal(_labels(out / 'grey16.png'),
                                _labels(out / 'sub' / 'grey8.png'))
