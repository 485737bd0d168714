r"""The CamVid click-supervision study (docs/results.md): plan, run, report.

A study is a grid of cells (sparse-label spec x method) trained with
`configs/camvid_clicks.py` at several seeds. Every run is one ordinary
`python main.py` command with its own workdir `ROOT/CELL_seedS`, so any cell can
be rerun by hand; this script only plans the commands, runs them one after
another and collects what the trainer wrote (TensorBoard scalars) into
docs/results.md, a learning-curve plot and a few qualitative overlays.

  # The commands of every cell (labels x methods x seeds):
  python -m benchmarks.camvid_study --plan
  # Run them (resumable: finished runs are skipped, killed ones resume):
  python -m benchmarks.camvid_study --run --seeds=0,1
  # Results into docs/results.md, docs/results_curves.png, docs/results/:
  python -m benchmarks.camvid_study --report --seeds=0,1

The method `full` (dense training labels, the fully supervised upper bound) does
not depend on the sparse labels; it is planned once per seed, with the first
`--labels` spec (whose prepared data folder also holds the dense labels).

Scores: a run's score is its val mIoU at the final evaluation (the last step
with an `eval/miou` scalar, i.e. the final weights on the validation split); a
cell's score is the mean over its *finished* seeds with the sample standard
deviation (ddof=1) as the spread. A cell with fewer finished seeds than planned
is marked partial in the report; unfinished runs are listed with the step they
reached, never averaged.

Presets (`--preset=NAME` fills --labels, --methods, --seeds, --size and adds
overrides; explicit flags still win):

  # The GPU study: every method of the registry x clicks:20, scribbles x 2
  # seeds at 40 epochs, plus one bfloat16 check run; --plan prints the
  # predicted device time and splits the grid into device calls:
  python -m benchmarks.camvid_study --plan --preset=gpu
  # One device call (benchmarks/gpu_study.sh wraps this; docs/benchmarks.md):
  python -m benchmarks.camvid_study --run --preset=gpu --call=1 --deadline_s=500
  python -m benchmarks.camvid_study --pack=$OUT --preset=gpu --call=1
  # Back on this machine: docs/results.md from the folder(s) that came back:
  python -m benchmarks.camvid_study --report --preset=gpu --from=FOLDER
  # The CPU 40-epoch schedule across sessions (resumable; --status says
  # which runs are done, in progress (step reached) or not started):
  python -m benchmarks.camvid_study --run --preset=cpu40
  python -m benchmarks.camvid_study --status --preset=cpu40

Device time (GPU preset): runs are separate `main.py` processes sharing JAX's
persistent compilation cache (JAX_COMPILATION_CACHE_DIR in the children's
environment), not cells inside one Python process. A cell's seeds and its
other label type compile the same programs (labels change values, not shapes),
so they load them from the cache; different methods are different programs
either way, so one process would only save the per-run start-up and cache
load (seconds), while separate processes keep every run an ordinary,
resumable command (SIGTERM at a call's deadline checkpoints it; a crash or a
NaN in one cell does not end the call) and need no second training driver.
The cache folder is git-ignored, so it survives between calls while the
device machine stays warm.
"""

import argparse
import ast
import dataclasses
import datetime
import importlib.metadata
import io
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from configs import presets

CONFIG_FILE = 'configs/camvid_clicks.py'
DEFAULT_LABELS = ('clicks:20', 'clicks:100', 'points:1')
FULL = 'full'
# Every loss preset (configs/presets.py) and dense labels; the default grid
# is the original study's.
METHODS = presets.PRESETS + (FULL,)
DEFAULT_METHODS = ('pce_only', 'agmm_released', 'agmm_paper', FULL)
DEFAULT_SEEDS = (0, 1)
DEFAULT_ROOT = 'runs/study'
# Written by --run into each workdir: the command and its attempts.
MARKER_FILE = 'study_run.json'
LOG_FILE = 'study_stdout.log'
# Scalar tags written by agmm_jax/train.py.
DEFAULT_MIOU_TAG = 'eval/miou'
DEFAULT_LOSS_TAG = 'train/loss'
DEFAULT_IOU_PREFIX = 'eval/iou/'
THROUGHPUT_TAG = 'train/images_per_second'
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Images of the CamVid splits (the shared copy; docs/results.md): training
# steps per epoch are TRAIN_IMAGES // batch (agmm_jax/train.py).
CAMVID_TRAIN_IMAGES = 367
CAMVID_VAL_IMAGES = 101


# --------------------------------------------------------------------------
# Plan.


def labels_tag(spec: str) -> str:
  """File-name form of a sparse-label spec: 'clicks:20' -> 'clicks20'."""
  return spec.replace(':', '').replace('=', '')


