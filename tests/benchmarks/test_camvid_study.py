"""Tests of benchmarks/camvid_study.py and its modules benchmarks/study/: the
plan, the resumable runner and the report, on fake workdirs (TensorBoard
events written with agmm_jax.storage.summary under the tags agmm_jax/train/trainer.py uses).
No training."""

import dataclasses
import datetime
import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from collections.abc import Sequence

import numpy as np
from PIL import Image
import pytest

from agmm_jax.storage import summary
from benchmarks import camvid_study
from benchmarks.study import archive
from benchmarks.study import runner
from benchmarks.study.cli import DEFAULT_CALL_BUDGET_S
from benchmarks.study.device_plan import (
    DeviceFigures, RunShape, device_order, is_core_run, predicted_img_per_s,
    predicted_run_s, program_key, run_shape, split_into_calls)
from benchmarks.study.evaluations import (
    evaluate_finished, parse_eval_output, run_diagnostic)
from benchmarks.study.grid import (
    CORE_METHODS, METHODS, STUDY_PRESETS, Cell, Run, config_overrides,
    plan_preset, plan_runs, run_config)
from benchmarks.study.pack import (
    PACK_FIGURES, PACK_FILE_LIMIT, PACK_JSON, pack_results, unpack_results)
from benchmarks.study.plots import make_overlays
from benchmarks.study.report import (
    late_gain, schedule_check, score_table, summarize, write_report)
from benchmarks.study.results import RunResult, read_run, result_from_record
from benchmarks.study.runner import (
    LOG_FILE, MARKER_FILE, cpu_label, machine_description, read_marker,
    run_plan, write_marker)
from configs import camvid_clicks
from tests import conftest

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
  (run,) = plan_runs(['points:1'], ['agmm_paper'], [4])
  config = run_config(run, [
      'data.dir=elsewhere', 'data.num_threads=2',
      'data.scale_range=(0.75, 1.5)', 'optimizer.lr=0.5'])
  assert config.seed == 4 and config.data.prepare.sparse == 'points:1'
  assert (config.data.dir, config.data.num_threads) == ('elsewhere', 2)
  assert config.data.scale_range == (0.75, 1.5)
  assert config.optimizer.lr == 0.5
  with pytest.raises(ValueError, match="'data.nope'"):
    run_config(run, ['data.nope=1'])
  with pytest.raises(ValueError, match='not a Python literal'):
    run_config(run, ['data.num_threads=two'])


def test_plan_rejects_unknown_method(capsys):
  assert camvid_study.main(['--plan', '--methods=pce_only,nope']) == 2
  assert "'nope'" in capsys.readouterr().err


def _fake_run(name: str, exit_code: int) -> Run:
  """A run whose command counts its calls in WORKDIR/calls and exits."""
  workdir = os.path.join('runs', name)
  script = (f'import os; p = os.path.join({workdir!r}, "calls"); '
            'n = int(open(p).read()) if os.path.exists(p) else 0; '
            f'open(p, "w").write(str(n + 1)); raise SystemExit({exit_code})')
  return Run(Cell('clicks:20', name), 0, workdir,
             (sys.executable, '-c', script))


