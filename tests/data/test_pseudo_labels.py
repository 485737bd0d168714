"""The pseudo-label facility (agmm_jax.data.pseudo_labels): a prepared
dataset relabeled record by record, written atomically, resumed shard by
shard after a stop, and its quality against the dense labels."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from agmm_jax.data import input_pipeline
from agmm_jax.data import labels as labels_lib
from agmm_jax.data import pseudo_labels
from agmm_jax.data import tfrecord
from tests import fixtures

NUM_CLASSES = 4


class Stopped(Exception):
  pass


def diagonal_labels(images, label):
  """A stand-in model: class ``(y + x) % K`` on every real pixel; images
  must be ImageNet-normalized (zero where padded)."""
  assert images.dtype == np.float32 and images.shape[:3] == label.shape
  y, x = np.indices(label.shape[1:])
  return np.where(label != labels_lib.PADDING, (y + x) % NUM_CLASSES, labels_lib.PADDING)


def source_records(data_dir, split='train'):
  metadata = input_pipeline.read_metadata(data_dir)
  return [record for shard in metadata['splits'][split]['shards']
          for record in tfrecord.read_all_records(os.path.join(data_dir, shard))]


def written_records(folder):
  metadata = input_pipeline.read_metadata(folder)
  return [record for shard in metadata['splits']['train']['shards']
          for record in tfrecord.read_all_records(os.path.join(folder, shard))]


def test_written_dataset_is_the_source_with_new_sparse_labels(tmp_path):
  data_dir = fixtures.make_folder_dataset_tfrecords(tmp_path, num_classes=NUM_CLASSES)
  target = str(tmp_path / 'pseudo')
  calls = []

  def label_batch(images, label):
    calls.append(len(images))
    return diagonal_labels(images, label)

  assert pseudo_labels.write(target, data_dir=data_dir, split='train', label_kind='sparse',
                             batch_size=4, label_batch=label_batch) == target
  assert calls == [4, 4]   # 6 records, padded to whole batches
  assert sorted(os.listdir(tmp_path)) == ['folder_source', 'prepared', 'pseudo']
  metadata = input_pipeline.read_metadata(target)
  assert list(metadata['splits']) == ['train']
  info = metadata['splits']['train']
  assert info['num_examples'] == 6 and info['has_sparse'] is True
  assert metadata['num_classes'] == NUM_CLASSES
  for source, written in zip(source_records(data_dir), written_records(target), strict=True):
    before, after = tfrecord.decode_example(source), tfrecord.decode_example(written)
    sparse = np.asarray(Image.open(io.BytesIO(after['label/sparse/encoded'])))
    height, width = sparse.shape
    y, x = np.indices((height, width))
    np.testing.assert_array_equal(sparse, (y + x) % NUM_CLASSES)
    assert {k: v for k, v in before.items() if k != 'label/sparse/encoded'} == {
        k: v for k, v in after.items() if k != 'label/sparse/encoded'}
  # Complete: a second call reads nothing and calls nothing.
  pseudo_labels.write(target, data_dir=data_dir, split='train', label_kind='sparse',
                      batch_size=4, label_batch=None)


def test_a_stopped_pass_keeps_its_complete_shards_and_resumes(tmp_path):
  data_dir = fixtures.make_folder_dataset_tfrecords(tmp_path, num_classes=NUM_CLASSES)
  target = str(tmp_path / 'pseudo')
  batches = []

  def label_batch(images, label):
    batches.append(len(images))
    return diagonal_labels(images, label)

  def stop_after_two():
    if len(batches) == 2:
      raise Stopped()

  kwargs = dict(data_dir=data_dir, split='train', label_kind='dense', batch_size=2,
                records_per_shard=2)
  with pytest.raises(Stopped):
    pseudo_labels.write(target, label_batch=label_batch, stop=stop_after_two, **kwargs)
  assert not os.path.exists(target)
  partial = target + '.tmp'
  complete = sorted(n for n in os.listdir(partial) if n.endswith('.tfrecord'))
  assert complete == ['train-00000-of-00003.tfrecord']   # shard 1 stopped mid-way
  kept = os.path.getmtime(os.path.join(partial, complete[0]))
  batches.clear()
  pseudo_labels.write(target, label_batch=label_batch, **kwargs)
  assert batches == [2, 2]   # shards 1 and 2 only
  assert not os.path.exists(partial)
  assert os.path.getmtime(os.path.join(target, complete[0])) == kept
  assert input_pipeline.read_metadata(target)['splits']['train']['shards'] == [
      f'train-0000{i}-of-00003.tfrecord' for i in range(3)]
  reference = str(tmp_path / 'reference')
  pseudo_labels.write(reference, data_dir=data_dir, split='train', label_kind='dense',
                      batch_size=4, label_batch=diagonal_labels)
  assert written_records(target) == written_records(reference)


def test_a_partial_folder_of_another_plan_is_started_over(tmp_path):
  data_dir = fixtures.make_folder_dataset_tfrecords(tmp_path, num_classes=NUM_CLASSES)
  target = str(tmp_path / 'pseudo')
  os.makedirs(target + '.tmp')
  with open(os.path.join(target + '.tmp', 'train-00000-of-00001.tfrecord'), 'wb') as f:
    f.write(b'left by another pass')
  pseudo_labels.write(target, data_dir=data_dir, split='train', label_kind='sparse',
                      batch_size=3, label_batch=diagonal_labels)
  assert len(written_records(target)) == 6


def test_pseudo_label_quality_counts_every_pixel(tmp_path):
  """The quality measure (benchmarks/pseudo_label_quality prints it) on a
  prepared folder whose sparse labels (points, a subset of the dense ones)
  stand for pseudo-labels: the confusion is diagonal and its counts equal a
  per-pixel count of the PNGs."""
  data_dir = fixtures.make_folder_dataset_tfrecords(tmp_path, num_shards=1)
  confusion, pseudo_labeled, dense_labeled = (
      pseudo_labels.confusion_with_dense(data_dir))
  expected = np.zeros_like(confusion)
  expected_dense = 0
  for data in tfrecord.read_all_records(
      os.path.join(data_dir, 'train-00000-of-00001.tfrecord')):
    example = tfrecord.decode_example(data)
    dense, sparse = (np.asarray(Image.open(io.BytesIO(example[
        f'label/{kind}/encoded']))) for kind in ('dense', 'sparse'))
    for true_class, pseudo_class in zip(dense.ravel(), sparse.ravel()):
      expected_dense += int(true_class != 255)
      if true_class != 255 and pseudo_class != 255:
        expected[true_class, pseudo_class] += 1
  np.testing.assert_array_equal(confusion, expected)
  assert pseudo_labeled == expected.sum() > 0
  assert np.count_nonzero(confusion - np.diag(np.diag(confusion))) == 0
  assert dense_labeled == expected_dense > pseudo_labeled


def test_label_png_codec_round_trips_and_stores_unlabeled_as_255():
  label = np.array([[0, 3, labels_lib.UNLABELED], [labels_lib.PADDING, 1, 2]], np.int32)
  stored = labels_lib.to_stored(label)
  np.testing.assert_array_equal(stored, [[0, 3, 255], [255, 1, 2]])
  assert stored.dtype == np.uint8
  encoded = labels_lib.encode_png(stored)
  assert encoded.startswith(b'\x89PNG')
  np.testing.assert_array_equal(labels_lib.decode_png(encoded), stored)
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encoded))), stored)
