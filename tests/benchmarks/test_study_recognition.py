"""benchmarks/study/recognition.py: the set counts against a loop over
classes, the table row's arithmetic and the one-line error (the model path
runs on the tiny CAM run in tests/methods/test_cam_stages.py)."""

import numpy as np

from benchmarks.study import recognition


def test_set_counts_match_a_loop_over_the_classes():
  rng = np.random.default_rng(0)
  for _ in range(20):
    predicted, truth = rng.random(7) < 0.4, rng.random(7) < 0.4
    right = extra = missed = 0
    for k in range(7):
      right += bool(predicted[k] and truth[k])
      extra += bool(predicted[k] and not truth[k])
      missed += bool(truth[k] and not predicted[k])
    assert recognition.set_counts(predicted, truth) == {
        'right': right, 'extra': extra, 'missed': missed,
        'exact': int(list(predicted) == list(truth)), 'images': 1}


def test_table_row_is_precision_recall_and_exact_sets():
  row = recognition.table_row('W', 'final model', {
      'right': 3, 'extra': 1, 'missed': 9, 'exact': 2, 'images': 5, 'step': 7})
  assert row == '| W | final model | 7 | 75.0 | 25.0 | 2 of 5 |'


def test_a_missing_workdir_is_one_error_line(tmp_path, capsys):
  assert recognition.main([f'--workdirs={tmp_path / "none"}']) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: ') and 'config.json' in err[0]
