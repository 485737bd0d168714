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
"""

import argparse
import os
import sys
from typing import Any

from data_prep import common
from data_prep import sparse_labels

VOC_CLASSES = (
    'background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus',
    'car', 'cat', 'chair', 'cow', 'diningtable', 'dog', 'horse', 'motorbike',
    'person', 'pottedplant', 'sheep', 'sofa', 'train', 'tvmonitor')
VOC_VOID = 255
# Official AGMM sub-folders for --sparse_dir=point / scribble.
OFFICIAL_SPARSE_DIRS = {'point': 'point/segcls', 'scribble': 'scribble/seginst'}


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
                         if is_sparse and sparse_dir else None))
        for image_id in read_ids(list_path)]
    options = common.SplitOptions(
        dense_decoder=dense_decoder,
        store_dense=train_dense or not is_sparse,
        sparse_decoder=sparse_decoder if is_sparse else None,
        sparse_spec=spec if is_sparse else None, seed=seed,
        jpeg_quality=jpeg_quality)
    settings = {}
    if is_sparse and sparse_dir:
      settings = {'sparse_dir': sparse_path,
                  'unlabeled_values_accepted': unlabeled_values}
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
                      "labels with this spec, e.g. 'points:1'")
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