@dataclasses.dataclass(frozen=True)
class Cell:
  """One cell of the study: a sparse-label spec and a method; `variant` names
  a check cell trained with extra overrides (e.g. 'bf16'), '' for the grid."""
  labels: str
  method: str
  variant: str = ''

  @property
  def name(self) -> str:
    base = FULL if self.method == FULL else (
        f'{labels_tag(self.labels)}_{self.method}')
    return f'{base}_{self.variant}' if self.variant else base

  @property
  def row(self) -> str:
    """Row of the result table: the label spec, or 'full (dense labels)'."""
    return 'full (dense labels)' if self.method == FULL else self.labels


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run: a cell at one seed, as a command line."""
  cell: Cell
  seed: int
  workdir: str
  argv: tuple[str, ...]

  @property
  def command(self) -> str:
    return shlex.join(self.argv)

  @property
  def config_arg(self) -> str:
    """The `--config=` value (config file plus its argument)."""
    prefix = '--config='
    return next(a[len(prefix):] for a in self.argv if a.startswith(prefix))


def plan_runs(labels: Sequence[str] = DEFAULT_LABELS,
              methods: Sequence[str] = DEFAULT_METHODS,
              seeds: Sequence[int] = DEFAULT_SEEDS, *, steps: int = -1,
              size: str = 'cpu', lseed: int = 0, root: str = DEFAULT_ROOT,
              overrides: Sequence[str] = (),
              python: str = 'python', variant: str = '') -> list[Run]:
  """The runs of the study, seed-major (every cell at seed 0 first).

  Args:
    labels: sparse-label generator specs (data_prep/sparse_labels.py).
    methods: subset of METHODS; 'full' gives one cell (first labels spec).
    seeds: training seeds (`--config.seed`).
    steps: `--config.num_train_steps` when > 0 (else the config's epochs).
    size: 'cpu' or 'gpu' (configs/camvid_clicks.py).
    lseed: seed of the sparse-label generator (the data, not the training).
    root: folder of the workdirs `ROOT/CELL_seedS`.
    overrides: extra `KEY=VALUE` config overrides (`--config.KEY=VALUE`).
    python: the interpreter named in the commands.
    variant: name of a check cell (workdir suffix) whose runs differ from the
      grid's by `overrides`; '' for the grid.

  Raises:
    ValueError: naming an unknown method, an empty list or a bad override.
  """
  for method in methods:
    if method not in METHODS:
      raise ValueError(f'--methods: unknown method {method!r}, expected some '
                       f'of {METHODS}')
  if not labels or not methods or not seeds:
    raise ValueError('--labels, --methods and --seeds must not be empty')
  for override in overrides:
    if '=' not in override or override.startswith('config.'):
      raise ValueError(f'--override {override!r}: expected KEY=VALUE with KEY '
                       'relative to the config, e.g. data.num_threads=2')
  labels, methods, seeds = (list(dict.fromkeys(x))
                             for x in (labels, methods, seeds))
  cells = []
  for spec in labels:
    cells += [Cell(spec, m, variant) for m in methods if m != FULL]
  if FULL in methods:
    cells.append(Cell(labels[0], FULL, variant))
  runs = []
  for seed in seeds:
    for cell in cells:
      workdir = os.path.join(root, f'{cell.name}_seed{seed}')
      config_arg = (f'{CONFIG_FILE}:labels={cell.labels},method={cell.method},'
                    f'size={size},lseed={lseed}')
      argv = [python, 'main.py', f'--config={config_arg}',
              f'--workdir={workdir}', f'--config.seed={seed}']
      if steps > 0:
        argv.append(f'--config.num_train_steps={steps}')
      argv += [f'--config.{override}' for override in overrides]
      runs.append(Run(cell, int(seed), workdir, tuple(argv)))
  return runs


# --------------------------------------------------------------------------
# Presets.


@dataclasses.dataclass(frozen=True)
class StudyPreset:
  """A named grid: what `--preset=NAME` plans.

  `core_methods` on the first labels spec run first on a device (the cells
  the issue's "done when" needs), `dtype_check` names the method of one extra
  run (first labels spec, first seed) in bfloat16 beside its float32 twin,
  `compilation_cache_dir` (relative to the repository) is JAX's persistent
  compilation cache of the runs.
  """
  labels: tuple[str, ...]
  methods: tuple[str, ...]
  seeds: tuple[int, ...]
  size: str
  root: str
  overrides: tuple[str, ...] = ()
  core_methods: tuple[str, ...] = ()
  dtype_check: str = ''
  compilation_cache_dir: str = ''


DTYPE_CHECK_VARIANT = 'bf16'
DTYPE_CHECK_OVERRIDE = 'model.compute_dtype=bfloat16'
CORE_METHODS = ('pce_only', FULL, 'agmm_released', 'agmm_paper')
STUDY_PRESETS = {
    # Every method of the registry (METHODS: the loss presets and dense
    # labels, so a method added to configs/presets.py joins the grid) on the
    # GPU backbone, 40 epochs (the minimum; the report's schedule
    # check says whether the learning curves call for more), val every 2
    # epochs (2 x 367 // 16 = 44 steps: a 20-point learning curve per run).
    'gpu': StudyPreset(
        labels=('clicks:20', 'scribbles'), methods=METHODS, seeds=(0, 1),
        size='gpu_r18', root='runs/gpu_study',
        overrides=('num_epochs=40', 'eval_every_steps=44',
                   'data.num_threads=12'),
        core_methods=CORE_METHODS, dtype_check='agmm_released',
        compilation_cache_dir='.jax_cache'),
    # The CPU 40-epoch schedule (size=cpu: 367 // 8 = 45 steps an epoch,
    # 1800 steps), val every 5 epochs (225 steps), progressing across
    # sessions.
    'cpu40': StudyPreset(
        labels=('clicks:20',), methods=CORE_METHODS, seeds=(0, 1),
        size='cpu', root='runs/study40',
        overrides=('eval_every_steps=225', 'data.num_threads=2'),
        core_methods=CORE_METHODS),
}


def plan_preset(preset: StudyPreset, *, labels: Sequence[str] | None = None,
                methods: Sequence[str] | None = None,
                seeds: Sequence[int] | None = None, steps: int = -1,
                size: str | None = None, root: str | None = None,
                overrides: Sequence[str] = (), lseed: int = 0,
                python: str = 'python') -> list[Run]:
  """The runs of `preset` (arguments given replace its fields; `overrides`
  are added to its own), its dtype check run last."""
  labels = list(labels or preset.labels)
  seeds = list(seeds if seeds is not None else preset.seeds)
  common_args = dict(steps=steps, size=size or preset.size, lseed=lseed,
                     root=root or preset.root, python=python)
  all_overrides = list(preset.overrides) + list(overrides)
  runs = plan_runs(labels, methods or preset.methods, seeds,
                   overrides=all_overrides, **common_args)
  if preset.dtype_check:
    runs += plan_runs(labels[:1], [preset.dtype_check], seeds[:1],
                      overrides=all_overrides + [DTYPE_CHECK_OVERRIDE],
                      variant=DTYPE_CHECK_VARIANT, **common_args)
  return runs


# --------------------------------------------------------------------------
# Predicted device time.

# Train-step GFLOP per image of each size of configs/camvid_clicks.py:
# XLA's cost analysis of the lowered forward + backward step at the size's
# crop, batch 1 (`python -m benchmarks.camvid_study --flops`; jax 0.10.2,
# 2026-12-01). The study's loss terms add little to the backbone's cost.
TRAIN_GFLOP_PER_IMAGE = {'gpu': 496.1, 'gpu_r18': 113.1, 'cpu': 23.0}
# Sizes --plan compares for the GPU preset (the backbone choice).
GPU_SIZES = ('gpu', 'gpu_r18')


@dataclasses.dataclass(frozen=True)
class DeviceFigures:
  """What the predicted device time assumes (the lent H200).

  Measured: `reference_img_per_s` and `compile_s` (size=gpu, ResNet-50 deep
  stem OS8, crop 353, batch 16, float32: 170-190 images/s after about 80 s
  of compilation, ../shared/device/README.md);
  `pipeline_img_per_s_per_thread` (10.2 ms per example and thread on the
  CPU, docs/benchmarks.md). Assumed until a device call measures them (the
  report lists each run's wall time and images/s; pass them back with
  --img_per_s / --compile_s): throughput scales with the inverse of the
  train-step FLOPs, capped by the input pipeline; every distinct program
  (method, dtype) compiles in `compile_s` whatever the size (on this CPU the
  bench_model train step compiled in 67.9 s for size=gpu and 60.7 s for
  gpu_r18, 2026-12-01, load ~13: compile time barely depends on the
  backbone), once per task; later runs load it from the persistent cache
  within `start_s` (process, JAX and data pipeline start, final checkpoint);
  `data_prep_s` per label spec and task (full resolution on 2 shared cores
  here: clicks:20 26 s, scribbles 459 s; the device's 16 cores assumed 8x
  faster); `call_overhead_s`: wheel installation and packing.
  """
  reference_img_per_s: float = 180.0
  reference_size: str = 'gpu'
  pipeline_img_per_s_per_thread: float = 98.0
  compile_s: float = 80.0
  start_s: float = 15.0
  data_prep_s: float = 60.0
  call_overhead_s: float = 60.0
  img_per_s: float = 0.0  # > 0: a measured throughput replacing the scaling


# A device call: at most 600 s a command; 15 minutes of device time a task,
# the machine's start included (../shared/device/README.md).
DEVICE_CALL_LIMIT_S = 600
DEVICE_TASK_BUDGET_S = 900
# Assumed: the machine's start (the device tool says "minutes").
MACHINE_START_S = 150
# The size=cpu schedule on this project's 2-core machines: the 200-step runs
# of docs/results.md took 7-8 min each (420 s / 200 steps, evaluations
# included).
CPU_SECONDS_PER_STEP = 2.1


def config_overrides(run: Run) -> list[str]:
  """The `KEY=VALUE` config overrides of `run`'s command (seed excluded)."""
  prefix = '--config.'
  return [a[len(prefix):] for a in run.argv
          if a.startswith(prefix) and not a.startswith(prefix + 'seed=')]


@dataclasses.dataclass(frozen=True)
class RunShape:
  """What one run trains: steps, batch, evaluation period and sizes."""
  size: str
  total_steps: int
  batch: int
  eval_every: int
  num_threads: int
  crop: int
  eval_pixels: int

  @property
  def train_images(self) -> int:
    return self.total_steps * self.batch

  @property
  def num_evals(self) -> int:
    """Evaluations at every multiple of the period and at the last step."""
    return self.total_steps // self.eval_every + (
        1 if self.total_steps % self.eval_every else 0)


def run_shape(run: Run) -> RunShape:
  """`run`'s schedule from its config (steps per epoch: CAMVID_TRAIN_IMAGES
  // batch, as agmm_jax/train.py counts them)."""
  config = run_config(run, config_overrides(run))
  batch = int(config.global_batch_size)
  steps_per_epoch = max(CAMVID_TRAIN_IMAGES // batch, 1)
  total = (int(config.num_train_steps) if config.num_train_steps > 0
           else int(config.num_epochs) * steps_per_epoch)
  eval_every = (steps_per_epoch if config.eval_every_steps == -1
                else int(config.eval_every_steps))
  size = common_args_of(run)['size']
  height, width = config.data.eval_canvas
  return RunShape(size=size, total_steps=total, batch=batch,
                  eval_every=eval_every if eval_every > 0 else total,
                  num_threads=int(config.data.num_threads),
                  crop=int(config.data.crop_size),
                  eval_pixels=int(height) * int(width))


def common_args_of(run: Run) -> dict[str, str]:
  """The `key=value` arguments of `run`'s config file argument."""
  arguments = run.config_arg.split(':', 1)[1]
  return dict(item.split('=', 1) for item in arguments.split(','))


def program_key(run: Run) -> tuple[str, ...]:
  """What decides the compiled programs of a run: the config argument without
  the labels (they change values, not shapes), dense labels as pCE (`full`
  trains pce_only's loss), and the overrides other than the seed and the
  paths. Runs with equal keys share the persistent compilation cache."""
  arguments = common_args_of(run)
  arguments.pop('labels', None)
  arguments.pop('lseed', None)
  if arguments.get('method') == FULL:
    arguments['method'] = 'pce_only'
  paths = ('data.dir=', 'data.prepare.')
  return tuple(f'{k}={v}' for k, v in sorted(arguments.items())) + tuple(
      sorted(o for o in config_overrides(run) if not o.startswith(paths)))


def predicted_img_per_s(shape: RunShape, figures: DeviceFigures) -> float:
  """Training images/s on the device: the reference throughput scaled by
  train-step FLOPs, min the input pipeline (threads x per-thread rate)."""
  if figures.img_per_s > 0:
    return figures.img_per_s
  compute = figures.reference_img_per_s * (
      TRAIN_GFLOP_PER_IMAGE[figures.reference_size]
      / TRAIN_GFLOP_PER_IMAGE[shape.size])
  return min(compute, shape.num_threads * figures.pipeline_img_per_s_per_thread)


def predicted_run_s(shape: RunShape, figures: DeviceFigures, *,
                    compiles: bool) -> float:
  """Seconds of one run: start + (compile) + train + periodic evaluation.

  An evaluated image costs eval_pixels / crop^2 / 3 of a trained one (a
  forward pass is about a third of forward + backward).
  """
  rate = predicted_img_per_s(shape, figures)
  eval_ratio = shape.eval_pixels / shape.crop ** 2 / 3.0
  return (figures.start_s + (figures.compile_s if compiles else 0.0)
          + shape.train_images / rate
          + shape.num_evals * CAMVID_VAL_IMAGES * eval_ratio / rate)


def is_core_run(run: Run, first_labels: str,
                core_methods: Sequence[str]) -> bool:
  """A run of the first device task: a core method on the first labels
  spec, or a check variant."""
  return bool(run.cell.variant) or (run.cell.labels == first_labels
                                    and run.cell.method in core_methods)


def device_order(runs: Sequence[Run],
                 core_methods: Sequence[str] = ()) -> list[Run]:
  """`runs` for device calls: the core runs (is_core_run) first, their
  programs in the order of `core_methods` (check variants after them), then
  the rest; each part grouped by program (a program compiles once per task)
  in order of first appearance."""
  if not runs:
    return []
  first_labels = runs[0].cell.labels
  tier = lambda r: 0 if is_core_run(r, first_labels, core_methods) else 1
  rank = lambda r: (core_methods.index(r.cell.method) if tier(r) == 0 and
                    not r.cell.variant and r.cell.method in core_methods
                    else len(core_methods))
  group_rank: dict[tuple[int, tuple[str, ...]], tuple[int, int]] = {}
  for index, run in enumerate(runs):
    key = (tier(run), program_key(run))
    previous = group_rank.get(key, (rank(run), index))
    group_rank[key] = (min(previous[0], rank(run)), previous[1])
  return sorted(runs, key=lambda r: (tier(r),
                                     group_rank[(tier(r), program_key(r))]))


@dataclasses.dataclass
class DeviceCall:
  """Runs planned into one device call with their predicted seconds;
  `task`: the device task (machine loan) it belongs to, 1-based; `prep_s`:
  data preparation of the label specs first needed in its task;
  `overhead_s`: installation of the wheels and packing the results."""
  task: int
  runs: list[Run] = dataclasses.field(default_factory=list)
  run_s: list[float] = dataclasses.field(default_factory=list)
  prep_s: float = 0.0
  overhead_s: float = 0.0

  @property
  def total_s(self) -> float:
    return sum(self.run_s) + self.prep_s + self.overhead_s


def predicted_extras_s(num_overlays: int, num_diagnostic_runs: int,
                       figures: DeviceFigures) -> float:
  """Seconds of the extras (`--pack` without --call: overlays and the G-vs-p
  diagnostic of the core runs, which need their checkpoints, so in the
  task that trained them): one predict process per overlay column and one
  diagnostic process (each a start and, assumed, half a train step's
  compile: forward programs only), 5 s per diagnosed run."""
  processes = num_overlays + (1 if num_diagnostic_runs else 0)
  return (processes * (figures.start_s + figures.compile_s / 2)
          + 5.0 * num_diagnostic_runs)


def split_into_calls(runs: Sequence[Run], figures: DeviceFigures,
                     budget_s: float, *,
                     task_budget_s: float = DEVICE_TASK_BUDGET_S
                     - MACHINE_START_S,
                     shapes: Mapping[Run, RunShape] | None = None
                     ) -> list[DeviceCall]:
  """Packs `runs` in order into device calls of at most `budget_s` seconds
  and the calls into device tasks of at most `task_budget_s` seconds of
  commands.

  Within a task the machine stays warm: the git-ignored compilation cache
  and data folders persist between its calls, so a program compiles and a
  label spec is prepared once per task. A new task starts cold.

  Raises:
    ValueError: when one run alone does not fit in a call.
  """
  shapes = shapes or {run: run_shape(run) for run in runs}
  calls: list[DeviceCall] = []
  programs: set[tuple[str, ...]] = set()
  data: set[str] = set()
  task_s = 0.0

  def cost(run: Run) -> tuple[float, float]:
    run_s = predicted_run_s(shapes[run], figures,
                            compiles=program_key(run) not in programs)
    prep_s = 0.0 if run.cell.labels in data else figures.data_prep_s
    return run_s, prep_s

  def open_call(seconds: float) -> None:
    """A new call for `seconds` of work, in a new task when the current
    one cannot hold the call's overhead and the work."""
    nonlocal task_s
    if not calls or task_s + figures.call_overhead_s + seconds > task_budget_s:
      programs.clear()
      data.clear()
      task_s = 0.0
      calls.append(DeviceCall(task=calls[-1].task + 1 if calls else 1))
    else:
      calls.append(DeviceCall(task=calls[-1].task))
    calls[-1].overhead_s = figures.call_overhead_s
    task_s += figures.call_overhead_s

  for run in runs:
    run_s, prep_s = cost(run)
    if (not calls or calls[-1].total_s + run_s + prep_s > budget_s
        or task_s + run_s + prep_s > task_budget_s):
      open_call(run_s + prep_s)
      run_s, prep_s = cost(run)
      if calls[-1].total_s + run_s + prep_s > budget_s:
        raise ValueError(
            f'{run.cell.name} seed {run.seed}: predicted {run_s:.0f} s does '
            f'not fit in a device call of {budget_s:.0f} s; shorten the run '
            '(--steps) or choose a smaller --size')
    calls[-1].runs.append(run)
    calls[-1].run_s.append(run_s)
    calls[-1].prep_s += prep_s
    task_s += run_s + prep_s
    programs.add(program_key(run))
    data.add(run.cell.labels)
  return calls


# Seconds of a device call kept for a stopped run's checkpoint and exit.
DEADLINE_MARGIN_S = 30


def call_deadline_s(call: DeviceCall) -> float:
  """Seconds the runs of `call` may take from the start of --run: the
  call's limit less its installation and packing and a margin
  (DEADLINE_MARGIN_S), so that the pack is written even when runs overrun
  their prediction."""
  return DEVICE_CALL_LIMIT_S - call.overhead_s - DEADLINE_MARGIN_S


def format_device_plan(calls: Sequence[DeviceCall], figures: DeviceFigures,
                       budget_s: float) -> list[str]:
  """The plan's predicted device time as '# ' comment lines: one line per
  run (its call, predicted seconds, compiles or cached), call totals and
  the device tasks the grid needs."""
  lines = []
  for number, call in enumerate(calls, 1):
    rate = (f'; {run_shape(call.runs[0]).size} at '
            f'{predicted_img_per_s(run_shape(call.runs[0]), figures):.0f} '
            'images/s') if call.runs else ''
    lines.append(
        f'# call {number} (task {call.task}): {len(call.runs)} runs, '
        f'predicted {call.total_s:.0f} s of {budget_s:.0f} s (runs '
        f'{sum(call.run_s):.0f} s, data preparation {call.prep_s:.0f} s, '
        f'install + pack {call.overhead_s:.0f} s){rate}')
    for run, seconds in zip(call.runs, call.run_s):
      compiled = seconds >= figures.compile_s + figures.start_s
      lines.append(f'#   {run.cell.name} seed {run.seed}: {seconds:.0f} s'
                   + (' (compiles)' if compiled else ' (cached programs)'))
  total = sum(c.total_s for c in calls)
  tasks = calls[-1].task if calls else 0
  lines.append(
      f'# total: {len(calls)} device call(s) in {tasks} task(s), predicted '
      f'{total:.0f} s of commands (a task lends {DEVICE_TASK_BUDGET_S} s, '
      f'{MACHINE_START_S} s of it assumed for the machine start)')
  if len(calls) > 1:
    lines.append(f'# WARNING: the grid exceeds one call of {budget_s:.0f} s; '
                 'run it as --call=1 .. --call='
                 f'{len(calls)} (the first calls hold the core cells)')
  return lines


def format_size_comparison(calls_by_size: Mapping[str, list[DeviceCall]]
                           ) -> list[str]:
  """'# ' lines: the grid's predicted device time at each GPU size (how the
  preset's backbone was chosen: the largest one whose core cells fit the
  first task)."""
  lines = ['# backbone choice: the whole grid at each GPU size']
  for size, calls in calls_by_size.items():
    total = sum(c.total_s for c in calls)
    core_task = sum(c.total_s for c in calls if c.task == 1)
    lines.append(f'#   size={size}: {len(calls)} call(s) in '
                 f'{calls[-1].task} task(s), {total:.0f} s; task 1 '
                 f'{core_task:.0f} s')
  return lines


def measure_train_gflop(size: str) -> float:
  """GFLOP per image of `size`'s train step (XLA cost analysis of the
  lowered benchmarks/bench_model.py step at the size's crop, batch 1)."""
  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  from flax import nnx
  from agmm_jax import models
  from benchmarks import bench_model
  from configs import camvid_clicks
  # pylint: enable=g-import-not-at-top
  config = camvid_clicks.get_config(f'size={size}')
  model = models.build_model(config.model, 11, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  crop = int(config.data.crop_size)
  lowered = bench_model._train_step_fn(graphdef).lower(  # pylint: disable=protected-access
      params, rest, jnp.zeros((1, crop, crop, 3)),
      jnp.zeros((1, crop, crop), jnp.int32))
  analysis = lowered.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  return float(analysis['flops']) / 1e9


# --------------------------------------------------------------------------
# Run.


def read_marker(workdir: str) -> dict[str, Any] | None:
  """The study marker of a workdir, or None when it has none."""
  path = os.path.join(workdir, MARKER_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}: not valid JSON ({e})') from None


def write_marker(workdir: str, marker: Mapping[str, Any]) -> None:
  """Writes the marker atomically (a kill never leaves half a file)."""
  path = os.path.join(workdir, MARKER_FILE)
  with open(path + '.tmp', 'w') as f:
    json.dump(marker, f, indent=2)
  os.replace(path + '.tmp', path)


def is_done(run: Run, repo_root: str = REPO_ROOT) -> bool:
  """True when `run`'s exact command finished with status 0 in its workdir."""
  marker = read_marker(os.path.join(repo_root, run.workdir))
  return bool(marker and marker.get('done')
              and marker.get('command') == run.command)


def machine_description() -> dict[str, Any]:
  """CPU model, core count, OS and library versions of this machine."""
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      models = [line.split(':', 1)[1].strip() for line in f
                if line.startswith('model name')]
    cpu = models[0] if models else cpu
  except OSError:
    pass
  versions = {}
  for package in ('jax', 'jaxlib', 'flax'):
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      versions[package] = 'not installed'
  # The GPUs, where nvidia-smi lists them (the lent device machine).
  devices = ''
  if shutil.which('nvidia-smi'):
    listing = subprocess.run(['nvidia-smi', '-L'], capture_output=True,
                             text=True, check=False)
    devices = '; '.join(listing.stdout.strip().splitlines())
  return {'cpu': cpu, 'cpu_count': os.cpu_count(),
          'platform': platform.platform(), 'python': platform.python_version(),
          'devices': devices, **versions}


def _utc_now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime(
      '%Y-%m-%d %H:%M:%S UTC')


def _apply_overrides(config: Any, overrides: Sequence[str]) -> None:
  """Applies `KEY=VALUE` overrides in place; VALUE is parsed like the flags
  would (a Python literal, or a plain string for string fields)."""
  for override in overrides:
    key, _, text = override.partition('=')
    *parents, last = key.split('.')
    node = config
    try:
      for part in parents:
        node = node[part]
      current = node[last]
    except (KeyError, AttributeError):
      raise ValueError(f'--override {override!r}: the config has no field '
                       f'{key!r}') from None
    if isinstance(current, str):
      node[last] = text
    else:
      try:
        value = ast.literal_eval(text)
      except (ValueError, SyntaxError):
        raise ValueError(f'--override {override!r}: {text!r} is not a '
                         'Python literal') from None
      node[last] = type(current)(value) if current is not None else value


def run_config(run: Run, overrides: Sequence[str] = ()) -> Any:
  """The ConfigDict that `run`'s command trains (for data preparation)."""
  # Imported here: the config imports JAX, which --plan does not need.
  from configs import camvid_clicks  # pylint: disable=g-import-not-at-top
  config = camvid_clicks.get_config(run.config_arg.split(':', 1)[1])
  config.seed = run.seed
  _apply_overrides(config, overrides)
  return config


def prepare_data(runs: Sequence[Run], overrides: Sequence[str] = (),
                 repo_root: str = REPO_ROOT) -> dict[str, float]:
  """Converts the data folder of every run once (before the runs, so the
  runs' wall times are training only); returns `{data_dir: seconds}`."""
  from data_prep import auto  # pylint: disable=g-import-not-at-top
  seconds = {}
  cwd = os.getcwd()
  os.chdir(repo_root)  # config paths are relative to the repository
  try:
    for run in runs:
      config = run_config(run, overrides)
      if config.data.dir in seconds:
        continue
      start = time.perf_counter()
      if auto.prepare_if_missing(config.data.prepare, config.data.dir):
        print(f'prepared {config.data.dir} in '
              f'{time.perf_counter() - start:.0f} s', flush=True)
      seconds[config.data.dir] = time.perf_counter() - start
  finally:
    os.chdir(cwd)
  return seconds


def run_plan(runs: Sequence[Run], *, repo_root: str = REPO_ROOT,
             keep_going: bool = True, env: Mapping[str, str] | None = None,
             deadline: float | None = None,
             predicted_s: Mapping[Run, float] | None = None
             ) -> list[tuple[Run, str]]:
  """Runs the commands one after another; returns `(run, status)` pairs.

  status: 'skipped' (already done with the same command), 'done',
  'failed (exit N)', or 'deferred (deadline)'. `env`: variables added to the
  commands' environment (JAX_COMPILATION_CACHE_DIR). `deadline`
  (time.monotonic() seconds): a run whose `predicted_s` would end after it
  is not started (it and the rest are left for the next call), and a run
  still going at the deadline gets SIGTERM (it checkpoints and exits 143). A run's stdout and stderr are appended to
  `WORKDIR/study_stdout.log`; its marker `WORKDIR/study_run.json` records the
  command, every attempt (start time, wall seconds, exit status, load
  average) and `done`. A killed or preempted run is simply rerun: the trainer
  resumes from its workdir; a SIGTERM or Ctrl-C of this process is passed on
  to the running trainer (which saves a checkpoint first). Stops at the first
  failure unless `keep_going`; always stops when a run was stopped by a signal
  (status >= 128 or < 0).
  """
  statuses = []
  machine = machine_description()
  child_env = {**os.environ, **(env or {})}
  for index, run in enumerate(runs, 1):
    label = f'[{index}/{len(runs)}] {run.cell.name} seed {run.seed}'
    if is_done(run, repo_root):
      print(f'{label}: done before, skipped', flush=True)
      statuses.append((run, 'skipped'))
      continue
    if deadline is not None and time.monotonic() + (
        predicted_s or {}).get(run, 0.0) > deadline:
      print(f'{label}: deferred (predicted to end after the deadline)',
            flush=True)
      statuses.append((run, 'deferred (deadline)'))
      break
    workdir = os.path.join(repo_root, run.workdir)
    os.makedirs(workdir, exist_ok=True)
    marker = read_marker(workdir) or {}
    attempts = marker.get('attempts', []) if (
        marker.get('command') == run.command) else []
    log_path = os.path.join(workdir, LOG_FILE)
    print(f'{label}: {run.command}\n  log: {log_path}', flush=True)
    attempt = {'start': _utc_now(), 'load_average': os.getloadavg()[0]}
    start = time.perf_counter()
    with open(log_path, 'a') as log:
      log.write(f'\n=== {attempt["start"]}: {run.command}\n')
      log.flush()
      process = subprocess.Popen(run.argv, cwd=repo_root, stdout=log,
                                 stderr=subprocess.STDOUT, env=child_env)
      # A SIGTERM to the study reaches the trainer, which then saves a
      # checkpoint and exits 143; so do Ctrl-C and the deadline.
      previous = signal.signal(
          signal.SIGTERM, lambda *_: process.send_signal(signal.SIGTERM))
      timer = None
      if deadline is not None:
        timer = threading.Timer(max(deadline - time.monotonic(), 0.0),
                                process.terminate)
        timer.start()
      try:
        returncode = process.wait()
      except KeyboardInterrupt:
        process.terminate()
        returncode = process.wait()
      finally:
        signal.signal(signal.SIGTERM, previous)
        if timer is not None:
          timer.cancel()
    attempt.update(wall_s=time.perf_counter() - start, returncode=returncode)
    attempts.append(attempt)
    write_marker(workdir, {
        'command': run.command, 'cell': run.cell.name,
        'labels': run.cell.labels, 'method': run.cell.method,
        'seed': run.seed, 'done': returncode == 0, 'attempts': attempts,
        'machine': machine})
    status = 'done' if returncode == 0 else f'failed (exit {returncode})'
    print(f'{label}: {status} in {attempt["wall_s"]:.0f} s', flush=True)
    statuses.append((run, status))
    if returncode != 0 and (not keep_going or returncode < 0
                            or returncode >= 128):
      break
  return statuses


# --------------------------------------------------------------------------
# Reading results.


@dataclasses.dataclass
class RunResult:
  """What one run's workdir holds.

  `miou_curve` / `loss_curve` / `throughput_curve` (train images/s):
  `(steps [T], values [T])` arrays sorted by step; `per_class_iou`:
  `{class: IoU}` at the final evaluation step; `wall_s`: the summed attempts
  of the study marker, else (`wall_from_events`) the time span of the scalar
  events; `done`: the marker of this exact command says it exited 0;
  `total_steps`: the planned steps (None: unknown); `evals`: evaluations of
  other datasets, `{data_dir: parse_eval_output(...)}`.
  """
  run: Run
  miou_curve: tuple[np.ndarray, np.ndarray]
  loss_curve: tuple[np.ndarray, np.ndarray]
  per_class_iou: dict[str, float]
  wall_s: float | None
  wall_from_events: bool
  done: bool
  machine: dict[str, Any] | None
  load_averages: list[float]
  total_steps: int | None = None
  throughput_curve: tuple[np.ndarray, np.ndarray] = (
      np.zeros(0, np.int64), np.zeros(0, np.float64))
  evals: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

  @property
  def has_eval(self) -> bool:
    return self.miou_curve[0].size > 0

  @property
  def final_miou(self) -> float:
    return float(self.miou_curve[1][-1]) if self.has_eval else float('nan')

  @property
  def final_step(self) -> int:
    return int(self.miou_curve[0][-1]) if self.has_eval else -1

  @property
  def last_step(self) -> int:
    """The last step with an evaluation or a logged train loss (-1: none)."""
    steps = np.concatenate([self.miou_curve[0], self.loss_curve[0]])
    return int(steps.max()) if steps.size else -1

  @property
  def finished(self) -> bool:
    """Done by the study, or (run by hand) evaluated at its planned last
    step."""
    return self.done or (self.total_steps is not None and self.has_eval
                         and self.final_step >= self.total_steps)


def read_scalars(workdir: str
                 ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]],
                            float | None]:
  """Every scalar tag of the event files directly in `workdir`.

  Returns `({tag: (steps [T] int64, values [T] float64)}, span_s)`, sorted by
  step; when a step was written more than once (a resumed run repeats the
  steps after its last checkpoint) the value written last is kept. `span_s`:
  seconds from the first to the last scalar event (None without scalars).
  """
  # Imported here so that --plan and --run do not load TensorBoard.
  # pylint: disable-next=g-import-not-at-top
  from tensorboard.backend.event_processing import event_accumulator
  accumulator = event_accumulator.EventAccumulator(
      workdir, size_guidance={event_accumulator.SCALARS: 0,
                              event_accumulator.IMAGES: 1,
                              event_accumulator.TENSORS: 1,
                              event_accumulator.HISTOGRAMS: 1})
  accumulator.Reload()
  scalars = {}
  wall_times = []
  for tag in accumulator.Tags()[event_accumulator.SCALARS]:
    by_step = {}
    for event in accumulator.Scalars(tag):
      by_step[int(event.step)] = float(event.value)
      wall_times.append(event.wall_time)
    steps = np.array(sorted(by_step), np.int64)
    scalars[tag] = (steps, np.array([by_step[s] for s in steps], np.float64))
  span_s = max(wall_times) - min(wall_times) if wall_times else None
  return scalars, span_s


def _class_order(workdir: str, names: Sequence[str],
                 repo_root: str = REPO_ROOT) -> list[str]:
  """`names` in the dataset's class order (metadata.json of the run's data
  folder, via its config.json), else sorted."""
  try:
    with open(os.path.join(workdir, 'config.json')) as f:
      data_dir = json.load(f)['data']['dir']
    if not os.path.isabs(data_dir):
      data_dir = os.path.join(repo_root, data_dir)
    with open(os.path.join(data_dir, 'metadata.json')) as f:
      classes = [str(c) for c in json.load(f)['classes']]
  except (OSError, KeyError, TypeError, json.JSONDecodeError):
    return sorted(names)
  known = [c for c in classes if c in names]
  return known + sorted(set(names) - set(known))


def planned_steps(run: Run) -> int | None:
  """The steps `run`'s command trains (None for a command that is not a
  camvid_clicks run)."""
  if not any(a.startswith(f'--config={CONFIG_FILE}:') for a in run.argv):
    return None
  return run_shape(run).total_steps


def run_record(run: Run, *, repo_root: str = REPO_ROOT,
               iou_prefix: str = DEFAULT_IOU_PREFIX) -> dict[str, Any] | None:
  """Everything the report needs of one workdir as JSON-able data (None when
  it has no event file yet): every scalar `{tag: [steps, values]}`, their
  time span, the study marker, config.json, the class order of the per-class
  IoU tags and the evaluations of other datasets (EVAL_FILE)."""
  workdir = os.path.join(repo_root, run.workdir)
  if not os.path.isdir(workdir) or not any(
      'tfevents' in name for name in os.listdir(workdir)):
    return None
  scalars, span_s = read_scalars(workdir)
  config = None
  if os.path.exists(os.path.join(workdir, 'config.json')):
    with open(os.path.join(workdir, 'config.json')) as f:
      config = json.load(f)
  names = [t[len(iou_prefix):] for t in scalars if t.startswith(iou_prefix)]
  return {'workdir': run.workdir, 'command': run.command,
          'scalars': {tag: [steps.tolist(), values.tolist()]
                      for tag, (steps, values) in scalars.items()},
          'span_s': span_s, 'marker': read_marker(workdir), 'config': config,
          'class_order': _class_order(workdir, names, repo_root),
          'evals': read_evals(workdir)}


def result_from_record(run: Run, record: Mapping[str, Any], *,
                       miou_tag: str = DEFAULT_MIOU_TAG,
                       loss_tag: str = DEFAULT_LOSS_TAG,
                       iou_prefix: str = DEFAULT_IOU_PREFIX) -> RunResult:
  """The RunResult of a run_record (read here or unpacked from a device
  call's folder)."""
  scalars = {tag: (np.asarray(steps, np.int64), np.asarray(values, np.float64))
             for tag, (steps, values) in record['scalars'].items()}
  empty = (np.zeros(0, np.int64), np.zeros(0, np.float64))
  miou_curve = scalars.get(miou_tag, empty)
  per_class = {}
  if miou_curve[0].size:
    final_step = miou_curve[0][-1]
    for name in record['class_order']:
      steps, values = scalars.get(iou_prefix + name, empty)
      if final_step in steps:
        per_class[name] = float(values[np.searchsorted(steps, final_step)])
  marker = record['marker']
  own_marker = bool(marker and marker.get('command') == run.command)
  # Without a marker of this command (run by hand), the event time span.
  wall_s, loads = record['span_s'], []
  if own_marker:
    attempts = marker.get('attempts', [])
    wall_s = float(sum(a['wall_s'] for a in attempts))
    loads = [float(a['load_average']) for a in attempts
             if 'load_average' in a]
  return RunResult(run=run, miou_curve=miou_curve,
                   loss_curve=scalars.get(loss_tag, empty),
                   per_class_iou=per_class, wall_s=wall_s,
                   wall_from_events=not own_marker,
                   done=own_marker and bool(marker.get('done')),
                   machine=marker.get('machine') if marker else None,
                   load_averages=loads, total_steps=planned_steps(run),
                   throughput_curve=scalars.get(THROUGHPUT_TAG, empty),
                   evals={k: v for k, v in record.get('evals', {}).items()
                          if v.get('command') == eval_command(run, k)})


def read_run(run: Run, *, repo_root: str = REPO_ROOT,
             miou_tag: str = DEFAULT_MIOU_TAG,
             loss_tag: str = DEFAULT_LOSS_TAG,
             iou_prefix: str = DEFAULT_IOU_PREFIX) -> RunResult | None:
  """Reads one run's workdir; None when it has no event file yet."""
  record = run_record(run, repo_root=repo_root, iou_prefix=iou_prefix)
  return None if record is None else result_from_record(
      run, record, miou_tag=miou_tag, loss_tag=loss_tag,
      iou_prefix=iou_prefix)


# --------------------------------------------------------------------------
# Evaluation on another dataset (main.py's eval mode).

# Written by evaluate_finished into each workdir: {data_dir: evaluation}.
EVAL_FILE = 'study_evals.json'


def eval_argv(run: Run, data_dir: str) -> tuple[str, ...]:
  """`run`'s command in eval mode on the dataset folder `data_dir`: the
  weights of its last step (the ones its final val evaluation scored), so
  both tables score the same model."""
  return run.argv + ('--config.mode=eval', f'--config.eval.data_dir={data_dir}',
                     '--config.eval.checkpoint=latest')


def eval_command(run: Run, data_dir: str) -> str:
  return shlex.join(eval_argv(run, data_dir))


def parse_eval_output(text: str) -> dict[str, Any]:
  """The last IoU table of main.py's eval mode output.

  The table is agmm_jax.inference.print_scores': a line 'SPLIT at step N
  (MODE):', a header 'class  IoU (%)', one 'NAME  VALUE' line per class
  (VALUE in %, or 'n/a'), then 'mIoU  VALUE' and 'pixel accuracy  VALUE'.
  Returns `{'split', 'step', 'eval_mode', 'per_class': {name: IoU},
  'miou', 'pixel_accuracy'}` with IoUs as fractions (NaN for 'n/a').

  Raises:
    ValueError: when the text holds no complete table.
  """
  lines = text.splitlines()
  heads = [i for i, line in enumerate(lines)
           if re.fullmatch(r'.+ at step \d+ \(.+\):', line.strip())]
  if not heads:
    raise ValueError('no "SPLIT at step N (MODE):" IoU table in the output')
  head = lines[heads[-1]].strip()
  match = re.fullmatch(r'(.+) at step (\d+) \((.+)\):', head)
  result: dict[str, Any] = {'split': match.group(1),
                            'step': int(match.group(2)),
                            'eval_mode': match.group(3), 'per_class': {}}
  for line in lines[heads[-1] + 2:]:
    parts = line.strip().rsplit(None, 1)
    if len(parts) != 2:
      break
    name, value = parts
    number = float('nan') if value == 'n/a' else float(value) / 100.0
    if name == 'mIoU':
      result['miou'] = number
    elif name == 'pixel accuracy':
      result['pixel_accuracy'] = number
      break
    else:
      result['per_class'][name] = number
  if 'miou' not in result or 'pixel_accuracy' not in result:
    raise ValueError(f'the IoU table after {head!r} ends before its mIoU and '
                     'pixel accuracy lines')
  return result


def read_evals(workdir: str) -> dict[str, dict[str, Any]]:
  """The evaluations evaluate_finished wrote into `workdir` ({} if none)."""
  path = os.path.join(workdir, EVAL_FILE)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}: not valid JSON ({e}); delete it to '
                       'evaluate again') from None


