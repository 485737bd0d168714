"""Tests of benchmarks/camvid_study.py: the plan, the resumable runner and the
report, on fake workdirs (TensorBoard events written with agmm_jax.summary
under the tags agmm_jax/train.py uses). No training."""

import json
import os
import shlex
import signal
import stat
import sys
import textwrap
import threading
import time

import numpy as np
from PIL import Image
import pytest

from agmm_jax import summary
from benchmarks import camvid_study
from configs import camvid_clicks

CLASSES = ('sky', 'building', 'pole', 'road', 'pavement', 'tree',
           'sign_symbol', 'fence', 'car', 'pedestrian', 'bicyclist')


def _parse_command(command: str) -> dict[str, str]:
  """`--flag=value` pairs of a planned command (after `python main.py`)."""
  argv = shlex.split(command)
  assert argv[:2] == ['python', 'main.py']
  flags = {}
  for arg in argv[2:]:
    key, sep, value = arg.partition('=')
    assert sep and key.startswith('--') and key not in flags, arg
    flags[key[2:]] = value
  return flags


def test_plan_prints_every_cell_and_seed(capsys):
  labels, methods, seeds = ['clicks:20', 'points:1'], [
      'pce_only', 'agmm_paper', 'full'], [0, 3]
  assert camvid_study.main(['--plan', '--labels=' + ','.join(labels),
                            '--methods=' + ','.join(methods),
                            '--seeds=0,3', '--steps=7',
                            '--root=runs/x']) == 0
  output = capsys.readouterr().out.strip().splitlines()
  # The predicted time follows as shell comments: 10 runs x 7 steps.
  comments = [line for line in output if line.startswith('#')]
  assert comments and comments[0].startswith('# 10 runs, 70 steps: about ')
  lines = [line for line in output if not line.startswith('#')]
  expected = {(spec, method, seed) for spec in labels for seed in seeds
              for method in ('pce_only', 'agmm_paper')}
  expected |= {('clicks:20', 'full', seed) for seed in seeds}
  seen = set()
  for line in lines:
    flags = _parse_command(line)
    path, _, argument = flags['config'].partition(':')
    assert path == 'configs/camvid_clicks.py'
    arguments = dict(item.split('=', 1) for item in argument.split(','))
    assert arguments['size'] == 'cpu' and arguments['lseed'] == '0'
    seed = int(flags['config.seed'])
    assert flags['config.num_train_steps'] == '7'
    method, spec = arguments['method'], arguments['labels']
    cell = 'full' if method == 'full' else (
        spec.replace(':', '') + '_' + method)
    assert flags['workdir'] == f'runs/x/{cell}_seed{seed}'
    seen.add((spec, method, seed))
    # The argument is one the config accepts, and selects what it says.
    config = camvid_clicks.get_config(argument)
    assert config.data.train_labels == (
        'dense' if method == 'full' else 'sparse')
    assert config.data.prepare.sparse == spec
  assert len(lines) == len(expected) == 10
  assert seen == expected
  # Seed-major order: every cell of seed 0 before any of seed 3.
  order = [int(_parse_command(line)['config.seed']) for line in lines]
  assert order == sorted(order)


def test_plan_without_steps_and_with_overrides(capsys):
  assert camvid_study.main(['--plan', '--labels=clicks:100',
                            '--methods=agmm_released', '--seeds=2',
                            '--override=data.num_threads=2']) == 0
  (line,) = [line for line in capsys.readouterr().out.strip().splitlines()
             if not line.startswith('#')]
  flags = _parse_command(line)
  assert 'config.num_train_steps' not in flags
  assert flags['config.data.num_threads'] == '2'
  assert flags['workdir'] == 'runs/study/clicks100_agmm_released_seed2'


def test_run_config_applies_overrides_like_the_command_line():
  (run,) = camvid_study.plan_runs(['points:1'], ['agmm_paper'], [4])
  config = camvid_study.run_config(run, [
      'data.dir=elsewhere', 'data.num_threads=2',
      'data.scale_range=(0.75, 1.5)', 'optimizer.lr=0.5'])
  assert config.seed == 4 and config.data.prepare.sparse == 'points:1'
  assert (config.data.dir, config.data.num_threads) == ('elsewhere', 2)
  assert config.data.scale_range == (0.75, 1.5)
  assert config.optimizer.lr == 0.5
  with pytest.raises(ValueError, match="'data.nope'"):
    camvid_study.run_config(run, ['data.nope=1'])
  with pytest.raises(ValueError, match='not a Python literal'):
    camvid_study.run_config(run, ['data.num_threads=two'])


