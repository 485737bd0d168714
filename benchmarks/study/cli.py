"""The command line of benchmarks/camvid_study.py (its usage text lives there):
argument parsing, the plan's printout with its predicted device calls, and
the --plan, --status, --run, --pack and --report actions.
"""

import argparse
import dataclasses
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence

from benchmarks.study import archive
from benchmarks.study.device_plan import (
    GPU_SIZES, DeviceCall, DeviceFigures,
    call_deadline_s, device_order, format_device_plan,
    format_size_comparison, is_core_run, measure_train_gflop,
    predicted_extras_s, run_shape, split_into_calls)
from benchmarks.study.datasets import DATASETS
from benchmarks.study.evaluations import evaluate_finished, run_diagnostic
from benchmarks.study.grid import (
    ALL_METHODS, DEFAULT_LABELS, FULL, DEFAULT_METHODS, DEFAULT_ROOT, DEFAULT_SEEDS,
    REPO_ROOT, STUDY_PRESETS, Run, StudyPreset, common_args_of, config_error,
    dataset_of, plan_preset)
from benchmarks.study.method_table import (
    group_rows, method_cost_factors, read_entries, write_method_table)
from benchmarks.study.pack import (
    PACK_FIGURES, PACK_JSON, pack_results, unpack_results)
from benchmarks.study.plots import make_overlays, overlay_path, plot_curves
from benchmarks.study.report import (
    format_duration, hand_written_tail, summarize, write_report)
from benchmarks.study.results import (
    DEFAULT_IOU_PREFIX, DEFAULT_LOSS_TAG, DEFAULT_MIOU_TAG, RunResult,
    format_status, read_run, result_from_record, run_status)
from benchmarks.study.runner import LOG_FILE, prepare_data, run_plan


def _comma_list(text: str) -> list[str]:
  return [item for item in text.split(',') if item]


DEFAULT_OVERLAY_IMAGES = 3
# What the extras' diagnostic uses (as the 200-step study did).
DEFAULT_DIAGNOSTIC_IMAGES = 64
# Of a device call's 600 s, what the plan packs runs into: the rest is left
# for the deadline's SIGTERM to be answered (a checkpoint) and a margin.
DEFAULT_CALL_BUDGET_S = 540