Runner = Callable[[Sequence[str], str], subprocess.CompletedProcess]


def run_command(argv: Sequence[str], cwd: str) -> subprocess.CompletedProcess:
  """Runs `argv` in `cwd`, capturing its output as text."""
  return subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True,
                        check=False)


def evaluate_finished(results: Sequence[RunResult], data_dir: str, *,
                      runner: Runner = run_command,
                      repo_root: str = REPO_ROOT) -> dict[str, str]:
  """Evaluates every finished run on `data_dir` once (eval_argv), storing
  the parsed table in WORKDIR/study_evals.json under `data_dir` with its
  command; a run already evaluated with the same command is skipped.
  Returns `{workdir: 'evaluated' | 'skipped' | 'failed: REASON'}`.
  """
  statuses = {}
  for result in results:
    run = result.run
    if not result.finished:
      continue
    if data_dir in result.evals:
      statuses[run.workdir] = 'skipped'
      continue
    workdir = os.path.join(repo_root, run.workdir)
    completed = runner(eval_argv(run, data_dir), repo_root)
    try:
      if completed.returncode != 0:
        raise ValueError(f'exit {completed.returncode}: '
                         f'{(completed.stderr or "").strip()[-300:]}')
      evaluation = parse_eval_output(completed.stdout)
    except ValueError as e:
      statuses[run.workdir] = f'failed: {e}'
      print(f'eval of {run.workdir} on {data_dir} failed: {e}',
            file=sys.stderr)
      continue
    evaluation.update(command=eval_command(run, data_dir), data_dir=data_dir)
    evals = {**read_evals(workdir), data_dir: evaluation}
    path = os.path.join(workdir, EVAL_FILE)
    with open(path + '.tmp', 'w') as f:
      json.dump(evals, f, indent=2)
    os.replace(path + '.tmp', path)
    result.evals[data_dir] = evaluation
    statuses[run.workdir] = 'evaluated'
  return statuses