def test_plan_rejects_unknown_method(capsys):
  assert camvid_study.main(['--plan', '--methods=pce_only,nope']) == 2
  assert "'nope'" in capsys.readouterr().err


def _fake_run(name: str, exit_code: int) -> camvid_study.Run:
  """A run whose command counts its calls in WORKDIR/calls and exits."""
  workdir = os.path.join('runs', name)
  script = (f'import os; p = os.path.join({workdir!r}, "calls"); '
            'n = int(open(p).read()) if os.path.exists(p) else 0; '
            f'open(p, "w").write(str(n + 1)); raise SystemExit({exit_code})')
  return camvid_study.Run(camvid_study.Cell('clicks:20', name), 0, workdir,
                          (sys.executable, '-c', script))


def test_run_skips_finished_runs_and_retries_failed_ones(tmp_path):
  ok, bad = _fake_run('ok', 0), _fake_run('bad', 3)
  statuses = camvid_study.run_plan([ok, bad], repo_root=str(tmp_path))
  assert [s for _, s in statuses] == ['done', 'failed (exit 3)']
  statuses = camvid_study.run_plan([ok, bad], repo_root=str(tmp_path))
  assert [s for _, s in statuses] == ['skipped', 'failed (exit 3)']
  calls = lambda run: int((tmp_path / run.workdir / 'calls').read_text())
  assert (calls(ok), calls(bad)) == (1, 2)
  marker = camvid_study.read_marker(str(tmp_path / bad.workdir))
  assert not marker['done'] and [a['returncode'] for a in
                                 marker['attempts']] == [3, 3]
  assert all(a['wall_s'] >= 0 for a in marker['attempts'])
  # A different command in the same workdir is not "done": it runs again.
  changed = camvid_study.Run(ok.cell, ok.seed, ok.workdir, ok.argv + ('x',))
  assert [s for _, s in camvid_study.run_plan(
      [changed], repo_root=str(tmp_path))] == ['done']
  assert calls(ok) == 2
  # --stop_on_failure stops at the failed run.
  statuses = camvid_study.run_plan([bad, changed], repo_root=str(tmp_path),
                                   keep_going=False)
  assert [s for _, s in statuses] == ['failed (exit 3)']


def test_run_passes_sigterm_to_the_trainer_and_stops(tmp_path):
  """SIGTERM to the study reaches the running command, whose exit status
  (143, as the trainer's after saving) stops the study."""
  script = textwrap.dedent('''\
      import os, signal, sys, time
      signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
      open('ready', 'w').close()
      time.sleep(60)
      ''')
  slow = camvid_study.Run(camvid_study.Cell('clicks:20', 'slow'), 0, '.',
                          (sys.executable, '-c', script))
  never = _fake_run('never', 0)

  def kill_when_ready():
    deadline = time.monotonic() + 30
    while not (tmp_path / 'ready').exists() and time.monotonic() < deadline:
      time.sleep(0.02)
    os.kill(os.getpid(), signal.SIGTERM)

  killer = threading.Thread(target=kill_when_ready)
  killer.start()
  start = time.monotonic()
  statuses = camvid_study.run_plan([slow, never], repo_root=str(tmp_path))
  killer.join()
  assert [s for _, s in statuses] == ['failed (exit 143)']
  assert time.monotonic() - start < 30
  assert not (tmp_path / never.workdir).exists()


