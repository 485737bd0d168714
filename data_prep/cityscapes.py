r"""Converts Cityscapes (fine annotations, N-click labels) to TFRecord shards.

Layout under ``--root``::

  leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
  gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png
  {N}clicks/{city}_{seq}_{frame}_gtFine_labelTrainIds.png    (N = 20, 50, 100)

The click folders are flat, named after the gtFine ``labelTrainIds`` file, as
the official AGMM code reads them (``root/100clicks/<basename>``); they hold
train ids (0..18) and an unlabeled value of 19 (the official
``ignore_index``) or 255: by default both are accepted, or
``--unlabeled_value=V``. ``labelIds`` are mapped to the 19 train ids (all other
ids -> 255, void); ``--gt_kind=labelTrainIds`` reads the already mapped files.
Image ids are ``{city}_{seq}_{frame}``. Images are stored as they are (PNG)
unless ``--jpeg_quality`` is set.

  python -m data_prep.cityscapes --root=cityscapes --clicks=20 \
      --output=data/cityscapes_20clicks
"""

import argparse
import glob
import os
import sys
from typing import Any

from data_prep import common
from data_prep import sparse_labels

CITYSCAPES_CLASSES = (
    'road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic light',
    'traffic sign', 'vegetation', 'terrain', 'sky', 'person', 'rider', 'car',
    'truck', 'bus', 'train', 'motorcycle', 'bicycle')
# labelId -> trainId for the 19 evaluated classes (cityscapesScripts
# labels.py); every other labelId in 0..33 is void.
LABEL_ID_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
    24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
NUM_LABEL_IDS = 34
_IMAGE_SUFFIX = '_leftImg8bit.png'


def label_ids_decoder() -> common.LabelDecoder:
  mapping = {label_id: LABEL_ID_TO_TRAIN_ID.get(label_id, 255)
             for label_id in range(NUM_LABEL_IDS)}
  return common.LabelDecoder.from_mapping(mapping, 'Cityscapes labelIds 0..33')


def train_ids_decoder() -> common.LabelDecoder:
  return common.LabelDecoder.identity(len(CITYSCAPES_CLASSES), [255])


def find_examples(root: str, split: str, gt_kind: str, clicks_dir: str,
                  split_file: str = '') -> tuple[list[common.SourceExample],
                                                 list[str]]:
  """Examples of a split, from a directory walk or an official split list."""
  if split_file:
    if not os.path.exists(split_file):
      return [], [f'{split_file}: missing split list']
    image_paths = [os.path.join(root, fields[0])
                   for fields in common.read_split_file(split_file)]
  else:
    image_paths = sorted(glob.glob(
        os.path.join(root, 'leftImg8bit', split, '*', '*' + _IMAGE_SUFFIX)))
    if not image_paths:
      return [], [f'{os.path.join(root, "leftImg8bit", split)}: no '
                  f'*{_IMAGE_SUFFIX} images']
  examples = []
  problems = []
  for image_path in image_paths:
    file_name = os.path.basename(image_path)
    if not file_name.endswith(_IMAGE_SUFFIX):
      problems.append(f'{image_path}: not a *{_IMAGE_SUFFIX} file')
      continue
    image_id = file_name[:-len(_IMAGE_SUFFIX)]
    city = os.path.basename(os.path.dirname(image_path))
    dense_path = os.path.join(root, 'gtFine', split, city,
                              f'{image_id}_gtFine_{gt_kind}.png')
    sparse_path = (os.path.join(clicks_dir,
                                f'{image_id}_gtFine_labelTrainIds.png')
                   if clicks_dir else None)
    examples.append(common.SourceExample(image_id, image_path, dense_path,
                                         sparse_path))
  return examples, problems


