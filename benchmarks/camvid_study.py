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
with an `eval/miou` scalar); a cell's score is the mean over its seeds with the
sample standard deviation (ddof=1) as the spread.
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
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
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
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------
# Plan.


def labels_tag(spec: str) -> str:
  """File-name form of a sparse-label spec: 'clicks:20' -> 'clicks20'."""
  return spec.replace(':', '').replace('=', '')


@dataclasses.dataclass(frozen=True)
class Cell:
  """One cell of the study: a sparse-label spec and a method."""
  labels: str
  method: str

  @property
  def name(self) -> str:
    return FULL if self.method == FULL else (
        f'{labels_tag(self.labels)}_{self.method}')

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
              python: str = 'python') -> list[Run]:
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
    cells += [Cell(spec, m) for m in methods if m != FULL]
  if FULL in methods:
    cells.append(Cell(labels[0], FULL))
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
  return {'cpu': cpu, 'cpu_count': os.cpu_count(),
          'platform': platform.platform(), 'python': platform.python_version(),
          **versions}


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
             keep_going: bool = True) -> list[tuple[Run, str]]:
  """Runs the commands one after another; returns `(run, status)` pairs.

  status: 'skipped' (already done with the same command), 'done', or
  'failed (exit N)'. A run's stdout and stderr are appended to
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
  for index, run in enumerate(runs, 1):
    label = f'[{index}/{len(runs)}] {run.cell.name} seed {run.seed}'
    if is_done(run, repo_root):
      print(f'{label}: done before, skipped', flush=True)
      statuses.append((run, 'skipped'))
      continue
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
                                 stderr=subprocess.STDOUT)
      # A SIGTERM to the study reaches the trainer, which then saves a
      # checkpoint and exits 143; so does Ctrl-C.
      previous = signal.signal(
          signal.SIGTERM, lambda *_: process.send_signal(signal.SIGTERM))
      try:
        returncode = process.wait()
      except KeyboardInterrupt:
        process.terminate()
        returncode = process.wait()
      finally:
        signal.signal(signal.SIGTERM, previous)
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

  `miou_curve` / `loss_curve`: `(steps [T], values [T])` arrays sorted by step;
  `per_class_iou`: `{class: IoU}` at the final evaluation step; `wall_s`: the
  summed attempts of the study marker, else (`wall_from_events`) the time
  span of the scalar events.
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


def read_run(run: Run, *, repo_root: str = REPO_ROOT,
             miou_tag: str = DEFAULT_MIOU_TAG,
             loss_tag: str = DEFAULT_LOSS_TAG,
             iou_prefix: str = DEFAULT_IOU_PREFIX) -> RunResult | None:
  """Reads one run's workdir; None when it has no event file yet."""
  workdir = os.path.join(repo_root, run.workdir)
  if not os.path.isdir(workdir) or not any(
      'tfevents' in name for name in os.listdir(workdir)):
    return None
  scalars, span_s = read_scalars(workdir)
  empty = (np.zeros(0, np.int64), np.zeros(0, np.float64))
  miou_curve = scalars.get(miou_tag, empty)
  per_class = {}
  if miou_curve[0].size:
    final_step = miou_curve[0][-1]
    names = [t[len(iou_prefix):] for t in scalars if t.startswith(iou_prefix)]
    for name in _class_order(workdir, names, repo_root):
      steps, values = scalars[iou_prefix + name]
      if final_step in steps:
        per_class[name] = float(values[np.searchsorted(steps, final_step)])
  marker = read_marker(workdir)
  # Without a marker of this command (run by hand), the event time span.
  wall_s, wall_from_events, loads = span_s, True, []
  if marker and marker.get('command') == run.command:
    wall_from_events = False
    attempts = marker.get('attempts', [])
    wall_s = float(sum(a['wall_s'] for a in attempts))
    loads = [float(a['load_average']) for a in attempts
             if 'load_average' in a]
  return RunResult(run=run, miou_curve=miou_curve,
                   loss_curve=scalars.get(loss_tag, empty),
                   per_class_iou=per_class, wall_s=wall_s,
                   wall_from_events=wall_from_events,
                   done=bool(marker and marker.get('done')),
                   machine=marker.get('machine') if marker else None,
                   load_averages=loads)


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


