"""The datasets a study can run (`--dataset`): each one's config file, split
sizes (a run's steps per epoch, its evaluations' cost), how its dense-label
cell is written, and the measured CPU seconds per step that `--plan`
predicts with.
"""

import dataclasses
import importlib
import os
from typing import Any


@dataclasses.dataclass(frozen=True)
class StudyDataset:
  """One dataset of the study.

  `config_file` takes `labels=,method=,size=,lseed=` arguments; the cell of
  dense labels (`full`) is `labels=FULL_LABELS,method=FULL_METHOD` ('' as
  labels: the first labels spec, whose prepared folder holds the dense
  labels too); `image_size` is the largest image (the eval canvas when the
  config sets none), before the config's `prepare.downscale`;
  `cpu_seconds_per_step`: a size=cpu run on this project's 2-core machines,
  evaluations included (`cpu_seconds_source` says how it was measured);
  `default_output` / `default_root`: the report and the workdirs' folder
  of a grid given without --output / --root (distinct per dataset, so
  that the archive's folders, named after the root, never mix datasets).
  """
  name: str
  display_name: str
  config_file: str
  title: str
  description: str
  train_images: int
  val_images: int
  image_size: tuple[int, int]
  cpu_seconds_per_step: float
  cpu_seconds_source: str
  full_labels: str
  full_method: str
  default_output: str
  default_root: str

  def full_config_args(self, first_labels: str) -> tuple[str, str]:
    """(labels, method) arguments of the dense-label cell's command."""
    return self.full_labels or first_labels, self.full_method

  def get_config(self, argument: str) -> Any:
    """The config file's get_config(argument)."""
    module = importlib.import_module(
        'configs.' + os.path.splitext(os.path.basename(self.config_file))[0])
    return module.get_config(argument)


CAMVID = StudyDataset(
    name='camvid', display_name='CamVid', config_file='configs/camvid_clicks.py',
    title='CamVid click-supervision study',
    description='CamVid, 11 classes (train 367, val 101 images; void '
    'ignored), sparse training labels from `data_prep/sparse_labels.py`',
    train_images=367, val_images=101, image_size=(360, 480),
    # The 40-epoch pce_only run re-measured for issue 32 (87a534e, the
    # study's command in a new workdir, alone on the idle 2-vCPU AMD EPYC):
    # 1800 steps and 8 evaluations in 46 min 20 s (docs/benchmarks.md, "On
    # the idle machine"). The archived run of docs/results.md 7. took 2.8
    # s/step on the earlier Intel machine with the old convolutions.
    cpu_seconds_per_step=1.54,
    cpu_seconds_source='the 40-epoch pce_only run on the idle 2-vCPU AMD '
    'EPYC, docs/benchmarks.md',
    full_labels='', full_method='full', default_output='docs/results.md',
    default_root='runs/study')

MSRC = StudyDataset(
    name='msrc', display_name='MSRC-v2', config_file='configs/msrc.py',
    title='MSRC-v2 weak-label study',
    description='MSRC-v2, 21 classes (train 276, val 59 images; void '
    'ignored), weak training labels (tags, boxes, points, clicks, '
    'scribbles) from the seeded generator of `data_prep/sparse_labels.py`',
    train_images=276, val_images=59, image_size=(320, 320),
    # The same model, crop (161) and batch (8) as CamVid's size=cpu, and
    # one evaluation of 59 images per 170 steps against 101 per 225: taken
    # as CamVid's idle figure. Measured here: 6.3 s/step under load 5-10
    # (2026-12-05); 2.6 s/step for the tags classifier on one core while a
    # CamVid run had the other (2026-12-06).
    cpu_seconds_per_step=1.54,
    cpu_seconds_source="CamVid's 40-epoch pce_only run (same model, crop "
    'and batch) on the idle 2-vCPU AMD EPYC',
    full_labels='dense', full_method='pce_only',
    default_output='docs/results_msrc.md', default_root='runs/msrc')

DATASETS = {d.name: d for d in (CAMVID, MSRC)}


def dataset_of_config(config_file: str) -> StudyDataset | None:
  """The dataset whose config file is `config_file` (None: none)."""
  return next((d for d in DATASETS.values()
               if d.config_file == config_file), None)