def _parse_args(argv: Sequence[str] | None, usage: str
                ) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='python -m benchmarks.camvid_study', description=usage,
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
  action.add_argument('--readme_table', action='store_true',
                      help='rewrite the method table of README.md (its '
                      'marked block) and docs/results_per_class.md from '
                      'every record under --archive')
  action.add_argument('--flops', action='store_true',
                      help='print the train-step GFLOP per image of each '
                      'size (TRAIN_GFLOP_PER_IMAGE)')
  parser.add_argument('--preset', choices=sorted(STUDY_PRESETS),
                      help='a named grid (labels, methods, seeds, size, root, '
                      'overrides); the flags below replace its fields')
  parser.add_argument('--dataset', choices=sorted(DATASETS), default=None,
                      help='whose config file the runs train (default: the '
                      'preset\'s, else camvid)')
  parser.add_argument('--labels', type=_comma_list, default=None,
                      help='comma-separated sparse-label specs (an option '
                      f'with "," is not supported; default '
                      f'{",".join(DEFAULT_LABELS)})')
  parser.add_argument('--methods', type=_comma_list, default=None,
                      help=f'comma-separated subset of {",".join(ALL_METHODS)} '
                      f'(default {",".join(DEFAULT_METHODS)})')
  parser.add_argument('--seeds', type=lambda t: [int(s) for s in
                                                 _comma_list(t)],
                      default=None, help='training seeds (default 0,1)')
  parser.add_argument('--steps', type=int, default=-1,
                      help='--config.num_train_steps (default: the config\'s '
                      'epochs)')
  parser.add_argument('--size', choices=('cpu', 'gpu', 'gpu_r18'),
                      default=None, help='the config file\'s size '
                      '(default cpu; MSRC has cpu only)')
  parser.add_argument('--lseed', type=int, default=0,
                      help='seed of the sparse-label generator')
  parser.add_argument('--root', default=None,
                      help='folder of the run workdirs (relative to the '
                      f'repository root; default {DEFAULT_ROOT}, MSRC\'s '
                      f'{DATASETS["msrc"].default_root})')
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
  parser.add_argument('--eval_given_classes', action='store_true',
                      help='--run/--report: also evaluate every finished run '
                      "with each image's classes given "
                      '(config.eval.given_classes; on --eval_data_dir when '
                      'given, else on the run\'s own eval split) and report '
                      'that table')
  parser.add_argument('--archive', default=archive.DEFAULT_ARCHIVE,
                      help='folder (relative to the repository) of the '
                      'committed records of finished runs: --run archives '
                      'each run it finishes and skips archived ones, '
                      '--status and --report read a run from there when its '
                      'workdir is gone (\'\': none)')
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
  parser.add_argument('--target_images', type=int, default=0,
                      help='--run: the record of each run it finishes also '
                      'keeps the target-vs-prediction diagnostic '
                      '(benchmarks/study/targets.py) on this many training '
                      'images (0: no)')
  parser.add_argument('--output', default=None,
                      help='--report: the Markdown file (default: the '
                      'dataset\'s, docs/results.md for CamVid; its folder '
                      'gets results_curves.png and results/; for another '
                      'name NAME.md: NAME_curves.png and NAME/)')
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
  dataset = DATASETS[args.dataset or 'camvid']
  preset = STUDY_PRESETS[args.preset] if args.preset else StudyPreset(
      labels=DEFAULT_LABELS, methods=DEFAULT_METHODS, seeds=DEFAULT_SEEDS,
      size='cpu', root=dataset.default_root, dataset=dataset.name)
  if args.dataset and args.dataset != preset.dataset:
    raise ValueError(f'--dataset={args.dataset}: --preset={args.preset} is '
                     f'a {preset.dataset} grid')
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
      run, runs[0].cell.labels, preset.core_methods or ALL_METHODS)


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


def _cpu_plan_lines(runs: Sequence[Run], waiting: Sequence[Run],
                    archive_dir: str) -> list[str]:
  """'# ' lines: the predicted CPU time of `runs` at their dataset's
  measured seconds per step (pCE's) times each method's cost relative to
  pCE in the records under `archive_dir` (1 where none has run), and the
  runs `waiting` for their method."""
  dataset = dataset_of(runs[0]) if runs else None
  lines = []
  if runs:
    factors = method_cost_factors(group_rows(read_entries(archive_dir))) if (
        os.path.isdir(archive_dir)) else {}
    factor = lambda run: factors.get(run.cell.method, 1.0)
    steps = sum(run_shape(run).total_steps for run in runs)
    seconds = sum(run_shape(run).total_steps * factor(run) for run in runs
                  ) * dataset.cpu_seconds_per_step
    methods = list(dict.fromkeys(r.cell.method for r in runs))
    known = [f'{m} {factors[m]:.2f}' for m in methods if m in factors]
    unknown = [m for m in methods if m not in factors and m not in (
        'pce_only', FULL)]
    lines.append(
        f'# {len(runs)} runs, {steps} steps: about '
        f'{format_duration(seconds)} on a 2-core CPU at pCE\'s '
        f'{dataset.cpu_seconds_per_step} s/step '
        f'({dataset.cpu_seconds_source}) times each method\'s cost; '
        'resumable, see --status')
    lines.append('# cost per step relative to pCE in the archived records: '
                 + (', '.join(known) or 'none') + (
                     '; not archived yet, taken as pCE\'s: '
                     + ', '.join(unknown) if unknown else ''))
  if waiting:
    lines.append(f'# {len(waiting)} runs not runnable yet (--run skips '
                 f'them): {config_error(waiting[0])}')
  return lines


def _with_checkpoints(runs: Sequence[Run]) -> list[RunResult]:
  """The RunResults of the runs whose workdir still holds its checkpoints
  (what an evaluation on another dataset needs; an archived record has
  none)."""
  results = []
  for run in runs:
    if os.path.isdir(os.path.join(REPO_ROOT, run.workdir, 'checkpoints')):
      result = read_run(run)
      if result is not None:
        results.append(result)
  return results


