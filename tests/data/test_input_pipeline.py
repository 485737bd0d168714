"""Tests of agmm_jax.data.input_pipeline on tiny synthetic TFRecord datasets."""

import io
import json
import os
import pickle

import numpy as np
from PIL import Image
import pytest

from agmm_jax.data import augment
from agmm_jax.data import input_pipeline
from agmm_jax.data import labels
from agmm_jax.data import tfrecord
from tests import fixtures

NUM_EXAMPLES = 10  # Example i is the only one whose labels use class i.
NUM_CLASSES = NUM_EXAMPLES
CROP = 12


def _png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG')
  return buffer.getvalue()


def _example_arrays(i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Image, sparse and dense stored labels of example ``i`` (sizes vary).

  Sparse: a 2x2 block of class ``i`` in the top-left corner, the rest 255.
  Dense: class ``(i + 1) % K`` everywhere except a void (255) first row.
  """
  height, width = 14 + i % 3, 18 + (i % 4) * 2
  rng = np.random.default_rng(i)
  image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  sparse = np.full((height, width), labels.STORED_UNLABELED, np.uint8)
  sparse[:2, :2] = i
  dense = np.full((height, width), (i + 1) % NUM_CLASSES, np.uint8)
  dense[0] = labels.STORED_UNLABELED
  return image, sparse, dense


def _write_dataset(data_dir, examples, split='train', num_shards=3):
  """Writes ``examples`` [(id, image, sparse, dense)] as a prepared split."""
  os.makedirs(data_dir, exist_ok=True)
  shards = [f'{split}-{s:05d}-of-{num_shards:05d}.tfrecord'
            for s in range(num_shards)]
  writers = [tfrecord.TFRecordWriter(os.path.join(data_dir, name))
             for name in shards]
  for k, (example_id, image, sparse, dense) in enumerate(examples):
    writers[k % num_shards].write(tfrecord.encode_example({
        'image/encoded': _png(image), 'image/id': example_id,
        'image/height': image.shape[0], 'image/width': image.shape[1],
        'label/sparse/encoded': _png(sparse),
        'label/dense/encoded': _png(dense)}))
  for writer in writers:
    writer.close()
  metadata_path = os.path.join(data_dir, 'metadata.json')
  metadata = {'classes': [f'c{k}' for k in range(NUM_CLASSES)],
              'num_classes': NUM_CLASSES, 'splits': {}}
  if os.path.exists(metadata_path):
    with open(metadata_path) as f:
      metadata = json.load(f)
  metadata['splits'][split] = {'num_examples': len(examples),
                               'shards': shards, 'has_sparse': True,
                               'has_dense': True}
  with open(metadata_path, 'w') as f:
    json.dump(metadata, f)
  # The shards' records in source order: shard by shard.
  return [examples[k] for s in range(num_shards)
          for k in range(s, len(examples), num_shards)]


class DataConfig:
  """The fields of ``config.data`` the pipeline reads."""

  def __init__(self, data_dir, **overrides):
    self.dir = str(data_dir)
    self.train_split = 'train'
    self.eval_split = 'val'
    self.train_labels = 'sparse'
    self.crop_size = CROP
    self.scale_range = (0.5, 2.0)
    self.augment = 'basic'
    self.eval_canvas = (20, 28)
    self.num_threads = 2
    self.prefetch = 2
    for name, value in overrides.items():
      setattr(self, name, value)


@pytest.fixture(scope='module')
def dataset_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('data')
  examples = [(f'ex{i}', *_example_arrays(i)) for i in range(NUM_EXAMPLES)]
  _write_dataset(data_dir, examples, 'train')
  val = _write_dataset(data_dir, examples[:7], 'val', num_shards=2)
  return data_dir, val


def _example_ids(batch) -> list[int]:
  """Which example each batch row is (its one sparse class)."""
  present = batch['class_present']
  assert (present.sum(axis=1) == 1).all()
  return present.argmax(axis=1).tolist()


def _take(iterator, num_batches):
  return [next(iterator) for _ in range(num_batches)]


def test_read_metadata_errors(tmp_path):
  with pytest.raises(ValueError, match='metadata.json: dataset metadata not'):
    input_pipeline.read_metadata(tmp_path)
  (tmp_path / 'metadata.json').write_text('{not json')
  with pytest.raises(ValueError, match='metadata.json: unreadable'):
    input_pipeline.read_metadata(tmp_path)
  (tmp_path / 'metadata.json').write_text('{"num_classes": 3, "splits": {}}')
  with pytest.raises(ValueError, match='splits must be a non-empty'):
    input_pipeline.read_metadata(tmp_path)


def test_train_batch_shapes_and_values(dataset_dir):
  data_dir, _ = dataset_dir
  iterator = input_pipeline.create_train_iterator(
      DataConfig(data_dir), batch_size_per_process=4, seed=0)
  for batch in _take(iterator, 3):
    assert batch['image'].shape == (4, CROP, CROP, 3)
    assert batch['image'].dtype == np.float32
    assert batch['label'].shape == (4, CROP, CROP)
    assert batch['label'].dtype == np.int32
    assert batch['class_present'].shape == (4, NUM_CLASSES)
    assert batch['class_present'].dtype == np.float32
    for row, example in zip(batch['label'], _example_ids(batch)):
      # Only the example's own class, unlabeled or padding can occur.
      assert set(np.unique(row)) <= {example, labels.UNLABELED,
                                     labels.PADDING}
    # Padding pixels carry the normalized black of the official code.
    padded = batch['label'] == labels.PADDING
    black = augment.normalize(np.zeros(3, np.uint8))
    np.testing.assert_allclose(batch['image'][padded],
                               np.broadcast_to(black, (padded.sum(), 3)),
                               atol=1e-6)


def test_epochs_reshuffle_and_restart_is_identical(dataset_dir):
  data_dir, _ = dataset_dir
  config = DataConfig(data_dir)
  epoch_batches = NUM_EXAMPLES // 2
  first = _take(input_pipeline.create_train_iterator(
      config, batch_size_per_process=2, seed=3), 3 * epoch_batches)
  orders = [sum((_example_ids(b) for b in
                 first[e * epoch_batches:(e + 1) * epoch_batches]), [])
            for e in range(3)]
  for order in orders:
    assert sorted(order) == list(range(NUM_EXAMPLES))  # Each epoch is whole.
  assert orders[0] != orders[1] and orders[1] != orders[2]
  again = _take(input_pipeline.create_train_iterator(
      config, batch_size_per_process=2, seed=3), 3 * epoch_batches)
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  other_seed = _take(input_pipeline.create_train_iterator(
      config, batch_size_per_process=2, seed=4), epoch_batches)
  assert sum((_example_ids(b) for b in other_seed), []) != orders[0]


def test_restored_state_resumes_exactly(dataset_dir):
  data_dir, _ = dataset_dir
  config = DataConfig(data_dir, num_threads=1)
  iterator = input_pipeline.create_train_iterator(
      config, batch_size_per_process=3, seed=7)
  _take(iterator, 2)
  state = iterator.get_state()
  expected = _take(iterator, 4)  # Crosses the epoch boundary.
  fresh = input_pipeline.create_train_iterator(
      DataConfig(data_dir, num_threads=2), batch_size_per_process=3, seed=7)
  fresh.set_state(state)
  for a, b in zip(expected, _take(fresh, 4)):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize('process_count', [2, 3])
def test_process_slices_are_disjoint_and_cover(dataset_dir, process_count):
  data_dir, _ = dataset_dir
  config = DataConfig(data_dir)
  single = _take(input_pipeline.create_train_iterator(
      config, batch_size_per_process=1, seed=5), NUM_EXAMPLES)
  stream = [_example_ids(b)[0] for b in single]
  seen = []
  for process in range(process_count):
    positions = range(process, NUM_EXAMPLES, process_count)
    batches = _take(input_pipeline.create_train_iterator(
        config, batch_size_per_process=1, seed=5, process_index=process,
        process_count=process_count), len(positions))
    ids = [_example_ids(b)[0] for b in batches]
    # Process p reads stream positions p, p + P, ... with the same crops.
    assert ids == [stream[k] for k in positions]
    for k, batch in zip(positions, batches):
      np.testing.assert_array_equal(batch['image'], single[k]['image'])
    seen += ids
  assert sorted(seen) == list(range(NUM_EXAMPLES))


def test_dense_train_labels(dataset_dir):
  data_dir, _ = dataset_dir
  iterator = input_pipeline.create_train_iterator(
      DataConfig(data_dir, train_labels='dense'), batch_size_per_process=5,
      seed=0)
  sparse_iterator = input_pipeline.create_train_iterator(
      DataConfig(data_dir), batch_size_per_process=5, seed=0)
  batch, sparse_batch = next(iterator), next(sparse_iterator)
  # Same shuffle; the dense map of example i is class (i + 1) % K.
  dense_classes = [(i + 1) % NUM_CLASSES for i in _example_ids(sparse_batch)]
  assert batch['class_present'].argmax(axis=1).tolist() == dense_classes
  assert (batch['class_present'].sum(axis=1) == 1).all()
  for row, cls in zip(batch['label'], dense_classes):
    assert set(np.unique(row)) <= {cls, labels.UNLABELED, labels.PADDING}
    assert (row == cls).any()


def test_voc_augment_runs_and_is_deterministic(dataset_dir):
  data_dir, _ = dataset_dir
  config = DataConfig(data_dir, augment='voc')
  a = _take(input_pipeline.create_train_iterator(
      config, batch_size_per_process=5, seed=1), 2)
  b = _take(input_pipeline.create_train_iterator(
      DataConfig(data_dir, augment='voc', num_threads=1),
      batch_size_per_process=5, seed=1), 2)
  basic = _take(input_pipeline.create_train_iterator(
      DataConfig(data_dir), batch_size_per_process=5, seed=1), 2)
  for x, y, z in zip(a, b, basic):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], z['label'])  # Same geometry.
    assert np.isfinite(x['image']).all()
  assert not np.array_equal(a[0]['image'], basic[0]['image'])


def _unnormalize(image):
  return np.rint((image - augment._NORM_OFFSET) / augment._NORM_SCALE)


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_batches(dataset_dir, process_count):
  data_dir, val = dataset_dir
  config = DataConfig(data_dir)
  batch_size = 2
  num_batches = input_pipeline.eval_num_batches(
      len(val), batch_size_per_process=batch_size,
      process_count=process_count)
  assert num_batches == -(-len(val) // (batch_size * process_count))
  seen = []
  for process in range(process_count):
    batches = list(input_pipeline.create_eval_iterator(
        config, 'val', batch_size_per_process=batch_size,
        process_index=process, process_count=process_count))
    assert len(batches) == num_batches
    for batch in batches:
      assert batch['image'].shape == (batch_size, 20, 28, 3)
      assert batch['label'].shape == (batch_size, 20, 28)
      assert batch['label'].dtype == np.int32
      assert batch['height'].dtype == np.int32
      for k in range(batch_size):
        example_id = str(batch['id'][k])
        if not example_id:  # Filler.
          assert batch['height'][k] == 0 and batch['width'][k] == 0
          assert (batch['label'][k] == labels.PADDING).all()
          assert (batch['image'][k] == 0).all()
          continue
        seen.append(example_id)
        _, image, _, dense = next(e for e in val if e[0] == example_id)
        h, w = dense.shape
        assert (batch['height'][k], batch['width'][k]) == (h, w)
        np.testing.assert_array_equal(
            batch['label'][k][:h, :w],
            labels.from_stored(dense, NUM_CLASSES))
        assert (batch['label'][k][h:] == labels.PADDING).all()
        assert (batch['label'][k][:, w:] == labels.PADDING).all()
        np.testing.assert_array_equal(
            _unnormalize(batch['image'][k][:h, :w]), image)
        assert (batch['image'][k][h:] == 0).all()
  assert sorted(seen) == sorted(e[0] for e in val)


def test_eval_canvas_is_checked_at_creation_or_sized_from_the_data(dataset_dir):
  data_dir, val = dataset_dir
  # The largest val image, from the examples written (metadata has no sizes,
  # so the pipeline reads them from the records).
  largest = (max(e[1].shape[0] for e in val), max(e[1].shape[1] for e in val))
  with pytest.raises(ValueError, match=(
      r'^config.data.eval_canvas=\(15, 40\) is smaller than the largest image '
      rf'\({largest[0]}x{largest[1]}\) of split .val.')):
    input_pipeline.create_eval_iterator(
        DataConfig(data_dir, eval_canvas=(15, 40)), 'val',
        batch_size_per_process=2)
  assert input_pipeline.eval_canvas(DataConfig(data_dir, eval_canvas=()),
                                    'val') == largest
  batch = next(iter(input_pipeline.create_eval_iterator(
      DataConfig(data_dir, eval_canvas=()), 'val', batch_size_per_process=2)))
  assert batch['image'].shape[1:3] == largest


def test_eval_canvas_reads_image_sizes_from_metadata(tmp_path):
  examples = [(f'ex{i}', *_example_arrays(i)) for i in range(3)]
  _write_dataset(tmp_path, examples, 'val', num_shards=1)
  with open(tmp_path / 'metadata.json') as f:
    metadata = json.load(f)
  # Sizes recorded by data_prep win over the records (never read here).
  metadata['splits']['val'].update(max_height=70, max_width=90)
  with open(tmp_path / 'metadata.json', 'w') as f:
    json.dump(metadata, f)
  assert input_pipeline.eval_canvas(DataConfig(tmp_path, eval_canvas=()),
                                    'val') == (70, 90)


def test_corrupt_record_names_shard_and_record(tmp_path):
  examples = [(f'ex{i}', *_example_arrays(i)) for i in range(4)]
  _write_dataset(tmp_path, examples, 'train', num_shards=1)
  shard = tmp_path / 'train-00000-of-00001.tfrecord'
  index = tfrecord.index_shard(shard)
  data = bytearray(shard.read_bytes())
  data[int(index[2, 0]) + 5] ^= 0xFF  # A data byte of record 2.
  shard.write_bytes(bytes(data))
  iterator = input_pipeline.create_train_iterator(
      DataConfig(tmp_path, num_threads=1), batch_size_per_process=4, seed=0)
  with pytest.raises(Exception, match=r'train-00000-of-00001.tfrecord: '
                     r'record 2: data CRC mismatch'):
    next(iterator)
  shard.write_bytes(bytes(data[:-3]))  # Truncate the last record.
  with pytest.raises(tfrecord.TFRecordError,
                     match=r'train-00000-of-00001.tfrecord: record 3: trunc'):
    input_pipeline.create_train_iterator(
        DataConfig(tmp_path), batch_size_per_process=4, seed=0)


def test_missing_split_and_labels(dataset_dir, tmp_path):
  data_dir, _ = dataset_dir
  with pytest.raises(ValueError, match="no split 'test'"):
    input_pipeline.create_eval_iterator(DataConfig(data_dir), 'test',
                                        batch_size_per_process=1)
  examples = [(f'ex{i}', *_example_arrays(i)) for i in range(2)]
  _write_dataset(tmp_path, examples, 'train', num_shards=1)
  metadata_path = tmp_path / 'metadata.json'
  metadata = json.loads(metadata_path.read_text())
  metadata['splits']['train']['has_sparse'] = False
  metadata_path.write_text(json.dumps(metadata))
  with pytest.raises(ValueError, match="'train' has no sparse labels"):
    input_pipeline.create_train_iterator(
        DataConfig(tmp_path), batch_size_per_process=1, seed=0)


def test_load_image_for_predict(tmp_path):
  image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), np.uint8)
  Image.fromarray(image).save(tmp_path / 'a.png')
  loaded = input_pipeline.load_image_for_predict(tmp_path / 'a.png')
  mean = np.array([0.485, 0.456, 0.406])
  std = np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(loaded, (image / 255.0 - mean) / std, atol=1e-5)
  assert loaded.dtype == np.float32
  (tmp_path / 'b.png').write_bytes(b'not an image')
  with pytest.raises(ValueError, match='b.png: not a readable image'):
    input_pipeline.load_image_for_predict(tmp_path / 'b.png')


def test_grain_orbax_checkpoint_handler_round_trip(dataset_dir, tmp_path):
  grain_checkpoint = pytest.importorskip('grain.checkpoint')
  from etils import epath  # pylint: disable=g-import-not-at-top
  data_dir, _ = dataset_dir
  config = DataConfig(data_dir)
  iterator = input_pipeline.create_train_iterator(
      config, batch_size_per_process=3, seed=2)
  _take(iterator, 3)
  handler = grain_checkpoint.CheckpointHandler()
  handler.save(epath.Path(tmp_path), args=grain_checkpoint.CheckpointSave(
      iterator))
  expected = _take(iterator, 2)
  fresh = input_pipeline.create_train_iterator(
      config, batch_size_per_process=3, seed=2)
  restored = handler.restore(
      epath.Path(tmp_path), args=grain_checkpoint.CheckpointRestore(fresh))
  for a, b in zip(expected, _take(restored, 2)):
    np.testing.assert_array_equal(a['image'], b['image'])


def test_reads_the_folder_converter_output(tmp_path):
  data_dir = fixtures.make_folder_dataset_tfrecords(
      tmp_path, num_train=4, num_val=3, num_classes=4)
  metadata = input_pipeline.read_metadata(data_dir)
  config = DataConfig(data_dir, crop_size=16,
                      eval_canvas=(fixtures.HEIGHT, fixtures.WIDTH))
  batch = next(input_pipeline.create_train_iterator(
      config, batch_size_per_process=2, seed=0))
  assert batch['class_present'].shape == (2, metadata['num_classes'])
  assert set(np.unique(batch['label'])) <= set(range(4)) | {
      labels.UNLABELED, labels.PADDING}
  # Eval labels are the converter's dense labels, decoded independently.
  source = input_pipeline.TFRecordSource(
      [os.path.join(data_dir, s) for s in metadata['splits']['val']['shards']])
  truth = {}
  for k in range(len(source)):
    example = tfrecord.decode_example(source[k].data)
    stored = np.asarray(Image.open(io.BytesIO(
        example['label/dense/encoded'])))
    truth[example['image/id'].decode()] = labels.from_stored(stored, 4)
  seen = 0
  for batch in input_pipeline.create_eval_iterator(
      config, 'val', batch_size_per_process=2):
    for k, example_id in enumerate(batch['id']):
      if example_id:
        seen += 1
        h, w = truth[example_id].shape
        np.testing.assert_array_equal(batch['label'][k][:h, :w],
                                      truth[example_id])
  assert seen == 3


def test_source_reads_records_in_shard_order_and_pickles(dataset_dir):
  data_dir, _ = dataset_dir
  metadata = input_pipeline.read_metadata(data_dir)
  paths = [os.path.join(data_dir, s)
           for s in metadata['splits']['train']['shards']]
  source = input_pipeline.TFRecordSource(paths)
  expected = [(path, k, record) for path in paths
              for k, record in enumerate(tfrecord.read_all_records(path))]
  assert len(source) == len(expected) == NUM_EXAMPLES
  assert source[0].data  # Opens a file handle; it must not be pickled.
  copy = pickle.loads(pickle.dumps(source))
  for key, (path, k, record) in enumerate(expected):
    assert source[key] == (record, f'{path}: record {k}')
    assert copy[key] == source[key]