@pytest.fixture(scope='module')
def study(tmp_path_factory):
  """Fake workdirs of 2 seeds x (pce_only, agmm_paper, full), each resumed
  once; agmm_released planned, started by hand at seed 0 (a train loss, no
  evaluation), not at seed 1. Returns (root, runs, {run: per-class IoU})."""
  root = str(tmp_path_factory.mktemp('study') / 'runs')
  runs = camvid_study.plan_runs(['clicks:20'],
                                ['pce_only', 'agmm_released', 'agmm_paper',
                                 'full'], [0, 1], steps=20, root=root)
  rng = np.random.default_rng(0)
  finals = {}
  for run in runs:
    if run.cell.method == 'agmm_released':
      if run.seed == 0:  # Started by hand (no marker), no evaluation yet.
        with summary.SummaryWriter(run.workdir) as writer:
          writer.write_scalars(5, {'train/loss': 1.0})
      continue
    per_class = rng.uniform(0.1, 0.9, len(CLASSES))
    miou_10 = rng.uniform(0.05, 0.3)
    with summary.SummaryWriter(run.workdir) as writer:
      for step in (5, 10, 15, 20):
        writer.write_scalars(step, {'train/loss': 3.0 / step,
                                    'train/lr_backbone': 0.01})
      writer.write_scalars(10, {'eval/miou': miou_10,
                                'eval/pixel_accuracy': 0.5,
                                **{f'eval/iou/{c}': miou_10 for c in CLASSES}})
      writer.write_scalars(20, {'eval/miou': rng.uniform(0.0, 1.0)})
    finals[run] = per_class
  # Event file names start with the time in whole seconds, and TensorBoard
  # reads a folder's files in name order: a resumed run starts later.
  time.sleep(1.05)
  for run, per_class in finals.items():
    # The run resumed and evaluated step 20 again: the later value counts.
    with summary.SummaryWriter(run.workdir) as writer:
      writer.write_scalars(20, {
          'eval/miou': per_class.mean(),
          **{f'eval/iou/{c}': v for c, v in zip(CLASSES, per_class)}})
    camvid_study.write_marker(run.workdir, {
        'command': run.command, 'done': True,
        'attempts': [{'wall_s': 100.0, 'returncode': 143,
                      'load_average': 4.0},
                     {'wall_s': 50.0, 'returncode': 0, 'load_average': 2.0}],
        'machine': camvid_study.machine_description()})
  return root, runs, finals


def test_read_run_takes_the_last_value_of_a_repeated_step(study):
  _, runs, finals = study
  result = camvid_study.read_run(runs[0])
  np.testing.assert_array_equal(result.miou_curve[0], [10, 20])
  assert result.final_miou == pytest.approx(finals[runs[0]].mean())
  assert list(result.per_class_iou) == sorted(CLASSES)  # no metadata.json
  np.testing.assert_allclose(
      [result.per_class_iou[c] for c in CLASSES], finals[runs[0]], rtol=1e-6)
  np.testing.assert_array_equal(result.loss_curve[0], [5, 10, 15, 20])
  assert result.wall_s == 150.0 and result.done
  started = camvid_study.read_run(runs[1])  # agmm_released: no eval yet
  assert not started.has_eval and not started.done
  assert started.wall_from_events and started.wall_s == 0.0
  assert camvid_study.read_run(runs[5]) is None  # agmm_released seed 1


def test_summarize_matches_numpy(study):
  _, runs, finals = study
  summaries = camvid_study.summarize(
      [r for r in map(camvid_study.read_run, runs) if r is not None])
  assert [s.cell.method for s in summaries] == [
      'pce_only', 'agmm_paper', 'full']
  for summary_ in summaries:
    per_run = np.array([finals[r] for r in finals if r.cell == summary_.cell])
    scores = per_run.mean(axis=1)
    assert summary_.count == 2
    assert summary_.mean == pytest.approx(np.mean(scores), rel=1e-6)
    assert summary_.std == pytest.approx(np.std(scores, ddof=1), rel=1e-5)
    np.testing.assert_allclose(
        [summary_.per_class_mean[c] for c in CLASSES], per_run.mean(axis=0),
        rtol=1e-6)


