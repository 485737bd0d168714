r"""Converts PASCAL VOC 2012 (with point / scribble labels) to TFRecord shards.

Layout under ``--root`` (``VOCdevkit/VOC2012`` plus the sparse folders that
come with the TEL / AGMM releases)::

  JPEGImages/NAME.jpg
  SegmentationClass/NAME.png      palette PNGs: the palette index is the class,
                                  255 = void (object borders)
  SegmentationClassAug/NAME.png   grayscale class ids (the 10582-image set)
  point/segcls/NAME.png           point labels (official AGMM path)
  scribble/seginst/NAME.png       scribble labels (official AGMM path)
  ImageSets/Segmentation/{train,val}.txt   one NAME per line

``--split_file=SPLIT=PATH`` reads another list, either one NAME per line or the
official ``NAME.jpg NAME.png`` lines (AGMM dataset/splits/pascal/*.txt).

Sparse PNGs hold class ids, and unlabeled pixels are 255 in some
distributions and 21 (= the number of classes, the official code's
``ignore_index``) in others. By default both are accepted as unlabeled and
the values found are recorded in metadata.json; ``--unlabeled_value=V``
accepts only ``V``. They are stored as 255.

  python -m data_prep.voc --root=VOCdevkit/VOC2012 --sparse_dir=point \
      --output=data/voc_point

Tags and boxes (``--sparse=boxes`` or ``--sparse=tags``): read from
``Annotations/NAME.xml`` when the root has that folder (VOC's own boxes,
one per object, ``difficult`` ones included; the tags are the objects'
classes plus background, which every VOC image shows), otherwise derived
from the dense labels by the generator (background gets no box). XML
corners are 1-based and inclusive; they are stored 0-based, half open.

  python -m data_prep.voc --root=VOCdevkit/VOC2012 --sparse=boxes \
      --output=data/voc_boxes
"""

import argparse
import os
import sys
from typing import Any
import xml.etree.ElementTree as ElementTree

import numpy as np

from agmm_jax.data import weak_labels
from data_prep import common
from data_prep import sparse_labels

VOC_CLASSES = (
    'background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus',
    'car', 'cat', 'chair', 'cow', 'diningtable', 'dog', 'horse', 'motorbike',
    'person', 'pottedplant', 'sheep', 'sofa', 'train', 'tvmonitor')
VOC_VOID = 255
# Official AGMM sub-folders for --sparse_dir=point / scribble.
OFFICIAL_SPARSE_DIRS = {'point': 'point/segcls', 'scribble': 'scribble/seginst'}
ANNOTATIONS_DIR = 'Annotations'
BACKGROUND = VOC_CLASSES.index('background')


def _xml_number(node: ElementTree.Element, tag: str, path: str) -> int:
  text = node.findtext(tag)
  try:
    return int(round(float(text)))
  except (TypeError, ValueError) as e:
    raise ValueError(f'{path}: <{tag}> is {text!r}, not a number') from e


