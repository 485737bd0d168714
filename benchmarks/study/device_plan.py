"""Predicted device time of a planned grid: each run's schedule (RunShape), its
seconds on the lent GPU from train-step FLOPs and the measured reference
figures (DeviceFigures), the device order (core cells first, runs grouped by
compiled program) and the split of the grid into device calls and tasks
that fit the device's limits; `--flops` measures the FLOP figures.
"""

import dataclasses
from collections.abc import Mapping, Sequence

from benchmarks.study.datasets import CAMVID
from benchmarks.study.grid import (
    FULL, Run, common_args_of, config_overrides, dataset_of, run_config)

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
# The size=cpu schedule of CamVid on this project's 2-core machines
# (benchmarks/study/datasets.py: each dataset's figure and its source).
CPU_SECONDS_PER_STEP = CAMVID.cpu_seconds_per_step


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
  val_images: int = CAMVID.val_images

  @property
  def train_images(self) -> int:
    return self.total_steps * self.batch

  @property
  def num_evals(self) -> int:
    """Evaluations at every multiple of the period and at the last step."""
    return self.total_steps // self.eval_every + (
        1 if self.total_steps % self.eval_every else 0)


def run_shape(run: Run) -> RunShape:
  """`run`'s schedule from its config (steps per epoch: the dataset's
  train_images // batch, as agmm_jax/train/trainer.py counts them). An SPML run's steps include
  its stage 2, whose evaluations are logged after stage 1's last step: the
  run is finished only at the final classifier's last evaluation; a CAM run's
  include the classifier stage before its segmenter (the pass between them
  is not counted)."""
  config = run_config(run, config_overrides(run))
  dataset = dataset_of(run)
  batch = int(config.global_batch_size)
  steps_per_epoch = max(dataset.train_images // batch, 1)
  total = (int(config.num_train_steps) if config.num_train_steps > 0
           else int(config.num_epochs) * steps_per_epoch)
  # Imported here, as run_config imports the configs: JAX is loaded only
  # by the actions that need a run's shape.
  # pylint: disable-next=g-import-not-at-top
  from agmm_jax.methods import cam_stages
  from agmm_jax.methods import spml_stage2
  from agmm_jax.train import run_spec
  if spml_stage2.is_enabled(config):
    total += spml_stage2.stage2_steps(config, total)
  if cam_stages.is_enabled(config):
    total += cam_stages.classifier_steps(config, steps_per_epoch)
  _, eval_every, _ = run_spec.Periods.from_config(config).steps(steps_per_epoch, total)
  size = common_args_of(run)['size']
  # An empty eval canvas is sized from the data: the (downscaled) image size.
  height, width = config.data.eval_canvas or tuple(
      side // int(config.data.prepare.downscale)
      for side in dataset.image_size)
  return RunShape(size=size, total_steps=total, batch=batch,
                  eval_every=eval_every,
                  num_threads=int(config.data.num_threads),
                  crop=int(config.data.crop_size),
                  eval_pixels=int(height) * int(width),
                  val_images=dataset.val_images)


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
          + shape.num_evals * shape.val_images * eval_ratio / rate)


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
  from agmm_jax.model import deeplab
  from benchmarks import bench_model
  from configs import camvid_clicks
  # pylint: enable=g-import-not-at-top
  config = camvid_clicks.get_config(f'size={size}')
  model = deeplab.build_model(config.model, 11, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  crop = int(config.data.crop_size)
  lowered = bench_model._train_step_fn(graphdef).lower(  # pylint: disable=protected-access
      params, rest, jnp.zeros((1, crop, crop, 3)),
      jnp.zeros((1, crop, crop), jnp.int32))
  analysis = lowered.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  return float(analysis['flops']) / 1e9
