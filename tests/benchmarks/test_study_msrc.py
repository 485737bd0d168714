"""The study on MSRC (`--dataset=msrc`, `--preset=msrc`): the grid per label
kind, the commands of configs/msrc.py, the runs waiting for the CAM stages,
the predicted time, and the pseudo-label quality a record keeps (against a
brute-force confusion written in the test)."""

import json

import numpy as np
import pytest

from agmm_jax.data import input_pipeline
from agmm_jax.data import labels as labels_lib
from agmm_jax.data import tfrecord
from benchmarks import camvid_study
from benchmarks.study import archive
from benchmarks.study.datasets import MSRC
from benchmarks.study.device_plan import run_shape
from benchmarks.study.grid import (
    FULL, STUDY_PRESETS, TAG_METHODS, applies, config_error, plan_preset)
from benchmarks.study.pass_quality import QUALITY_FILE, read_qualities
from benchmarks.study.report import pseudo_label_table
from benchmarks.study.results import RunResult
from configs import presets
from tests.benchmarks import test_study_method_table


@pytest.fixture(scope='module')
def msrc_runs():
  return plan_preset(STUDY_PRESETS['msrc'])


def test_msrc_preset_plans_the_best_methods_of_each_label_kind(msrc_runs):
  cells = {(r.cell.labels, r.cell.method) for r in msrc_runs}
  assert cells == {
      ('boxes', 'box_pce_gatedcrf'), ('boxes', 'box_pce'), ('boxes', 'boxinst'),
      ('boxes', 'box_fill'), ('boxes', 'cam'),
      ('clicks:20', 'pce_only'), ('clicks:20', 'pce_ncut'),
      ('scribbles', 'pce_only'), ('scribbles', 'pce_densecrf'),
      ('scribbles', 'soft_self_labeling'), ('dense', FULL)} | {
          ('tags', m) for m in TAG_METHODS}
  assert sorted({r.seed for r in msrc_runs}) == [0, 1]
  for run in msrc_runs:
    assert run.config_arg.startswith('configs/msrc.py:')
    assert run.workdir.startswith('runs/msrc/')
    assert archive.record_path(run, 'docs/results/records', '/repo') == (
        f'/repo/docs/results/records/msrc/{run.workdir.split("/")[-1]}.json')
  full = next(r for r in msrc_runs if r.cell.method == FULL)
  assert 'labels=dense,method=pce_only,' in full.config_arg


def test_box_and_tag_methods_only_on_their_labels():
  for method in presets.BOX_PRESETS:
    assert applies(method, 'boxes') and applies(method, 'boxes:min_area=50')
    assert not applies(method, 'clicks:20') and not applies(method, 'tags')
  for method in presets.PRESETS:
    assert not applies(method, 'boxes') and not applies(method, 'tags')
  # The CAM stages run from tags and from boxes.
  assert applies('cam', 'tags') and applies('cam', 'boxes')
  assert not applies('cam', 'scribbles')
  assert applies('pce_only', 'scribbles')
  assert not applies('spml', 'scribbles')


def test_msrc_run_shapes(msrc_runs):
  clicks = next(r for r in msrc_runs if r.cell.labels == 'clicks:20')
  shape = run_shape(clicks)
  # 276 // 8 = 34 steps an epoch, 40 epochs; evaluations every 170 steps.
  assert (shape.total_steps, shape.eval_every, shape.num_evals) == (
      34 * 40, 170, 8)
  assert shape.val_images == 59
  assert config_error(clicks) == ''
  # A tags run trains the CAM classifier (40 epochs) before its segmenter.
  tags = [r for r in msrc_runs if r.cell.labels == 'tags']
  assert tags and all(config_error(r) == '' for r in tags)
  assert {run_shape(r).total_steps for r in tags} == {2 * 34 * 40}