def read_voc_xml(path: str, *, height: int, width: int,
                 num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """``(tags [K], boxes [n, 5])`` of a VOC annotation file: one box per
  ``<object>`` (its own ``<bndbox>``, not its parts'), tags = the objects'
  classes + background. One-line ValueErrors name ``path``: missing or
  unparsable file, a size that is not the image's, an unknown class, a box
  outside the image or empty."""
  if not os.path.exists(path):
    raise ValueError(f'{path}: missing annotation file')
  try:
    root = ElementTree.parse(path).getroot()
  except ElementTree.ParseError as e:
    raise ValueError(f'{path}: not valid XML ({e})') from e
  size = root.find('size')
  if size is not None:
    xml_size = (_xml_number(size, 'height', path), _xml_number(size, 'width', path))
    if xml_size != (height, width):
      raise ValueError(f'{path}: <size> {xml_size[1]}x{xml_size[0]} differs '
                       f'from the image\'s {width}x{height}')
  boxes = []
  for obj in root.findall('object'):
    name = (obj.findtext('name') or '').strip()
    if name not in VOC_CLASSES[:num_classes]:
      raise ValueError(f'{path}: object class {name!r} is not a VOC class')
    box = obj.find('bndbox')
    if box is None:
      raise ValueError(f'{path}: object {name!r} has no <bndbox>')
    boxes.append((VOC_CLASSES.index(name),
                  _xml_number(box, 'ymin', path) - 1,
                  _xml_number(box, 'xmin', path) - 1,
                  _xml_number(box, 'ymax', path),
                  _xml_number(box, 'xmax', path)))
  boxes = weak_labels.check_boxes(np.asarray(boxes, np.int64), height=height,
                                  width=width, num_classes=num_classes,
                                  where=path)
  tags = weak_labels.tags_from_boxes(boxes, num_classes)
  tags[BACKGROUND] = 1.0
  return tags, boxes


def resolve_sparse_dir(root: str, sparse_dir: str) -> str:
  """``point`` -> ROOT/point/segcls (if present), else ROOT/sparse_dir."""
  if os.path.isabs(sparse_dir):
    return sparse_dir
  official = OFFICIAL_SPARSE_DIRS.get(sparse_dir.strip('/'))
  if official and os.path.isdir(os.path.join(root, official)):
    return os.path.join(root, official)
  return os.path.join(root, sparse_dir)


def read_ids(path: str) -> list[str]:
  """Image ids from a plain or official (``NAME.jpg NAME.png``) split list."""
  ids = []
  for fields in common.read_split_file(path):
    ids.append(os.path.splitext(os.path.basename(fields[0]))[0])
  return ids


def default_dense_dir(root: str) -> str:
  """SegmentationClassAug (a superset) when present, else SegmentationClass."""
  for name in ('SegmentationClassAug', 'SegmentationClass'):
    if os.path.isdir(os.path.join(root, name)):
      return name
  return 'SegmentationClass'


def convert_voc(root: str, output: str, *,
                splits: tuple[str, ...] = ('train', 'val'),
                sparse_splits: tuple[str, ...] = ('train',),
                split_files: dict[str, str] | None = None,
                dense_dir: str = '', sparse_dir: str = '', sparse: str = '',
                unlabeled_value: int | None = None, seed: int = 0,
                train_dense: bool = True, jpeg_quality: int = 0,
                num_shards: int = 0, num_workers: int = 1,
                skip_bad: bool = False, overwrite: bool = False,
                overlays: int = 0, progress: bool = True) -> dict[str, Any]:
  """Converts VOC under ``root``; ``unlabeled_value=None`` accepts 255 and 21.

  Returns the metadata; raises ``common.ConversionError``.
  """
  if bool(sparse) == bool(sparse_dir):
    raise common.ConversionError(
        ['give exactly one of --sparse_dir (e.g. point, scribble) and '
         '--sparse (a generator spec)'])
  num_classes = len(VOC_CLASSES)
  dense_dir = dense_dir or default_dense_dir(root)
  dense_decoder = common.LabelDecoder.identity(num_classes, [VOC_VOID])
  unlabeled_values = ([unlabeled_value] if unlabeled_value is not None
                      else [255, num_classes])
  try:
    sparse_decoder = (common.LabelDecoder.identity(num_classes,
                                                   unlabeled_values)
                      if sparse_dir else None)
    spec = sparse_labels.parse_spec(sparse) if sparse else None
  except ValueError as e:
    raise common.ConversionError([str(e)]) from e
  sparse_path = resolve_sparse_dir(root, sparse_dir) if sparse_dir else ''
  annotations = os.path.join(root, ANNOTATIONS_DIR)
  read_xml = spec is not None and spec.weak and os.path.isdir(annotations)
  split_files = split_files or {}
  sources = {}
  for split in splits:
    list_path = split_files.get(split) or os.path.join(
        root, 'ImageSets', 'Segmentation', f'{split}.txt')
    if not os.path.exists(list_path):
      sources[split] = common.SplitSource(
          [], common.SplitOptions(), [f'{list_path}: missing split list'])
      continue
    is_sparse = split in sparse_splits
    examples = [
        common.SourceExample(
            image_id=image_id,
            image_path=os.path.join(root, 'JPEGImages', image_id + '.jpg'),
            dense_path=os.path.join(root, dense_dir, image_id + '.png'),
            sparse_path=(os.path.join(sparse_path, image_id + '.png')
                         if is_sparse and sparse_dir else None),
            annotation_path=(os.path.join(annotations, image_id + '.xml')
                             if is_sparse and read_xml else None))
        for image_id in read_ids(list_path)]
    options = common.SplitOptions(
        dense_decoder=dense_decoder,
        store_dense=train_dense or not is_sparse,
        sparse_decoder=sparse_decoder if is_sparse else None,
        sparse_spec=spec if is_sparse else None, seed=seed,
        jpeg_quality=jpeg_quality,
        annotation_reader=read_voc_xml if is_sparse and read_xml else None,
        box_background=BACKGROUND)
    settings = {}
    if is_sparse and sparse_dir:
      settings = {'sparse_dir': sparse_path,
                  'unlabeled_values_accepted': unlabeled_values}
    if is_sparse and read_xml:
      settings = {'annotations_dir': annotations}
    sources[split] = common.SplitSource(examples, options, [], settings)
  return common.convert(
      name='voc2012', classes=VOC_CLASSES, splits=sources, output=output,
      num_shards=num_shards, num_workers=num_workers, skip_bad=skip_bad,
      overwrite=overwrite, overlays=overlays, progress=progress,
      extra_metadata={'converter': 'voc', 'source_root': os.path.abspath(root),
                      'dense_dir': dense_dir,
                      'split_lists': {s: split_files.get(s, '') for s in
                                      splits}})


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m data_prep.voc', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--root', required=True, help='VOCdevkit/VOC2012')
  parser.add_argument('--split_file', action='append', default=[],
                      help='SPLIT=PATH list of ids (repeatable)')
  parser.add_argument('--dense_dir', default='',
                      help='default: SegmentationClassAug if present, else '
                      'SegmentationClass')
  parser.add_argument('--sparse_dir', default='',
                      help='point, scribble (official sub-folders) or a '
                      'folder of sparse PNGs (relative to --root or absolute)')
  parser.add_argument('--sparse', default='',
                      help='instead of --sparse_dir: generate from the dense '
                      "labels with this spec, e.g. 'points:1'; 'boxes' or "
                      "'tags' read Annotations/*.xml when present")
  parser.add_argument('--unlabeled_value', default='auto',
                      help="unlabeled value of the sparse PNGs: 'auto' (255 "
                      'and 21 both accepted) or an integer')
  common.add_common_flags(parser)
  args = parser.parse_args(argv)
  split_files, unlabeled = common.parse_sparse_source_flags(parser, args)
  return common.run_cli(lambda: convert_voc(
      args.root, args.output, split_files=split_files,
      dense_dir=args.dense_dir, sparse_dir=args.sparse_dir, sparse=args.sparse,
      unlabeled_value=unlabeled, **common.common_kwargs(args)), args.output)


if __name__ == '__main__':
  sys.exit(main())
