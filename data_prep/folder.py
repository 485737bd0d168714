r"""Converts a folder dataset (your own data, or CamVid) to TFRecord shards.

Expected layout (CamVid's, see ../shared/datasets/camvid/README.md)::

  ROOT/classes.txt                 one class name per line (line i = value i)
  ROOT/{split}/images/NAME.jpg     (or .jpeg / .png), RGB
  ROOT/{split}/labels/NAME.png     single-channel, values 0..K-1 and void

or a flat folder, one split (named by ``--splits``, default ``val``)::

  ROOT/classes.txt, ROOT/images/NAME.jpg, ROOT/labels/NAME.png

Sparse training labels are generated from the dense ones (``--sparse``, a
``data_prep.sparse_labels`` spec) or read from your own PNGs
(``--sparse_dir``: ``DIR/NAME.png`` with class ids and
``--sparse_unlabeled_value`` for unlabeled pixels)::

  python -m data_prep.folder --root=../shared/datasets/camvid --void_value=11 \
      --sparse=clicks:20 --seed=0 --output=data/camvid_clicks20
"""

import argparse
import os
import sys
from typing import Any

from data_prep import common
from data_prep import sparse_labels

_IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
CLASSES_FILE = 'classes.txt'
# The split a flat folder becomes when no name is given: an evaluation split,
# the name configs evaluate by default (config.data.eval_split).
FLAT_SPLIT = 'val'


def is_flat(root: str, images_subdir: str = 'images') -> bool:
  """Whether ``root`` holds one split directly (``ROOT/images``)."""
  return os.path.isdir(os.path.join(root, images_subdir))


def is_folder_dataset(path: str, images_subdir: str = 'images') -> bool:
  """Whether ``path`` looks like a raw folder dataset this converter reads:
  a class list plus ``images/`` at the root or in a split subfolder."""
  if not os.path.isfile(os.path.join(path, CLASSES_FILE)):
    return False
  return is_flat(path, images_subdir) or any(
      os.path.isdir(os.path.join(path, name, images_subdir))
      for name in os.listdir(path))


def read_classes(path: str) -> list[str]:
  if not os.path.exists(path):
    raise common.ConversionError([f'{path}: missing class list (one name per '
                                  'line)'])
  with open(path) as f:
    classes = [line.strip() for line in f if line.strip()]
  if not classes:
    raise common.ConversionError([f'{path}: no class names'])
  return classes


def find_examples(root: str, split: str, images_subdir: str = 'images',
                  labels_subdir: str = 'labels',
                  sparse_dir: str = '') -> tuple[list[common.SourceExample],
                                                 list[str]]:
  """Pairs images with labels by file stem; returns (examples, problems).

  A flat ``root`` (``is_flat``) is the split itself. Raises ConversionError
  (not skippable) when the split's folders are missing or hold no image.
  """
  split_dir = root if is_flat(root, images_subdir) else os.path.join(root, split)
  image_dir = os.path.join(split_dir, images_subdir)
  label_dir = os.path.join(split_dir, labels_subdir)
  problems = []
  if not os.path.isdir(image_dir):
    raise common.ConversionError(
        [f'{image_dir}: missing image folder for split {split}'])
  if not os.path.isdir(label_dir):
    raise common.ConversionError(
        [f'{label_dir}: missing label folder for split {split}'])
  images = {}
  for file_name in sorted(os.listdir(image_dir)):
    stem, extension = os.path.splitext(file_name)
    if extension.lower() not in _IMAGE_EXTENSIONS:
      continue
    if stem in images:
      problems.append(f'{os.path.join(image_dir, file_name)}: second image '
                      f'for id {stem!r} ({images[stem]})')
      continue
    images[stem] = os.path.join(image_dir, file_name)
  labels = {os.path.splitext(n)[0] for n in os.listdir(label_dir)
            if n.lower().endswith('.png')}
  for stem in sorted(labels - set(images)):
    problems.append(f'{os.path.join(label_dir, stem + ".png")}: label file '
                    'without an image')
  examples = [
      common.SourceExample(
          image_id=stem, image_path=path,
          dense_path=os.path.join(label_dir, stem + '.png'),
          sparse_path=(os.path.join(sparse_dir, stem + '.png')
                       if sparse_dir else None))
      for stem, path in images.items()
  ]
  if not examples and not problems:
    raise common.ConversionError([f'{image_dir}: no images'])
  return examples, problems


