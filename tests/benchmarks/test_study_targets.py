"""benchmarks/study/targets.py: the target-vs-prediction diagnostic of any
loss with a target map, against gmm_diagnostic's own path on an AGMM run
(the GMM response computed explicitly, images in batches), and its error
line for a loss without a target."""

import json

import pytest

from benchmarks import gmm_diagnostic
from benchmarks.study import targets
from configs import presets
from configs import tiny


def test_agmm_target_matches_gmm_diagnostic(tiny_trained_run):
  workdir, _ = tiny_trained_run
  with open(f'{workdir}/config.json') as f:
    form = json.load(f)['loss']['gmm']['form']
  name, totals = targets.diagnose(workdir, num_images=4)
  expected = gmm_diagnostic.diagnose(workdir, num_images=4, batch_size=2)[form]
  assert name == 'gmm_response'
  assert totals['pixels'] > 0 and totals['covered'] > 0
  for key, value in expected.items():
    assert totals[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_a_loss_without_target_map_is_one_error_line(tmp_path, capsys):
  config = tiny.get_config()
  config.loss = presets.preset('pce_only')
  (tmp_path / 'config.json').write_text(config.to_json_best_effort())
  assert targets.main([f'--workdirs={tmp_path}']) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f'error: {tmp_path}: its loss (pce) has no target map (no '
                 'term registers a summary)']
