r"""What the box terms take for labels, against the dense labels of the images.

  python -m benchmarks.box_label_quality \
      --data_dir=data/msrc_boxesmin_area100_lseed0 --inner_area=1,0.2

Every training record with boxes and dense labels (the split's records, whole
images, no crop) is read; the dense labels are never trained on by a box run,
so they tell what each term's labels get right:

* ``box_fill`` at each ``--inner_area`` (1: Simple Does It's Box, the
  smaller of nested boxes in front; < 1: their Box^i): its labels, from
  ``agmm_jax.methods.boxes.smallest_box_target`` itself, scored as a
  pseudo-label pass is (benchmarks/pseudo_label_quality.py): the share of
  the densely labeled pixels it labels, the share of those it labels right,
  mIoU and per-class IoU;
* ``box_pce`` (and ``box_outside``): each pixel's allowed classes ``A(x)``
  (the classes of the boxes that contain it, plus ``--background_class``):
  the share of the densely labeled pixels with a non-empty ``A(x)``, the
  share of those whose true class is in it (what the partial cross-entropy
  accepts is right), whose ``A(x)`` is the true class alone (the loss then
  teaches the pixel exactly), and the mean size of ``A(x)``.

Prints Markdown tables.
"""

import argparse
import os
import sys
from collections.abc import Iterator, Sequence

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from agmm_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
from agmm_jax.data import labels as labels_lib  # pylint: disable=g-import-not-at-top
from agmm_jax.data import tfrecord  # pylint: disable=g-import-not-at-top
from agmm_jax.data import weak_labels  # pylint: disable=g-import-not-at-top
from agmm_jax.evaluation import metrics  # pylint: disable=g-import-not-at-top
from agmm_jax.methods import boxes as boxes_lib  # pylint: disable=g-import-not-at-top


def records(data_dir: str, split: str
            ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields ``(boxes [n, 5], dense label [H, W])`` of each record of
  `split`; a one-line ValueError when the split lacks boxes or dense
  labels."""
  metadata = input_pipeline.read_metadata(data_dir)
  num_classes = int(metadata['num_classes'])
  info = metadata['splits'][split]
  if not info.get('has_dense'):
    raise ValueError(f'{data_dir}: the {split} split stores no dense labels')
  for shard in info['shards']:
    path = os.path.join(data_dir, shard)
    for index, data in enumerate(tfrecord.read_all_records(path)):
      example = tfrecord.decode_example(data)
      dense = input_pipeline.decode_label_png(
          example[input_pipeline.LABEL_KEYS['dense']], num_classes)
      weak = weak_labels.from_record(
          example, num_classes=num_classes, height=dense.shape[0],
          width=dense.shape[1], where=f'{path} record {index}')
      if weak is None:
        raise ValueError(f'{path}: record {index} holds no boxes (prepare '
                         'the data with the sparse spec boxes)')
      yield weak[1], dense


def fill_confusion(boxes: np.ndarray, dense: np.ndarray, num_classes: int,
                   inner_area: float, background_class: int
                   ) -> tuple[np.ndarray, int]:
  """``(confusion [K, K] (dense, box_fill label), labeled dense pixels)``
  of one image."""
  target = np.asarray(boxes_lib.smallest_box_target(
      jnp.asarray(boxes[None]), dense.shape[0], dense.shape[1], inner_area,
      background_class))[0]
  both = (dense != labels_lib.UNLABELED) & (target != labels_lib.UNLABELED)
  confusion = np.bincount(dense[both] * num_classes + target[both],
                          minlength=num_classes**2)
  return confusion.reshape(num_classes, num_classes), int(both.sum())


def allowed_counts(boxes: np.ndarray, dense: np.ndarray, num_classes: int,
                   background_class: int) -> np.ndarray:
  """``[covered, truth allowed, truth alone, summed |A(x)|]`` over the
  densely labeled pixels of one image."""
  cover = np.asarray(boxes_lib.allowed_mask(
      jnp.asarray(boxes[None]), dense.shape[0], dense.shape[1], num_classes,
      background_class))[0]
  truth = dense != labels_lib.UNLABELED
  sizes = cover.sum(-1)
  covered = truth & (sizes > 0)
  truth_allowed = covered & np.take_along_axis(
      cover, np.maximum(dense, 0)[..., None], -1)[..., 0]
  return np.array([covered.sum(), truth_allowed.sum(),
                   (truth_allowed & (sizes == 1)).sum(), sizes[covered].sum()],
                  np.int64)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data_dir', required=True)
  parser.add_argument('--split', default='train')
  parser.add_argument('--inner_area', default='1,0.2',
                      help='comma-separated box_fill inner areas')
  parser.add_argument('--background_class', type=int,
                      default=boxes_lib.NO_BACKGROUND)
  args = parser.parse_args(argv)
  try:
    metadata = input_pipeline.read_metadata(args.data_dir)
    names = metadata['classes']
    num_classes = len(names)
    areas = [float(a) for a in args.inner_area.split(',')]
    confusions = {a: np.zeros((num_classes, num_classes), np.int64)
                  for a in areas}
    filled = dict.fromkeys(areas, 0)
    counts = np.zeros(4, np.int64)
    dense_pixels = images = 0
    for boxes, dense in records(args.data_dir, args.split):
      images += 1
      dense_pixels += int((dense != labels_lib.UNLABELED).sum())
      counts += allowed_counts(boxes, dense, num_classes, args.background_class)
      for area in areas:
        confusion, labeled = fill_confusion(boxes, dense, num_classes, area,
                                            args.background_class)
        confusions[area] += confusion
        filled[area] += labeled
  except (ValueError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'{images} {args.split} images of {args.data_dir}, '
        f'{dense_pixels} densely labeled pixels\n')
  print('| labels | labeled % | right % | mIoU | '
        + ' | '.join(names) + ' |')
  print('|---' * (num_classes + 4) + '|')
  for area in areas:
    scores = metrics.segmentation_scores(confusions[area])
    iou = ' | '.join(f'{100 * v:.1f}' for v in scores['per_class_iou'])
    print(f'| box_fill, inner_area={area:g} | '
          f'{100 * filled[area] / dense_pixels:.1f} | '
          f'{100 * np.trace(confusions[area]) / max(filled[area], 1):.1f} | '
          f'{100 * scores["miou"]:.1f} | {iou} |')
  covered, allowed, alone, sizes = counts.tolist()
  print('\n| box_pce: A(x) | covered % | truth in A(x) % | truth alone % | '
        'mean classes in A(x) |\n|---|---|---|---|---|')
  print(f'| background_class={args.background_class} | '
        f'{100 * covered / dense_pixels:.1f} | '
        f'{100 * allowed / max(covered, 1):.1f} | '
        f'{100 * alone / max(covered, 1):.1f} | {sizes / max(covered, 1):.2f} |')
  return 0


if __name__ == '__main__':
  sys.exit(main())