def summarize(results: Sequence[RunResult]) -> list[CellSummary]:
  """Groups runs by cell (in plan order): mean and sample std of the final
  mIoU, and the mean per-class IoU over the seeds that have the class."""
  by_cell: dict[Cell, list[RunResult]] = {}
  for result in results:
    if result.has_eval:
      by_cell.setdefault(result.run.cell, []).append(result)
  summaries = []
  for cell, cell_results in by_cell.items():
    scores = np.array([r.final_miou for r in cell_results])
    classes = list(dict.fromkeys(
        c for r in cell_results for c in r.per_class_iou))
    per_class = {c: float(np.mean([r.per_class_iou[c] for r in cell_results
                                   if c in r.per_class_iou]))
                 for c in classes}
    summaries.append(CellSummary(
        cell=cell, results=list(cell_results), mean=float(np.mean(scores)),
        std=float(np.std(scores, ddof=1)) if scores.size > 1 else float('nan'),
        per_class_mean=per_class))
  return summaries


# --------------------------------------------------------------------------
# Report.


def format_score(mean: float, std: float, count: int) -> str:
  """'41.23 ± 0.57 (n=2)' in percent; the spread is omitted for one seed."""
  if count == 1:
    return f'{100 * mean:.2f} (n=1)'
  return f'{100 * mean:.2f} ± {100 * std:.2f} (n={count})'


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