# --------------------------------------------------------------------------
# Status across sessions.


@dataclasses.dataclass(frozen=True)
class RunStatus:
  """Where one planned run stands: `state` is 'done', 'in progress',
  'failed (exit N)' or 'not started'; `step` the last step it logged (-1:
  none), `total` its planned steps, `miou` its last val mIoU (NaN: none)."""
  run: Run
  state: str
  step: int
  total: int | None
  miou: float


def run_status(run: Run, result: RunResult | None, *,
               repo_root: str = REPO_ROOT) -> RunStatus:
  """The status of `run` from its workdir (result: read_run's)."""
  marker = read_marker(os.path.join(repo_root, run.workdir))
  attempts = (marker or {}).get('attempts', []) if (
      marker and marker.get('command') == run.command) else []
  last_exit = attempts[-1].get('returncode') if attempts else None
  if result is not None and result.finished:
    state = 'done'
  elif last_exit not in (None, 0) and 0 < last_exit < 128:
    state = f'failed (exit {last_exit})'
  elif result is not None or attempts:
    state = 'in progress'
  else:
    state = 'not started'
  return RunStatus(run=run, state=state,
                   step=result.last_step if result else -1,
                   total=planned_steps(run),
                   miou=result.final_miou if result else float('nan'))


def format_status(statuses: Sequence[RunStatus]) -> list[str]:
  """A table of the planned runs (cell, seed, state, step reached / total,
  last val mIoU), then one line per cell ('k of n seeds done') and totals."""
  width = max([len(s.run.cell.name) for s in statuses] + [4])
  lines = [f'{"cell":<{width}}  seed  {"state":<16}  {"step":>11}  val mIoU']
  for status in statuses:
    step = (f'{max(status.step, 0)}/{status.total}' if status.total
            else str(max(status.step, 0)))
    miou = '' if np.isnan(status.miou) else f'{100 * status.miou:.2f}'
    lines.append(f'{status.run.cell.name:<{width}}  {status.run.seed:>4}  '
                 f'{status.state:<16}  {step:>11}  {miou}')
  by_cell: dict[Cell, list[RunStatus]] = {}
  for status in statuses:
    by_cell.setdefault(status.run.cell, []).append(status)
  lines.append('')
  for cell, cell_statuses in by_cell.items():
    done = sum(s.state == 'done' for s in cell_statuses)
    started = any(s.state != 'not started' for s in cell_statuses)
    lines.append(f'{cell.name}: {done} of {len(cell_statuses)} seeds done'
                 + ('' if done == len(cell_statuses) else ' (partial)'
                    if started else ' (not started)'))
  counts = {state: sum(s.state.startswith(state) for s in statuses)
            for state in ('done', 'in progress', 'failed', 'not started')}
  lines.append(f'{len(statuses)} runs: ' + ', '.join(
      f'{count} {state}' for state, count in counts.items()))
  return lines