def convert_cityscapes(root: str, output: str, *,
                       splits: tuple[str, ...] = ('train', 'val'),
                       sparse_splits: tuple[str, ...] = ('train',),
                       split_files: dict[str, str] | None = None,
                       clicks: int = 0, clicks_dir: str = '', sparse: str = '',
                       gt_kind: str = 'labelIds',
                       unlabeled_value: int | None = None, seed: int = 0,
                       train_dense: bool = True, jpeg_quality: int = 0,
                       num_shards: int = 0, num_workers: int = 1,
                       skip_bad: bool = False, overwrite: bool = False,
                       overlays: int = 0,
                       progress: bool = True) -> dict[str, Any]:
  """Converts Cityscapes; sparse labels from ``clicks``/``clicks_dir`` (files)
  or ``sparse`` (generated). Raises ``common.ConversionError``."""
  if clicks and not clicks_dir:
    clicks_dir = f'{clicks}clicks'
  if bool(clicks_dir) == bool(sparse):
    raise common.ConversionError(
        ['give exactly one of --clicks / --clicks_dir (click label files) and '
         '--sparse (a generator spec)'])
  if gt_kind not in ('labelIds', 'labelTrainIds'):
    raise common.ConversionError(
        [f'--gt_kind must be labelIds or labelTrainIds, got {gt_kind!r}'])
  num_classes = len(CITYSCAPES_CLASSES)
  dense_decoder = (label_ids_decoder() if gt_kind == 'labelIds'
                   else train_ids_decoder())
  unlabeled_values = ([unlabeled_value] if unlabeled_value is not None
                      else [255, num_classes])
  try:
    sparse_decoder = (common.LabelDecoder.identity(num_classes,
                                                   unlabeled_values)
                      if clicks_dir else None)
    spec = sparse_labels.parse_spec(sparse) if sparse else None
  except ValueError as e:
    raise common.ConversionError([str(e)]) from e
  clicks_path = (clicks_dir if os.path.isabs(clicks_dir)
                 else os.path.join(root, clicks_dir)) if clicks_dir else ''
  split_files = split_files or {}
  sources = {}
  for split in splits:
    is_sparse = split in sparse_splits
    examples, problems = find_examples(
        root, split, gt_kind, clicks_path if is_sparse else '',
        split_files.get(split, ''))
    options = common.SplitOptions(
        dense_decoder=dense_decoder,
        store_dense=train_dense or not is_sparse,
        sparse_decoder=sparse_decoder if is_sparse else None,
        sparse_spec=spec if is_sparse else None, seed=seed,
        jpeg_quality=jpeg_quality)
    settings = {}
    if is_sparse and clicks_dir:
      settings = {'clicks_dir': clicks_path,
                  'unlabeled_values_accepted': unlabeled_values}
    sources[split] = common.SplitSource(examples, options, problems, settings)
  return common.convert(
      name='cityscapes', classes=CITYSCAPES_CLASSES, splits=sources,
      output=output, num_shards=num_shards, num_workers=num_workers,
      skip_bad=skip_bad, overwrite=overwrite, overlays=overlays,
      progress=progress,
      extra_metadata={'converter': 'cityscapes',
                      'source_root': os.path.abspath(root),
                      'gt_kind': gt_kind})


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m data_prep.cityscapes',
      description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--root', required=True)
  parser.add_argument('--split_file', action='append', default=[],
                      help='SPLIT=PATH official list (leftImg8bit/... '
                      'gtFine/... per line); default: walk leftImg8bit/SPLIT')
  parser.add_argument('--clicks', type=int, default=0,
                      help='use ROOT/{N}clicks (20, 50, 100)')
  parser.add_argument('--clicks_dir', default='',
                      help='click label folder (relative to --root or '
                      'absolute), e.g. random_50clicks')
  parser.add_argument('--sparse', default='',
                      help="generate instead, e.g. 'clicks:20'")
  parser.add_argument('--gt_kind', default='labelIds',
                      help='labelIds (mapped to train ids) or labelTrainIds')
  parser.add_argument('--unlabeled_value', default='auto',
                      help="click files' unlabeled value: 'auto' (19 and 255) "
                      'or an integer')
  common.add_common_flags(parser)
  args = parser.parse_args(argv)
  split_files, unlabeled = common.parse_sparse_source_flags(parser, args)
  return common.run_cli(lambda: convert_cityscapes(
      args.root, args.output, split_files=split_files, clicks=args.clicks,
      clicks_dir=args.clicks_dir, sparse=args.sparse, gt_kind=args.gt_kind,
      unlabeled_value=unlabeled, **common.common_kwargs(args)), args.output)


if __name__ == '__main__':
  sys.exit(main())
