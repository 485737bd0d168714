"""Tags and boxes: the generator against brute force, the record round trip
through the folder and VOC converters (VOC's real XML layout), bad boxes."""

import collections
import json
import os

import numpy as np
import pytest

from agmm_jax.data import tfrecord
from agmm_jax.data import weak_labels
from data_prep import common
from data_prep import folder
from data_prep import sparse_labels
from data_prep import voc
from tests import fixtures
from tests.data_prep import test_data_prep

VOID = sparse_labels.STORED_UNLABELED


def brute_force_boxes(dense, min_area, background=None):
  """Bounding boxes of 8-connected regions by a breadth-first flood fill."""
  height, width = dense.shape
  seen = np.zeros(dense.shape, bool)
  boxes = []
  for y in range(height):
    for x in range(width):
      class_id = int(dense[y, x])
      if seen[y, x] or class_id == VOID:
        continue
      queue, pixels = collections.deque([(y, x)]), []
      seen[y, x] = True
      while queue:
        r, c = queue.popleft()
        pixels.append((r, c))
        for dr in (-1, 0, 1):
          for dc in (-1, 0, 1):
            rr, cc = r + dr, c + dc
            if (0 <= rr < height and 0 <= cc < width and not seen[rr, cc]
                and dense[rr, cc] == class_id):
              seen[rr, cc] = True
              queue.append((rr, cc))
      if len(pixels) >= min_area and class_id != background:
        rows = [p[0] for p in pixels]
        cols = [p[1] for p in pixels]
        boxes.append((class_id, min(rows), min(cols), max(rows) + 1,
                      max(cols) + 1))
  return sorted(boxes)


def random_labels(rng, height=13, width=17, num_classes=4):
  dense = rng.integers(0, num_classes, (height, width)).astype(np.uint8)
  # Blocks make larger regions beside the speckle; some void.
  dense[2:7, 3:11] = 1
  dense[rng.random(dense.shape) < 0.1] = VOID
  return dense


@pytest.mark.parametrize('seed', range(6))
@pytest.mark.parametrize('min_area', [1, 3, 8])
def test_region_boxes_and_tags_match_brute_force(seed, min_area):
  rng = np.random.default_rng(seed)
  dense = random_labels(rng)
  background = 0 if seed % 2 else None
  spec = f'boxes:min_area={min_area}'
  tags, boxes = sparse_labels.weak_labels(dense, spec, num_classes=5,
                                          background=background)
  assert sorted(map(tuple, boxes.tolist())) == brute_force_boxes(
      dense, min_area, background)
  expected_tags = np.zeros(5, np.float32)
  expected_tags[[v for v in set(dense.ravel().tolist()) if v != VOID]] = 1
  np.testing.assert_array_equal(tags, expected_tags)
  # Deterministic: the regions decide, not a seed or the image id.
  again = sparse_labels.weak_labels(dense, spec, num_classes=5,
                                    background=background)
  np.testing.assert_array_equal(again[1], boxes)
  # The weak kinds label no pixel.
  sparse = sparse_labels.generate(dense, spec, seed=seed, image_id='x')
  assert (sparse == VOID).all()


def test_tags_spec_has_tags_and_no_box():
  dense = np.array([[0, 0, 2], [VOID, 2, 2]], np.uint8)
  tags, boxes = sparse_labels.weak_labels(dense, 'tags', num_classes=3)
  np.testing.assert_array_equal(tags, [1, 0, 1])
  assert boxes.shape == (0, 5)


@pytest.mark.parametrize('spec', ['boxes:3', 'tags:min_area=2',
                                  'boxes:erode=1'])
def test_bad_weak_specs_rejected_with_one_line(spec):
  with pytest.raises(ValueError, match='sparse spec') as error:
    sparse_labels.parse_spec(spec)
  assert '\n' not in str(error.value)


@pytest.mark.parametrize('box, words', [
    ((1, 0, 0, 5, 11), 'outside the 5x10 image'),
    ((1, -1, 0, 2, 2), 'outside'),
    ((1, 2, 3, 2, 6), 'empty box'),
    ((1, 2, 6, 4, 6), 'empty box'),
    ((7, 0, 0, 2, 2), 'unknown class'),
    ((-1, 0, 0, 2, 2), 'unknown class')])
def test_check_boxes_rejects_bad_boxes_naming_the_file(box, words):
  with pytest.raises(ValueError, match=words) as error:
    weak_labels.check_boxes(np.array([box]), height=5, width=10,
                            num_classes=3, where='a/b.xml')
  assert str(error.value).startswith('a/b.xml: ')
  assert '\n' not in str(error.value)