def _command_line(argv: Sequence[str] | None) -> str:
  return shlex.join(['python', '-m', 'benchmarks.camvid_study'] + list(
      argv if argv is not None else sys.argv[1:]))


@dataclasses.dataclass(frozen=True)
class _Plan:
  """The runs the flags name, and how they would run.

  Attributes:
    runs: every planned run.
    preset: the study preset they come from.
    calls: the device calls of a GPU plan (empty on CPU).
    call: the call `--call` picks, or None.
    waiting: runs whose config refuses them today (a method still to
      land): planned, reported as waiting, skipped by --run.
    selected: the runs the action covers (the picked call's, every call's,
      or every run).
    cache_dir: the persistent compilation cache of the runs ('' none).
  """
  runs: list[Run]
  preset: StudyPreset
  calls: list[DeviceCall]
  call: DeviceCall | None
  waiting: list[Run]
  selected: list[Run]
  cache_dir: str


def _plan(args: argparse.Namespace) -> _Plan:
  """The plan of `args`.

  Raises:
    ValueError: the flags name no valid plan (one line).
  """
  runs, preset = _planned(args)
  calls = _device_calls(args, preset, runs) if _is_device_plan(runs) else []
  call = _select_call(args, calls) if calls else None
  if args.call and not calls:
    raise ValueError('--call needs a GPU --size (the plan of device calls)')
  waiting = [] if calls else [r for r in runs if config_error(r)]
  selected = call.runs if call else (
      [r for c in calls for r in c.runs] if calls else runs)
  cache_dir = (args.compilation_cache_dir if args.compilation_cache_dir
               is not None else preset.compilation_cache_dir)
  return _Plan(runs, preset, calls, call, waiting, selected, cache_dir or '')


def main(argv: Sequence[str] | None, usage: str) -> int:
  """Runs the action the flags `argv` name (None: sys.argv); `usage`: the
  --help description. Returns the exit status."""
  args = _parse_args(argv, usage)
  if args.readme_table:
    return _readme_table(args, argv)
  if args.flops:
    from configs import camvid_clicks  # pylint: disable=g-import-not-at-top
    for size in camvid_clicks.SIZES:
      print(f'size={size}: {measure_train_gflop(size):.1f} GFLOP per image')
    return 0
  try:
    plan = _plan(args)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if args.plan:
    return _print_plan(args, plan)
  if args.status:
    results = {run: archive.read_result(run, args.archive)
               for run in plan.selected}
    print('\n'.join(format_status([run_status(run, results[run])
                                   for run in plan.selected])))
    return 0
  if args.run:
    return _run(args, plan)
  if args.pack:
    return _pack(args, argv, plan)
  return _report(args, argv, plan)


def _readme_table(args: argparse.Namespace, argv: Sequence[str] | None
                  ) -> int:
  """--readme_table: the README's method table from the records."""
  try:
    paths = write_method_table(os.path.join(REPO_ROOT, args.archive),
                               REPO_ROOT, command_line=_command_line(argv))
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print('wrote ' + ', '.join(paths))
  return 0


def _print_plan(args: argparse.Namespace, plan: _Plan) -> int:
  """--plan: each selected run's command, then the device calls' budget (a
  GPU plan) or the CPU plan's summary."""
  for run in plan.selected:
    print(run.command)
  if not plan.calls:
    print('\n'.join(_cpu_plan_lines(
        [r for r in plan.runs if r not in plan.waiting], plan.waiting,
        os.path.join(REPO_ROOT, args.archive) if args.archive else '')))
    return 0
  calls_by_size = {}
  for size in GPU_SIZES:
    try:
      calls_by_size[size] = _device_calls(args, plan.preset, plan.runs, size)
    except ValueError as e:
      print(f'# size={size}: {e}')
  for line in (format_device_plan(plan.calls, _figures(args),
                                  args.call_budget_s)
               + [_extras_line(args, plan.preset, plan.runs, plan.calls)]
               + format_size_comparison(calls_by_size)):
    print(line)
  if plan.cache_dir:
    print(f'# JAX_COMPILATION_CACHE_DIR={plan.cache_dir} for every run')
  return 0


