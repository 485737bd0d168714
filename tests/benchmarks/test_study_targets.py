"""benchmarks/study/targets.py: the target-vs-prediction diagnostic of any
loss with a target map, against gmm_diagnostic's own path on an AGMM run
(the GMM response computed explicitly, images in batches), and its error
line for a loss without a target."""

import dataclasses
import json
import shutil

import numpy as np
import pytest

from benchmarks import gmm_diagnostic
from benchmarks.study import archive
from benchmarks.study import runner
from benchmarks.study import targets
from benchmarks.study.grid import Cell, Run
from benchmarks.study.report import target_table
from benchmarks.study.results import RunResult
from configs import presets
from configs import tiny


IMAGES = 2


@pytest.fixture(scope='module')
def diagnosed(tiny_trained_run):
  """targets.diagnose of the shared tiny AGMM run, made once."""
  return targets.diagnose(tiny_trained_run[0], num_images=IMAGES)


def test_agmm_target_matches_gmm_diagnostic(tiny_trained_run, diagnosed):
  workdir, _ = tiny_trained_run
  with open(f'{workdir}/config.json') as f:
    form = json.load(f)['loss']['gmm']['form']
  name, totals = diagnosed
  # gmm_diagnostic's batch of both images, the response computed by hand.
  expected = gmm_diagnostic.diagnose(workdir, num_images=IMAGES,
                                     batch_size=IMAGES)[form]
  assert name == 'gmm_response'
  assert totals['pixels'] > 0 and totals['covered'] > 0
  for key, value in expected.items():
    assert totals[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_steps_all_diagnoses_every_kept_checkpoint(tiny_trained_run, diagnosed,
                                                   tmp_path):
  # The shared run keeps steps 2 and 4; step 4 is `diagnose`'s latest, and
  # step 2 is gmm_diagnostic's latest on a copy without step 4.
  workdir, _ = tiny_trained_run
  name, by_step = targets.diagnose_steps(workdir, IMAGES, 'all')
  assert name == 'gmm_response' and list(by_step) == [2, 4]
  latest = {key: value for key, value in diagnosed[1].items() if key != 'step'}
  assert diagnosed[1]['step'] == 4 and by_step[4] == pytest.approx(latest)
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy)
  shutil.rmtree(copy / 'checkpoints' / '4')
  with open(f'{workdir}/config.json') as f:
    form = json.load(f)['loss']['gmm']['form']
  expected = gmm_diagnostic.diagnose(str(copy), num_images=IMAGES,
                                     batch_size=IMAGES)[form]
  assert by_step[2] != pytest.approx(by_step[4])
  assert expected.pop('step') == 2
  for key, value in expected.items():
    assert by_step[2][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
  assert targets.diagnose_steps(workdir, IMAGES, '2')[1].keys() == {2}


def test_steps_name_the_latest_every_kept_or_listed_checkpoints():
  kept = [1200, 600, 1150]
  assert targets.chosen_steps('latest', kept) == [1200]
  assert targets.chosen_steps('all', kept) == [600, 1150, 1200]
  assert targets.chosen_steps('1200,600', kept) == [1200, 600]
  for which, missing in (('1800', '1800'), ('600,x', 'x'), (',', '?')):
    with pytest.raises(ValueError) as error:
      targets.chosen_steps(which, kept)
    assert str(error.value) == (f'--steps={which}: no checkpoint of step {missing}; '
                                'kept: 600, 1150, 1200')
  with pytest.raises(ValueError, match='^no checkpoint$'):
    targets.chosen_steps('latest', [])


def test_a_loss_without_target_map_is_one_error_line(tmp_path, capsys):
  config = tiny.get_config()
  config.loss = presets.preset('pce_only')
  (tmp_path / 'config.json').write_text(config.to_json_best_effort())
  assert targets.main([f'--workdirs={tmp_path}']) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f'error: {tmp_path}: its loss (pce) has no target map (no '
                 'term registers a summary)']


def test_archive_keeps_the_diagnostic_and_the_report_tables_it(
    tiny_trained_run, diagnosed, tmp_path):
  # A copy of the shared run, marked done by the study as --run would.
  workdir = str(tmp_path / 'runs' / 'study' / 'tiny_seed0')
  shutil.copytree(tiny_trained_run[0], workdir)
  run = Run(Cell('clicks:10', 'agmm_released'), 0, 'runs/study/tiny_seed0',
            ('python', 'main.py', '--config=configs/tiny.py:',
             '--workdir=runs/study/tiny_seed0'))
  runner.write_marker(workdir, {'command': run.command, 'done': True,
                                'attempts': []})
  path = archive.save(run, 'records', str(tmp_path), target_images=IMAGES)
  with open(path) as f:
    kept = json.load(f)['targets']
  name, totals = diagnosed
  assert kept == pytest.approx({'target': name, 'images': IMAGES, **totals})
  # Saved again without the diagnostic (a new evaluation): it stays.
  archive.save(run, 'records', str(tmp_path))
  with open(path) as f:
    assert json.load(f)['targets'] == kept
  # The finished workdir is read first; the archive adds what only it keeps.
  read = archive.read_result(run, 'records', repo_root=str(tmp_path))
  assert read.finished and read.targets == kept
  result = dataclasses.replace(_finished(run), targets={
      'target': 'tel_response', 'step': 4, 'covered': 200.0, 'g_right': 50.0,
      'p_right': 100.0, 'g_right_p_wrong': 10.0, 'g_wrong_p_right': 60.0,
      'g_error': 80.0, 'p_error': 40.0})
  failed = dataclasses.replace(result, targets={
      'error': 'W: its loss (pce) has no target map (no term registers a '
      'summary)'})
  lines = target_table([result, failed])
  # 50 / 200 = 25.0 %, 100 / 200 = 50.0 %, ...; 80 / 200 = 0.400.
  assert lines[2] == (f'| {run.cell.name} | 0 | 4 | tel_response | 25.0 | '
                      '50.0 | 5.0 | 30.0 | 0.400 | 0.200 |')
  assert lines[3].startswith(f'| {run.cell.name} | 0 | | none: its loss '
                             '(pce) has no target map')


def _finished(run):
  empty = (np.zeros(0, np.int64), np.zeros(0))
  return RunResult(run=run, miou_curve=(np.array([4]), np.array([0.3])),
                   loss_curve=empty, per_class_iou={}, wall_s=1.0,
                   wall_from_events=False, done=True, machine=None,
                   load_averages=[])