def test_pad_boxes_keeps_the_largest_in_order():
  boxes = np.array([[0, 0, 0, 1, 1], [1, 0, 0, 5, 5], [2, 0, 0, 2, 2],
                    [3, 0, 0, 4, 4]], np.int32)
  padded = weak_labels.pad_boxes(boxes, 2)
  np.testing.assert_array_equal(padded[:, 0], [1, 3])
  padded = weak_labels.pad_boxes(boxes[:1], 3)
  np.testing.assert_array_equal(padded[1:, 0], [weak_labels.NO_BOX] * 2)
  np.testing.assert_array_equal(padded[0], boxes[0])


def read_examples(data_dir, split):
  """``(metadata, {image id: decoded example})`` of a prepared split."""
  with open(os.path.join(data_dir, 'metadata.json')) as f:
    metadata = json.load(f)
  return metadata, test_data_prep.read_split(data_dir, split)


def test_folder_converter_stores_generated_tags_and_boxes(tmp_path):
  root, truth = fixtures.make_folder_root(tmp_path)
  output = str(tmp_path / 'out')
  folder.convert_folder(root, output, void_values=(4,),
                        sparse='boxes:min_area=4', progress=False)
  metadata, examples = read_examples(output, 'train')
  assert metadata['splits']['train']['has_weak_labels']
  assert not metadata['splits']['val']['has_weak_labels']
  assert metadata['sparse_labels']['train']['kind'] == 'boxes'
  total = 0
  for image_id, dense in truth['train'].items():
    example = examples[image_id]
    tags, boxes = weak_labels.from_record(
        example, num_classes=4, height=dense.shape[0], width=dense.shape[1],
        where=image_id)
    assert sorted(map(tuple, boxes.tolist())) == brute_force_boxes(dense, 4)
    np.testing.assert_array_equal(np.flatnonzero(tags), sorted(
        set(dense.ravel().tolist()) - {VOID}))
    assert (common.decode_png(example['label/sparse/encoded']) == VOID).all()
    total += len(boxes)
  assert metadata['sparse_labels']['train']['boxes_per_image'] == (
      total / len(truth['train']))


def write_voc_xml(path, width, height, objects, size=True):
  """An annotation in VOC 2012's layout, a person's parts included."""
  parts = ['<annotation>', '\t<folder>VOC2012</folder>',
           f'\t<filename>{os.path.basename(path)[:-4]}.jpg</filename>',
           '\t<source><database>The VOC2007 Database</database></source>']
  if size:
    parts.append(f'\t<size><width>{width}</width><height>{height}</height>'
                 '<depth>3</depth></size>')
  parts.append('\t<segmented>1</segmented>')
  for name, (xmin, ymin, xmax, ymax) in objects:
    parts += ['\t<object>', f'\t\t<name>{name}</name>',
              '\t\t<pose>Frontal</pose>', '\t\t<truncated>0</truncated>',
              '\t\t<difficult>0</difficult>',
              f'\t\t<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>'
              f'<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox>']
    if name == 'person':
      parts += ['\t\t<part><name>head</name><bndbox><xmin>1</xmin>'
                '<ymin>1</ymin><xmax>2</xmax><ymax>2</ymax></bndbox></part>']
    parts.append('\t</object>')
  parts.append('</annotation>')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write('\n'.join(parts) + '\n')


def test_voc_converter_reads_real_boxes_from_annotations(tmp_path):
  root, truth = fixtures.make_voc_root(tmp_path)
  expected = {}
  for index, image_id in enumerate(truth['point']):
    height, width = truth['dense'][image_id].shape
    objects = [('dog', (3, 2, 10 + index, 9)),
               ('person', (1, 1, width, height)),
               ('car', ('4.0', '5', '6', '7'))]
    write_voc_xml(os.path.join(root, 'Annotations', image_id + '.xml'),
                  width, height, objects)
    expected[image_id] = [(12, 1, 2, 9, 10 + index), (15, 0, 0, height, width),
                          (7, 4, 3, 7, 6)]
  output = str(tmp_path / 'voc')
  metadata = voc.convert_voc(root, output, sparse='boxes', progress=False)
  assert metadata['sparse_labels']['train']['weak_source'] == 'annotations'
  _, examples = read_examples(output, 'train')
  for image_id, boxes in expected.items():
    height, width = truth['dense'][image_id].shape
    tags, read = weak_labels.from_record(examples[image_id], num_classes=21,
                                         height=height, width=width,
                                         where=image_id)
    assert read.tolist() == [list(b) for b in boxes]
    np.testing.assert_array_equal(np.flatnonzero(tags), [0, 7, 12, 15])


