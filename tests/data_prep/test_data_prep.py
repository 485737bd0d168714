"""Tests of the converters (folder, VOC, Cityscapes) on exact-layout data."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from agmm_jax.data import tfrecord
from data_prep import cityscapes
from data_prep import common
from data_prep import folder
from data_prep import voc
from tests import fixtures

# labelId -> trainId of the 19 Cityscapes classes; every other id is void.
CITYSCAPES_TRAIN_IDS = {
    'road': (7, 0), 'sidewalk': (8, 1), 'building': (11, 2), 'wall': (12, 3),
    'fence': (13, 4), 'pole': (17, 5), 'traffic light': (19, 6),
    'traffic sign': (20, 7), 'vegetation': (21, 8), 'terrain': (22, 9),
    'sky': (23, 10), 'person': (24, 11), 'rider': (25, 12), 'car': (26, 13),
    'truck': (27, 14), 'bus': (28, 15), 'train': (31, 16),
    'motorcycle': (32, 17), 'bicycle': (33, 18)}


def read_split(data_dir: str, split: str) -> dict[str, dict]:
  """{image id: decoded example} via the TFRecord reader; checks metadata."""
  with open(os.path.join(data_dir, 'metadata.json')) as f:
    metadata = json.load(f)
  examples = {}
  for shard in metadata['splits'][split]['shards']:
    for record in tfrecord.read_all_records(os.path.join(data_dir, shard)):
      example = tfrecord.decode_example(record)
      examples[example['image/id'].decode()] = example
  assert len(examples) == metadata['splits'][split]['num_examples']
  return examples


def label(example, kind):
  return common.decode_png(example[f'label/{kind}/encoded'])


def image(example):
  return np.asarray(Image.open(io.BytesIO(example['image/encoded'])))


@pytest.fixture(scope='module')
def folder_root(tmp_path_factory):
  return fixtures.make_folder_root(tmp_path_factory.mktemp('folder'))


@pytest.fixture(scope='module')
def folder_dataset(folder_root, tmp_path_factory):
  root, _ = folder_root
  output = str(tmp_path_factory.mktemp('out') / 'ds')
  code = folder.main([f'--root={root}', '--void_value=4',
                      '--sparse=points:1:margin=1', f'--output={output}',
                      '--num_shards=2', '--overlays=2', '--no_progress'])
  assert code == 0
  return output


def test_folder_round_trip_is_lossless(folder_root, folder_dataset):
  root, truth = folder_root
  with open(os.path.join(folder_dataset, 'metadata.json')) as f:
    metadata = json.load(f)
  assert metadata['num_classes'] == 4
  assert metadata['classes'] == [f'class_{c}' for c in range(4)]
  assert metadata['label_convention']['stored_unlabeled'] == 255
  assert metadata['splits']['train']['shards'] == [
      'train-00000-of-00002.tfrecord', 'train-00001-of-00002.tfrecord']
  assert metadata['splits']['train']['has_sparse']
  assert not metadata['splits']['val']['has_sparse']
  assert metadata['sparse_labels']['train']['source'] == 'generated'
  assert metadata['sparse_labels']['train']['margin'] == 1
  for split in ('train', 'val'):
    examples = read_split(folder_dataset, split)
    assert sorted(examples) == sorted(truth[split])
    for image_id, example in examples.items():
      dense = label(example, 'dense')
      np.testing.assert_array_equal(dense, truth[split][image_id])
      image_path = os.path.join(root, split, 'images', image_id + '.jpg')
      with open(image_path, 'rb') as f:
        assert example['image/encoded'] == f.read()
      assert example['image/format'] == b'jpeg'
      assert example['image/height'] == [dense.shape[0]]
      assert example['image/width'] == [dense.shape[1]]
      if split == 'train':
        sparse = label(example, 'sparse')
        labeled = sparse != 255
        assert labeled.any()
        np.testing.assert_array_equal(sparse[labeled], dense[labeled])
      else:
        assert 'label/sparse/encoded' not in example
  assert len(os.listdir(os.path.join(folder_dataset, 'overlays', 'train'))) == 2


def test_folder_provided_sparse_and_no_train_dense(folder_root, tmp_path):
  root, truth = folder_root
  sparse_dir = tmp_path / 'mine'
  sparse_dir.mkdir()
  expected = {}
  for image_id, dense in truth['train'].items():
    sparse = np.full_like(dense, 255)
    sparse[::7, ::5] = dense[::7, ::5]
    raw = sparse.copy()
    raw[sparse == 255] = 9      # this user marks unlabeled with 9
    Image.fromarray(raw).save(sparse_dir / f'{image_id}.png')
    expected[image_id] = sparse
  output = str(tmp_path / 'ds')
  folder.convert_folder(root, output, void_values=(4,),
                        sparse_dir=str(sparse_dir), sparse_unlabeled_value=9,
                        train_dense=False, progress=False)
  examples = read_split(output, 'train')
  for image_id, example in examples.items():
    assert 'label/dense/encoded' not in example
    np.testing.assert_array_equal(label(example, 'sparse'), expected[image_id])
  assert 'label/dense/encoded' in next(iter(read_split(output,
                                                       'val').values()))


def test_folder_downscale(folder_root, tmp_path):
  root, truth = folder_root
  output = str(tmp_path / 'half')
  folder.convert_folder(root, output, splits=('val',), void_values=(4,),
                        downscale=2, progress=False)
  for image_id, example in read_split(output, 'val').items():
    full = truth['val'][image_id]
    np.testing.assert_array_equal(label(example, 'dense'), full[1::2, 1::2])
    assert image(example).shape == (full.shape[0] // 2, full.shape[1] // 2, 3)


def test_parallel_conversion_matches_serial(folder_root, tmp_path, monkeypatch):
  root, _ = folder_root
  # The fixture converts faster than workers start: start them anyway.
  monkeypatch.setattr(common, '_pool_pays_off', lambda *args: True)
  outputs = []
  for workers in (1, 2):
    output = str(tmp_path / f'w{workers}')
    folder.convert_folder(root, output, void_values=(4,),
                          sparse='scribbles:0.5', seed=7, num_workers=workers,
                          progress=False)
    outputs.append(output)
  for split in ('train', 'val'):
    assert read_split(outputs[0], split) == read_split(outputs[1], split)


def test_a_cheap_conversion_starts_no_workers(folder_root, tmp_path, monkeypatch):
  root, truth = folder_root

  def no_pool(self):
    raise AssertionError('a worker pool was started')
  monkeypatch.setattr(common._Pool, 'get', no_pool)
  output = str(tmp_path / 'cheap')
  folder.convert_folder(root, output, void_values=(4,), num_workers=4,
                        progress=False)
  assert sorted(read_split(output, 'val')) == sorted(truth['val'])


@pytest.mark.parametrize('seconds, done, left, pays_off', [
    (0.0, 0, 1000, False),   # nothing measured yet
    (1.0, 1, 1000, False),   # one example is not a measurement
    (1.0, 2, 21, True),      # 0.5 s each x 21 = 10.5 s > 10 s
    (1.0, 2, 20, False),     # exactly 10 s: not more than the start-up
    (0.012, 2, 333, False),  # MSRC dense: 6 ms each, 2 s left
    (0.8, 2, 466, True),     # CamVid, generated scribbles: 0.4 s each
])
def test_the_pool_starts_when_the_rest_would_outlast_its_start_up(
    seconds, done, left, pays_off):
  assert common._POOL_START_S == 10.0 and common._POOL_PROBE == 2
  assert common._pool_pays_off(seconds, done, left) == pays_off


@pytest.mark.parametrize('unlabeled', [255, 21])
@pytest.mark.parametrize('kind', ['point', 'scribble'])
def test_voc_round_trip_and_unlabeled_detection(tmp_path, unlabeled, kind):
  root, truth = fixtures.make_voc_root(tmp_path, sparse_unlabeled=unlabeled)
  output = str(tmp_path / 'voc')
  metadata = voc.convert_voc(root, output, sparse_dir=kind, progress=False)
  sparse_meta = metadata['sparse_labels']['train']
  assert sparse_meta['source'] == 'provided'
  assert sparse_meta['unlabeled_values_found'] == [unlabeled]
  assert sparse_meta['sparse_dir'].endswith(
      {'point': 'point/segcls', 'scribble': 'scribble/seginst'}[kind])
  train = read_split(output, 'train')
  assert sorted(train) == sorted(truth[kind])
  for image_id, example in train.items():
    np.testing.assert_array_equal(label(example, 'sparse'),
                                  truth[kind][image_id])
    np.testing.assert_array_equal(label(example, 'dense'),
                                  truth['dense'][image_id])
  for image_id, example in read_split(output, 'val').items():
    np.testing.assert_array_equal(label(example, 'dense'),
                                  truth['dense'][image_id])


def test_voc_palette_segmentation_class_and_official_split_list(tmp_path):
  root, truth = fixtures.make_voc_root(tmp_path, sparse_unlabeled=21)
  output = str(tmp_path / 'voc')
  code = voc.main([f'--root={root}', '--dense_dir=SegmentationClass',
                   '--sparse_dir=point', '--splits=train',
                   f'--split_file=train={root}/splits/train.txt',
                   f'--output={output}', '--no_progress'])
  assert code == 0
  for image_id, example in read_split(output, 'train').items():
    np.testing.assert_array_equal(label(example, 'dense'),
                                  truth['dense'][image_id])
    assert 255 in label(example, 'dense')     # void object borders survive


def test_voc_explicit_unlabeled_value_rejects_the_other(tmp_path, capsys):
  root, truth = fixtures.make_voc_root(tmp_path, sparse_unlabeled=21)
  output = str(tmp_path / 'voc')
  code = voc.main([f'--root={root}', '--sparse_dir=point',
                   '--unlabeled_value=255', f'--output={output}',
                   '--no_progress'])
  assert code == 1
  err = capsys.readouterr().err
  for image_id in truth['point']:
    assert f'point/segcls/{image_id}.png: label values [21]' in err
  assert not os.path.exists(output)


def test_cityscapes_label_id_table():
  assert cityscapes.CITYSCAPES_CLASSES == tuple(CITYSCAPES_TRAIN_IDS)
  expected = {label_id: train_id
              for label_id, train_id in CITYSCAPES_TRAIN_IDS.values()}
  decoder = cityscapes.label_ids_decoder()
  raw = np.arange(34).reshape(1, 34)
  stored = decoder.decode(raw, 'table')
  for label_id in range(34):
    assert stored[0, label_id] == expected.get(label_id, 255), label_id
  with pytest.raises(ValueError, match=r'x\.png: label values \[34\]'):
    decoder.decode(np.array([[34]]), 'x.png')


@pytest.mark.parametrize('click_unlabeled', [19, 255])
def test_cityscapes_round_trip(tmp_path, click_unlabeled):
  root, truth = fixtures.make_cityscapes_root(
      tmp_path, clicks=(20,), click_unlabeled=click_unlabeled)
  expected_lut = np.full(256, 255, np.uint8)
  for label_id, train_id in CITYSCAPES_TRAIN_IDS.values():
    expected_lut[label_id] = train_id
  output = str(tmp_path / 'city')
  code = cityscapes.main([f'--root={root}', '--clicks=20',
                          f'--output={output}', '--no_progress'])
  assert code == 0
  with open(os.path.join(output, 'metadata.json')) as f:
    metadata = json.load(f)
  assert metadata['sparse_labels']['train']['unlabeled_values_found'] == [
      click_unlabeled]
  for split in ('train', 'val'):
    examples = read_split(output, split)
    assert sorted(examples) == sorted(truth['label_ids'][split])
    for image_id, example in examples.items():
      np.testing.assert_array_equal(
          label(example, 'dense'),
          expected_lut[truth['label_ids'][split][image_id]])
      assert example['image/format'] == b'png'
      if split == 'train':
        np.testing.assert_array_equal(label(example, 'sparse'),
                                      truth['clicks'][20][image_id])
  # labelTrainIds files give the same dense labels.
  output2 = str(tmp_path / 'city2')
  cityscapes.convert_cityscapes(root, output2, clicks=20,
                                gt_kind='labelTrainIds', progress=False)
  for split in ('train', 'val'):
    first, second = read_split(output, split), read_split(output2, split)
    for image_id in first:
      assert (first[image_id]['label/dense/encoded'] ==
              second[image_id]['label/dense/encoded'])


def _corrupt(root, truth):
  """Four bad examples of four kinds; returns {kind: offending path}."""
  train = sorted(truth['train'])
  paths = {
      'missing': os.path.join(root, 'train', 'labels', train[0] + '.png'),
      'size': os.path.join(root, 'train', 'labels', train[1] + '.png'),
      'value': os.path.join(root, 'train', 'labels', train[2] + '.png'),
      'decode': os.path.join(root, 'val', 'images',
                             sorted(truth['val'])[0] + '.jpg'),
  }
  os.remove(paths['missing'])
  Image.fromarray(np.zeros((10, 12), np.uint8)).save(paths['size'])
  bad_value = truth['train'][train[2]].copy()
  bad_value[bad_value == 255] = 4
  bad_value[3, 3] = 17
  Image.fromarray(bad_value).save(paths['value'])
  with open(paths['decode'], 'wb') as f:
    f.write(b'\xff\xd8 this is not a jpeg')
  return paths


def test_bad_input_lists_every_file_and_writes_nothing(tmp_path, capsys):
  root, truth = fixtures.make_folder_root(tmp_path)
  paths = _corrupt(root, truth)
  output = str(tmp_path / 'out')
  argv = [f'--root={root}', '--void_value=4', '--sparse=clicks:5',
          f'--output={output}', '--no_progress']
  assert folder.main(argv) == 1
  err_lines = capsys.readouterr().err.splitlines()
  for kind, path in paths.items():
    matching = [line for line in err_lines if line.startswith(path)]
    assert len(matching) == 1, (kind, err_lines)
  assert 'missing label file' in ''.join(
      l for l in err_lines if l.startswith(paths['missing']))
  assert 'label size 12x10 differs from image size 56x40' in ''.join(
      l for l in err_lines if l.startswith(paths['size']))
  assert 'label values [17]' in ''.join(
      l for l in err_lines if l.startswith(paths['value']))
  assert 'cannot decode image' in ''.join(
      l for l in err_lines if l.startswith(paths['decode']))
  assert not os.path.exists(output)
  assert os.listdir(tmp_path) == [os.path.basename(root)]  # no temp folder

  assert folder.main(argv + ['--skip_bad']) == 0
  with open(os.path.join(output, common.BAD_FILES_FILE)) as f:
    report = f.read().splitlines()
  assert sorted(line.split(':')[0] for line in report) == sorted(
      paths.values())
  with open(os.path.join(output, 'metadata.json')) as f:
    metadata = json.load(f)
  assert metadata['num_bad_files'] == 4
  assert metadata['splits']['train']['num_examples'] == len(truth['train']) - 3
  assert metadata['splits']['val']['num_examples'] == len(truth['val']) - 1
  assert len(read_split(output, 'train')) == len(truth['train']) - 3


def test_label_without_image_and_missing_split(tmp_path, capsys):
  root, truth = fixtures.make_folder_root(tmp_path)
  orphan = os.path.join(root, 'val', 'labels', 'orphan.png')
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(orphan)
  code = folder.main([f'--root={root}', '--void_value=4', '--splits=train,val,'
                      'test', f'--output={tmp_path / "o"}', '--no_progress'])
  assert code == 1
  err = capsys.readouterr().err
  assert f'{orphan}: label file without an image' in err
  assert os.path.join(root, 'test', 'images') + ': missing image folder' in err


def test_interrupted_conversion_leaves_no_output(folder_root, tmp_path,
                                                 monkeypatch):
  root, _ = folder_root
  calls = []
  original_write = tfrecord.TFRecordWriter.write

  def interrupted_write(self, record):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt
    original_write(self, record)

  monkeypatch.setattr(tfrecord.TFRecordWriter, 'write', interrupted_write)
  output = tmp_path / 'out'
  with pytest.raises(KeyboardInterrupt):
    folder.convert_folder(root, str(output), void_values=(4,),
                          sparse='clicks:3', progress=False)
  assert len(calls) == 3
  assert os.listdir(tmp_path) == []


def test_existing_output_needs_overwrite(folder_root, tmp_path, capsys):
  root, _ = folder_root
  output = tmp_path / 'out'
  output.mkdir()
  (output / 'keep.txt').write_text('x')
  argv = [f'--root={root}', '--void_value=4', '--splits=val',
          f'--output={output}', '--no_progress']
  assert folder.main(argv) == 1
  assert 'output exists (use --overwrite' in capsys.readouterr().err
  assert os.listdir(output) == ['keep.txt']
  assert folder.main(argv + ['--overwrite']) == 0
  assert sorted(os.listdir(output)) == ['metadata.json',
                                        'val-00000-of-00001.tfrecord']
  assert sorted(os.listdir(tmp_path)) == ['out']


def test_make_folder_dataset_tfrecords(tmp_path):
  data_dir = fixtures.make_folder_dataset_tfrecords(tmp_path, num_train=5,
                                                    num_val=2)
  train = read_split(data_dir, 'train')
  assert len(train) == 5
  assert all('label/sparse/encoded' in e and 'label/dense/encoded' in e
             for e in train.values())
  assert len(read_split(data_dir, 'val')) == 2


def test_voc_sparse_only_train_split_needs_no_dense_files(tmp_path):
  root, truth = fixtures.make_voc_root(tmp_path)
  first = sorted(truth['point'])[0]
  os.remove(os.path.join(root, 'SegmentationClassAug', first + '.png'))
  output = str(tmp_path / 'voc')
  metadata = voc.convert_voc(root, output, sparse_dir='point',
                             train_dense=False, progress=False)
  assert not metadata['splits']['train']['has_dense']
  assert metadata['splits']['val']['has_dense']
  for image_id, example in read_split(output, 'train').items():
    assert 'label/dense/encoded' not in example
    np.testing.assert_array_equal(label(example, 'sparse'),
                                  truth['point'][image_id])


def test_size_mismatch_is_caught_before_downscaling(folder_root, tmp_path,
                                                    capsys):
  source, _ = folder_root
  root = tmp_path / 'root'
  shutil.copytree(source, root)
  label_path = root / 'val' / 'labels' / sorted(
      os.listdir(root / 'val' / 'labels'))[0]
  wider = np.asarray(Image.open(label_path))
  Image.fromarray(np.concatenate([wider, wider[:, :1]], axis=1)).save(
      label_path)
  code = folder.main([f'--root={root}', '--void_value=4', '--splits=val',
                      '--downscale=2', f'--output={tmp_path / "out"}',
                      '--no_progress'])
  assert code == 1
  assert f'{label_path}: label size' in capsys.readouterr().err
  assert not (tmp_path / 'out').exists()


def test_interrupted_overwrite_keeps_the_previous_dataset(
    folder_root, tmp_path, monkeypatch):
  root, _ = folder_root
  output = str(tmp_path / 'out')
  folder.convert_folder(root, output, splits=('val',), void_values=(4,),
                        progress=False)
  before = sorted(os.listdir(output))
  original_rename = os.rename
  renames = []

  def rename_then_interrupt(src, dst):
    renames.append((src, dst))
    if len(renames) == 2:  # Between moving the old dataset away and the new in.
      raise KeyboardInterrupt
    original_rename(src, dst)

  monkeypatch.setattr(os, 'rename', rename_then_interrupt)
  with pytest.raises(KeyboardInterrupt):
    folder.convert_folder(root, output, splits=('val',), void_values=(4,),
                          overwrite=True, progress=False)
  monkeypatch.setattr(os, 'rename', original_rename)
  assert sorted(os.listdir(output)) == before
  assert sorted(os.listdir(tmp_path)) == ['out']


def test_flat_folder_converts_as_one_split_sized_in_metadata(tmp_path, capsys):
  # A flat folder: classes.txt, images/ and labels/ at the root.
  source, truth = fixtures.make_folder_root(
      tmp_path, split_sizes={'held_out': 3}, height=30, width=44)
  flat = tmp_path / 'flat'
  os.makedirs(flat)
  shutil.copy(os.path.join(source, 'classes.txt'), flat)
  for subdir in ('images', 'labels'):
    shutil.copytree(os.path.join(source, 'held_out', subdir), flat / subdir)
  output = str(tmp_path / 'out')
  assert folder.main([f'--root={flat}', '--void_value=4', f'--output={output}',
                      '--no_progress']) == 0
  examples = read_split(output, folder.FLAT_SPLIT)
  assert sorted(examples) == sorted(truth['held_out'])
  for image_id, dense in truth['held_out'].items():
    np.testing.assert_array_equal(label(examples[image_id], 'dense'), dense)
  with open(os.path.join(output, 'metadata.json')) as f:
    split = json.load(f)['splits'][folder.FLAT_SPLIT]
  assert (split['max_height'], split['max_width']) == (30, 44)
  # --splits names the one split; two names for one flat folder are refused.
  assert folder.main([f'--root={flat}', '--void_value=4', '--splits=test',
                      f'--output={tmp_path / "named"}', '--no_progress']) == 0
  assert len(read_split(str(tmp_path / 'named'), 'test')) == 3
  capsys.readouterr()
  assert folder.main([f'--root={flat}', '--void_value=4', '--splits=a,b',
                      f'--output={tmp_path / "two"}', '--no_progress']) == 1
  assert 'is one split' in capsys.readouterr().err
  assert not (tmp_path / 'two').exists()


@pytest.mark.parametrize('split', ['.', '..', '.hidden', 'a/b', 'x y'])
def test_odd_split_names_are_refused(folder_root, tmp_path, capsys, split):
  root, _ = folder_root
  output = tmp_path / 'out'
  assert folder.main([f'--root={root}', '--void_value=4', f'--splits={split},val',
                      f'--output={output}', '--no_progress']) == 1
  err = capsys.readouterr().err
  assert f'split name {split!r}' in err and '--skip_bad' not in err
  assert os.listdir(tmp_path) == []


def test_skip_bad_is_suggested_only_for_bad_examples(folder_root, tmp_path,
                                                      capsys):
  source, truth = folder_root
  root = tmp_path / 'root'
  shutil.copytree(source, root)
  os.remove(root / 'classes.txt')
  argv = [f'--root={root}', '--void_value=4', f'--output={tmp_path / "o"}',
          '--no_progress']
  assert folder.main(argv) == 1
  err = capsys.readouterr().err
  assert 'missing class list' in err and '--skip_bad' not in err
  shutil.copy(os.path.join(source, 'classes.txt'), root)
  bad = root / 'val' / 'images' / f'{sorted(truth["val"])[0]}.jpg'
  bad.write_bytes(b'not a jpeg')
  assert folder.main(argv) == 1
  err = capsys.readouterr().err
  assert f'{bad}: cannot decode image' in err and '--skip_bad' in err


def test_rerun_removes_the_leftovers_of_killed_conversions(folder_root,
                                                          tmp_path):
  root, _ = folder_root
  killed = subprocess.Popen([sys.executable, '-c', 'import time; '  # pylint: disable=consider-using-with
                             'time.sleep(60)'])
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  leftovers = [f'.out.incomplete-{killed.pid}',
               f'.out.incomplete-{killed.pid}.old']
  # A live process's folder may be a conversion in progress.
  in_progress = f'.out.incomplete-{os.getppid()}'
  for name in [*leftovers, in_progress, '.other.incomplete-1']:
    os.makedirs(tmp_path / name / 'train')
    (tmp_path / name / 'train' / 'part.tfrecord').write_bytes(b'x' * 10)
  folder.convert_folder(root, str(tmp_path / 'out'), void_values=(4,),
                        sparse='clicks:3', progress=False)
  assert sorted(os.listdir(tmp_path)) == sorted(
      ['.other.incomplete-1', in_progress, 'out'])