# --------------------------------------------------------------------------
# Packing a device call's results (at most 8 files of 16 MB come back).

PACK_JSON = 'study_results.json'
PACK_FIGURES = 'study_figures.tar.gz'
PACK_FORMAT = 1
PACK_FILE_LIMIT = 16 * 2**20


def pack_results(runs: Sequence[Run], folder: str, *,
                 repo_root: str = REPO_ROOT,
                 figure_paths: Sequence[str] = (), diagnostic: str = '',
                 command_line: str = '') -> list[str]:
  """Writes what docs/results.md needs of `runs` into two files of `folder`:
  PACK_JSON (the plan, the run_record of every run that has events, the
  machine, the diagnostic's text, the command line) and PACK_FIGURES (the PNGs
  `figure_paths`, by base name). Returns their paths.

  Raises:
    ValueError: when a file exceeds PACK_FILE_LIMIT (nothing is left).
  """
  records = []
  for run in runs:
    record = run_record(run, repo_root=repo_root)
    if record is not None:
      records.append({**record, 'cell': run.cell.name, 'seed': run.seed})
  plan = [{'labels': r.cell.labels, 'method': r.cell.method,
           'variant': r.cell.variant, 'seed': r.seed, 'workdir': r.workdir,
           'argv': list(r.argv)} for r in runs]
  payload = {'format': PACK_FORMAT, 'created': _utc_now(),
             'command_line': command_line, 'machine': machine_description(),
             'diagnostic': diagnostic, 'plan': plan, 'records': records}
  os.makedirs(folder, exist_ok=True)
  json_path = os.path.join(folder, PACK_JSON)
  tar_path = os.path.join(folder, PACK_FIGURES)
  with open(json_path + '.tmp', 'w') as f:
    json.dump(payload, f)
  with tarfile.open(tar_path + '.tmp', 'w:gz') as tar:
    for path in figure_paths:
      tar.add(path, arcname=os.path.basename(path))
  for path in (json_path, tar_path):
    size = os.path.getsize(path + '.tmp')
    if size > PACK_FILE_LIMIT:
      for leftover in (json_path, tar_path):
        if os.path.exists(leftover + '.tmp'):
          os.remove(leftover + '.tmp')
      raise ValueError(f'{path}: {size / 2**20:.1f} MB exceeds the '
                       f'{PACK_FILE_LIMIT // 2**20} MB a device call returns; '
                       'pack fewer runs (--call) or overlay images')
  for path in (json_path, tar_path):
    os.replace(path + '.tmp', path)
  return [json_path, tar_path]


@dataclasses.dataclass
class Unpacked:
  """The packs of one or more device calls: the planned `runs` (their
  union, in order), `records` by workdir (a later folder's record of the
  same workdir wins: it is the newer), the machines, the diagnostics' texts
  and the extracted figures."""
  runs: list[Run]
  records: dict[str, dict[str, Any]]
  machines: list[dict[str, Any]]
  diagnostics: list[str]
  figure_paths: list[str]


def unpack_results(folders: Sequence[str], figures_dir: str) -> Unpacked:
  """Reads the packs in `folders` (in order) and extracts their PNGs into
  `figures_dir`.

  Raises:
    ValueError: naming the folder and what is wrong (missing file, other
      format, a figure name that is not a plain PNG file name).
  """
  unpacked = Unpacked([], {}, [], [], [])
  planned: dict[str, Run] = {}
  for folder in folders:
    json_path = os.path.join(folder, PACK_JSON)
    if not os.path.exists(json_path):
      raise ValueError(f'{folder}: no {PACK_JSON} (the folder a device call '
                       'returned, written by --pack)')
    with open(json_path) as f:
      try:
        payload = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f'{json_path}: not valid JSON ({e})') from None
    if payload.get('format') != PACK_FORMAT:
      raise ValueError(f'{json_path}: pack format {payload.get("format")!r}, '
                       f'this script reads {PACK_FORMAT}')
    for entry in payload['plan']:
      planned[entry['workdir']] = Run(
          Cell(entry['labels'], entry['method'], entry['variant']),
          int(entry['seed']), entry['workdir'], tuple(entry['argv']))
    for record in payload['records']:
      unpacked.records[record['workdir']] = record
    unpacked.machines.append(payload['machine'])
    if payload.get('diagnostic'):
      unpacked.diagnostics.append(payload['diagnostic'])
    tar_path = os.path.join(folder, PACK_FIGURES)
    if not os.path.exists(tar_path):
      continue
    with tarfile.open(tar_path, 'r:gz') as tar:
      members = tar.getmembers()
      for member in members:
        if not (member.isfile() and re.fullmatch(r'[\w.-]+\.png',
                                                 member.name)):
          raise ValueError(f'{tar_path}: {member.name!r} is not a plain PNG '
                           'file name')
      os.makedirs(figures_dir, exist_ok=True)
      for member in members:
        source = tar.extractfile(member)
        path = os.path.join(figures_dir, member.name)
        with open(path, 'wb') as f:
          f.write(source.read())
        if path not in unpacked.figure_paths:
          unpacked.figure_paths.append(path)
  unpacked.runs = list(planned.values())
  return unpacked


def run_diagnostic(results: Sequence[RunResult], *, images: int,
                   runner: Runner = run_command, python: str = sys.executable,
                   repo_root: str = REPO_ROOT) -> str:
  """benchmarks/gmm_diagnostic.py's Markdown table for the finished runs of
  `results` ('' when none; the error when it fails)."""
  workdirs = [r.run.workdir for r in results if r.finished]
  if not workdirs:
    return ''
  argv = [python, '-m', 'benchmarks.gmm_diagnostic',
          f'--workdirs={",".join(workdirs)}', f'--images={images}']
  completed = runner(argv, repo_root)
  if completed.returncode != 0:
    return (f'`{shlex.join(argv)}` failed (exit {completed.returncode}):\n\n'
            f'```\n{(completed.stderr or "")[-2000:]}\n```')
  return f'`{shlex.join(argv)}`:\n\n{completed.stdout.strip()}'


@dataclasses.dataclass
class CellSummary:
  """Scores of one cell over its seeds (runs without an evaluation left out)."""
  cell: Cell
  results: list[RunResult]
  mean: float
  std: float           # sample standard deviation (ddof=1); NaN for one seed
  per_class_mean: dict[str, float]

  @property
  def count(self) -> int:
    return len(self.results)

  @property
  def best(self) -> RunResult:
    return max(self.results, key=lambda r: r.final_miou)


def val_scores(result: RunResult) -> tuple[float, dict[str, float]] | None:
  """(final val mIoU, per-class IoU) of a run, None without an evaluation."""
  return (result.final_miou, result.per_class_iou) if result.has_eval else None


