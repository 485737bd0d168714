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
    # The 40-epoch pce_only run of docs/results.md 7. trained steps 200 to
    # 1800 in 4433 s, evaluations every 225 steps included, with nothing
    # else running (the 200-step runs' 420 s / 200 steps had fewer
    # evaluations per step and underestimated it).
    cpu_seconds_per_step=2.8,
    cpu_seconds_source='the 40-epoch pce_only run of docs/results.md 7.',
    full_labels='', full_method='full', default_output='docs/results.md',
    default_root='runs/study')

MSRC = StudyDataset(
    name='msrc', display_name='MSRC-v2', config_file='configs/msrc.py',
    title='MSRC-v2 weak-label study',
    description='MSRC-v2, 21 classes (train 276, val 59 images; void '
    'ignored), weak training labels (tags, boxes, points, clicks, '
    'scribbles) from the seeded generator of `data_prep/sparse_labels.py`',
    train_images=276, val_images=59, image_size=(320, 320),
    # Measured (main.py, clicks:20 pce_only at size=cpu, 30 steps, then one
    # evaluation of the 59 val images) on the 2-vCPU AMD EPYC under load 5
    # to 10 (two background training runs and other jobs), 2026-12-05:
    # steps 10 to 30 in 126.8 s (6.3 s/step after compilation), the
    # evaluation 104 s with its compilation (at most 0.6 s/step at one
    # evaluation per 170 steps). CamVid's size=cpu trains the same model,
    # crop and batch at 2.8 s/step on an idle machine: this figure is the
    # loaded machine's.
    cpu_seconds_per_step=6.9,
    cpu_seconds_source='30 steps and one evaluation of clicks:20 pce_only, '
    '2-vCPU AMD EPYC under load 5-10, 2026-12-05; about 2.8 on an idle '
    'machine, as CamVid',
    full_labels='dense', full_method='pce_only',
    default_output='docs/results_msrc.md', default_root='runs/msrc')

DATASETS = {d.name: d for d in (CAMVID, MSRC)}


def dataset_of_config(config_file: str) -> StudyDataset | None:
  """The dataset whose config file is `config_file` (None: none)."""
  return next((d for d in DATASETS.values()
               if d.config_file == config_file), None)
