"""Tests of agmm_jax.storage.summary: events are read back with TensorBoard's own
EventAccumulator (no TensorFlow involved)."""

import io
import logging as std_logging
import sys

import ml_collections
import numpy as np
from PIL import Image
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from agmm_jax.storage import summary


def load_events(logdir):
  accumulator = event_accumulator.EventAccumulator(
      str(logdir), size_guidance={event_accumulator.TENSORS: 0,
                                  event_accumulator.SCALARS: 0})
  accumulator.Reload()
  return accumulator


@pytest.fixture(scope='module')
def written(tmp_path_factory):
  """Writes scalars, images, text, histograms and hparams once."""
  logdir = tmp_path_factory.mktemp('events')
  rng = np.random.default_rng(0)
  images_uint8 = rng.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
  image_float = rng.random((4, 6, 1))
  histogram_values = rng.normal(size=1000)
  writer = summary.create_default_writer(str(logdir), just_logging=False)
  with writer:
    writer.write_hparams(ml_collections.ConfigDict(
        {'lr': 0.01, 'model': {'depth': 101}, 'scales': (0.5, 1.0)}))
    writer.write_scalars(1, {'loss': 0.5, 'miou': np.float32(0.25)})
    writer.write_scalars(7, {'loss': np.array(0.125)})
    writer.write_images(7, {'pairs': images_uint8, 'gray': image_float})
    writer.write_texts(7, {'table': 'mIoU | 50.0'})
    writer.write_histograms(7, {'weights': histogram_values},
                            num_buckets={'weights': 10})
  return dict(events=load_events(logdir), images_uint8=images_uint8,
              image_float=image_float, histogram_values=histogram_values)


def test_scalars_read_back_with_steps(written):
  loss = written['events'].Scalars('loss')
  assert [(e.step, e.value) for e in loss] == [(1, 0.5), (7, 0.125)]
  assert [(e.step, e.value) for e in written['events'].Scalars('miou')] == [
      (1, 0.25)]


def test_images_decode_to_the_written_pixels(written):
  (event,) = written['events'].Tensors('pairs')
  assert event.step == 7
  width, height, *pngs = tensor_util.make_ndarray(event.tensor_proto)
  assert (int(width), int(height)) == (7, 5)
  decoded = np.stack([np.asarray(Image.open(io.BytesIO(png))) for png in pngs])
  np.testing.assert_array_equal(decoded, written['images_uint8'])
  (gray,) = written['events'].Tensors('gray')
  _, _, png = tensor_util.make_ndarray(gray.tensor_proto)
  np.testing.assert_array_equal(
      np.asarray(Image.open(io.BytesIO(png))),
      np.round(written['image_float'][..., 0] * 255).astype(np.uint8))


def test_text_histogram_and_hparams_are_written(written):
  events = written['events']
  (text,) = events.Tensors('table')
  assert tensor_util.make_ndarray(text.tensor_proto).item() == b'mIoU | 50.0'
  (histogram,) = events.Histograms('weights')
  values = written['histogram_values']
  counts, edges = np.histogram(values, bins=10)
  np.testing.assert_allclose(histogram.histogram_value.bucket, counts)
  np.testing.assert_allclose(histogram.histogram_value.bucket_limit, edges[1:])
  assert histogram.histogram_value.num == values.size
  assert '_hparams_/session_start_info' in events.Tags()['tensors']
  assert sys.modules.get('tensorflow') is None


def test_just_logging_writes_no_event_files(tmp_path):
  writer = summary.create_default_writer(str(tmp_path / 'logs'),
                                         just_logging=True)
  writer.write_scalars(0, {'loss': 1.0})
  writer.close()
  assert not (tmp_path / 'logs').exists()


def test_bad_images_and_scalars_are_rejected(tmp_path):
  writer = summary.SummaryWriter(str(tmp_path))
  with pytest.raises(ValueError, match="image 'x'"):
    writer.write_images(0, {'x': np.zeros((2, 3, 4, 2))})
  with pytest.raises(ValueError, match="scalar 'y'"):
    writer.write_scalars(0, {'y': np.zeros(3)})
  writer.close()


class FakeClock:

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


class RecordingWriter(summary.LoggingWriter):

  def __init__(self):
    super().__init__()
    self.scalars = []

  def write_scalars(self, step, scalars):
    self.scalars.append((step, dict(scalars)))


def test_report_progress_rates_eta_and_paused_time():
  clock = FakeClock()
  writer = RecordingWriter()
  report = summary.ReportProgress(1000, writer=writer, every_steps=10,
                                  every_secs=None, global_batch_size=16,
                                  time_fn=clock)
  assert report(0) is None
  clock.now += 2.0
  assert report(5) is None  # not due yet
  clock.now += 2.0
  with report.paused():  # 1 s of evaluation must not count
    clock.now += 1.0
  result = report(10)
  np.testing.assert_allclose(result['steps_per_sec'], 10 / 4.0)
  np.testing.assert_allclose(result['images_per_sec'], 16 * 10 / 4.0)
  np.testing.assert_allclose(result['eta_secs'], 990 / 2.5)
  assert writer.scalars == [(10, {'steps_per_sec': 2.5,
                                  'images_per_sec': 40.0})]
  clock.now += 10.0
  np.testing.assert_allclose(report(20)['steps_per_sec'], 1.0)


def test_report_progress_every_secs_and_log_line(caplog):
  clock = FakeClock()
  report = summary.ReportProgress(100, every_steps=None, every_secs=30.0,
                                  time_fn=clock)
  report(0)
  clock.now += 29.0
  assert report(3) is None
  clock.now += 1.0
  caplog.set_level(std_logging.INFO, logger='absl')
  result = report(6)
  np.testing.assert_allclose(result['steps_per_sec'], 6 / 30.0)
  assert 'images_per_sec' not in result
  assert any('step 6/100' in message and 'ETA 7m50s' in message
             for message in caplog.messages)