def dataset_scores(data_dir: str
                   ) -> Callable[[RunResult],
                                 tuple[float, dict[str, float]] | None]:
  """The scores of a run on the other dataset `data_dir` (evaluate_finished)."""
  def scores(result: RunResult) -> tuple[float, dict[str, float]] | None:
    evaluation = result.evals.get(data_dir)
    return (evaluation['miou'], evaluation['per_class']) if evaluation else None
  return scores


def summarize(results: Sequence[RunResult], *, finished_only: bool = False,
              scores_of: Callable[[RunResult], tuple[float, dict[str, float]]
                                  | None] = val_scores
              ) -> list[CellSummary]:
  """Groups runs by cell (in plan order): mean and sample std of the mIoU
  (`scores_of`: the final val evaluation by default), and the mean
  per-class IoU over the seeds that have the class. `finished_only`: runs
  still training (or stopped early) are left out."""
  by_cell: dict[Cell, list[tuple[RunResult, float, dict[str, float]]]] = {}
  for result in results:
    scored = scores_of(result)
    if scored is not None and (result.finished or not finished_only):
      by_cell.setdefault(result.run.cell, []).append((result, *scored))
  summaries = []
  for cell, entries in by_cell.items():
    scores = np.array([miou for _, miou, _ in entries])
    classes = list(dict.fromkeys(c for _, _, iou in entries for c in iou))
    per_class = {}
    for c in classes:
      values = [iou[c] for _, _, iou in entries
                if c in iou and not np.isnan(iou[c])]
      per_class[c] = float(np.mean(values)) if values else float('nan')
    summaries.append(CellSummary(
        cell=cell, results=[r for r, _, _ in entries],
        mean=float(np.mean(scores)),
        std=float(np.std(scores, ddof=1)) if scores.size > 1 else float('nan'),
        per_class_mean=per_class))
  return summaries


# --------------------------------------------------------------------------
# Report.


def format_score(mean: float, std: float, count: int,
                 planned: int | None = None) -> str:
  """'41.23 ± 0.57 (n=2)' in percent; the spread is omitted for one seed;
  fewer seeds than `planned`: '(n=1 of 2, partial)'."""
  n = (f'n={count}' if planned is None or count >= planned
       else f'n={count} of {planned}, partial')
  if count == 1:
    return f'{100 * mean:.2f} ({n})'
  return f'{100 * mean:.2f} ± {100 * std:.2f} ({n})'


def _format_duration(seconds: float | None) -> str:
  if seconds is None:
    return 'n/a'
  minutes, secs = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}h{minutes:02d}m' if hours else f'{minutes}m{secs:02d}s'


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


def make_overlays(summaries: Sequence[CellSummary], labels_spec: str,
                  output_dir: str, *, num_images: int = 3,
                  python: str = sys.executable,
                  repo_root: str = REPO_ROOT) -> str | None:
  """Predicts a few val images with the best seed of every method trained on
  `labels_spec` (plus `full`) and writes one small grid PNG; returns its path
  (None when no such run has a checkpoint).

  Columns: input, ground truth, one prediction per method. The predictions
  come from the trainer's predict mode (best checkpoint) on val images
  shrunk by the run's `data.prepare.downscale` (the training resolution).
  """
  chosen = [s for s in summaries
            if (s.cell.labels == labels_spec or s.cell.method == FULL)
            and os.path.isdir(os.path.join(repo_root, s.best.run.workdir,
                                           'checkpoints'))]
  if not chosen:
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
  from agmm_jax import visualize  # pylint: disable=g-import-not-at-top

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
  path = os.path.join(output_dir, f'qualitative_{labels_tag(labels_spec)}.png')
  # A 256-colour palette PNG is about a third of the RGB one.
  with Image.open(buffer) as grid:
    grid.convert('RGB').quantize(256).save(path, optimize=True)
  return path


def median_img_per_s(result: RunResult) -> float:
  """Median logged training images/s of a run, its first logged period
  (which holds the compilation) left out; NaN when none was logged."""
  values = result.throughput_curve[1]
  values = values[1:] if values.size > 1 else values
  return float(np.median(values)) if values.size else float('nan')


def score_table(runs: Sequence[Run], results: Sequence[RunResult],
                summaries: Sequence[CellSummary],
                missing: str | None = None) -> list[str]:
  """Markdown table: one row per label spec (and 'full (dense labels)'),
  one column per method, the grid's cells only (check variants left out).
  A cell with fewer finished seeds than planned is marked partial; one with
  none reads `missing`, by default 'in progress' (a run has events) or
  'not run'."""
  grid = [r for r in runs if not r.cell.variant]
  planned: dict[Cell, int] = {}
  for run in grid:
    planned[run.cell] = planned.get(run.cell, 0) + 1
  started = {r.run.cell for r in results}
  by_cell = {s.cell: s for s in summaries}

  def entry(cell: Cell) -> str:
    summary = by_cell.get(cell)
    if summary is None:
      return missing or ('in progress' if cell in started else 'not run')
    return format_score(summary.mean, summary.std, summary.count,
                        planned.get(cell))

  # Columns: the sparse-label methods (one score column for a 'full'-only
  # study).
  methods = list(dict.fromkeys(r.cell.method for r in grid
                               if r.cell.method != FULL)) or ['mIoU']
  lines = ['| labels | ' + ' | '.join(methods) + ' |',
           '|---|' + '---|' * len(methods)]
  for spec in dict.fromkeys(r.cell.labels for r in grid
                            if r.cell.method != FULL):
    lines.append(f'| {spec} | ' + ' | '.join(
        entry(Cell(spec, m)) for m in methods) + ' |')
  full_cells = [r.cell for r in grid if r.cell.method == FULL]
  if full_cells:
    lines.append(f'| full (dense labels) | {entry(full_cells[0])} |'
                 + ' |' * (len(methods) - 1))
  return lines


def per_class_table(summaries: Sequence[CellSummary]) -> list[str]:
  """Markdown table of the mean per-class IoU (%) and mIoU of each cell."""
  class_names = list(dict.fromkeys(
      c for s in summaries for c in s.per_class_mean))
  if not class_names:
    return []
  lines = ['| cell | ' + ' | '.join(class_names) + ' | mIoU |',
           '|---|' + '---|' * (len(class_names) + 1)]
  for summary in summaries:
    values = [summary.per_class_mean.get(c) for c in class_names]
    lines.append(f'| {summary.cell.name} | ' + ' | '.join(
        '' if v is None else 'n/a' if np.isnan(v) else f'{100 * v:.1f}'
        for v in values) + f' | {100 * summary.mean:.1f} |')
  return lines


# The schedule rule (checked on the first labels spec's pce_only and dense
# cells): the curves have flattened when the val mIoU gained less than
# PLATEAU_GAIN over the last quarter of the steps, and dense labels beat
# clicks when their gap exceeds SEPARATION_SPREADS seed spreads.
PLATEAU_GAIN = 0.01
SEPARATION_SPREADS = 2.0


def late_gain(result: RunResult) -> float:
  """Final val mIoU minus the one at the last evaluation at or before 3/4 of
  the final step (NaN with fewer than two evaluations)."""
  steps, values = result.miou_curve
  earlier = np.nonzero(steps <= 0.75 * steps[-1])[0] if steps.size else []
  if steps.size < 2 or not len(earlier):
    return float('nan')
  return float(values[-1] - values[earlier[-1]])


def schedule_check(results: Sequence[RunResult], labels_spec: str) -> list[str]:
  """The schedule rule's verdict as Markdown lines: late gain of the
  pce_only and dense cells, their gap against the seed spread."""
  finished = [r for r in results if r.finished and not r.run.cell.variant]
  sparse = [r for r in finished if r.run.cell == Cell(labels_spec, 'pce_only')]
  dense = [r for r in finished if r.run.cell.method == FULL]
  if not sparse or not dense:
    return [f'Not checked yet: needs finished `pce_only` ({labels_spec}) and '
            '`full` runs.']
  gains = [late_gain(r) for r in sparse + dense]
  gain = float(np.nanmean(gains)) if not np.all(np.isnan(gains)) else (
      float('nan'))
  scores = lambda rs: np.array([r.final_miou for r in rs])
  gap = float(scores(dense).mean() - scores(sparse).mean())
  spreads = [np.std(scores(rs), ddof=1) for rs in (sparse, dense)
             if len(rs) > 1]
  spread = float(max(spreads)) if spreads else float('nan')
  lines = [f'Rule: the schedule is long enough when the val mIoU of '
           f'`pce_only` ({labels_spec}) and `full` gains less than '
           f'{100 * PLATEAU_GAIN:.0f} point over the last quarter of the '
           f'steps and dense labels beat clicks by more than '
           f'{SEPARATION_SPREADS:g} seed spreads.', '',
           f'- gain over the last quarter: {100 * gain:+.2f} points (mean of '
           f'{len(gains)} runs)',
           f'- dense minus clicks: {100 * gap:+.2f} points; largest seed '
           f'spread {100 * spread:.2f}']
  if np.isnan(gain) or gain >= PLATEAU_GAIN:
    verdict = ('still rising: the schedule is too short; the next task '
               'doubles it (`--override=num_epochs=80`, a new `--root`)')
  elif np.isnan(spread):
    verdict = 'flat, but one seed per cell cannot tell the gap from noise'
  elif gap <= SEPARATION_SPREADS * spread:
    verdict = ('flat, and dense labels do not beat clicks beyond the seed '
               'noise: a longer schedule would not separate the methods')
  else:
    verdict = 'flat, and dense labels beat clicks: the schedule is long enough'
  return lines + [f'- verdict: {verdict}']


# bfloat16 is kept when it moves the val mIoU by at most the larger of this
# and the float32 cell's seed spread.
DTYPE_TOLERANCE = 0.01


def dtype_check(results: Sequence[RunResult]) -> list[str]:
  """Markdown lines comparing each finished bfloat16 check run with its
  float32 twin (same cell and seed): mIoU, images/s, verdict."""
  finished = [r for r in results if r.finished]
  lines = []
  for check in (r for r in finished
                if r.run.cell.variant == DTYPE_CHECK_VARIANT):
    grid_cell = dataclasses.replace(check.run.cell, variant='')
    twins = [r for r in finished if r.run.cell == grid_cell]
    twin = next((r for r in twins if r.run.seed == check.run.seed), None)
    if twin is None:
      lines.append(f'- {check.run.cell.name} seed {check.run.seed}: its '
                   'float32 twin has not finished')
      continue
    difference = check.final_miou - twin.final_miou
    spread = (float(np.std([r.final_miou for r in twins], ddof=1))
              if len(twins) > 1 else 0.0)
    tolerance = max(DTYPE_TOLERANCE, spread)
    keep = abs(difference) <= tolerance
    lines.append(
        f'- {grid_cell.name} seed {check.run.seed}: float32 '
        f'{100 * twin.final_miou:.2f}, bfloat16 {100 * check.final_miou:.2f} '
        f'({100 * difference:+.2f} points; tolerance {100 * tolerance:.2f}); '
        f'{median_img_per_s(twin):.0f} vs {median_img_per_s(check):.0f} '
        'images/s. Verdict: ' + (
            'bfloat16 does not change the result; later grids may train in '
            'it (`--override=' + DTYPE_CHECK_OVERRIDE + '`, a new `--root`)'
            if keep else 'bfloat16 changes the result: keep float32'))
  return lines


