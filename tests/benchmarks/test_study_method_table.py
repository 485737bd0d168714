"""README's method table (benchmarks/study/method_table.py) on small synthetic
records: means, sample sds, gaps and the separation rule against values
computed by hand in the test, the best-method sentences, the README block
rewrite and its error line."""

import json
import math
import os

import numpy as np
import pytest

from benchmarks import camvid_study
from benchmarks.study import method_table
from benchmarks.study.method_table import (
    BEGIN, END, best_sentences, group_rows, read_entries, separation,
    table_lines)

CLASSES = ('sky', 'road')


def _record(method: str, seed: int, miou: float, *, labels: str = 'clicks:20',
            steps: int = 200, span_s: float = 600.0,
            sky: float = 0.5, size: str = 'cpu', extra: str = '') -> dict:
  """A finished run's archived record with a final val mIoU of `miou`."""
  command = (f'python main.py --config=configs/camvid_clicks.py:labels='
             f'{labels},method={method},size={size},lseed=0 --workdir=runs/'
             f'study/x_seed{seed} --config.seed={seed}{extra}')
  if steps:
    command += f' --config.num_train_steps={steps}'
  final = steps or 1800
  return {'command': command, 'workdir': f'runs/study/x_seed{seed}',
          'scalars': {'eval/miou': [[final // 2, final], [0.01, miou]],
                      'eval/iou/sky': [[final], [sky]],
                      'eval/iou/road': [[final], [2 * miou - sky]]},
          'span_s': span_s,
          'marker': {'command': command, 'done': True, 'machine': {
              'cpu': 'Test CPU', 'cpu_count': 2}},
          'config': {'num_epochs': 40, 'global_batch_size': 8},
          'class_order': list(CLASSES), 'evals': {}}


def _write(archive, folder: str, name: str, record: dict) -> None:
  path = archive / folder
  path.mkdir(parents=True, exist_ok=True)
  (path / f'{name}.json').write_text(json.dumps(record))


@pytest.fixture
def archive(tmp_path):
  """pCE 0.20 / 0.22, ncut 0.30 / 0.26, crf 0.24 / 0.19 at 200 steps on
  clicks:20; pCE and dense labels at 40 epochs; an unfinished run."""
  root = tmp_path / 'records'
  for method, seed, miou in [('pce_only', 0, 0.20), ('pce_only', 1, 0.22),
                             ('pce_ncut', 0, 0.30), ('pce_ncut', 1, 0.26),
                             ('pce_densecrf', 0, 0.24),
                             ('pce_densecrf', 1, 0.19)]:
    _write(root, 'study', f'{method}_{seed}',
           _record(method, seed, miou, span_s=600.0 + 60 * seed))
  for method, seed, miou in [('pce_only', 0, 0.38), ('pce_only', 1, 0.40),
                             ('full', 0, 0.45), ('full', 1, 0.47)]:
    _write(root, 'study40', f'{method}_{seed}',
           _record(method, seed, miou, steps=0))
  with_target = _record('pce_ncut', 1, 0.26, span_s=660.0)
  with_target['targets'] = {'target': 'tel_response', 'step': 200,
                            'covered': 60.0, 'g_right': 30.0,
                            'p_right': 45.0}
  _write(root, 'study', 'pce_ncut_1', with_target)
  unfinished = _record('tel', 0, 0.5)
  unfinished['marker']['done'] = False
  _write(root, 'study', 'tel_0', unfinished)
  return root


def test_rows_hold_hand_computed_means_sds_and_wall_times(archive):
  rows = {row.key: row for row in group_rows(read_entries(str(archive)))}
  assert set(rows) == {
      ('camvid', '200 steps', 'clicks:20', m)
      for m in ('pce_only', 'pce_ncut', 'pce_densecrf')} | {
          ('camvid', '40 epochs', 'clicks:20', 'pce_only'),
          ('camvid', '40 epochs', 'dense', 'full')}
  ncut = rows[('camvid', '200 steps', 'clicks:20', 'pce_ncut')]
  # mean (0.30 + 0.26) / 2; sd sqrt(2 * 0.02^2 / 1).
  assert ncut.mean == pytest.approx(0.28)
  assert ncut.sd == pytest.approx(math.sqrt(2 * 0.02 ** 2))
  assert ncut.wall_s == pytest.approx(630.0)
  assert [e.seed for e in ncut.entries] == [0, 1]


def test_wall_time_sums_the_markers_attempts_over_the_event_span(tmp_path):
  record = _record('pce_only', 0, 0.2, span_s=9000.0)
  record['marker']['attempts'] = [{'wall_s': 100.0}, {'wall_s': 250.0}]
  _write(tmp_path, 'study', 'resumed', record)
  other = _record('pce_only', 1, 0.2, span_s=700.0)  # another command's
  other['marker'] = {**other['marker'], 'command': 'python main.py x',
                     'attempts': [{'wall_s': 5.0}]}
  _write(tmp_path, 'study', 'by_hand', other)
  walls = sorted(e.span_s for e in read_entries(str(tmp_path)))
  assert walls == [350.0, 700.0]


def test_table_gaps_and_separation_by_hand(archive):
  rows = group_rows(read_entries(str(archive)))
  lines = table_lines(rows, 'docs/x.md')
  by_method = {line.split(' | ')[0] + line.split(' | ')[2]: line
               for line in lines[2:]}
  ncut = by_method['| CamVid, 200 stepspce_ncut'].split(' | ')
  # 28.00 ± 2.83 (n=2); gap 28 - 21 = +7.00; no dense row at 200 steps.
  assert ncut[3:7] == ['28.00 ± 2.83 (n=2)', '+7.00', '—', 'above']
  crf = by_method['| CamVid, 200 stepspce_densecrf'].split(' | ')
  # 21.50 ± 3.54: mean gap +0.50, seed 0.19 under pCE's best 0.22.
  assert crf[3:7] == ['21.50 ± 3.54 (n=2)', '+0.50', '—', 'no']
  pce40 = by_method['| CamVid, 40 epochspce_only'].split(' | ')
  # 39 - 46 = -7.00 against dense labels at the same budget.
  assert pce40[3:6] == ['39.00 ± 1.41 (n=2)', '—', '-7.00']
  assert pce40[-1] == '[table](docs/x.md#camvid-40-epochs) |'
  # Rows in order: pCE first, then by mean.
  assert [line.split(' | ')[2] for line in lines[2:5]] == [
      'pce_only', 'pce_ncut', 'pce_densecrf']


@pytest.mark.parametrize('method, pce, verdict', [
    # Every seed above pCE's best; gap 7 > 2 x pooled sd sqrt(5e-4) = 4.47.
    ((0.30, 0.26), (0.20, 0.22), 'above'),
    # Every seed above, but gap 3.5 < 2 x pooled sd sqrt(4.25e-4) = 4.12.
    ((0.25, 0.29), (0.23, 0.24), 'no'),
    # Gap 22.9 > 2 x pooled sd 6.69, but a seed (0.29) under pCE's best.
    ((0.29,) + (0.5,) * 9, (0.20, 0.30), 'no'),
    ((0.10, 0.12), (0.20, 0.22), 'below'),
    ((0.30,), (0.20, 0.22), 'n/a (one seed)'),
    ((0.19,), (0.20, 0.22), 'n/a (one seed)'),
    # One seed inside pCE's range: neither 'above' nor 'below' can follow.
    ((0.215,), (0.20, 0.22), 'no'),
    ((0.20, 0.24), (0.22,), 'no'),
])
def test_separation_rule(method, pce, verdict):
  method, pce = np.array(method), np.array(pce)
  # The rule restated in the test: all seeds beyond, gap beyond 2 pooled sd.
  if method.size > 1 and pce.size > 1:
    pooled = math.sqrt(((method.size - 1) * np.var(method, ddof=1)
                        + (pce.size - 1) * np.var(pce, ddof=1))
                       / (method.size + pce.size - 2))
    gap = method.mean() - pce.mean()
    expected = ('above' if method.min() > pce.max() and gap > 2 * pooled
                else 'below' if method.max() < pce.min()
                and -gap > 2 * pooled else 'no')
    assert expected == verdict
  else:
    # More seeds only widen the ranges: once they overlap, it is 'no'.
    overlap = method.min() <= pce.max() and method.max() >= pce.min()
    assert verdict == ('no' if overlap else 'n/a (one seed)')
  assert separation(method, pce) == verdict


def test_best_sentences_name_the_winner_or_none(archive, tmp_path):
  rows = group_rows(read_entries(str(archive)))
  sentences = best_sentences(rows)
  assert sentences[0].startswith(
      '- CamVid, 200 steps, clicks:20: **pce_ncut** is best (28.00 ± 2.83')
  assert sentences[1] == (
      '- CamVid, 40 epochs, clicks:20: only pCE has run (39.00 ± 1.41 (n=2)).')
  # Without the winner, nothing separates: none beats pCE.
  os.remove(archive / 'study' / 'pce_ncut_0.json')
  os.remove(archive / 'study' / 'pce_ncut_1.json')
  sentences = best_sentences(group_rows(read_entries(str(archive))))
  assert '**none beats pCE** (21.00 ± 1.41 (n=2); highest other mean ' \
      'pce_densecrf 21.50 ± 3.54 (n=2), not separated)' in sentences[0]
  # A leader on one seed: the rule cannot decide, and the sentence says so.
  os.remove(archive / 'study' / 'pce_densecrf_1.json')
  sentences = best_sentences(group_rows(read_entries(str(archive))))
  # Its seed 0 scores 0.24: 24.00 - 21.00 = +3.00 points.
  assert sentences[0] == (
      '- CamVid, 200 steps, clicks:20: **not decided yet**: pce_densecrf has '
      'the highest mean (24.00 (n=1), +3.00 points over '
      "pCE's 21.00 ± 1.41 (n=2)); separation needs two seeds of each.")
  # Ahead on the mean (21.50 > 21.00) but its one seed under pCE's best
  # (0.22): the rule's every-seed-above test already fails, so it is
  # decided without a second seed.
  _write(archive, 'study', 'pce_densecrf_0',
         _record('pce_densecrf', 0, 0.215))
  sentences = best_sentences(group_rows(read_entries(str(archive))))
  assert sentences[0] == (
      '- CamVid, 200 steps, clicks:20: **none beats pCE** (21.00 ± 1.41 '
      '(n=2); highest other mean pce_densecrf 21.50 (n=1), not separated: '
      "its seeds overlap pCE's, which no further seed can undo).")
  # Behind on its one seed (0.18 < 21.00): none beats pCE, the verdict n/a.
  _write(archive, 'study', 'pce_densecrf_0',
         _record('pce_densecrf', 0, 0.18))
  sentences = best_sentences(group_rows(read_entries(str(archive))))
  assert sentences[0] == (
      '- CamVid, 200 steps, clicks:20: **none beats pCE** (21.00 ± 1.41 '
      '(n=2); highest other mean pce_densecrf 18.00 (n=1), n/a (one seed)).')


def test_readme_table_rewrites_only_the_block(archive, tmp_path, monkeypatch,
                                             capsys):
  readme = tmp_path / 'README.md'
  readme.write_text(f'intro\n{BEGIN}\nold table\n{END}\noutro\n')
  monkeypatch.setattr(camvid_study.cli, 'REPO_ROOT', str(tmp_path))
  assert camvid_study.main(['--readme_table', f'--archive={archive}']) == 0
  text = readme.read_text()
  assert text.startswith(f'intro\n{BEGIN}\nGenerated ')
  assert text.endswith(f'{END}\noutro\n') and 'old table' not in text
  assert '| CamVid, 200 steps | clicks:20 | pce_ncut | 28.00 ± 2.83' in text
  doc = (tmp_path / method_table.PER_CLASS_DOC).read_text()
  # sky 0.5 in every run; road 2 x mIoU - sky: (0.1 + 0.06) / 2 for ncut.
  assert '| clicks:20 | pce_ncut | 50.0 | 6.0 | 28.0 |' in doc
  # A record's target diagnostic: 30 and 45 of 60 covered pixels.
  assert '| clicks:20 | pce_ncut | 1 | 200 | tel_response | 50.0 | 75.0 |' \
      in doc
  readme.write_text('no markers\n')
  assert camvid_study.main(['--readme_table', f'--archive={archive}']) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: README.md needs one')


def test_method_cost_factors_per_step_relative_to_pce(tmp_path):
  root = tmp_path / 'records'
  for method, seed, span in [('pce_only', 0, 400.0), ('pce_only', 1, 400.0),
                             ('pce_ncut', 0, 1000.0), ('pce_ncut', 1, 800.0)]:
    _write(root, 'study', f'{method}_{seed}',
           _record(method, seed, 0.2, span_s=span))
  # A method whose runs trained more steps (SPML's stage 2): per step.
  spml = _record('spml', 0, 0.2, span_s=454.0)
  spml['scalars']['eval/miou'] = [[200, 227], [0.1, 0.2]]
  _write(root, 'study', 'spml_0', spml)
  factors = method_table.method_cost_factors(
      group_rows(read_entries(str(root))))
  # pCE 400 / 200 = 2 s/step; ncut (5 + 4) / 2 = 4.5; spml 454 / 227 = 2.
  assert factors == pytest.approx({'pce_ncut': 2.25, 'spml': 1.0})


def test_other_settings_never_pool_with_the_cpu_grid(tmp_path):
  root = tmp_path / 'records'
  common = ' --config.eval_every_steps=44 --config.data.num_threads=12'
  for name, kwargs in [
      ('cpu', {}), ('gpu', {'size': 'gpu_r18', 'extra': common}),
      ('bf16', {'size': 'gpu_r18',
                'extra': common + ' --config.model.compute_dtype=bfloat16'})]:
    _write(root, 'study', name, _record('pce_only', 0, 0.3, steps=0, **kwargs))
  keys = [row.key[1] for row in group_rows(read_entries(str(root)))]
  assert sorted(keys) == ['40 epochs', '40 epochs, size=gpu_r18',
                          '40 epochs, size=gpu_r18, '
                          'model.compute_dtype=bfloat16']


def test_runs_that_checkpoint_differently_pool_with_the_cpu_grid(tmp_path):
  """``keep_checkpoint_every_steps`` (kept checkpoints for the target
  diagnostic) and ``checkpoint_every_steps`` (how much a killed background
  run loses) change neither what is trained nor how long; a loss option
  does."""
  root = tmp_path / 'records'
  _write(root, 'study', 'plain', _record('pce_ncut', 0, 0.3, steps=0))
  _write(root, 'study', 'kept', _record(
      'pce_ncut', 1, 0.4, steps=0, extra=' --config.keep_checkpoint_every_steps=600'
      ' --config.checkpoint_every_steps=50'))
  _write(root, 'study', 'exact', _record(
      'pce_ncut', 2, 0.5, steps=0, extra=' --config.loss.ncut.approx=exact'))
  rows = group_rows(read_entries(str(root)))
  assert [row.key[1] for row in rows] == [
      '40 epochs', '40 epochs, loss.ncut.approx=exact']
  assert len(rows[0].entries) == 2


def test_boxes_compare_with_box_pce_and_tags_with_cam(tmp_path):
  """Box and tag labels mark no pixel: their pCE is the plain box loss
  (box_pce) and the plain CAM pipeline (cam); pce_only on boxes (the box
  CAM pipeline) is one method among the others."""
  root = tmp_path / 'records'
  for method, seed, miou in [('box_pce', 0, 0.10), ('box_pce', 1, 0.12),
                             ('boxinst', 0, 0.30), ('boxinst', 1, 0.26),
                             ('pce_only', 0, 0.14)]:
    _write(root, 'study', f'{method}_{seed}',
           _record(method, seed, miou, labels='boxes', steps=0))
  _write(root, 'study', 'cam_0', _record('cam', 0, 0.08, labels='tags', steps=0))
  rows = group_rows(read_entries(str(root)))
  lines = table_lines(rows, 'docs/x.md')
  cells = [line.split(' | ') for line in lines[2:]]
  # Baseline first, then by mean; box_pce 11.00 ± 1.41 is the reference.
  assert [(c[1], c[2]) for c in cells] == [
      ('boxes', 'box_pce'), ('boxes', 'boxinst'), ('boxes', 'pce_only'),
      ('tags', 'cam')]
  assert cells[0][3:7] == ['11.00 ± 1.41 (n=2)', '—', '—', '—']
  # 28 - 11 = +17.00; pooled sd sqrt((2e-4 + 8e-4) / 2) = 2.24 points.
  assert cells[1][3:7] == ['28.00 ± 2.83 (n=2)', '+17.00', '—', 'above']
  assert cells[2][3:7] == ['14.00 (n=1)', '+3.00', '—', 'n/a (one seed)']
  assert cells[3][3:7] == ['8.00 (n=1)', '—', '—', '—']
  assert best_sentences(rows) == [
      '- CamVid, 40 epochs, boxes: **boxinst** is best (28.00 ± 2.83 (n=2), '
      '+17.00 points over box_pce, separated).',
      '- CamVid, 40 epochs, tags: only cam has run (8.00 (n=1)).']