def test_plan_predicts_the_runs_at_each_methods_cost(capsys, tmp_path):
  # Archived 200-step CamVid runs: pce_ncut at twice pCE's time per step.
  for method, span in (('pce_only', 400.0), ('pce_ncut', 800.0)):
    for seed in (0, 1):
      test_study_method_table._write(
          tmp_path, 'study', f'{method}_{seed}',
          test_study_method_table._record(method, seed, 0.2, span_s=span))
  assert camvid_study.main(['--plan', '--preset=msrc', '--seeds=0',
                            '--labels=clicks:20,tags',
                            f'--archive={tmp_path}']) == 0
  lines = capsys.readouterr().out.splitlines()
  commands = [line for line in lines if line.startswith('python main.py')]
  # pce_only and pce_ncut on clicks, dense labels, the tags methods.
  assert len(commands) == 3 + len(TAG_METHODS)
  # Three runs of 1360 steps at the dataset's seconds per step, pce_ncut's
  # twice, and the tags runs' 2720 (classifier and segmenter) at pCE's
  # (the CAM preset is not archived: its cost is pCE's).
  tag_steps = len(TAG_METHODS) * 2720
  seconds = ((1 + 2 + 1) * 1360 + tag_steps) * MSRC.cpu_seconds_per_step
  hours, minutes = divmod(round(seconds) // 60, 60)
  runs = 3 + len(TAG_METHODS)
  summary = [line for line in lines if line.startswith(f'# {runs} runs')]
  assert summary and summary[0].startswith(
      f'# {runs} runs, {4080 + tag_steps} steps: about {hours}h{minutes:02d}m')
  assert not any('not runnable yet' in line for line in lines)


def test_dataset_flag_conflicting_with_the_preset_is_one_error(capsys):
  assert camvid_study.main(['--plan', '--preset=cpu40',
                            '--dataset=msrc']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ['error: --dataset=msrc: --preset=cpu40 is a camvid grid']


def _write_pass(folder, dense_maps, pseudo_maps, splits=('train',)):
  """A prepared dataset of records holding a dense and a pseudo-label."""
  folder.mkdir(parents=True)
  shard = 'train-00000-of-00001.tfrecord'
  with tfrecord.TFRecordWriter(str(folder / shard)) as writer:
    for dense, pseudo in zip(dense_maps, pseudo_maps):
      writer.write(tfrecord.encode_example({
          input_pipeline.LABEL_KEYS['dense']: labels_lib.encode_png(
              labels_lib.to_stored(dense)),
          input_pipeline.LABEL_KEYS['sparse']: labels_lib.encode_png(
              labels_lib.to_stored(pseudo))}))
  info = {'shards': [shard], 'num_examples': len(dense_maps)}
  (folder / 'metadata.json').write_text(json.dumps({
      'num_classes': 3, 'classes': ['a', 'b', 'c'],
      'splits': {s: info for s in splits}}))


def test_pass_quality_against_a_brute_force_confusion(tmp_path):
  rng = np.random.default_rng(0)
  dense = [rng.integers(-1, 3, (5, 7)) for _ in range(3)]
  pseudo = [np.where(rng.random((5, 7)) < 0.7, d, rng.integers(-1, 3, (5, 7)))
            for d in dense]
  workdir = tmp_path / 'run'
  _write_pass(workdir / 'spml_pseudo_labels', dense, pseudo)
  # The run's own prepared data (two splits) is not a pass.
  _write_pass(workdir / 'data', dense, pseudo, splits=('train', 'val'))
  qualities = read_qualities(str(workdir))
  assert list(qualities) == ['spml_pseudo_labels']
  quality = qualities['spml_pseudo_labels']
  confusion = np.zeros((3, 3))
  labeled = both = 0
  for d, p in zip(dense, pseudo):
    for truth, guess in zip(d.ravel(), p.ravel()):
      labeled += truth >= 0
      if truth >= 0 and guess >= 0:
        both += 1
        confusion[truth, guess] += 1
  iou = [confusion[k, k] / (confusion[k].sum() + confusion[:, k].sum()
                            - confusion[k, k]) for k in range(3)]
  assert quality['source'] == 'measured'
  assert quality['coverage'] == pytest.approx(both / labeled)
  assert quality['miou'] == pytest.approx(np.mean(iou))
  assert quality['per_class'] == pytest.approx(dict(zip('abc', iou)))
  assert quality['pixel_accuracy'] == pytest.approx(
      np.trace(confusion) / confusion.sum())
  # A pass's own quality.json is read instead.
  (workdir / 'spml_pseudo_labels' / QUALITY_FILE).write_text(json.dumps(
      {'miou': 0.5, 'per_class': {'a': 0.5}, 'coverage': 1.0}))
  assert read_qualities(str(workdir))['spml_pseudo_labels'] == {
      'miou': 0.5, 'per_class': {'a': 0.5}, 'coverage': 1.0,
      'source': QUALITY_FILE}


def test_report_tables_the_pseudo_label_quality(msrc_runs):
  empty = (np.zeros(0, np.int64), np.zeros(0))
  result = RunResult(
      run=msrc_runs[0], miou_curve=(np.array([10]), np.array([0.3])),
      loss_curve=empty, per_class_iou={}, wall_s=1.0, wall_from_events=False,
      done=True, machine=None, load_averages=[],
      pseudo_labels={'cam_pseudo_labels': {
          'coverage': 0.8, 'pixel_accuracy': 0.9, 'miou': 0.55,
          'per_class': {'grass': 0.7, 'cow': float('nan')}}})
  lines = pseudo_label_table([result])
  assert lines[0] == ('| cell | seed | pass | labeled | pixel acc. | mIoU | '
                      'grass | cow |')
  assert lines[2] == (f'| {msrc_runs[0].cell.name} | 0 | `cam_pseudo_labels` '
                      '| 80.0 | 90.0 | 55.0 | 70.0 | n/a |')
  assert pseudo_label_table([]) == []