def write_report(runs: Sequence[Run], results: Sequence[RunResult],
                 summaries: Sequence[CellSummary], *, markdown_path: str,
                 curves_path: str, overlay_paths: Sequence[str],
                 command_line: str) -> str:
  """Writes docs/results.md (tables, plot and overlay links, commands,
  machine, wall times); returns the Markdown text."""
  doc_dir = os.path.dirname(os.path.abspath(markdown_path))
  relative = lambda p: os.path.relpath(os.path.abspath(p), doc_dir)
  by_cell = {s.cell: s for s in summaries}
  # Columns: the sparse-label methods (one score column for a 'full'-only
  # study).
  methods = list(dict.fromkeys(r.cell.method for r in runs if
                               r.cell.method != FULL)) or ['val mIoU']
  labels = list(dict.fromkeys(r.cell.labels for r in runs
                              if r.cell.method != FULL))
  seeds = sorted({r.seed for r in runs})
  lines = [
      '# CamVid click-supervision study', '',
      f'Generated {_utc_now()} by `{command_line}` from the workdirs of the '
      'runs below (a missing cell has not been run yet).', '',
      'Data: CamVid, 11 classes (train 367, val 101 images; void ignored), '
      f'sparse training labels from `data_prep/sparse_labels.py`; config '
      f'`{CONFIG_FILE}`; training seeds {", ".join(map(str, seeds))}. '
      'Score: val mIoU (%) at the final evaluation, mean ± sample standard '
      'deviation (ddof=1) over seeds, n = number of seeds.', '',
      '## Val mIoU (%)', '',
      '| labels | ' + ' | '.join(methods) + ' |',
      '|---|' + '---|' * len(methods)]
  for spec in labels:
    cells = [by_cell.get(Cell(spec, m)) for m in methods]
    lines.append(f'| {spec} | ' + ' | '.join(
        format_score(s.mean, s.std, s.count) if s else 'not run'
        for s in cells) + ' |')
  full = [s for s in summaries if s.cell.method == FULL]
  if full or any(r.cell.method == FULL for r in runs):
    score = format_score(full[0].mean, full[0].std, full[0].count) if (
        full) else 'not run'
    lines.append(f'| full (dense labels) | {score} |' + ' |' * (
        len(methods) - 1))

  class_names = list(dict.fromkeys(
      c for s in summaries for c in s.per_class_mean))
  if class_names:
    lines += ['', '## Per-class val IoU (%), mean over seeds', '',
              '| cell | ' + ' | '.join(class_names) + ' | mIoU |',
              '|---|' + '---|' * (len(class_names) + 1)]
    for summary in summaries:
      values = [summary.per_class_mean.get(c) for c in class_names]
      lines.append(f'| {summary.cell.name} | ' + ' | '.join(
          f'{100 * v:.1f}' if v is not None else '' for v in values)
                   + f' | {100 * summary.mean:.1f} |')

  lines += ['', '## Learning curves', '',
            f'![val mIoU and train loss vs step]({relative(curves_path)})']
  if overlay_paths:
    lines += ['', '## Qualitative results', '',
              'Val images at training resolution; ground truth and the best '
              'seed of each method overlaid (void and unlabeled pixels '
              'uncoloured).', '']
    lines += [f'![{os.path.basename(p)}]({relative(p)})' for p in overlay_paths]

  lines += ['', '## Runs: commands and wall times', '',
            'Each command is run from the repository root; rerunning it '
            'resumes or, once finished, does nothing new. Wall time: the '
            "sum over the run's attempts (training, periodic evaluation, "
            'checkpoints, compilation; data preparation excluded); '
            '"(events)": a run started by hand, timed from its first to its '
            'last scalar event (start-up and first compilation left out).',
            '',
            '| cell | seed | last step | val mIoU (%) | wall time | status |',
            '|---|---|---|---|---|---|']
  result_of = {(r.run.cell, r.run.seed): r for r in results}
  for run in runs:
    result = result_of.get((run.cell, run.seed))
    if result is None:
      lines.append(f'| {run.cell.name} | {run.seed} | | | | not run |')
      continue
    status = 'done' if result.done else 'incomplete'
    miou = f'{100 * result.final_miou:.2f}' if result.has_eval else ''
    wall = _format_duration(result.wall_s) + (
        ' (events)' if result.wall_from_events else '')
    lines.append(f'| {run.cell.name} | {run.seed} | {result.last_step} | '
                 f'{miou} | {wall} | {status} |')
  lines += ['', '```bash']
  lines += [run.command for run in runs]
  lines += ['```']

  machines = [r.machine for r in results if r.machine]
  machine = machines[0] if machines else machine_description()
  lines += ['', '## Machine', '',
            f'- CPU: {machine["cpu"]}, {machine["cpu_count"]} cores'
            + ('' if machines else ' (of the machine that wrote this report; '
               'no run recorded its own)'),
            f'- {machine["platform"]}, Python {machine["python"]}, jax '
            f'{machine["jax"]}, flax {machine["flax"]}']
  loads = [load for r in results for load in r.load_averages]
  if loads:
    lines.append(f'- 1-minute load average at the start of the runs: '
                 f'{min(loads):.1f} to {max(loads):.1f} (the machine was '
                 'shared; wall times include that contention)')
  text = '\n'.join(lines) + '\n'
  os.makedirs(doc_dir, exist_ok=True)
  with open(markdown_path, 'w') as f:
    f.write(text)
  return text


# --------------------------------------------------------------------------
# Command line.