def convert_folder(root: str, output: str, *,
                   splits: tuple[str, ...] = common.DEFAULT_SPLITS,
                   sparse_splits: tuple[str, ...] = ('train',),
                   void_values: tuple[int, ...] = (255,),
                   classes_file: str = '', sparse: str = '',
                   sparse_dir: str = '', sparse_unlabeled_value: int = 255,
                   seed: int = 0, train_dense: bool = True, downscale: int = 1,
                   jpeg_quality: int = 0, images_subdir: str = 'images',
                   labels_subdir: str = 'labels', name: str = '',
                   num_shards: int = 0, num_workers: int = 1,
                   skip_bad: bool = False, overwrite: bool = False,
                   overlays: int = 0, progress: bool = True) -> dict[str, Any]:
  """Converts ``root`` into a prepared dataset at ``output``.

  Splits not in ``sparse_splits`` are evaluation splits: dense labels only
  (always stored). A flat ``root`` is one split: ``splits`` must name one.
  Returns the metadata; raises ``common.ConversionError``.
  """
  if sparse and sparse_dir:
    raise common.ConversionError(['give --sparse or --sparse_dir, not both'])
  if not os.path.isdir(root):
    raise common.ConversionError([f'{root}: no such folder'])
  if is_flat(root, images_subdir) and len(splits) != 1:
    raise common.ConversionError([
        f'{root}: a flat folder ({images_subdir}/ at the root) is one split; '
        f'name it with one --splits=NAME, not {",".join(splits)}'])
  for split in splits:
    common.check_split_name(split)
  classes = read_classes(classes_file or os.path.join(root, CLASSES_FILE))
  num_classes = len(classes)
  try:
    dense_decoder = common.LabelDecoder.identity(num_classes, void_values)
    sparse_decoder = (common.LabelDecoder.identity(
        num_classes, [sparse_unlabeled_value]) if sparse_dir else None)
    spec = sparse_labels.parse_spec(sparse) if sparse else None
  except ValueError as e:
    raise common.ConversionError([str(e)]) from e
  sources = {}
  missing = []
  for split in splits:
    is_sparse = split in sparse_splits and bool(sparse or sparse_dir)
    try:
      examples, problems = find_examples(
          root, split, images_subdir, labels_subdir,
          sparse_dir if is_sparse else '')
    except common.ConversionError as error:
      missing.extend(error.problems)
      continue
    options = common.SplitOptions(
        dense_decoder=dense_decoder,
        store_dense=train_dense or split not in sparse_splits,
        sparse_decoder=sparse_decoder if is_sparse else None,
        sparse_spec=spec if is_sparse else None,
        seed=seed, downscale=downscale, jpeg_quality=jpeg_quality)
    settings = {'sparse_dir': os.path.abspath(sparse_dir)} if (
        is_sparse and sparse_dir) else {}
    sources[split] = common.SplitSource(examples, options, problems, settings)
  if missing:
    # Listed with the other splits' bad files, but --skip_bad cannot help.
    raise common.ConversionError(
        missing + [p for source in sources.values() for p in source.problems])
  return common.convert(
      name=name or os.path.basename(os.path.normpath(root)), classes=classes,
      splits=sources, output=output, num_shards=num_shards,
      num_workers=num_workers, skip_bad=skip_bad, overwrite=overwrite,
      overlays=overlays, progress=progress,
      extra_metadata={'converter': 'folder', 'source_root': os.path.abspath(
          root), 'void_values': list(void_values), 'downscale': downscale})


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m data_prep.folder',
      description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--root', required=True)
  parser.add_argument('--classes_file', default='',
                      help='default: ROOT/classes.txt')
  parser.add_argument('--void_value', default='255',
                      help='comma-separated dense values meaning void')
  parser.add_argument('--sparse', default='',
                      help="generator spec, e.g. 'clicks:20', "
                      "'points:1:margin=5', 'scribbles:0.3'")
  parser.add_argument('--sparse_dir', default='',
                      help='your own sparse label PNGs (DIR/NAME.png)')
  parser.add_argument('--sparse_unlabeled_value', type=int, default=255,
                      help='value of unlabeled pixels in --sparse_dir PNGs')
  parser.add_argument('--downscale', type=int, default=1,
                      help='shrink images and labels by this integer factor')
  parser.add_argument('--images_subdir', default='images')
  parser.add_argument('--labels_subdir', default='labels')
  parser.add_argument('--name', default='', help='default: ROOT folder name')
  common.add_common_flags(parser)
  args = parser.parse_args(argv)
  if args.splits is None:
    args.splits = (FLAT_SPLIT if is_flat(args.root, args.images_subdir)
                   else ','.join(common.DEFAULT_SPLITS))
  try:
    void_values = tuple(int(v) for v in args.void_value.split(',') if v)
  except ValueError:
    parser.error(f'--void_value must be integers, got {args.void_value!r}')
  return common.run_cli(lambda: convert_folder(
      args.root, args.output, void_values=void_values,
      classes_file=args.classes_file, sparse=args.sparse,
      sparse_dir=args.sparse_dir,
      sparse_unlabeled_value=args.sparse_unlabeled_value,
      downscale=args.downscale, images_subdir=args.images_subdir,
      labels_subdir=args.labels_subdir, name=args.name,
      **common.common_kwargs(args)), args.output)


if __name__ == '__main__':
  sys.exit(main())
