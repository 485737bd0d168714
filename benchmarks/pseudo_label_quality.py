"""How good SPML's stage-2 pseudo-labels are: their IoU against the dense
labels of the same training records (which sparse-label runs never train on).

  python -m benchmarks.pseudo_label_quality runs/study/clicks20_spml_seed0

Prints the share of labeled (non-void) pixels the pass labeled, the pixel
accuracy and the per-class and mean IoU of `WORKDIR/spml_pseudo_labels`.
"""

import argparse
import os

import numpy as np

from agmm_jax import input_pipeline
from agmm_jax import labels
from agmm_jax import metrics
from agmm_jax import spml_stage2
from agmm_jax import tfrecord


def confusion_of_pseudo_labels(folder: str) -> tuple[np.ndarray, int, int]:
  """`(confusion [K, K] (true, pseudo), pseudo-labeled pixels, dense-labeled
  pixels)` over every training record of the pseudo-label dataset
  `folder`."""
  metadata = input_pipeline.read_metadata(folder)
  num_classes = int(metadata['num_classes'])
  confusion = np.zeros((num_classes, num_classes), np.int64)
  pseudo_labeled = dense_labeled = 0
  for shard in metadata['splits']['train']['shards']:
    for data in tfrecord.read_all_records(os.path.join(folder, shard)):
      example = tfrecord.decode_example(data)
      dense, pseudo = (input_pipeline.decode_label_png(
          example[f'label/{kind}/encoded'], num_classes)
                       for kind in ('dense', 'sparse'))
      truth = dense != labels.UNLABELED
      both = truth & (pseudo != labels.UNLABELED)
      dense_labeled += int(truth.sum())
      pseudo_labeled += int(both.sum())
      confusion += np.bincount(
          dense[both] * num_classes + pseudo[both],
          minlength=num_classes**2).reshape(num_classes, num_classes)
  return confusion, pseudo_labeled, dense_labeled


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('workdir', help='the workdir of an spml run')
  args = parser.parse_args()
  folder = os.path.join(args.workdir, spml_stage2.PSEUDO_LABEL_DIR)
  confusion, pseudo_labeled, dense_labeled = confusion_of_pseudo_labels(folder)
  scores = metrics.segmentation_scores(confusion)
  classes = input_pipeline.class_names(input_pipeline.read_metadata(folder))
  print(f'{folder}: pseudo-labels on {100 * pseudo_labeled / dense_labeled:.1f}%'
        ' of the densely labeled training pixels')
  print(metrics.format_iou_table(scores['per_class_iou'], classes,
                                 scores['miou'], scores['pixel_accuracy']))


if __name__ == '__main__':
  main()