def test_voc_converter_without_annotations_derives_boxes_without_background(
    tmp_path):
  root, truth = fixtures.make_voc_root(tmp_path)
  output = str(tmp_path / 'voc')
  metadata = voc.convert_voc(root, output, sparse='boxes', progress=False)
  assert metadata['sparse_labels']['train']['weak_source'] == 'dense labels'
  _, examples = read_examples(output, 'train')
  for image_id in truth['point']:
    dense = truth['dense'][image_id]
    _, boxes = weak_labels.from_record(
        examples[image_id], num_classes=21, height=dense.shape[0],
        width=dense.shape[1], where=image_id)
    assert sorted(map(tuple, boxes.tolist())) == brute_force_boxes(
        dense, 1, background=0)


@pytest.mark.parametrize('objects, words', [
    ([('dog', (0, 1, 5, 5))], 'outside'),
    ([('dog', (1, 1, 9999, 5))], 'outside'),
    ([('dog', (6, 1, 5, 5))], 'empty box'),
    ([('unicorn', (1, 1, 5, 5))], "'unicorn' is not a VOC class"),
    ([('dog', ('a', 1, 5, 5))], 'not a number')])
def test_voc_bad_annotation_is_one_line_naming_the_file(tmp_path, objects,
                                                        words):
  root, truth = fixtures.make_voc_root(tmp_path)
  for image_id in truth['point']:
    height, width = truth['dense'][image_id].shape
    write_voc_xml(os.path.join(root, 'Annotations', image_id + '.xml'),
                  width, height, [('cat', (1, 1, 4, 4))])
  bad_id = next(iter(truth['point']))
  height, width = truth['dense'][bad_id].shape
  bad_path = os.path.join(root, 'Annotations', bad_id + '.xml')
  write_voc_xml(bad_path, width, height, objects)
  with pytest.raises(common.ConversionError) as error:
    voc.convert_voc(root, str(tmp_path / 'voc'), sparse='boxes',
                    progress=False)
  assert len(error.value.problems) == 1
  problem = error.value.problems[0]
  assert problem.startswith(bad_path) and words in problem
  assert '\n' not in problem


def test_voc_annotation_size_must_be_the_image_size(tmp_path):
  root, truth = fixtures.make_voc_root(tmp_path)
  for image_id in truth['point']:
    height, width = truth['dense'][image_id].shape
    write_voc_xml(os.path.join(root, 'Annotations', image_id + '.xml'),
                  width + 1, height, [('cat', (1, 1, 4, 4))])
  with pytest.raises(common.ConversionError, match='differs from the image'):
    voc.convert_voc(root, str(tmp_path / 'voc'), sparse='boxes',
                    progress=False)


def test_sparse_label_cli_rejects_weak_kinds(tmp_path, capsys):
  with pytest.raises(SystemExit):
    sparse_labels.main([f'--dense_dir={tmp_path}', '--num_classes=3',
                        '--spec=boxes', f'--output_dir={tmp_path / "out"}'])
  assert 'not label maps' in capsys.readouterr().err


@pytest.mark.parametrize('example, words', [
    ({weak_labels.TAGS_KEY: [1, 0]}, 'must be 3 values of 0 or 1'),
    ({weak_labels.TAGS_KEY: [1, 0, 2]}, 'must be 3 values of 0 or 1'),
    ({weak_labels.TAGS_KEY: [1, 0, 1], weak_labels.BOX_COUNT_KEY: [2],
      weak_labels.BOXES_KEY: [0, 0, 0, 1, 1]}, '5 values for 2 boxes'),
    ({weak_labels.TAGS_KEY: [1, 0, 1], weak_labels.BOX_COUNT_KEY: [1],
      weak_labels.BOXES_KEY: [0, 0, 0, 9, 1]}, 'outside the 4x4 image')])
def test_bad_weak_labels_in_a_record_are_one_line(example, words):
  with pytest.raises(ValueError, match=words) as error:
    weak_labels.from_record(example, num_classes=3, height=4, width=4,
                            where='train-00000 record 7')
  assert str(error.value).startswith('train-00000 record 7: ')
  assert '\n' not in str(error.value)


def test_record_round_trip_of_tags_and_boxes():
  boxes = np.array([[2, 0, 1, 3, 4], [0, 1, 1, 2, 2]], np.int32)
  tags = np.array([1, 0, 1], np.float32)
  example = tfrecord.decode_example(tfrecord.encode_example(
      weak_labels.record_features(tags, boxes)))
  got_tags, got_boxes = weak_labels.from_record(
      example, num_classes=3, height=4, width=4, where='x')
  np.testing.assert_array_equal(got_tags, tags)
  np.testing.assert_array_equal(got_boxes, boxes)
  example = tfrecord.decode_example(tfrecord.encode_example(
      weak_labels.record_features(tags, boxes[:0])))
  assert weak_labels.from_record(example, num_classes=3, height=4, width=4,
                                 where='x')[1].shape == (0, 5)