def test_report_writes_markdown_and_plot(study, tmp_path, capsys):
  root, runs, finals = study
  output = tmp_path / 'docs' / 'results.md'
  assert camvid_study.main(['--report', '--labels=clicks:20', '--seeds=0,1',
                            '--steps=20', f'--root={root}',
                            f'--output={output}', '--overlay_images=0']) == 0
  capsys.readouterr()
  text = output.read_text()
  for method in ('pce_only', 'agmm_paper', 'full'):
    per_run = np.array([finals[r] for r in finals
                        if r.cell.method == method])
    scores = 100 * per_run.mean(axis=1)
    assert (f'{np.mean(scores):.2f} ± {np.std(scores, ddof=1):.2f} (n=2)'
            in text), method
    name = 'clicks20_' + method if method != 'full' else 'full'
    row = next(line for line in text.splitlines()
               if line.startswith(f'| {name} | ') and line.count('|') > 10)
    cells = [c.strip() for c in row.strip('|').split('|')]
    np.testing.assert_allclose(
        [float(c) for c in cells[1:-1]],
        100 * per_run.mean(axis=0)[np.argsort(CLASSES)], atol=0.051)
  # agmm_released: one run without an evaluation, one not started.
  table_row = next(line for line in text.splitlines()
                   if line.startswith('| clicks:20 | '))
  assert '| labels | pce_only | agmm_released | agmm_paper |' in text
  columns = table_row.split('|')
  assert columns[3].strip() == 'in progress'  # seed 0 started, none finished
  assert '(n=2)' in columns[2] and '(n=2)' in columns[4]
  assert ('| clicks20_agmm_released | 0 | 5 |  | 0m00s (events) |  | '
          'in progress (step 5 of 20; not averaged) |') in text
  assert '| clicks20_agmm_released | 1 | | | | | not run |' in text
  assert '**Partial grid: 6 of 8 planned runs have finished.**' in text
  for run in runs:
    assert run.command in text
  assert '2m30s' in text  # 100 s + 50 s over two attempts
  with Image.open(tmp_path / 'docs' / 'results_curves.png') as plot:
    assert plot.format == 'PNG' and plot.width > 400 and plot.height > 200
  assert '](results_curves.png)' in text


def test_report_without_any_evaluation_fails(tmp_path, capsys):
  assert camvid_study.main(['--report', f'--root={tmp_path}',
                            f'--output={tmp_path / "r.md"}']) == 1
  assert 'no run' in capsys.readouterr().err
  assert not (tmp_path / 'r.md').exists()


_FAKE_PREDICT = textwrap.dedent('''\
    """Stands in for `python main.py ... --config.mode=predict`: writes
    class (column index mod 11) as palette PNGs for every input image."""
    import os, sys
    import numpy as np
    from PIL import Image
    flags = dict(a[2:].split('=', 1) for a in sys.argv[2:])
    assert flags['config.mode'] == 'predict', flags
    out = flags['config.predict.output_dir']
    os.makedirs(out)
    for name in os.listdir(flags['config.predict.input_dir']):
        with Image.open(os.path.join(flags['config.predict.input_dir'],
                                     name)) as image:
            width, height = image.size
        ids = np.broadcast_to(np.arange(width) % 11, (height, width))
        Image.fromarray(ids.astype(np.uint8)).save(os.path.join(out, name))
    ''')


def test_overlays_grid_from_predict_mode(study, tmp_path):
  """The overlay grid from a stand-in for the trainer's predict mode."""
  root, runs, _ = study
  source = tmp_path / 'camvid'
  rng = np.random.default_rng(1)
  for index in range(5):
    (source / 'val' / 'images').mkdir(parents=True, exist_ok=True)
    (source / 'val' / 'labels').mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (36, 48, 3), np.uint8)).save(
        source / 'val' / 'images' / f'im{index}.jpg')
    Image.fromarray(rng.integers(0, 12, (36, 48), np.uint8)).save(
        source / 'val' / 'labels' / f'im{index}.png')
  for run in runs:
    if os.path.isdir(run.workdir):
      os.makedirs(os.path.join(run.workdir, 'checkpoints'), exist_ok=True)
      with open(os.path.join(run.workdir, 'config.json'), 'w') as f:
        json.dump({'data': {'prepare': {'root': str(source), 'downscale': 2,
                                        'void_value': 11}}}, f)
  fake = tmp_path / 'fake_predict.py'
  fake.write_text(_FAKE_PREDICT)
  python = tmp_path / 'python'
  python.write_text(f'#!/bin/sh\nexec {sys.executable} {fake} "$@"\n')
  python.chmod(python.stat().st_mode | stat.S_IEXEC)
  summaries = camvid_study.summarize(
      [r for r in map(camvid_study.read_run, runs) if r is not None])
  path = camvid_study.make_overlays(summaries, 'clicks:20',
                                    str(tmp_path / 'out'), num_images=2,
                                    python=str(python))
  assert path == str(tmp_path / 'out' / 'qualitative_clicks20.png')
  with Image.open(path) as grid:
    # 2 rows x (input, ground truth, pce_only, agmm_paper, full).
    assert grid.format == 'PNG' and grid.width > grid.height > 100
  assert os.path.getsize(path) < 300_000