def write_report(runs: Sequence[Run], results: Sequence[RunResult], *,
                 markdown_path: str, curves_path: str,
                 overlay_paths: Sequence[str], command_line: str,
                 machines: Sequence[Mapping[str, Any]] = (),
                 diagnostics: Sequence[str] = ()) -> str:
  """Writes docs/results.md (tables, plot and overlay links, schedule and
  bfloat16 checks, commands, machine, wall times); returns the Markdown.

  Scores average the finished runs only; cells with fewer finished seeds
  than planned are marked partial, unfinished runs are listed with their
  step. `machines`: of the packs (device calls), else the runs' markers.
  """
  doc_dir = os.path.dirname(os.path.abspath(markdown_path))
  relative = lambda p: os.path.relpath(os.path.abspath(p), doc_dir)
  summaries = summarize(results, finished_only=True)
  labels = list(dict.fromkeys(r.cell.labels for r in runs))
  seeds = sorted({r.seed for r in runs})
  finished = sum(r.finished for r in results)
  lines = [
      '# CamVid click-supervision study', '',
      f'Generated {_utc_now()} by `{command_line}` from the workdirs of the '
      'runs below (a missing cell has not been run yet).', '',
      'Data: CamVid, 11 classes (train 367, val 101 images; void ignored), '
      f'sparse training labels from `data_prep/sparse_labels.py`; config '
      f'`{CONFIG_FILE}`; training seeds {", ".join(map(str, seeds))}. '
      'Score: val mIoU (%) at the final evaluation, mean ± sample standard '
      'deviation (ddof=1) over the finished seeds, n = number of seeds.', '']
  if finished < len(runs):
    lines += [f'**Partial grid: {finished} of {len(runs)} planned runs have '
              'finished.** Cells marked "partial" average fewer seeds than '
              'planned; "in progress": no seed finished yet; runs not '
              'finished are listed below with the step they reached and '
              'are not averaged.', '']
  lines += ['## Val mIoU (%)', ''] + score_table(runs, results, summaries)
  data_dirs = list(dict.fromkeys(d for r in results for d in r.evals))
  for data_dir in data_dirs:
    other = summarize(results, finished_only=True,
                      scores_of=dataset_scores(data_dir))
    lines += ['', f'## mIoU (%) on `{data_dir}`', '',
              "The finished runs' last weights (the ones the val table "
              'scores) evaluated on this dataset with `--config.mode=eval '
              f'--config.eval.data_dir={data_dir}`.', '']
    lines += score_table(runs, results, other, missing='not evaluated')
    lines += [''] + per_class_table(other)

  if per_class_table(summaries):
    lines += ['', '## Per-class val IoU (%), mean over finished seeds', '']
    lines += per_class_table(summaries)

  lines += ['', '## Learning curves', '',
            f'![val mIoU and train loss vs step]({relative(curves_path)})',
            '', '### Schedule check', '']
  lines += schedule_check(results, labels[0])
  dtype_lines = dtype_check(results)
  if dtype_lines or any(r.cell.variant == DTYPE_CHECK_VARIANT for r in runs):
    lines += ['', '## bfloat16 check', ''] + (
        dtype_lines or ['Not run yet.'])
  if overlay_paths:
    lines += ['', '## Qualitative results', '',
              'Val images at training resolution; ground truth and the best '
              'seed of each method overlaid (void and unlabeled pixels '
              'uncoloured).', '']
    lines += [f'![{os.path.basename(p)}]({relative(p)})' for p in overlay_paths]
  if diagnostics:
    lines += ['', '## G vs p diagnostic (benchmarks/gmm_diagnostic.py)', '']
    lines += list(diagnostics)

  lines += ['', '## Runs: commands and wall times', '',
            'Each command is run from the repository root; rerunning it '
            'resumes or, once finished, does nothing new. Wall time: the '
            "sum over the run's attempts (training, periodic evaluation, "
            'checkpoints, compilation; data preparation excluded); '
            '"(events)": a run started by hand, timed from its first to its '
            'last scalar event (start-up and first compilation left out). '
            'images/s: median logged training throughput.',
            '',
            '| cell | seed | last step | val mIoU (%) | wall time | images/s '
            '| status |',
            '|---|---|---|---|---|---|---|']
  result_of = {(r.run.cell, r.run.seed): r for r in results}
  for run in runs:
    result = result_of.get((run.cell, run.seed))
    if result is None:
      lines.append(f'| {run.cell.name} | {run.seed} | | | | | not run |')
      continue
    total = f' of {result.total_steps}' if result.total_steps else ''
    status = 'done' if result.finished else f'in progress (step ' \
        f'{max(result.last_step, 0)}{total}; not averaged)'
    miou = f'{100 * result.final_miou:.2f}' if result.has_eval else ''
    wall = _format_duration(result.wall_s) + (
        ' (events)' if result.wall_from_events else '')
    rate = median_img_per_s(result)
    rate_text = '' if np.isnan(rate) else f'{rate:.0f}'
    lines.append(f'| {run.cell.name} | {run.seed} | {result.last_step} | '
                 f'{miou} | {wall} | {rate_text} | {status} |')
  lines += ['', '```bash']
  lines += [run.command for run in runs]
  lines += ['```']

  recorded = list(machines) or [r.machine for r in results if r.machine]
  machine = recorded[0] if recorded else machine_description()
  lines += ['', '## Machine', '',
            f'- CPU: {machine["cpu"]}, {machine["cpu_count"]} cores'
            + ('' if recorded else ' (of the machine that wrote this report; '
               'no run recorded its own)'),
            f'- {machine["platform"]}, Python {machine["python"]}, jax '
            f'{machine["jax"]}, flax {machine["flax"]}']
  if machine.get('devices'):
    lines.append(f'- GPU: {machine["devices"]}')
  loads = [load for r in results for load in r.load_averages]
  if loads:
    # A load above the core count means other jobs shared the machine.
    shared = max(loads) > float(machine['cpu_count'] or 1)
    lines.append(f'- 1-minute load average at the start of the runs: '
                 f'{min(loads):.1f} to {max(loads):.1f}' + (
                     ' (the machine was shared; wall times include that '
                     'contention)' if shared else ''))
  text = '\n'.join(lines) + '\n'
  os.makedirs(doc_dir, exist_ok=True)
  with open(markdown_path, 'w') as f:
    f.write(text)
  return text


# --------------------------------------------------------------------------
# Command line.


def _comma_list(text: str) -> list[str]:
  return [item for item in text.split(',') if item]


DEFAULT_OVERLAY_IMAGES = 3
# What the extras' diagnostic uses (as the 200-step study did).
DEFAULT_DIAGNOSTIC_IMAGES = 64
# Of a device call's 600 s, what the plan packs runs into: the rest is left
# for the deadline's SIGTERM to be answered (a checkpoint) and a margin.
DEFAULT_CALL_BUDGET_S = 540


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='python -m benchmarks.camvid_study', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  action = parser.add_mutually_exclusive_group(required=True)
  action.add_argument('--plan', action='store_true',
                      help='print the command of every run, with the '
                      'predicted time as "#" comment lines')
  action.add_argument('--run', action='store_true',
                      help='run the planned commands (resumable)')
  action.add_argument('--status', action='store_true',
                      help='per run: done, in progress (step reached), '
                      'failed or not started')
  action.add_argument('--pack', metavar='FOLDER',
                      help='write the report inputs of the planned runs into '
                      f'FOLDER ({PACK_JSON}, {PACK_FIGURES}): what a device '
                      'call returns')
  action.add_argument('--report', action='store_true',
                      help='write the Markdown report, plot and overlays')
  action.add_argument('--flops', action='store_true',
                      help='print the train-step GFLOP per image of each '
                      'size (TRAIN_GFLOP_PER_IMAGE)')
  parser.add_argument('--preset', choices=sorted(STUDY_PRESETS),
                      help='a named grid (labels, methods, seeds, size, root, '
                      'overrides); the flags below replace its fields')
  parser.add_argument('--labels', type=_comma_list, default=None,
                      help='comma-separated sparse-label specs (an option '
                      f'with "," is not supported; default '
                      f'{",".join(DEFAULT_LABELS)})')
  parser.add_argument('--methods', type=_comma_list, default=None,
                      help=f'comma-separated subset of {",".join(METHODS)} '
                      f'(default {",".join(DEFAULT_METHODS)})')
  parser.add_argument('--seeds', type=lambda t: [int(s) for s in
                                                 _comma_list(t)],
                      default=None, help='training seeds (default 0,1)')
  parser.add_argument('--steps', type=int, default=-1,
                      help='--config.num_train_steps (default: the config\'s '
                      'epochs)')
  parser.add_argument('--size', choices=('cpu', 'gpu', 'gpu_r18'),
                      default=None, help='configs/camvid_clicks.py size '
                      '(default cpu)')
  parser.add_argument('--lseed', type=int, default=0,
                      help='seed of the sparse-label generator')
  parser.add_argument('--root', default=None,
                      help='folder of the run workdirs (relative to the '
                      f'repository root; default {DEFAULT_ROOT})')
  parser.add_argument('--override', action='append', default=[],
                      help='extra config override KEY=VALUE for every run '
                      '(repeatable), e.g. data.num_threads=2')
  parser.add_argument('--python', default='python',
                      help='interpreter named in the commands')
  parser.add_argument('--stop_on_failure', action='store_true',
                      help='--run: stop at the first failed run')
  parser.add_argument('--call', type=int, default=0,
                      help='--plan/--run/--pack/--status: only the runs of '
                      'this device call of the plan (1-based; GPU sizes)')
  parser.add_argument('--call_budget_s', type=float,
                      default=DEFAULT_CALL_BUDGET_S,
                      help='predicted seconds a device call may hold')
  parser.add_argument('--deadline_s', type=float, default=None,
                      help='--run: start no run predicted to end later than '
                      'this many seconds after the start; SIGTERM the one '
                      'still going then (0: none; default with --call: what '
                      'the device call leaves after installation, packing '
                      'and a margin)')
  parser.add_argument('--img_per_s', type=float, default=0.0,
                      help='measured training images/s replacing the '
                      'FLOP-scaled prediction')
  parser.add_argument('--compile_s', type=float,
                      default=DeviceFigures.compile_s,
                      help='measured compile seconds per program')
  parser.add_argument('--compilation_cache_dir', default=None,
                      help='JAX_COMPILATION_CACHE_DIR of the runs (relative '
                      'to the repository; default: the preset\'s, else none)')
  parser.add_argument('--eval_data_dir', default='',
                      help='--run/--report: also evaluate every finished run '
                      'on this prepared dataset folder (main.py eval mode, '
                      'config.eval.data_dir) and report a second table')
  parser.add_argument('--from', dest='from_folders', type=_comma_list,
                      default=None,
                      help='--report: the folder(s) device calls returned '
                      '(written by --pack), instead of the workdirs; the '
                      'plan is the packs\' (the other grid flags are not '
                      'needed)')
  parser.add_argument('--diagnostic_images', type=int, default=0,
                      help='--report/--pack: run benchmarks/gmm_diagnostic.py '
                      'on this many training images for the finished core '
                      'runs of the first labels spec (0: no)')
  parser.add_argument('--output', default='docs/results.md',
                      help='--report: the Markdown file (its folder gets '
                      'results_curves.png and results/; for another name '
                      'NAME.md: NAME_curves.png and NAME/)')
  parser.add_argument('--overlay_images', type=int,
                      default=DEFAULT_OVERLAY_IMAGES,
                      help='--report/--pack: val images per qualitative grid '
                      '(0: none)')
  parser.add_argument('--overlay_labels', type=_comma_list, default=None,
                      help='--report: label specs that get a qualitative grid '
                      '(default: the first --labels spec)')
  parser.add_argument('--miou_tag', default=DEFAULT_MIOU_TAG)
  parser.add_argument('--loss_tag', default=DEFAULT_LOSS_TAG)
  parser.add_argument('--iou_prefix', default=DEFAULT_IOU_PREFIX)
  return parser.parse_args(argv)


