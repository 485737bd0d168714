"""What the runs' workdirs hold: their TensorBoard scalars, marker and config as
a JSON-able record (also what a device call packs), the RunResult the report
reads from it, and where each planned run stands (`--status`).
"""

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from benchmarks.study.device_plan import run_shape
from benchmarks.study.evaluations import is_current, read_evals
from benchmarks.study.grid import REPO_ROOT, Cell, Run, config_error, dataset_of
from benchmarks.study.pass_quality import read_qualities
from benchmarks.study.runner import attempts_wall_s, read_marker, timed_so_far

# Scalar tags written by agmm_jax/train/trainer.py.
DEFAULT_MIOU_TAG = 'eval/miou'
DEFAULT_LOSS_TAG = 'train/loss'
DEFAULT_IOU_PREFIX = 'eval/iou/'
THROUGHPUT_TAG = 'train/images_per_second'


@dataclasses.dataclass
class RunResult:
  """What one run's workdir holds.

  `miou_curve` / `loss_curve` / `throughput_curve` (train images/s):
  `(steps [T], values [T])` arrays sorted by step; `per_class_iou`:
  `{class: IoU}` at the final evaluation step; `wall_s`: the summed attempts
  of the study marker, else (`wall_from_events`) the time span of the scalar
  events; `done`: the marker of this exact command says it exited 0;
  `total_steps`: the planned steps (None: unknown); `evals`: evaluations on
  other datasets or with the classes given, `{evaluation_key:
  parse_eval_output(...)}` (those of this run's command); `pseudo_labels`:
  the quality of each pass folder, `{name: pass_quality.read_qualities'
  value}`; `targets`: the record's target-vs-prediction diagnostic
  (targets.record_of, `{}`: not made).
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
  # The usable cores of each attempt that recorded them (runner.usable_cores).
  cores: list[int] = dataclasses.field(default_factory=list)
  throughput_curve: tuple[np.ndarray, np.ndarray] = (
      np.zeros(0, np.int64), np.zeros(0, np.float64))
  evals: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
  pseudo_labels: dict[str, dict[str, Any]] = dataclasses.field(
      default_factory=dict)
  targets: dict[str, Any] = dataclasses.field(default_factory=dict)

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
  """The steps `run`'s command trains (None for a command of no study
  dataset, or one its config refuses today: grid.config_error)."""
  if dataset_of(run) is None or config_error(run):
    return None
  return run_shape(run).total_steps


def run_record(run: Run, *, repo_root: str = REPO_ROOT,
               iou_prefix: str = DEFAULT_IOU_PREFIX) -> dict[str, Any] | None:
  """Everything the report needs of one workdir as JSON-able data (None when
  it has no event file yet): every scalar `{tag: [steps, values]}`, their
  time span, the study marker, config.json, the class order of the per-class
  IoU tags, the evaluations of other datasets (EVAL_FILE) and the quality
  of its pseudo-label passes (pass_quality)."""
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
          'span_s': span_s,
          'marker': timed_so_far(read_marker(workdir), workdir),
          'config': config,
          'class_order': _class_order(workdir, names, repo_root),
          'evals': read_evals(workdir),
          'pseudo_labels': read_qualities(workdir)}


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
  marker_wall_s = attempts_wall_s(marker, run.command)
  loads, cores = [], []
  if own_marker:
    attempts = marker.get('attempts', [])
    loads = [float(a['load_average']) for a in attempts
             if 'load_average' in a]
    cores = [int(a['cores']) for a in attempts if 'cores' in a]
  return RunResult(run=run, miou_curve=miou_curve,
                   loss_curve=scalars.get(loss_tag, empty),
                   per_class_iou=per_class,
                   # Without a marker of this command (run by hand), the
                   # event time span.
                   wall_s=(record['span_s'] if marker_wall_s is None
                           else marker_wall_s),
                   wall_from_events=marker_wall_s is None,
                   done=own_marker and bool(marker.get('done')),
                   machine=marker.get('machine') if marker else None,
                   load_averages=loads, cores=cores,
                   total_steps=planned_steps(run),
                   throughput_curve=scalars.get(THROUGHPUT_TAG, empty),
                   evals={k: v for k, v in record.get('evals', {}).items()
                          if is_current(run, k, v)},
                   pseudo_labels=record.get('pseudo_labels') or {},
                   targets=record.get('targets') or {})


def read_run(run: Run, *, repo_root: str = REPO_ROOT,
             miou_tag: str = DEFAULT_MIOU_TAG,
             loss_tag: str = DEFAULT_LOSS_TAG,
             iou_prefix: str = DEFAULT_IOU_PREFIX) -> RunResult | None:
  """Reads one run's workdir; None when it has no event file yet."""
  record = run_record(run, repo_root=repo_root, iou_prefix=iou_prefix)
  return None if record is None else result_from_record(
      run, record, miou_tag=miou_tag, loss_tag=loss_tag,
      iou_prefix=iou_prefix)


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
