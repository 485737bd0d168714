"""The report's figures: learning curves of every cell and the qualitative
overlay grid (the best seed of each method predicting a few val images).
"""

import io
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence

import numpy as np

from benchmarks.study.grid import FULL, REPO_ROOT, labels_tag
from benchmarks.study.report import CellSummary


def plot_curves(summaries: Sequence[CellSummary], path: str) -> None:
  """Writes a PNG: val mIoU vs step (left) and train loss vs step (right),
  one colour per cell, one line per seed."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  figure, (miou_axes, loss_axes) = plt.subplots(1, 2, figsize=(11, 4.2))
  colors = plt.get_cmap('tab10' if len(summaries) <= 10 else 'tab20')
  for index, summary in enumerate(summaries):
    color = colors(index % colors.N)
    for seed_index, result in enumerate(summary.results):
      name = summary.cell.name if seed_index == 0 else None
      steps, values = result.miou_curve
      miou_axes.plot(steps, 100 * values, color=color, marker='.', lw=1.2,
                     label=name)
      steps, values = result.loss_curve
      # Markers keep short curves (a single logged step) visible.
      loss_axes.plot(steps, values, color=color, lw=1.0, alpha=0.8,
                     marker='.' if steps.size < 50 else None, label=name)
  miou_axes.set(xlabel='step', ylabel='val mIoU (%)',
                title='evaluation (one line per seed)')
  loss_axes.set(xlabel='step', ylabel='total train loss',
                title='training loss')
  for axes in (miou_axes, loss_axes):
    axes.grid(alpha=0.3)
  miou_axes.legend(fontsize=7, loc='lower right')
  figure.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  figure.savefig(path, dpi=90)
  plt.close(figure)


def overlay_path(output_dir: str, labels_spec: str) -> str:
  """Where make_overlays writes the grid of `labels_spec`."""
  return os.path.join(output_dir, f'qualitative_{labels_tag(labels_spec)}.png')


def make_overlays(summaries: Sequence[CellSummary], labels_spec: str,
                  output_dir: str, *, num_images: int = 3,
                  python: str = sys.executable,
                  repo_root: str = REPO_ROOT,
                  complete_only: bool = False) -> str | None:
  """Predicts a few val images with the best seed of every method trained on
  `labels_spec` (plus `full`) and writes one small grid PNG; returns its path
  (None when no such run has a checkpoint, or, with `complete_only`, when
  one method's best seed has none: a grid missing methods would replace a
  complete one).

  Columns: input, ground truth, one prediction per method. The predictions
  come from the trainer's predict mode (best checkpoint) on val images
  shrunk by the run's `data.prepare.downscale` (the training resolution).
  """
  wanted = [s for s in summaries
            if s.cell.labels == labels_spec or s.cell.method == FULL]
  chosen = [s for s in wanted
            if os.path.isdir(os.path.join(repo_root, s.best.run.workdir,
                                          'checkpoints'))]
  if not chosen or (complete_only and len(chosen) < len(wanted)):
    return None
  with open(os.path.join(repo_root, chosen[0].best.run.workdir,
                         'config.json')) as f:
    config = json.load(f)
  source_root = os.path.join(repo_root, config['data']['prepare']['root'])
  factor = max(int(config['data']['prepare']['downscale']), 1)
  void_value = int(config['data']['prepare']['void_value'])
  image_dir = os.path.join(source_root, 'val', 'images')
  all_names = sorted(os.listdir(image_dir))
  # Evenly spaced over the (sequence-ordered) val set: different scenes.
  names = [all_names[i] for i in sorted(set(np.linspace(
      0, len(all_names) - 1, num_images).astype(int).tolist()))]

  from PIL import Image  # pylint: disable=g-import-not-at-top
  from agmm_jax.evaluation import visualize  # pylint: disable=g-import-not-at-top

  def shrink(image, resample):
    return image.resize((image.width // factor, image.height // factor),
                        resample) if factor > 1 else image

  with tempfile.TemporaryDirectory() as scratch:
    inputs = os.path.join(scratch, 'images')
    os.makedirs(inputs)
    panels: dict[str, list[np.ndarray]] = {}
    for name in names:
      stem = os.path.splitext(name)[0]
      with Image.open(os.path.join(image_dir, name)) as image:
        rgb = shrink(image.convert('RGB'), Image.Resampling.BOX)
      rgb.save(os.path.join(inputs, stem + '.png'))
      with Image.open(os.path.join(source_root, 'val', 'labels',
                                   stem + '.png')) as label:
        truth = np.asarray(shrink(label, Image.Resampling.NEAREST), np.int32)
      truth = np.where(truth == void_value, -1, truth)
      panels.setdefault('input', []).append(np.asarray(rgb))
      panels.setdefault('ground truth', []).append(
          visualize.overlay(np.asarray(rgb), truth, alpha=0.6))
    for summary in chosen:
      run = summary.best.run
      output = os.path.join(scratch, summary.cell.name)
      argv = list(run.argv[1:]) + [
          '--config.mode=predict', f'--config.predict.input_dir={inputs}',
          f'--config.predict.output_dir={output}']
      completed = subprocess.run([python] + argv, cwd=repo_root,
                                 capture_output=True, text=True, check=False)
      if completed.returncode != 0:
        print(f'predict failed for {run.workdir}:\n{completed.stderr[-2000:]}',
              file=sys.stderr)
        continue
      column = f'{summary.cell.method} (seed {run.seed})'
      for index, name in enumerate(names):
        stem = os.path.splitext(name)[0]
        with Image.open(os.path.join(output, stem + '.png')) as predicted:
          classes = np.asarray(predicted, np.int32)
        classes = np.where(classes == 255, -1, classes)
        panels.setdefault(column, []).append(
            visualize.overlay(panels['input'][index], classes, alpha=0.6))

  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  columns = list(panels)
  figure, axes = plt.subplots(len(names), len(columns), squeeze=False,
                              figsize=(2.2 * len(columns), 1.75 * len(names)))
  for col, title in enumerate(columns):
    for row in range(len(names)):
      axes[row, col].imshow(panels[title][row])
      axes[row, col].set_axis_off()
    axes[0, col].set_title(title, fontsize=7)
  figure.tight_layout(pad=0.2)
  buffer = io.BytesIO()
  figure.savefig(buffer, format='png', dpi=80)
  plt.close(figure)
  os.makedirs(output_dir, exist_ok=True)
  path = overlay_path(output_dir, labels_spec)
  # A 256-colour palette PNG is about a third of the RGB one.
  with Image.open(buffer) as grid:
    grid.convert('RGB').quantize(256).save(path, optimize=True)
  return path
