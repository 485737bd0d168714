"""The quality of a run's pseudo-labels: for every pass folder of a workdir
(a stage's pseudo-label dataset, agmm_jax/data/pseudo_labels.py: SPML's
`spml_pseudo_labels`, the CAM and box pipelines' passes), its IoU against
the dense labels of the same training records, which weak-label runs never
train on. A record keeps it, so the report has it after the workdir is gone.
"""

import json
import os
from typing import Any

# A pass may write its own measure beside its records; read first when there.
QUALITY_FILE = 'quality.json'


def _is_pass(folder: str) -> bool:
  """A complete pass folder: a prepared dataset of one split (a pass writes
  its split only; WORKDIR/data, the run's own prepared data, has two; one
  still being written is TARGET.tmp, without metadata)."""
  # Imported here: the library loads JAX, which --plan does not need.
  from agmm_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  try:
    with open(os.path.join(folder, input_pipeline.METADATA_FILE)) as f:
      return len(json.load(f)['splits']) == 1
  except (OSError, KeyError, TypeError, json.JSONDecodeError):
    return False


def pass_folders(workdir: str) -> list[str]:
  """The complete pass folders directly in `workdir`, sorted by name."""
  if not os.path.isdir(workdir):
    return []
  return sorted(name for name in os.listdir(workdir)
                if not name.endswith('.tmp')
                and _is_pass(os.path.join(workdir, name)))


def measure(folder: str, split: str = 'train') -> dict[str, Any]:
  """`{'miou', 'pixel_accuracy', 'per_class': {class: IoU}, 'coverage'}` of
  the pseudo-labels in `folder` against its dense labels (fractions; NaN
  for a class absent from both); coverage: the share of densely labeled
  pixels the pass labeled."""
  # Imported here: the library loads JAX, which --plan does not need.
  # pylint: disable=g-import-not-at-top
  from agmm_jax.data import input_pipeline
  from agmm_jax.data import pseudo_labels
  from agmm_jax.evaluation import metrics
  # pylint: enable=g-import-not-at-top
  confusion, pseudo_labeled, dense_labeled = (
      pseudo_labels.confusion_with_dense(folder, split))
  scores = metrics.segmentation_scores(confusion)
  names = input_pipeline.class_names(input_pipeline.read_metadata(folder))
  return {'miou': float(scores['miou']),
          'pixel_accuracy': float(scores['pixel_accuracy']),
          'per_class': {str(n): float(v) for n, v in
                        zip(names, scores['per_class_iou'])},
          'coverage': pseudo_labeled / dense_labeled if dense_labeled else 0.0}


def read_qualities(workdir: str) -> dict[str, dict[str, Any]]:
  """`{pass folder name: quality}` of every pass folder of `workdir`: its
  QUALITY_FILE when the pass wrote one (`source` 'QUALITY_FILE'), else
  measured here (`source` 'measured')."""
  qualities = {}
  for name in pass_folders(workdir):
    folder = os.path.join(workdir, name)
    path = os.path.join(folder, QUALITY_FILE)
    if os.path.exists(path):
      with open(path) as f:
        try:
          quality = dict(json.load(f), source=QUALITY_FILE)
        except json.JSONDecodeError as e:
          raise ValueError(f'{path}: not valid JSON ({e})') from None
    else:
      quality = dict(measure(folder), source='measured')
    qualities[name] = quality
  return qualities