def _comma_list(text: str) -> list[str]:
  return [item for item in text.split(',') if item]


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='python -m benchmarks.camvid_study', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  action = parser.add_mutually_exclusive_group(required=True)
  action.add_argument('--plan', action='store_true',
                      help='print the command of every run')
  action.add_argument('--run', action='store_true',
                      help='run the planned commands (resumable)')
  action.add_argument('--report', action='store_true',
                      help='write the Markdown report, plot and overlays')
  parser.add_argument('--labels', type=_comma_list,
                      default=list(DEFAULT_LABELS),
                      help='comma-separated sparse-label specs (an option '
                      'with "," is not supported)')
  parser.add_argument('--methods', type=_comma_list, default=list(DEFAULT_METHODS),
                      help=f'comma-separated subset of {",".join(METHODS)}')
  parser.add_argument('--seeds', type=lambda t: [int(s) for s in
                                                 _comma_list(t)],
                      default=list(DEFAULT_SEEDS), help='training seeds')
  parser.add_argument('--steps', type=int, default=-1,
                      help='--config.num_train_steps (default: the config\'s '
                      'epochs)')
  parser.add_argument('--size', choices=('cpu', 'gpu'), default='cpu')
  parser.add_argument('--lseed', type=int, default=0,
                      help='seed of the sparse-label generator')
  parser.add_argument('--root', default=DEFAULT_ROOT,
                      help='folder of the run workdirs (relative to the '
                      'repository root)')
  parser.add_argument('--override', action='append', default=[],
                      help='extra config override KEY=VALUE for every run '
                      '(repeatable), e.g. data.num_threads=2')
  parser.add_argument('--python', default='python',
                      help='interpreter named in the commands')
  parser.add_argument('--stop_on_failure', action='store_true',
                      help='--run: stop at the first failed run')
  parser.add_argument('--output', default='docs/results.md',
                      help='--report: the Markdown file (its folder gets '
                      'results_curves.png and results/)')
  parser.add_argument('--overlay_images', type=int, default=3,
                      help='--report: val images per qualitative grid '
                      '(0: none)')
  parser.add_argument('--overlay_labels', type=_comma_list, default=None,
                      help='--report: label specs that get a qualitative grid '
                      '(default: the first --labels spec)')
  parser.add_argument('--miou_tag', default=DEFAULT_MIOU_TAG)
  parser.add_argument('--loss_tag', default=DEFAULT_LOSS_TAG)
  parser.add_argument('--iou_prefix', default=DEFAULT_IOU_PREFIX)
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(argv)
  try:
    runs = plan_runs(args.labels, args.methods, args.seeds, steps=args.steps,
                     size=args.size, lseed=args.lseed, root=args.root,
                     overrides=args.override, python=args.python)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if args.plan:
    for run in runs:
      print(run.command)
    return 0

  if args.run:
    from data_prep import common  # pylint: disable=g-import-not-at-top
    try:
      prepare_data(runs, args.override)
    except (ValueError, OSError, common.ConversionError) as e:
      print(f'error: data preparation: {e}', file=sys.stderr)
      return 1
    statuses = run_plan(runs, keep_going=not args.stop_on_failure)
    failed = [(r, s) for r, s in statuses if s.startswith('failed')]
    for run, status in failed:
      print(f'{status}: {run.workdir}/{LOG_FILE}', file=sys.stderr)
    return 1 if failed or len(statuses) < len(runs) else 0

  results = [r for r in (read_run(run, miou_tag=args.miou_tag,
                                  loss_tag=args.loss_tag,
                                  iou_prefix=args.iou_prefix)
                         for run in runs) if r is not None]
  summaries = summarize(results)
  if not summaries:
    print(f'error: no run under {args.root} has an evaluation yet '
          f'({args.miou_tag!r} scalars)', file=sys.stderr)
    return 1
  output = os.path.join(REPO_ROOT, args.output)
  doc_dir = os.path.dirname(output)
  curves_path = os.path.join(doc_dir, 'results_curves.png')
  plot_curves(summaries, curves_path)
  overlay_paths = []
  if args.overlay_images > 0:
    overlay_dir = os.path.join(doc_dir, 'results')
    if os.path.isdir(overlay_dir):  # only grids this report links stay
      for name in os.listdir(overlay_dir):
        if name.startswith('qualitative_') and name.endswith('.png'):
          os.remove(os.path.join(overlay_dir, name))
    for spec in args.overlay_labels or args.labels[:1]:
      path = make_overlays(summaries, spec, overlay_dir,
                           num_images=args.overlay_images)
      if path:
        overlay_paths.append(path)
  write_report(runs, results, summaries, markdown_path=output,
               curves_path=curves_path, overlay_paths=overlay_paths,
               command_line=shlex.join(['python', '-m',
                                        'benchmarks.camvid_study'] +
                                       list(argv if argv is not None
                                            else sys.argv[1:])))
  print(f'wrote {output}, {curves_path} and {len(overlay_paths)} overlay '
        'grid(s)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