def test_run_skips_finished_runs_and_retries_failed_ones(tmp_path):
  ok, bad = _fake_run('ok', 0), _fake_run('bad', 3)
  statuses = run_plan([ok, bad], repo_root=str(tmp_path))
  assert [s for _, s in statuses] == ['done', 'failed (exit 3)']
  statuses = run_plan([ok, bad], repo_root=str(tmp_path))
  assert [s for _, s in statuses] == ['skipped', 'failed (exit 3)']
  calls = lambda run: int((tmp_path / run.workdir / 'calls').read_text())
  assert (calls(ok), calls(bad)) == (1, 2)
  marker = read_marker(str(tmp_path / bad.workdir))
  assert not marker['done'] and [a['returncode'] for a in
                                 marker['attempts']] == [3, 3]
  assert all(a['wall_s'] >= 0 for a in marker['attempts'])
  # A different command in the same workdir is not "done": it runs again.
  changed = Run(ok.cell, ok.seed, ok.workdir, ok.argv + ('x',))
  assert [s for _, s in run_plan(
      [changed], repo_root=str(tmp_path))] == ['done']
  assert calls(ok) == 2
  # --stop_on_failure stops at the failed run.
  statuses = run_plan([bad, changed], repo_root=str(tmp_path),
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
  slow = Run(Cell('clicks:20', 'slow'), 0, '.',
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
  statuses = run_plan([slow, never], repo_root=str(tmp_path))
  killer.join()
  assert [s for _, s in statuses] == ['failed (exit 143)']
  assert time.monotonic() - start < 30
  assert not (tmp_path / never.workdir).exists()


def test_run_records_its_attempt_first_and_completes_a_lost_one(tmp_path):
  """The marker holds the attempt while the run goes; an attempt left open
  by a study killed mid-run gets the wall time up to its log's last write."""
  workdir = os.path.join('runs', 'watched')
  script = (f'import shutil; shutil.copy({workdir!r} + "/{MARKER_FILE}", '
            f'{workdir!r} + "/seen.json"); raise SystemExit(3)')
  run = Run(Cell('clicks:20', 'watched'), 0, workdir,
            (sys.executable, '-c', script))
  seen = lambda: json.loads((tmp_path / workdir / 'seen.json').read_text())
  run_plan([run], repo_root=str(tmp_path))
  [open_attempt] = seen()['attempts']
  assert not seen()['done'] and 'wall_s' not in open_attempt
  # A SIGKILL of the study leaves its attempt open; its run logged until
  # 125 s after the start.
  marker = read_marker(str(tmp_path / workdir))
  marker['attempts'].append({'start': '2026-12-02 00:00:00 UTC'})
  write_marker(str(tmp_path / workdir), marker)
  start = datetime.datetime(2026, 12, 2,
                            tzinfo=datetime.timezone.utc).timestamp()
  os.utime(tmp_path / workdir / LOG_FILE, (start + 125, start + 125))
  # A report meanwhile (the run may still be going) times it so far.
  so_far = runner.timed_so_far(marker, str(tmp_path / workdir))
  assert [a['wall_s'] for a in so_far['attempts']][1] == 125
  assert 'wall_s' not in marker['attempts'][1]
  run_plan([run], repo_root=str(tmp_path))
  attempts = read_marker(str(tmp_path / workdir))['attempts']
  assert [a['returncode'] for a in attempts] == [3, None, 3]
  assert attempts[1]['wall_s'] == 125 and 'lost' in attempts[1]
  assert [a.get('wall_s') for a in seen()['attempts']][:2] == [
      attempts[0]['wall_s'], 125]


@pytest.fixture(scope='module')
def study(tmp_path_factory):
  """Fake workdirs of 2 seeds x (pce_only, agmm_paper, full), each resumed
  once; agmm_released planned, started by hand at seed 0 (a train loss, no
  evaluation), not at seed 1. Returns (root, runs, {run: per-class IoU})."""
  root = str(tmp_path_factory.mktemp('study') / 'runs')
  runs = plan_runs(['clicks:20'],
                   ['pce_only', 'agmm_released', 'agmm_paper', 'full'],
                   [0, 1], steps=20, root=root)
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
    write_marker(run.workdir, {
        'command': run.command, 'done': True,
        'attempts': [{'wall_s': 100.0, 'returncode': 143,
                      'load_average': 4.0},
                     {'wall_s': 50.0, 'returncode': 0, 'load_average': 2.0}],
        'machine': machine_description()})
  return root, runs, finals


def test_read_run_takes_the_last_value_of_a_repeated_step(study):
  _, runs, finals = study
  result = read_run(runs[0])
  np.testing.assert_array_equal(result.miou_curve[0], [10, 20])
  assert result.final_miou == pytest.approx(finals[runs[0]].mean())
  assert list(result.per_class_iou) == sorted(CLASSES)  # no metadata.json
  np.testing.assert_allclose(
      [result.per_class_iou[c] for c in CLASSES], finals[runs[0]], rtol=1e-6)
  np.testing.assert_array_equal(result.loss_curve[0], [5, 10, 15, 20])
  assert result.wall_s == 150.0 and result.done
  started = read_run(runs[1])  # agmm_released: no eval yet
  assert not started.has_eval and not started.done
  assert started.wall_from_events and started.wall_s == 0.0
  assert read_run(runs[5]) is None  # agmm_released seed 1


def test_summarize_matches_numpy(study):
  _, runs, finals = study
  summaries = summarize([r for r in map(read_run, runs) if r is not None])
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


def test_each_attempt_records_the_cores_it_may_use(tmp_path):
  """Under an affinity mask (taskset) the attempt records the cores of the
  mask, not the machine's: XLA:CPU's threads, and rounding, follow them."""
  available = sorted(os.sched_getaffinity(0))
  try:
    os.sched_setaffinity(0, available[:1])
    run_plan([_fake_run('pinned', 0)], repo_root=str(tmp_path))
  finally:
    os.sched_setaffinity(0, available)
  run_plan([_fake_run('whole', 0)], repo_root=str(tmp_path))
  pinned = read_marker(str(tmp_path / 'runs' / 'pinned'))
  whole = read_marker(str(tmp_path / 'runs' / 'whole'))
  assert [a['cores'] for a in pinned['attempts']] == [1]
  assert [a['cores'] for a in whole['attempts']] == [len(available)]
  assert whole['machine']['cores'] == len(available)


def test_report_names_runs_with_attempts_on_fewer_cores(study, tmp_path,
                                                         capsys):
  root, runs, _ = study
  machine = {**machine_description(), 'cpu_count': 4}
  marker = read_marker(runs[0].workdir)
  marker['machine'] = machine
  for attempt, cores in zip(marker['attempts'], (4, 1)):
    attempt['cores'] = cores
  write_marker(runs[0].workdir, marker)
  output = tmp_path / 'docs' / 'results.md'
  assert camvid_study.main(['--report', '--labels=clicks:20', '--seeds=0,1',
                            '--steps=20', f'--root={root}',
                            f'--output={output}', '--overlay_images=0']) == 0
  capsys.readouterr()
  line = next(line for line in output.read_text().splitlines()
              if line.startswith('- Attempts on fewer cores'))
  assert line.endswith(f': {runs[0].cell.name} seed {runs[0].seed} '
                       '(1 of 2 attempts on 1 of 4)')
  assert read_run(runs[0]).cores == [4, 1]


def test_report_names_the_runs_of_each_cpu(study, tmp_path, capsys):
  """Records from two CPUs (a study carried across machines): the Machine
  section says which runs each made; from one CPU it adds nothing."""
  root, _, finals = study
  output = tmp_path / 'docs' / 'results.md'
  args = ['--report', '--labels=clicks:20', '--seeds=0,1', '--steps=20',
          f'--root={root}', f'--output={output}', '--overlay_images=0']

  def cpus_lines():
    assert camvid_study.main(args) == 0
    capsys.readouterr()
    return [line for line in output.read_text().splitlines()
            if line.startswith('- CPU')]

  here = machine_description()
  other = {**here, 'cpu': 'Other CPU', 'cpu_count': 3,
           'cpu_vector_isa': 'AVX-512'}
  moved = list(finals)[1]
  originals = {run: read_marker(run.workdir) for run in finals}
  try:
    for run, marker in originals.items():
      write_marker(run.workdir, {**marker, 'machine': here})
    assert cpus_lines() == [f'- CPU: {cpu_label(here)}']
    write_marker(moved.workdir, {**originals[moved], 'machine': other})
    [line] = cpus_lines()
  finally:
    for run, marker in originals.items():
      write_marker(run.workdir, marker)
  assert line.startswith('- CPUs: 2 (')
  groups = dict(group.split(': ') for group in line.split(
      'recorded before the field existed): ')[1].split('; '))
  name = lambda run: f'{run.cell.name} seed {run.seed}'
  assert groups == {
      'Other CPU (AVX-512), 3 cores': name(moved),
      cpu_label(here): ', '.join(name(r) for r in finals if r != moved)}


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
  summaries = summarize([r for r in map(read_run, runs) if r is not None])
  path = make_overlays(summaries, 'clicks:20',
                       str(tmp_path / 'out'), num_images=2,
                       python=str(python))
  assert path == str(tmp_path / 'out' / 'qualitative_clicks20.png')
  with Image.open(path) as grid:
    # 2 rows x (input, ground truth, pce_only, agmm_paper, full).
    assert grid.format == 'PNG' and grid.width > grid.height > 100
  assert os.path.getsize(path) < 300_000


# --------------------------------------------------------------------------
# The GPU preset, its predicted device time and its split into calls.


def test_gpu_preset_plans_every_registry_method_and_one_check_run():
  from configs import presets
  runs = plan_preset(STUDY_PRESETS['gpu'])
  grid = [r for r in runs if not r.cell.variant]
  # SPML's points preset is not run on scribbles nor its scribble preset on
  # clicks; every other preset on both.
  not_for = {('scribbles', 'spml'), ('clicks:20', 'spml_scribble')}
  expected = {(spec, method, seed) for spec in ('clicks:20', 'scribbles')
              for method in presets.PRESETS for seed in (0, 1)
              if (spec, method) not in not_for}
  expected |= {('clicks:20', 'full', seed) for seed in (0, 1)}
  assert {(r.cell.labels, r.cell.method, r.seed) for r in grid} == expected
  assert len(grid) == len(expected)
  (check,) = [r for r in runs if r.cell.variant]
  assert (check.cell.method, check.seed, check.cell.variant) == (
      'agmm_released', 0, 'bf16')
  assert check.workdir == 'runs/gpu_study/clicks20_agmm_released_bf16_seed0'
  twin = next(r for r in grid if r.cell == Cell(
      'clicks:20', 'agmm_released') and r.seed == 0)
  # The check differs from its float32 twin by the dtype and workdir only.
  assert set(check.argv) - set(twin.argv) == {
      '--config.model.compute_dtype=bfloat16', f'--workdir={check.workdir}'}
  for run in runs:
    flags = _parse_command(run.command)
    assert 'size=gpu_r18' in flags['config']
    assert flags['config.eval_every_steps'] == '44'
    assert flags['config.num_epochs'] == '40'
    assert 'config.num_train_steps' not in flags
  config = run_config(twin, config_overrides(twin))
  assert (config.model.depth, config.model.output_stride, config.num_epochs,
          config.global_batch_size, config.data.crop_size) == (
              18, 16, 40, 16, 353)
  assert config.data.prepare.downscale == 1


def test_grid_skips_methods_on_label_kinds_they_are_not_for():
  labels = ['clicks:20', 'points:1', 'scribbles', 'scribbles:width=3']
  methods = ['pce_only', 'spml', 'spml_scribble']
  runs = plan_runs(labels, methods, [0], root='r')
  cells = [(r.cell.labels, r.cell.method) for r in runs]
  # Naive reference: the kind is the spec's prefix; spml is for points and
  # clicks, spml_scribble for scribbles, pce_only for all.
  kind_ok = {'pce_only': ('clicks', 'points', 'scribbles'),
             'spml': ('clicks', 'points'), 'spml_scribble': ('scribbles',)}
  assert cells == [(spec, m) for spec in labels for m in methods
                   if spec.split(':')[0] in kind_ok[m]]
  # The planned runs keep their workdirs and commands.
  everything = plan_runs(labels, ['pce_only'], [0], root='r')
  assert [r for r in runs if r.cell.method == 'pce_only'] == everything
  assert runs[1].workdir == 'r/clicks20_spml_seed0'
  with pytest.raises(ValueError, match='none is for the label kinds'):
    plan_runs(['scribbles'], ['spml'], [0])
  # The report marks the skipped cells '-', the planned ones 'not run'.
  table = score_table(runs, [], [])
  assert table[2] == '| clicks:20 | not run | not run | - |'
  assert table[4] == '| scribbles | not run | - | not run |'


def test_spml_runs_are_planned_with_their_stage_2_steps():
  """An SPML run ends with its final classifier (stage 2: SPML's 4000 of
  30000 iterations, scaled), so it is finished only at that last step."""
  for steps, stage2 in ((200, 27), (300, 40)):
    (spml,) = plan_runs(['clicks:20'], ['spml'], [0], steps=steps)
    (pce,) = plan_runs(['clicks:20'], ['pce_only'], [0], steps=steps)
    assert run_shape(spml).total_steps == steps + stage2
    assert run_shape(pce).total_steps == steps
  (fixed,) = plan_runs(['clicks:20'], ['spml'], [0], steps=200,
                       overrides=['spml_stage2.num_train_steps=5'])
  assert run_shape(fixed).total_steps == 205
  (off,) = plan_runs(['clicks:20'], ['spml'], [0], steps=200,
                     overrides=['spml_stage2.enabled=False'])
  assert run_shape(off).total_steps == 200


def test_predicted_run_seconds_match_a_hand_computation():
  (run,) = plan_preset(STUDY_PRESETS['gpu'],
                       labels=['clicks:20'], methods=['tel'],
                       seeds=[0])[:1]
  shape = run_shape(run)
  # 40 epochs of 367 // 16 = 22 steps; val every 44 steps: 20 evaluations.
  assert (shape.total_steps, shape.batch, shape.num_evals) == (880, 16, 20)
  figures = DeviceFigures()
  # 180 images/s for 496.1 GFLOP per image, scaled to 113.1; the pipeline
  # (12 threads x 98 images/s) is not the limit.
  rate = min(180.0 * 496.1 / 113.1, 12 * 98.0)
  assert predicted_img_per_s(shape, figures) == pytest.approx(rate)
  eval_s = 20 * 101 * (360 * 480) / 353**2 / 3 / rate
  expected = 15.0 + 880 * 16 / rate + eval_s
  assert predicted_run_s(
      shape, figures, compiles=False) == pytest.approx(expected)
  assert predicted_run_s(
      shape, figures, compiles=True) == pytest.approx(expected + 80.0)
  # A measured throughput replaces the scaling.
  measured = dataclasses.replace(figures, img_per_s=200.0)
  assert predicted_run_s(
      shape, measured, compiles=False) == pytest.approx(
          15.0 + (880 * 16 + 20 * 101 * 360 * 480 / 353**2 / 3) / 200.0)


def _curve_result(method: str, seed: int, curve: Sequence[float]
                  ) -> RunResult:
  """A finished clicks:20 (or dense, method 'full') run evaluated every 100
  steps with val mIoU `curve`."""
  steps = 100 * np.arange(1, len(curve) + 1)
  run = Run(Cell('clicks:20', method), seed, f'runs/{method}_{seed}', ())
  return RunResult(run=run, miou_curve=(steps, np.array(curve, np.float64)),
                   loss_curve=(np.zeros(0, np.int64), np.zeros(0)),
                   per_class_iou={}, wall_s=None, wall_from_events=False,
                   done=True, machine=None, load_averages=[])


def test_late_gain_is_the_rise_over_the_last_quarter_of_the_steps():
  # Steps 100..800: 3/4 of 800 is 600, whose value is 0.30.
  result = _curve_result('pce_only', 0,
                         [.1, .2, .25, .26, .28, .30, .33, .35])
  assert late_gain(result) == pytest.approx(0.35 - 0.30)
  assert np.isnan(late_gain(_curve_result('pce_only', 0, [.3])))


@pytest.mark.parametrize('sparse, dense, verdict, spread_text', [
    # Gain (0.05 + 0.03) / 2 >= 1 point: rising, and one seed per cell.
    ([[.2, .30, .35]], [[.3, .40, .43]],
     'still rising: the schedule is too short; the next task doubles it '
     '(`--override=num_epochs=80`, a new `--root`); provisional: one seed '
     'per cell, whose curve moves between evaluations too',
     'not known yet (one seed per cell)'),
    # Flat (gains 0.002, 0.004), one seed per cell.
    ([[.2, .350, .352]], [[.3, .440, .444]],
     'flat, but one seed per cell cannot tell the gap from noise',
     'not known yet (one seed per cell)'),
    # Flat; gap 0.02 against the larger spread, std(.45, .50) = 0.0354.
    ([[.2, .450, .450], [.2, .500, .500]], [[.3, .490, .490], [.3, .500, .500]],
     'flat, and dense labels do not beat clicks beyond the seed noise: a '
     'longer schedule would not separate the methods', '3.54'),
    # Flat; gap 0.10 against the spread std(.35, .36) = 0.0071.
    ([[.2, .350, .350], [.2, .360, .360]], [[.3, .450, .450], [.3, .460, .460]],
     'flat, and dense labels beat clicks: the schedule is long enough',
     '0.71'),
])
def test_schedule_check_verdicts(sparse, dense, verdict, spread_text):
  results = ([_curve_result('pce_only', s, c) for s, c in enumerate(sparse)]
             + [_curve_result('full', s, c) for s, c in enumerate(dense)])
  lines = schedule_check(results, 'clicks:20')
  gap = np.mean([c[-1] for c in dense]) - np.mean([c[-1] for c in sparse])
  expected = (f'- dense minus clicks: {100 * gap:+.2f} points; largest seed '
              f'spread {spread_text}')
  assert expected in lines
  assert lines[-1] == f'- verdict: {verdict}'


def test_schedule_check_waits_for_both_cells():
  lines = schedule_check([_curve_result('pce_only', 0, [.2, .3])],
                         'clicks:20')
  assert lines == ['Not checked yet: needs finished `pce_only` (clicks:20) '
                   'and `full` runs.']


def _synthetic_runs(programs: str) -> list[Run]:
  """One run per letter; equal letters share a program (the method)."""
  runs = []
  for index, letter in enumerate(programs):
    runs.append(Run(
        Cell('clicks:20', f'm{letter}'), index, f'w{index}',
        ('python', 'main.py',
         f'--config=configs/camvid_clicks.py:labels=clicks:20,'
         f'method=m{letter},size=gpu_r18,lseed=0', f'--workdir=w{index}',
         f'--config.seed={index}')))
  return runs


def test_split_into_calls_compiles_once_per_task_and_respects_budgets():
  runs = _synthetic_runs('aaabbbcccadd')
  shape = RunShape(size='gpu_r18', total_steps=100, batch=10,
                   eval_every=100, num_threads=12, crop=10,
                   eval_pixels=0)
  figures = DeviceFigures(
      img_per_s=100.0, compile_s=50.0, start_s=5.0, data_prep_s=7.0,
      call_overhead_s=3.0)
  # A run: 5 s start + 10 s training (+ 50 s compile), eval free.
  calls = split_into_calls(
      runs, figures, 100.0, task_budget_s=190.0,
      shapes={r: shape for r in runs})
  assert [r for c in calls for r in c.runs] == runs  # order kept
  # Naive reference: walk the calls, compile on a program's first run in
  # its task, prepare the labels once per task.
  seen: dict[int, set[str]] = {}
  for call in calls:
    assert call.total_s <= 100.0
    programs = seen.setdefault(call.task, set())
    expected = []
    for run in call.runs:
      expected.append(15.0 + (50.0 if run.cell.method not in programs
                              else 0.0))
      programs.add(run.cell.method)
    assert call.run_s == pytest.approx(expected)
  for task in {c.task for c in calls}:
    in_task = [c for c in calls if c.task == task]
    assert sum(c.total_s for c in in_task) <= 190.0
    assert sum(c.prep_s for c in in_task) == 7.0  # one label spec
  # Greedy: a call's first run would not have fitted in the call before
  # (nor, in a new task, in the task before).
  for before, after in zip(calls, calls[1:]):
    task_before = sum(c.total_s for c in calls if c.task == before.task)
    assert (before.total_s + after.run_s[0] > 100.0 if after.task ==
            before.task else task_before + after.run_s[0] + 3.0 > 190.0)
  assert len({c.task for c in calls}) > 1
  with pytest.raises(ValueError, match='does not fit in a device call'):
    split_into_calls(runs, figures, 60.0, shapes={r: shape for r in runs})


def test_device_order_puts_core_programs_first_grouped():
  runs = plan_preset(STUDY_PRESETS['gpu'])
  ordered = device_order(runs, CORE_METHODS)
  assert sorted(ordered, key=runs.index) == runs
  core = [r for r in ordered
          if is_core_run(r, 'clicks:20', CORE_METHODS)]
  assert ordered[:len(core)] == core
  # pce_only and full share a program and come first, then the AGMM forms.
  assert {r.cell.method for r in core[:4]} == {'pce_only', 'full'}
  assert [r.cell.method for r in core[4:8]] == ['agmm_released'] * 2 + [
      'agmm_paper'] * 2
  assert core[-1].cell.variant == 'bf16'
  # Each program's runs are contiguous within a part.
  keys = [(r in core, program_key(r)) for r in ordered]
  assert len(set(keys)) == len([k for i, k in enumerate(keys)
                                if i == 0 or keys[i - 1] != k])


def test_plan_prints_calls_and_predicted_device_time(capsys):
  assert camvid_study.main(['--plan', '--preset=gpu']) == 0
  lines = capsys.readouterr().out.splitlines()
  commands = [line for line in lines if not line.startswith('#')]
  # 2 label specs x 2 seeds x the loss presets, less SPML's 2 cells that do
  # not apply, + 2 dense runs + the bf16 check.
  assert len(commands) == 2 * (2 * (len(METHODS) - 1) - 2) + 2 + 1
  call_lines = [line for line in lines if line.startswith('# call ')]
  totals = [float(line.split('predicted ')[1].split(' s')[0])
            for line in call_lines]
  (total_line,) = [line for line in lines if line.startswith('# total: ')]
  assert f'predicted {sum(totals):.0f} s' in total_line or abs(
      float(total_line.split('predicted ')[1].split(' s')[0])
      - sum(totals)) <= len(totals)
  assert all(t <= DEFAULT_CALL_BUDGET_S for t in totals)
  assert any('WARNING' in line for line in lines)  # several calls
  assert any(line.startswith('#   size=gpu_r18') for line in lines)
  # --call=1: only that call's runs, the core cells first.
  assert camvid_study.main(['--plan', '--preset=gpu', '--call=1']) == 0
  first = [line for line in capsys.readouterr().out.splitlines()
           if not line.startswith('#')]
  assert 0 < len(first) < len(commands)
  assert all('labels=clicks:20' in line for line in first)
  assert camvid_study.main(['--plan', '--preset=gpu', '--call=99']) == 2
  assert 'device call(s)' in capsys.readouterr().err


def test_camvid_config_gpu_r18_size():
  config = camvid_clicks.get_config('size=gpu_r18,method=pce_only')
  assert (config.model.depth, config.model.stem, config.model.output_stride,
          config.data.crop_size, tuple(config.data.eval_canvas),
          config.global_batch_size, config.data.prepare.downscale) == (
              18, 'torchvision', 16, 353, (360, 480), 16, 1)
  with pytest.raises(ValueError, match='size must be one of'):
    camvid_clicks.get_config('size=tpu')


# --------------------------------------------------------------------------
# Across sessions: --status, partial grids, deadline.


def _write_run(run: Run, *, steps: Sequence[int],
               mious: Sequence[float], marker_exit: int | None,
               per_class: Sequence[float] | None = None) -> None:
  """Fake workdir: a train loss at every step of `steps`, val mIoU `mious`
  at those steps, per-class IoU at the last one; a study marker with one
  attempt exiting `marker_exit` (None: no marker)."""
  with summary.SummaryWriter(run.workdir) as writer:
    for step, miou in zip(steps, mious):
      writer.write_scalars(step, {'train/loss': 1.0 / step,
                                  'train/images_per_second': 40.0 + step,
                                  'eval/miou': miou})
    if per_class is not None:
      writer.write_scalars(steps[-1], {f'eval/iou/{c}': v
                                       for c, v in zip(CLASSES, per_class)})
  if marker_exit is not None:
    write_marker(run.workdir, {
        'command': run.command, 'done': marker_exit == 0,
        'attempts': [{'wall_s': 60.0, 'returncode': marker_exit,
                      'load_average': 1.0}],
        'machine': machine_description()})


def test_archive_keeps_finished_runs_after_their_workdirs_are_gone(
    tmp_path, capsys):
  """A session's workdirs do not outlive it: --status and --report read
  the committed records instead, and --run skips what they hold."""
  root = str(tmp_path / 'runs' / 'grid')
  records = str(tmp_path / 'records')
  done, unfinished = plan_runs(['clicks:20'], ['pce_only', 'agmm_paper'],
                               [0], steps=20, root=root)
  per_class = np.linspace(0.1, 0.9, len(CLASSES))
  _write_run(done, steps=[10, 20], mious=[0.1, per_class.mean()],
             marker_exit=0, per_class=per_class)
  _write_run(unfinished, steps=[10], mious=[0.2], marker_exit=143)
  # The trainer's config.json (the archive compares its loss config).
  (tmp_path / done.workdir / 'config.json').write_text(run_config(
      done, config_overrides(done)).to_json_best_effort(indent=2,
                                                        sort_keys=True))
  before = read_run(done)
  for run in (done, unfinished):
    assert archive.save(run, records) == archive.record_path(run, records)
  assert archive.record_path(done, records) == os.path.join(
      records, 'grid', 'clicks20_pce_only_seed0.json')
  # Planned with other bookkeeping flags (a checkpoint period), the same run:
  # its workdir's marker and record are read, with the command that made it.
  saved_often = dataclasses.replace(
      done, argv=done.argv + ('--config.checkpoint_every_steps=5',))
  from_workdir = archive.read_result(saved_often, records)
  assert from_workdir.run.command == done.command
  assert from_workdir.done and from_workdir.wall_s == 60.0
  shutil.rmtree(tmp_path / 'runs')
  assert archive.is_archived(done, records)
  assert not archive.is_archived(unfinished, records)
  after = archive.read_result(done, records)
  assert after.done and after.finished and after.wall_s == 60.0
  for curve in ('miou_curve', 'loss_curve', 'throughput_curve'):
    for ours, theirs in zip(getattr(after, curve), getattr(before, curve)):
      np.testing.assert_array_equal(ours, theirs)
  assert after.per_class_iou == before.per_class_iou
  # Another schedule under the same workdir name is not taken for it.
  longer = dataclasses.replace(
      done, argv=done.argv + ('--config.num_train_steps=40',))
  assert archive.load(longer, records) is None
  assert archive.read_result(longer, records) is None
  # From the record alone, the same; an eval period makes another run.
  assert archive.is_archived(saved_often, records)
  from_record = archive.read_result(saved_often, records)
  assert from_record.run.command == done.command
  assert from_record.done and from_record.wall_s == 60.0
  assert not archive.is_archived(dataclasses.replace(
      done, argv=done.argv + ('--config.eval_every_steps=5',)), records)
  # Nor is a record trained with another loss config (a preset changed).
  path = archive.record_path(done, records)
  stale = json.loads(open(path).read())
  stale['config']['loss']['weights']['pce'] = 0.5
  stale_records = str(tmp_path / 'stale')
  os.makedirs(os.path.dirname(archive.record_path(done, stale_records)))
  with open(archive.record_path(done, stale_records), 'w') as f:
    json.dump(stale, f)
  assert archive.load(done, records) is not None
  capsys.readouterr()
  assert archive.load(done, stale_records) is None
  assert 'has now (loss.weights.pce 0.5 -> 1.0); not counted' in (
      capsys.readouterr().err)
  # A record older than a loss field added since (run_identity.ADDED_FIELDS)
  # trained with its recorded value, and one older than a term's options
  # (options it did not train with): counted; another value: stale.
  def older(edit):
    record = json.loads(open(path).read())
    edit(record['config']['loss'])
    with open(archive.record_path(done, stale_records), 'w') as f:
      json.dump(record, f)
    return archive.load(done, stale_records) is not None

  assert older(lambda loss: loss['soft_self_labeling'].pop('step_scale'))
  assert older(lambda loss: loss.pop('soft_self_labeling'))
  assert not older(lambda loss: loss['soft_self_labeling'].update(
      step_scale='pixel'))
  assert capsys.readouterr().err.count('another loss config') == 1

  grid = ['--labels=clicks:20', '--methods=pce_only,agmm_paper', '--seeds=0',
          '--steps=20', f'--root={root}', f'--archive={records}']
  assert camvid_study.main(['--status'] + grid) == 0
  rows = {tuple(line.split()[:2]): line.split()[2:]
          for line in capsys.readouterr().out.splitlines()[1:3]}
  assert rows[('clicks20_pce_only', '0')][:2] == ['done', '20/20']
  assert rows[('clicks20_agmm_paper', '0')][:3] == ['in', 'progress', '10/20']
  output = tmp_path / 'results.md'
  assert camvid_study.main(['--report', f'--output={output}',
                            '--overlay_images=0'] + grid) == 0
  capsys.readouterr()
  row = next(line for line in output.read_text().splitlines()
             if line.startswith('| clicks:20 | '))
  assert row.split('|')[2].strip() == (
      f'{100 * per_class.mean():.2f} (n=1)')

  # run_plan: a run done elsewhere is skipped unrun; each run done here,
  # now or before, is handed to on_done (the study archives it).
  ok = _fake_run('ok', 0)
  handed = []
  statuses = run_plan([ok], repo_root=str(tmp_path / 'a'),
                      on_done=handed.append)
  statuses += run_plan([ok], repo_root=str(tmp_path / 'a'),
                       on_done=handed.append)
  statuses += run_plan([ok], repo_root=str(tmp_path / 'b'),
                       done_elsewhere=lambda run: run == ok,
                       on_done=handed.append)
  assert [s for _, s in statuses] == ['done', 'skipped', 'skipped']
  assert handed == [ok, ok]
  assert not (tmp_path / 'b' / ok.workdir).exists()


def test_run_action_archives_what_it_finishes_and_skips_the_archive(
    tmp_path, monkeypatch, capsys):
  """--run hands run_plan the archive of --archive: archived runs count as
  done elsewhere, and each run done is archived there."""
  root = str(tmp_path / 'runs' / 'grid')
  records = str(tmp_path / 'records')
  (run,) = plan_runs(['clicks:20'], ['pce_only'], [0], steps=20, root=root)
  seen = {}

  def fake_run_plan(runs, **kwargs):
    seen['runs'] = list(runs)
    seen['before'] = [kwargs['done_elsewhere'](r) for r in runs]
    _write_run(runs[0], steps=[10, 20], mious=[0.1, 0.3], marker_exit=0)
    kwargs['on_done'](runs[0])
    seen['after'] = [kwargs['done_elsewhere'](r) for r in runs]
    return [(runs[0], 'done')]

  monkeypatch.setattr('benchmarks.study.cli.prepare_data',
                      lambda *args, **kwargs: {})
  monkeypatch.setattr('benchmarks.study.cli.run_plan', fake_run_plan)
  assert camvid_study.main([
      '--run', '--labels=clicks:20', '--methods=pce_only', '--seeds=0',
      '--steps=20', f'--root={root}', f'--archive={records}']) == 0
  capsys.readouterr()
  assert seen == {'runs': [run], 'before': [False], 'after': [True]}
  assert os.path.exists(archive.record_path(run, records))


@pytest.fixture(scope='module')
def partial_study(tmp_path_factory):
  """3 cells x 2 seeds at 20 steps: pce_only both seeds done; agmm_paper
  seed 0 done, seed 1 stopped at step 10 (exit 143); agmm_released seed 0
  failed (exit 1) at step 5, seed 1 not started. Returns (root, runs,
  {run: final mIoU})."""
  root = str(tmp_path_factory.mktemp('partial') / 'runs')
  runs = plan_runs(['clicks:20'], ['pce_only', 'agmm_released',
                                   'agmm_paper'], [0, 1],
                   steps=20, root=root)
  by_key = {(r.cell.method, r.seed): r for r in runs}
  rng = np.random.default_rng(3)
  finals = {}
  for key in (('pce_only', 0), ('pce_only', 1), ('agmm_paper', 0)):
    per_class = rng.uniform(0.1, 0.9, len(CLASSES))
    finals[by_key[key]] = per_class.mean()
    _write_run(by_key[key], steps=[10, 20],
               mious=[0.1, per_class.mean()], marker_exit=0,
               per_class=per_class)
  _write_run(by_key[('agmm_paper', 1)], steps=[10], mious=[0.77],
             marker_exit=143)
  _write_run(by_key[('agmm_released', 0)], steps=[5], mious=[0.05],
             marker_exit=1)
  return root, runs, finals


def test_status_lists_done_in_progress_failed_and_not_started(
    partial_study, capsys):
  root, runs, _ = partial_study
  assert camvid_study.main(['--status', '--labels=clicks:20',
                            '--methods=pce_only,agmm_released,agmm_paper',
                            '--steps=20', f'--root={root}']) == 0
  lines = capsys.readouterr().out.splitlines()
  rows = {tuple(line.split()[:2]): line.split()[2:] for line in lines[1:7]}
  assert rows[('clicks20_pce_only', '0')][:2] == ['done', '20/20']
  assert rows[('clicks20_agmm_paper', '1')][:3] == ['in', 'progress', '10/20']
  assert rows[('clicks20_agmm_released', '0')][:3] == ['failed', '(exit',
                                                       '1)']
  assert rows[('clicks20_agmm_released', '1')][:3] == ['not', 'started',
                                                       '0/20']
  assert 'clicks20_agmm_paper: 1 of 2 seeds done (partial)' in lines
  assert 'clicks20_pce_only: 2 of 2 seeds done' in lines
  # agmm_released: seed 0 failed, so the cell has started.
  assert 'clicks20_agmm_released: 0 of 2 seeds done (partial)' in lines
  assert lines[-1] == ('6 runs: 3 done, 1 in progress, 1 failed, '
                       '1 not started')


def test_report_marks_partial_cells_and_does_not_average_unfinished(
    partial_study, tmp_path, capsys):
  root, runs, finals = partial_study
  output = tmp_path / 'results.md'
  assert camvid_study.main(['--report', '--labels=clicks:20',
                            '--methods=pce_only,agmm_released,agmm_paper',
                            '--steps=20', f'--root={root}',
                            f'--output={output}', '--overlay_images=0']) == 0
  capsys.readouterr()
  text = output.read_text()
  assert '**Partial grid: 3 of 6 planned runs have finished.**' in text
  row = next(line for line in text.splitlines()
             if line.startswith('| clicks:20 | '))
  pce, released, paper = [c.strip() for c in row.strip('|').split('|')[1:]]
  pce_scores = [100 * v for r, v in finals.items()
                if r.cell.method == 'pce_only']
  assert pce == (f'{np.mean(pce_scores):.2f} ± '
                 f'{np.std(pce_scores, ddof=1):.2f} (n=2)')
  (paper_final,) = [v for r, v in finals.items()
                    if r.cell.method == 'agmm_paper']
  # The stopped seed's 77% is not averaged in.
  assert paper == f'{100 * paper_final:.2f} (n=1 of 2, partial)'
  assert released == 'in progress'
  assert ('| clicks20_agmm_paper | 1 | 10 | 77.00 | 1m00s | 50 | '
          'in progress (step 10 of 20; not averaged) |') in text


def test_run_plan_defers_runs_past_the_deadline_and_passes_env(tmp_path):
  script = textwrap.dedent('''\
      import os, signal, sys, time
      signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
      open('env', 'w').write(os.environ['JAX_COMPILATION_CACHE_DIR'])
      time.sleep(float(sys.argv[1]))
      ''')
  fast = Run(Cell('clicks:20', 'fast'), 0, 'fast',
             (sys.executable, '-c', script, '0'))
  slow = Run(Cell('clicks:20', 'slow'), 0, '.',
             (sys.executable, '-c', script, '60'))
  never = _fake_run('never', 0)
  env = {'JAX_COMPILATION_CACHE_DIR': str(tmp_path / 'cache')}
  start = time.monotonic()
  # The slow run is predicted to fit, overruns and is stopped at the
  # deadline; the next one is predicted past it and deferred.
  statuses = run_plan(
      [fast, slow, never], repo_root=str(tmp_path), env=env,
      deadline=start + 3.0, predicted_s={fast: 0.1, slow: 0.1, never: 100.0})
  assert time.monotonic() - start < 30
  assert [s for _, s in statuses] == ['done', 'failed (exit 143)']
  assert (tmp_path / 'env').read_text() == str(tmp_path / 'cache')
  statuses = run_plan(
      [never], repo_root=str(tmp_path), deadline=time.monotonic() + 5.0,
      predicted_s={never: 100.0})
  assert [s for _, s in statuses] == ['deferred (deadline)']
  assert not (tmp_path / never.workdir).exists()


# --------------------------------------------------------------------------
# Packing a device call's results, and the report from the pack.


def test_pack_round_trip_gives_the_same_results_and_report(
    partial_study, tmp_path, capsys):
  root, runs, _ = partial_study
  figure = tmp_path / 'qualitative_clicks20.png'
  Image.fromarray(np.arange(48, dtype=np.uint8).reshape(6, 8)).save(figure)
  paths = pack_results(runs, str(tmp_path / 'out'), figure_paths=[str(figure)],
                       diagnostic='| run | acc |')
  assert sorted(os.listdir(tmp_path / 'out')) == sorted(
      [PACK_JSON, PACK_FIGURES])
  assert all(os.path.getsize(p) < PACK_FILE_LIMIT for p in paths)
  unpacked = unpack_results([str(tmp_path / 'out')], str(tmp_path / 'figures'))
  assert (tmp_path / 'figures' / figure.name).read_bytes() == \
      figure.read_bytes()
  assert unpacked.diagnostics == ['| run | acc |']
  for run in runs:
    direct = read_run(run)
    if direct is None:
      assert run.workdir not in unpacked.records
      continue
    packed = result_from_record(run, unpacked.records[run.workdir])
    for field in ('miou_curve', 'loss_curve', 'throughput_curve'):
      for a, b in zip(getattr(direct, field), getattr(packed, field)):
        np.testing.assert_array_equal(a, b)
    assert packed.per_class_iou == direct.per_class_iou
    assert (packed.done, packed.finished, packed.wall_s, packed.total_steps,
            packed.last_step) == (direct.done, direct.finished,
                                  direct.wall_s, direct.total_steps,
                                  direct.last_step)
  # The report from the pack has the same tables as the one from the runs.
  flags = ['--labels=clicks:20', '--methods=pce_only,agmm_released,agmm_paper',
           '--steps=20', f'--root={root}', '--overlay_images=0']
  from_runs, from_pack = tmp_path / 'a.md', tmp_path / 'b.md'
  assert camvid_study.main(['--report', f'--output={from_runs}'] + flags) == 0
  assert camvid_study.main(['--report', f'--output={from_pack}',
                            f'--from={tmp_path / "out"}'] + flags) == 0
  capsys.readouterr()
  for start, end in (('## Val mIoU', '## Learning curves'),
                     ('## Runs:', '## Machine')):
    section = lambda text: text.split(start)[1].split(end)[0]  # pylint: disable=cell-var-from-loop
    assert section(from_pack.read_text()) == section(from_runs.read_text())
  assert '| run | acc |' in from_pack.read_text()


def test_pack_refuses_files_over_the_limit_and_unpack_bad_names(
    partial_study, tmp_path, monkeypatch):
  _, runs, _ = partial_study
  monkeypatch.setattr('benchmarks.study.pack.PACK_FILE_LIMIT', 100)
  with pytest.raises(ValueError, match='exceeds'):
    pack_results(runs, str(tmp_path / 'out'))
  assert os.listdir(tmp_path / 'out') == []  # nothing half-written
  monkeypatch.undo()
  pack_results(runs[:1], str(tmp_path / 'ok'))
  bad = tmp_path / 'ok' / PACK_FIGURES
  with tarfile.open(bad, 'w:gz') as tar:
    tar.add(__file__, arcname='../escape.png')
  with pytest.raises(ValueError, match='not a plain PNG'):
    unpack_results([str(tmp_path / 'ok')], str(tmp_path / 'f'))
  with pytest.raises(ValueError, match='no study_results.json'):
    unpack_results([str(tmp_path)], str(tmp_path / 'f'))


# --------------------------------------------------------------------------
# Evaluation on a second dataset (main.py eval mode, a fake runner here).


def test_parse_eval_output_reads_the_printed_iou_table():
  from agmm_jax.evaluation import metrics
  per_class = np.array([0.5, np.nan, 0.25])
  text = ('some log line\nval at step 1800 (whole):\n'
          + metrics.format_iou_table(per_class, ['road', 'side walk', 'car'],
                                     0.375, 0.9) + '\n')
  parsed = parse_eval_output(text)
  assert (parsed['split'], parsed['step'], parsed['eval_mode']) == (
      'val', 1800, 'whole')
  assert parsed['miou'] == pytest.approx(0.375)
  assert parsed['pixel_accuracy'] == pytest.approx(0.9)
  assert parsed['per_class']['road'] == pytest.approx(0.5)
  assert np.isnan(parsed['per_class']['side walk'])
  assert parsed['per_class']['car'] == pytest.approx(0.25)
  with pytest.raises(ValueError, match='no "SPLIT at step N'):
    parse_eval_output('error: no checkpoint')
  with pytest.raises(ValueError, match='ends before'):
    parse_eval_output('val at step 3 (whole):\nclass  IoU (%)\n'
                      'road  50.00\n')


def test_eval_data_dir_evaluates_finished_runs_once_and_reports_them(
    partial_study, tmp_path, capsys):
  # A copy: the evaluations written into the workdirs stay in this test.
  root = str(tmp_path / 'runs')
  shutil.copytree(partial_study[0], root)
  runs = plan_runs(['clicks:20'], ['pce_only', 'agmm_released',
                                   'agmm_paper'], [0, 1],
                   steps=20, root=root)
  from agmm_jax.evaluation import metrics
  calls = []
  scores = {}

  def fake_runner(argv, cwd):
    calls.append(list(argv))
    workdir = next(a.split('=', 1)[1] for a in argv
                   if a.startswith('--workdir='))
    if 'agmm_paper' in workdir:
      return subprocess.CompletedProcess(argv, 1, '', 'error: no data')
    iou = np.full(len(CLASSES), 0.1 + 0.1 * len(calls))
    scores[workdir] = iou.mean()
    table = metrics.format_iou_table(iou, CLASSES, iou.mean(), 0.8)
    return subprocess.CompletedProcess(argv, 0, f'val at step 20 (whole):\n'
                                       f'{table}\n', '')

  results = [r for r in map(read_run, runs) if r is not None]
  data_dir = str(tmp_path / 'other_data')
  statuses = evaluate_finished(results, data_dir, runner=fake_runner)
  # Finished runs only: both pce_only seeds and agmm_paper seed 0 (which
  # fails here); the stopped and failed runs are not evaluated.
  assert sorted(statuses.values()) == ['evaluated', 'evaluated',
                                       'failed: exit 1: error: no data']
  for argv in calls:
    run = next(r for r in runs if f'--workdir={r.workdir}' in argv)
    assert argv == list(run.argv) + [
        '--config.mode=eval', f'--config.eval.data_dir={data_dir}',
        '--config.eval.checkpoint=latest']
  calls.clear()
  results = [r for r in map(read_run, runs) if r is not None]
  statuses = evaluate_finished(results, data_dir, runner=fake_runner)
  assert len(calls) == 1 and 'agmm_paper' in calls[0][3]  # retried only
  assert sorted(statuses.values()).count('skipped') == 2
  # The report's second table: mean ± std over the evaluated seeds.
  output = tmp_path / 'results.md'
  results = [r for r in map(read_run, runs) if r is not None]
  write_report(runs, results, markdown_path=str(output),
               curves_path=str(tmp_path / 'c.png'),
               overlay_paths=[], command_line='x')
  text = output.read_text()
  second = text.split(f'## mIoU (%) on `{data_dir}`')[1]
  row = next(line for line in second.splitlines()
             if line.startswith('| clicks:20 | '))
  values = [100 * v for w, v in scores.items() if 'pce_only' in w]
  assert row.split('|')[2].strip() == (
      f'{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f} (n=2)')
  assert row.split('|')[4].strip() == 'not evaluated'  # its eval failed


def test_eval_given_classes_is_its_own_evaluation_and_table(
    partial_study, tmp_path):
  root = str(tmp_path / 'runs')
  shutil.copytree(partial_study[0], root)
  runs = plan_runs(['clicks:20'], ['pce_only'], [0, 1], steps=20, root=root)
  from agmm_jax.evaluation import metrics
  calls = []

  def fake_runner(argv, cwd):
    calls.append(list(argv))
    given = '--config.eval.given_classes=true' in argv
    iou = np.full(len(CLASSES), 0.6 if given else 0.2)
    table = metrics.format_iou_table(iou, CLASSES, iou.mean(), 0.8)
    mode = 'whole, given classes' if given else 'whole'
    return subprocess.CompletedProcess(
        argv, 0, f'val at step 20 ({mode}):\n{table}\n', '')

  results = [r for r in map(read_run, runs) if r is not None]
  assert set(evaluate_finished(results, '', given_classes=True,
                               runner=fake_runner).values()) == {'evaluated'}
  for argv in calls:  # its own eval split: no data_dir flag
    run = next(r for r in runs if f'--workdir={r.workdir}' in argv)
    assert argv == list(run.argv) + [
        '--config.mode=eval', '--config.eval.given_classes=true',
        '--config.eval.checkpoint=latest']
  # A second key: the plain evaluation of another folder is not skipped.
  other = str(tmp_path / 'other')
  results = [r for r in map(read_run, runs) if r is not None]
  assert set(evaluate_finished(results, other, runner=fake_runner).values()
             ) == {'evaluated'}
  results = [r for r in map(read_run, runs) if r is not None]
  assert sorted(results[0].evals) == sorted(
      [other, 'own eval split, given classes'])
  assert results[0].evals['own eval split, given classes']['eval_mode'] == (
      'whole, given classes')
  output = tmp_path / 'results.md'
  write_report(runs, results, markdown_path=str(output),
               curves_path=str(tmp_path / 'c.png'), overlay_paths=[],
               command_line='x')
  text = output.read_text()
  given = text.split("## mIoU (%) on the val split, each image's classes "
                     'given')[1].split('## ')[0]
  assert '--config.eval.given_classes=true' in given
  row = next(line for line in given.splitlines()
             if line.startswith('| clicks:20 | '))
  assert row.split('|')[2].strip() == '60.00 ± 0.00 (n=2)'
  assert f'## mIoU (%) on `{other}`' in text


def test_report_eval_given_classes_keeps_the_evaluation_in_the_records(
    partial_study, tmp_path, monkeypatch, capsys):
  root = str(tmp_path / 'runs')
  shutil.copytree(partial_study[0], root)
  from agmm_jax.evaluation import metrics
  from benchmarks.study import cli
  table = metrics.format_iou_table(np.full(len(CLASSES), 0.5), CLASSES, 0.5,
                                   0.8)
  fake_runner = lambda argv, cwd: subprocess.CompletedProcess(
      argv, 0, f'val at step 20 (whole, given classes):\n{table}\n', '')
  real = cli.evaluate_finished
  monkeypatch.setattr(cli, 'evaluate_finished', lambda *a, **k: real(
      *a, runner=fake_runner, **k))
  records = str(tmp_path / 'records')
  argv = ['--labels=clicks:20', '--methods=pce_only', '--seeds=0,1',
          '--steps=20', f'--root={root}', f'--archive={records}']
  runs = plan_runs(['clicks:20'], ['pce_only'], [0, 1], steps=20, root=root)
  for run in runs:
    archive.save(run, records)
    os.makedirs(os.path.join(run.workdir, 'checkpoints'))  # evaluable
  assert camvid_study.main(['--report', *argv, '--eval_given_classes',
                            f'--output={tmp_path / "r.md"}',
                            '--overlay_images=0']) == 0
  capsys.readouterr()
  for run in runs:  # the workdirs may go: the records keep the evaluation
    kept = archive.load(run, records)['evals']
    assert kept['own eval split, given classes']['miou'] == pytest.approx(0.5)
  shutil.rmtree(root)
  assert camvid_study.main(['--report', *argv,
                            f'--output={tmp_path / "r2.md"}',
                            '--overlay_images=0']) == 0
  assert "each image's classes given" in (tmp_path / 'r2.md').read_text()


def test_a_regenerated_report_keeps_its_hand_written_section(partial_study,
                                                             tmp_path):
  _, runs, _ = partial_study
  results = [r for r in map(read_run, runs) if r is not None]
  output = tmp_path / 'results.md'
  kwargs = dict(markdown_path=str(output), curves_path=str(tmp_path / 'c.png'),
                overlay_paths=[])
  first = write_report(runs, results, command_line='first', **kwargs)
  hand = ('\n## What these numbers say (written by hand; the sections above '
          'are generated)\n\nAn explanation.\n\n### Its own subsection\n')
  output.write_text(first + hand)
  second = write_report(runs, results[:2], command_line='second', **kwargs)
  text = output.read_text()
  assert text == second and text.endswith(hand)
  assert text.count('## What these numbers say') == 1
  assert '`second`' in text and '`first`' not in text
  assert text[:-len(hand)] != first  # the generated part was regenerated


def test_run_diagnostic_runs_the_finished_runs_and_reports_failures(
    partial_study):
  _, runs, finals = partial_study
  results = [r for r in map(read_run, runs) if r is not None]
  seen = []

  def fake_runner(argv, cwd):
    seen.append(list(argv))
    return subprocess.CompletedProcess(argv, 0, '| run | acc G % |\n', '')

  text = run_diagnostic(results, images=8, runner=fake_runner, python='py')
  (argv,) = seen
  assert argv[:3] == ['py', '-m', 'benchmarks.gmm_diagnostic']
  flag, _, workdirs = argv[3].partition('=')
  assert flag == '--workdirs'
  assert sorted(workdirs.split(',')) == sorted(r.workdir for r in finals)
  assert argv[4] == '--images=8'
  assert text.endswith('| run | acc G % |') and 'gmm_diagnostic' in text
  failing = lambda argv, cwd: subprocess.CompletedProcess(argv, 2, '', 'boom')
  assert 'failed (exit 2)' in run_diagnostic(
      results, images=8, runner=failing)
  unfinished = [r for r in results if not r.finished]
  assert run_diagnostic(unfinished, images=8, runner=failing) == ''


def test_plan_into_a_closed_pipe_stops_without_traceback():
  # `--plan | head -1`: the reader leaves after one line.
  plan = subprocess.Popen(
      [sys.executable, '-m', 'benchmarks.camvid_study', '--plan',
       '--preset=msrc'], cwd=conftest.REPO_ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, bufsize=0)
  assert plan.stdout.readline().startswith(b'python main.py ')
  plan.stdout.close()
  _, stderr = plan.communicate(timeout=120)
  assert plan.returncode == 1
  assert b'Traceback' not in stderr and b'BrokenPipe' not in stderr, stderr


def test_machine_names_the_cpus_vector_extension():
  # Two EPYCs of one model name round differently (XLA:CPU compiles for the
  # host's vector width): the record says which this one has.
  machine = machine_description()
  if os.path.exists('/proc/cpuinfo'):
    with open('/proc/cpuinfo') as f:
      flags = next(line for line in f if line.startswith('flags')).split()
    expected = ('AVX-512' if 'avx512f' in flags
                else 'AVX2' if 'avx2' in flags else '')
    assert machine['cpu_vector_isa'] == expected
  assert cpu_label({'cpu': 'EPYC', 'cpu_count': 2,
                    'cpu_vector_isa': 'AVX2'}) == 'EPYC (AVX2), 2 cores'
  # Records written before the field existed, and markers without a CPU.
  assert cpu_label({'cpu': 'EPYC', 'cpu_count': 2}) == 'EPYC, 2 cores'
  assert cpu_label({}) == ''


def test_report_keeps_an_earlier_grid_no_workdir_can_redraw(study, tmp_path,
                                                            capsys):
  root, runs, _ = study
  for run in runs:  # the overlay test above gives some of them checkpoints
    shutil.rmtree(os.path.join(run.workdir, 'checkpoints'), ignore_errors=True)
  output = tmp_path / 'docs' / 'results.md'
  figures = tmp_path / 'docs' / 'results'
  figures.mkdir(parents=True)
  earlier = figures / 'qualitative_clicks20.png'
  Image.fromarray(np.arange(48, dtype=np.uint8).reshape(6, 8)).save(earlier)
  before = earlier.read_bytes()
  stale = figures / 'qualitative_scribbles.png'
  stale.write_bytes(before)
  cited = figures / 'qualitative_full_seed0.png'
  cited.write_bytes(before)
  output.write_text('# old\n\n## What these numbers say (written by hand; '
                    'the sections above are generated)\n\nSee '
                    '![full](results/qualitative_full_seed0.png).\n')
  assert camvid_study.main(['--report', '--labels=clicks:20', '--seeds=0,1',
                            '--steps=20', f'--root={root}',
                            f'--output={output}', '--overlay_images=2',
                            '--overlay_labels=clicks:20']) == 0
  capsys.readouterr()
  assert earlier.read_bytes() == before and not stale.exists()
  assert cited.exists()  # the hand-written section links it
  assert '![qualitative_clicks20.png](results/qualitative_clicks20.png)' in (
      output.read_text())