def _run(args: argparse.Namespace, plan: _Plan) -> int:
  """--run: trains the selected runs (resuming, skipping finished ones),
  archives each as it finishes, then evaluates them as the flags ask."""
  start = time.monotonic()
  for run in plan.waiting:
    print(f'{run.cell.name} seed {run.seed}: skipped, not runnable yet '
          f'({config_error(run)})', file=sys.stderr)
  selected = [r for r in plan.selected if r not in plan.waiting]
  if len(plan.calls) > 1 and not plan.call:
    print(f'warning: the plan needs {len(plan.calls)} device calls of '
          f'{args.call_budget_s:.0f} s; running them all in order (pass '
          '--call=K on a device)', file=sys.stderr)
  from data_prep import common  # pylint: disable=g-import-not-at-top
  try:
    prepare_data(selected, args.override)
  except (ValueError, OSError, common.ConversionError) as e:
    print(f'error: data preparation: {e}', file=sys.stderr)
    return 1
  predicted = {run: seconds for c in plan.calls
               for run, seconds in zip(c.runs, c.run_s)}
  env = {'JAX_COMPILATION_CACHE_DIR': os.path.join(REPO_ROOT, plan.cache_dir)
         } if plan.cache_dir else None
  deadline_s = args.deadline_s
  if deadline_s is None:
    deadline_s = call_deadline_s(plan.call) if plan.call else 0.0
  statuses = run_plan(
      selected, keep_going=not args.stop_on_failure, env=env,
      deadline=start + deadline_s if deadline_s > 0 else None,
      predicted_s=predicted,
      done_elsewhere=lambda run: archive.is_archived(run, args.archive),
      on_done=lambda run: archive.save(
          run, args.archive, target_images=args.target_images))
  failed = [(r, s) for r, s in statuses if s.startswith('failed')]
  for run, status in failed:
    print(f'{status}: {run.workdir}/{LOG_FILE}', file=sys.stderr)
  if args.eval_data_dir or args.eval_given_classes:
    statuses_by_workdir = evaluate_finished(
        _with_checkpoints(selected), args.eval_data_dir,
        given_classes=args.eval_given_classes)
    for run in selected:
      if statuses_by_workdir.get(run.workdir) == 'evaluated':
        archive.save(run, args.archive, target_images=args.target_images)
  return 1 if failed or len(statuses) < len(selected) else 0


def _result_tags(args: argparse.Namespace) -> dict[str, str]:
  return dict(miou_tag=args.miou_tag, loss_tag=args.loss_tag,
              iou_prefix=args.iou_prefix)


def _archived_results(args: argparse.Namespace, runs: Sequence[Run]
                      ) -> list[RunResult]:
  """The results of the archived ones of `runs`, with the flags' tags."""
  return [r for r in (archive.read_result(run, args.archive,
                                          **_result_tags(args))
                      for run in runs) if r is not None]