def _planned(args: argparse.Namespace) -> tuple[list[Run], StudyPreset]:
  """The runs the flags plan, and the preset they start from (the default
  grid's when --preset is not given)."""
  preset = STUDY_PRESETS[args.preset] if args.preset else StudyPreset(
      labels=DEFAULT_LABELS, methods=DEFAULT_METHODS, seeds=DEFAULT_SEEDS,
      size='cpu', root=DEFAULT_ROOT)
  runs = plan_preset(preset, labels=args.labels, methods=args.methods,
                     seeds=args.seeds, steps=args.steps, size=args.size,
                     root=args.root, overrides=args.override,
                     lseed=args.lseed, python=args.python)
  return runs, preset


def _figures(args: argparse.Namespace) -> DeviceFigures:
  return DeviceFigures(img_per_s=args.img_per_s, compile_s=args.compile_s)


def _is_device_plan(runs: Sequence[Run]) -> bool:
  return common_args_of(runs[0])['size'] in GPU_SIZES


def _is_core(run: Run, runs: Sequence[Run], preset: StudyPreset) -> bool:
  """A grid run of a core method on the first labels spec (the runs the
  overlays and the diagnostic show)."""
  return not run.cell.variant and is_core_run(
      run, runs[0].cell.labels, preset.core_methods or METHODS)


def _device_calls(args: argparse.Namespace, preset: StudyPreset,
                  runs: Sequence[Run], size: str | None = None
                  ) -> list[DeviceCall]:
  """The plan's device calls (`size`: the runs resized, to compare
  backbones)."""
  if size:
    runs = [dataclasses.replace(run, argv=tuple(
        a.replace(f'size={common_args_of(run)["size"]},', f'size={size},')
        for a in run.argv)) for run in runs]
  return split_into_calls(device_order(runs, preset.core_methods),
                          _figures(args), args.call_budget_s)


def _extras_line(args: argparse.Namespace, preset: StudyPreset,
                 runs: Sequence[Run], calls: Sequence[DeviceCall]) -> str:
  """'# ' line: the extras' predicted seconds and where they belong."""
  core = [r for r in runs if _is_core(r, runs, preset)]
  if not core:
    return '# extras: none (no core run planned)'
  overlays = args.overlay_images or DEFAULT_OVERLAY_IMAGES
  diagnosed = args.diagnostic_images or DEFAULT_DIAGNOSTIC_IMAGES
  seconds = predicted_extras_s(len({r.cell for r in core}), len(core),
                               _figures(args))
  last = max(index for index, call in enumerate(calls, 1)
             if any(r in core for r in call.runs))
  return (f'# extras: overlays ({overlays} images) and G-vs-p diagnostic '
          f'({diagnosed} images) of the {len(core)} core runs, predicted '
          f'{seconds:.0f} s: after call {last}, in the same task (they need '
          'its checkpoints): benchmarks/gpu_study.sh extras')


def _select_call(args: argparse.Namespace, calls: Sequence[DeviceCall]
                 ) -> DeviceCall | None:
  """The call --call names (None without --call)."""
  if not args.call:
    return None
  if not 1 <= args.call <= len(calls):
    raise ValueError(f'--call={args.call}: the plan has {len(calls)} '
                     'device call(s)')
  return calls[args.call - 1]


def _cpu_plan_lines(runs: Sequence[Run]) -> list[str]:
  shapes = [run_shape(run) for run in runs]
  steps = sum(s.total_steps for s in shapes)
  return [f'# {len(runs)} runs, {steps} steps: about '
          f'{_format_duration(steps * CPU_SECONDS_PER_STEP)} on a 2-core CPU at '
          f'{CPU_SECONDS_PER_STEP} s/step (the 200-step runs of '
          'docs/results.md); resumable, see --status']


def _command_line(argv: Sequence[str] | None) -> str:
  return shlex.join(['python', '-m', 'benchmarks.camvid_study'] + list(
      argv if argv is not None else sys.argv[1:]))


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(argv)
  if args.flops:
    from configs import camvid_clicks  # pylint: disable=g-import-not-at-top
    for size in camvid_clicks.SIZES:
      print(f'size={size}: {measure_train_gflop(size):.1f} GFLOP per image')
    return 0
  try:
    runs, preset = _planned(args)
    calls = (_device_calls(args, preset, runs) if _is_device_plan(runs)
             else [])
    call = _select_call(args, calls) if calls else None
    if args.call and not calls:
      raise ValueError('--call needs a GPU --size (the plan of device calls)')
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  figures = _figures(args)
  selected = call.runs if call else (
      [r for c in calls for r in c.runs] if calls else runs)
  cache_dir = (args.compilation_cache_dir if args.compilation_cache_dir
               is not None else preset.compilation_cache_dir)

  if args.plan:
    for run in selected:
      print(run.command)
    if calls:
      calls_by_size = {}
      for size in GPU_SIZES:
        try:
          calls_by_size[size] = _device_calls(args, preset, runs, size)
        except ValueError as e:
          print(f'# size={size}: {e}')
      for line in (format_device_plan(calls, figures, args.call_budget_s)
                   + [_extras_line(args, preset, runs, calls)]
                   + format_size_comparison(calls_by_size)):
        print(line)
      if cache_dir:
        print(f'# JAX_COMPILATION_CACHE_DIR={cache_dir} for every run')
    else:
      print('\n'.join(_cpu_plan_lines(runs)))
    return 0

  if args.status:
    results = {run: read_run(run) for run in selected}
    print('\n'.join(format_status([run_status(run, results[run])
                                   for run in selected])))
    return 0

  if args.run:
    start = time.monotonic()
    if calls and len(calls) > 1 and not call:
      print(f'warning: the plan needs {len(calls)} device calls of '
            f'{args.call_budget_s:.0f} s; running them all in order (pass '
            '--call=K on a device)', file=sys.stderr)
    from data_prep import common  # pylint: disable=g-import-not-at-top
    try:
      prepare_data(selected, args.override)
    except (ValueError, OSError, common.ConversionError) as e:
      print(f'error: data preparation: {e}', file=sys.stderr)
      return 1
    predicted = {run: seconds for c in calls
                 for run, seconds in zip(c.runs, c.run_s)}
    env = {'JAX_COMPILATION_CACHE_DIR': os.path.join(REPO_ROOT, cache_dir)
           } if cache_dir else None
    deadline_s = args.deadline_s
    if deadline_s is None:
      deadline_s = call_deadline_s(call) if call else 0.0
    statuses = run_plan(
        selected, keep_going=not args.stop_on_failure, env=env,
        deadline=start + deadline_s if deadline_s > 0 else None,
        predicted_s=predicted)
    failed = [(r, s) for r, s in statuses if s.startswith('failed')]
    for run, status in failed:
      print(f'{status}: {run.workdir}/{LOG_FILE}', file=sys.stderr)
    if args.eval_data_dir:
      results = [r for r in map(read_run, selected) if r is not None]
      evaluate_finished(results, args.eval_data_dir)
    return 1 if failed or len(statuses) < len(selected) else 0

  tags = dict(miou_tag=args.miou_tag, loss_tag=args.loss_tag,
              iou_prefix=args.iou_prefix)
  output = os.path.join(REPO_ROOT, args.output)
  # docs/results.md -> docs/results_curves.png and docs/results/: another
  # report (the GPU study's) keeps its figures apart.
  stem = os.path.splitext(output)[0]
  overlay_dir = stem
  if args.pack:
    results = [r for r in (read_run(run, **tags) for run in runs)
               if r is not None]
    core = [r for r in results if _is_core(r.run, runs, preset)]
    folder = os.path.join(REPO_ROOT, args.pack)
    # The extras run without --call (a call packs its scalars only).
    extras = call is None and (args.overlay_images > 0
                               or args.diagnostic_images > 0)
    try:
      # The scalars first: when the extras overrun the device call, this
      # pack still comes back (each pack replaces the last atomically).
      paths = pack_results(runs, folder, command_line=_command_line(argv))
      print('wrote ' + ', '.join(paths), flush=True)
      if not extras:
        return 0
      with tempfile.TemporaryDirectory() as scratch:
        figure_paths = []
        if args.overlay_images > 0:
          path = make_overlays(summarize(core, finished_only=True),
                               runs[0].cell.labels, scratch,
                               num_images=args.overlay_images,
                               python=args.python)
          figure_paths += [path] if path else []
        diagnostic = run_diagnostic(
            core, images=args.diagnostic_images,
            python=args.python) if args.diagnostic_images > 0 else ''
        paths = pack_results(runs, folder, figure_paths=figure_paths,
                             diagnostic=diagnostic,
                             command_line=_command_line(argv))
    except ValueError as e:
      print(f'error: {e}', file=sys.stderr)
      return 1
    print('wrote ' + ', '.join(paths) + ' with the overlays and diagnostic')
    return 0

  # --report.
  machines, diagnostics, overlay_paths = [], [], []
  if args.overlay_images > 0 and os.path.isdir(overlay_dir):
    # Only the grids this report links stay.
    for name in os.listdir(overlay_dir):
      if name.startswith('qualitative_') and name.endswith('.png'):
        os.remove(os.path.join(overlay_dir, name))
  if args.from_folders:
    if args.eval_data_dir:
      print('error: --eval_data_dir evaluates workdirs on this machine; the '
            'packs of --from carry the evaluations made on the device',
            file=sys.stderr)
      return 2
    try:
      unpacked = unpack_results(
          [os.path.join(REPO_ROOT, f) for f in args.from_folders], overlay_dir)
    except ValueError as e:
      print(f'error: {e}', file=sys.stderr)
      return 1
    # The packs' plan: the commands exactly as the device ran them.
    runs = unpacked.runs
    results = [result_from_record(run, unpacked.records[run.workdir], **tags)
               for run in runs if run.workdir in unpacked.records]
    machines, diagnostics = unpacked.machines, unpacked.diagnostics
    overlay_paths = unpacked.figure_paths if args.overlay_images > 0 else []
  else:
    results = [r for r in (read_run(run, **tags) for run in runs)
               if r is not None]
    if args.eval_data_dir:
      evaluate_finished(results, args.eval_data_dir)
    core = [r for r in results if _is_core(r.run, runs, preset)]
    if args.diagnostic_images > 0:
      diagnostics = [run_diagnostic(core, images=args.diagnostic_images,
                                    python=args.python)]
    if args.overlay_images > 0:
      finished = summarize(results, finished_only=True)
      for spec in args.overlay_labels or [runs[0].cell.labels]:
        path = make_overlays(finished, spec, overlay_dir,
                             num_images=args.overlay_images)
        if path:
          overlay_paths.append(path)
  summaries = summarize(results)
  if not summaries:
    print(f'error: no run under {runs[0].workdir.rsplit(os.sep, 1)[0]} has an '
          f'evaluation yet ({args.miou_tag!r} scalars)', file=sys.stderr)
    return 1
  curves_path = stem + '_curves.png'
  plot_curves(summaries, curves_path)
  write_report(runs, results, markdown_path=output, curves_path=curves_path,
               overlay_paths=overlay_paths, command_line=_command_line(argv),
               machines=machines, diagnostics=[d for d in diagnostics if d])
  print(f'wrote {output}, {curves_path} and {len(overlay_paths)} overlay '
        'grid(s)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