def _pack(args: argparse.Namespace, argv: Sequence[str] | None,
          plan: _Plan) -> int:
  """--pack: the runs' records (and, outside a device call, the overlays
  and the diagnostic) in one folder to carry back."""
  runs = plan.runs
  results = _archived_results(args, runs)
  core = [r for r in results if _is_core(r.run, runs, plan.preset)]
  folder = os.path.join(REPO_ROOT, args.pack)
  # The extras run without --call (a call packs its scalars only).
  extras = plan.call is None and (args.overlay_images > 0
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


def _remove_unlinked_grids(folder: str, linked: Sequence[str],
                           markdown_path: str) -> None:
  """Deletes the qualitative grids in `folder` that neither the report links
  (`linked`) nor the hand-written section of `markdown_path` names (grids
  of label specs no longer asked for)."""
  keep = {os.path.abspath(p) for p in linked}
  hand_written = hand_written_tail(markdown_path)
  for name in os.listdir(folder):
    path = os.path.abspath(os.path.join(folder, name))
    if (name.startswith('qualitative_') and name.endswith('.png')
        and path not in keep and f'/{name})' not in hand_written):
      os.remove(path)


def _report(args: argparse.Namespace, argv: Sequence[str] | None,
            plan: _Plan) -> int:
  """--report: the Markdown report, its curves and overlay grids, from the
  records here or from the packs of --from."""
  dataset = DATASETS[plan.preset.dataset]
  output = os.path.join(REPO_ROOT, args.output or dataset.default_output)
  # docs/results.md -> docs/results_curves.png and docs/results/: another
  # report (the GPU study's) keeps its figures apart.
  stem = os.path.splitext(output)[0]
  if args.from_folders:
    if args.eval_data_dir or args.eval_given_classes:
      print('error: --eval_data_dir and --eval_given_classes evaluate '
            'workdirs on this machine; the '
            'packs of --from carry the evaluations made on the device',
            file=sys.stderr)
      return 2
    try:
      unpacked = unpack_results(
          [os.path.join(REPO_ROOT, f) for f in args.from_folders], stem)
    except ValueError as e:
      print(f'error: {e}', file=sys.stderr)
      return 1
    # The packs' plan: the commands exactly as the device ran them.
    runs = unpacked.runs
    results = [result_from_record(run, unpacked.records[run.workdir],
                                  **_result_tags(args))
               for run in runs if run.workdir in unpacked.records]
    machines, diagnostics = unpacked.machines, unpacked.diagnostics
    overlay_paths = unpacked.figure_paths if args.overlay_images > 0 else []
  else:
    runs = plan.runs
    results = _local_results(args, plan)
    machines = []
    core = [r for r in results if _is_core(r.run, runs, plan.preset)]
    diagnostics = [run_diagnostic(core, images=args.diagnostic_images,
                                  python=args.python)
                   ] if args.diagnostic_images > 0 else []
    overlay_paths = []
    if args.overlay_images > 0:
      finished = summarize(results, finished_only=True)
      for spec in args.overlay_labels or [runs[0].cell.labels]:
        # runs/ does not outlive a session: while some method's workdir is
        # gone, the grid an earlier report made stays.
        earlier = overlay_path(stem, spec)
        has_earlier = os.path.exists(earlier)
        path = make_overlays(finished, spec, stem,
                             num_images=args.overlay_images,
                             complete_only=has_earlier)
        if path or has_earlier:
          overlay_paths.append(path or earlier)
  if args.overlay_images > 0 and os.path.isdir(stem):
    _remove_unlinked_grids(stem, overlay_paths, output)
  summaries = summarize(results)
  if not summaries:
    print(f'error: no run under {runs[0].workdir.rsplit(os.sep, 1)[0]} has an '
          f'evaluation yet ({args.miou_tag!r} scalars)', file=sys.stderr)
    return 1
  curves_path = stem + '_curves.png'
  plot_curves(summaries, curves_path)
  write_report(runs, results, markdown_path=output, curves_path=curves_path,
               overlay_paths=overlay_paths, command_line=_command_line(argv),
               machines=machines, diagnostics=[d for d in diagnostics if d],
               dataset=dataset)
  print(f'wrote {output}, {curves_path} and {len(overlay_paths)} overlay '
        'grid(s)')
  return 0


def _local_results(args: argparse.Namespace, plan: _Plan) -> list[RunResult]:
  """The archived results of the plan's runs, after evaluating the finished
  workdirs here where the flags ask (the records keep the new evaluation)."""
  results = _archived_results(args, plan.runs)
  if not (args.eval_data_dir or args.eval_given_classes):
    return results
  statuses_by_workdir = evaluate_finished(
      _with_checkpoints(plan.runs), args.eval_data_dir,
      given_classes=args.eval_given_classes)
  evaluated = [r.run for r in results
               if statuses_by_workdir.get(r.run.workdir) == 'evaluated']
  for run in evaluated:
    archive.save(run, args.archive)
  return [archive.read_result(r.run, args.archive, **_result_tags(args))
          if r.run in evaluated else r for r in results]
