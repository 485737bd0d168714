"""The study's report: cell summaries over seeds (mean and sample spread of
the final mIoU), the score and per-class tables, the schedule and bfloat16
checks, and docs/results.md itself.
"""

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from benchmarks.study.datasets import CAMVID, StudyDataset
from benchmarks.study.evaluations import eval_flags
from benchmarks.study.grid import (
    DTYPE_CHECK_OVERRIDE, DTYPE_CHECK_VARIANT, FULL, Cell, Run)
from benchmarks.study.results import RunResult
from benchmarks.study.runner import cpu_label, machine_description, utc_now


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


def dataset_scores(key: str
                   ) -> Callable[[RunResult],
                                 tuple[float, dict[str, float]] | None]:
  """The scores of a run's evaluation `key` (evaluations.evaluation_key: on
  another dataset, or with the image's classes given)."""
  def scores(result: RunResult) -> tuple[float, dict[str, float]] | None:
    evaluation = result.evals.get(key)
    return (evaluation['miou'], evaluation['per_class']) if evaluation else None
  return scores


def evaluation_heading(evaluation: Mapping[str, Any]) -> list[str]:
  """The heading and explanation of a table of evaluate_finished's
  evaluations (one of them given: their data and flags are the same)."""
  data_dir = evaluation.get('data_dir', '')
  given = evaluation.get('given_classes', False)
  where = f'on `{data_dir}`' if data_dir else 'on the val split'
  flags = ' '.join(eval_flags(data_dir, given))
  text = ("The finished runs' last weights (the ones the val table scores) "
          f'evaluated with `{flags}`.')
  if given:
    where += ", each image's classes given"
    text += (' Each image is predicted among the classes of its own label '
             'map only (the oracle tags class activation maps are scored '
             'with): what is left is localization; the gap to the plain '
             'table is recognition.')
  return [f'## mIoU (%) {where}', '', text]


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


def format_score(mean: float, std: float, count: int,
                 planned: int | None = None) -> str:
  """'41.23 ± 0.57 (n=2)' in percent; the spread is omitted for one seed;
  fewer seeds than `planned`: '(n=1 of 2, partial)'."""
  n = (f'n={count}' if planned is None or count >= planned
       else f'n={count} of {planned}, partial')
  if count == 1:
    return f'{100 * mean:.2f} ({n})'
  return f'{100 * mean:.2f} ± {100 * std:.2f} ({n})'


def format_duration(seconds: float | None) -> str:
  if seconds is None:
    return 'n/a'
  minutes, secs = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}h{minutes:02d}m' if hours else f'{minutes}m{secs:02d}s'


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
  'not run'; a cell the grid does not plan (a method not for those labels)
  reads '-'."""
  grid = [r for r in runs if not r.cell.variant]
  planned: dict[Cell, int] = {}
  for run in grid:
    planned[run.cell] = planned.get(run.cell, 0) + 1
  started = {r.run.cell for r in results}
  by_cell = {s.cell: s for s in summaries}

  def entry(cell: Cell) -> str:
    if cell not in planned:
      return '-'
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
           'spread ' + ('not known yet (one seed per cell)' if np.isnan(spread)
                        else f'{100 * spread:.2f}')]
  if np.isnan(gain) or gain >= PLATEAU_GAIN:
    verdict = ('still rising: the schedule is too short; the next task '
               'doubles it (`--override=num_epochs=80`, a new `--root`)')
    if np.isnan(spread):
      verdict += ('; provisional: one seed per cell, whose curve moves '
                  'between evaluations too')
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


def pseudo_label_table(results: Sequence[RunResult]) -> list[str]:
  """Markdown table of the pseudo-label quality of every finished run that
  made a pass (benchmarks/study/pass_quality.py): its share of the densely
  labeled training pixels, pixel accuracy, mIoU and per-class IoU (%)."""
  rows = [(r, name, q) for r in results if r.finished
          for name, q in sorted(r.pseudo_labels.items())]
  if not rows:
    return []
  classes = list(dict.fromkeys(c for _, _, q in rows for c in q['per_class']))
  percent = lambda v: 'n/a' if v is None or np.isnan(v) else f'{100 * v:.1f}'
  lines = ['| cell | seed | pass | labeled | pixel acc. | mIoU | '
           + ' | '.join(classes) + ' |',
           '|---|---|---|---|---|---|' + '---|' * len(classes)]
  for result, name, quality in rows:
    lines.append(
        f'| {result.run.cell.name} | {result.run.seed} | `{name}` | '
        f'{percent(quality.get("coverage"))} | '
        f'{percent(quality.get("pixel_accuracy"))} | '
        f'{percent(quality.get("miou"))} | ' + ' | '.join(
            percent(quality['per_class'].get(c)) for c in classes) + ' |')
  return lines


def target_table(results: Sequence[RunResult]) -> list[str]:
  """Markdown table of the finished runs whose record keeps the
  target-vs-prediction diagnostic (benchmarks/study/targets.py): over the
  unlabeled pixels whose class is labeled in the image, how often the
  target's and the prediction's choice is the true class (%), and their
  mean absolute errors against the one-hot truth."""
  rows = [r for r in results if r.finished and r.targets]
  if not rows:
    return []
  lines = ['| cell | seed | step | target | acc target | acc p | '
           'target right, p wrong | target wrong, p right | '
           '\\|target - y\\| | \\|p - y\\| |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for result in rows:
    t = result.targets
    if 'error' in t:
      lines.append(f'| {result.run.cell.name} | {result.run.seed} | | '
                   f'none: {t["error"].split(": ", 1)[-1]} |' + ' |' * 6)
      continue
    covered = max(t['covered'], 1.0)
    share = lambda key: f'{100 * t[key] / covered:.1f}'
    lines.append(
        f'| {result.run.cell.name} | {result.run.seed} | {int(t["step"])} | '
        f'{t["target"]} | {share("g_right")} | {share("p_right")} | '
        f'{share("g_right_p_wrong")} | {share("g_wrong_p_right")} | '
        f'{t["g_error"] / covered:.3f} | {t["p_error"] / covered:.3f} |')
  return lines


def _fewer_cores_lines(results: Sequence[RunResult],
                       machine: dict[str, Any]) -> list[str]:
  """A line naming the runs with attempts on fewer cores than the machine
  has (``taskset``): XLA:CPU's arithmetic follows its thread count, so such
  a run is not the one the command makes on the whole machine."""
  total = int(machine.get('cpu_count') or 0)
  fewer = [f'{r.run.cell.name} seed {r.run.seed} ({sum(c < total for c in r.cores)} of '
           f'{len(r.cores)} attempts on {min(r.cores)} of {total})'
           for r in results if r.cores and min(r.cores) < total]
  if not fewer:
    return []
  return ['- Attempts on fewer cores than the machine has (an affinity '
          'mask; XLA:CPU sizes its threads, and so its rounding, by it): '
          + '; '.join(fewer)]


# The heading under which a report's reader writes what the numbers say:
# write_report regenerates what is above it and keeps it and what follows.
HAND_WRITTEN = '## What these numbers say (written by hand'


def write_report(runs: Sequence[Run], results: Sequence[RunResult], *,
                 markdown_path: str, curves_path: str,
                 overlay_paths: Sequence[str], command_line: str,
                 machines: Sequence[Mapping[str, Any]] = (),
                 diagnostics: Sequence[str] = (),
                 dataset: StudyDataset = CAMVID) -> str:
  """Writes docs/results.md (tables, plot and overlay links, schedule and
  bfloat16 checks, pseudo-label quality, commands, machine, wall times);
  returns the Markdown.

  Scores average the finished runs only; cells with fewer finished seeds
  than planned are marked partial, unfinished runs are listed with their
  step. `machines`: of the packs (device calls), else the runs' markers.
  The earlier file's hand-written section (HAND_WRITTEN) is kept at the end.
  """
  doc_dir = os.path.dirname(os.path.abspath(markdown_path))
  relative = lambda p: os.path.relpath(os.path.abspath(p), doc_dir)
  lines = (_header_lines(runs, results, command_line, dataset)
           + _score_lines(runs, results, dataset)
           + _curve_and_check_lines(runs, results, relative(curves_path))
           + _figure_and_diagnostic_lines(
               results, [relative(p) for p in overlay_paths], diagnostics)
           + _run_lines(runs, results)
           + _machine_lines(results, machines))
  text = '\n'.join(lines) + '\n' + hand_written_tail(markdown_path)
  os.makedirs(doc_dir, exist_ok=True)
  with open(markdown_path + '.tmp', 'w') as f:
    f.write(text)
  os.replace(markdown_path + '.tmp', markdown_path)
  return text


def _header_lines(runs: Sequence[Run], results: Sequence[RunResult],
                  command_line: str, dataset: StudyDataset) -> list[str]:
  """Title, provenance, data and score definition; the partial-grid note."""
  seeds = sorted({r.seed for r in runs})
  finished = sum(r.finished for r in results)
  lines = [
      f'# {dataset.title}', '',
      f'Generated {utc_now()} by `{command_line}` from the workdirs of the '
      'runs below (a missing cell has not been run yet).', '',
      f'Data: {dataset.description}; config '
      f'`{dataset.config_file}`; training seeds {", ".join(map(str, seeds))}. '
      'Score: val mIoU (%) at the final evaluation, mean ± sample standard '
      'deviation (ddof=1) over the finished seeds, n = number of seeds.', '']
  if finished < len(runs):
    lines += [f'**Partial grid: {finished} of {len(runs)} planned runs have '
              'finished.** Cells marked "partial" average fewer seeds than '
              'planned; "in progress": no seed finished yet; runs not '
              'finished are listed below with the step they reached and '
              'are not averaged.', '']
  return lines


def _score_lines(runs: Sequence[Run], results: Sequence[RunResult],
                 dataset: StudyDataset) -> list[str]:
  """The val mIoU table, one table (with per-class IoU) per extra
  evaluation of the records, and the per-class table."""
  summaries = summarize(results, finished_only=True)
  lines = ['## Val mIoU (%)', ''] + score_table(runs, results, summaries)
  keys = list(dict.fromkeys(key for r in results for key in r.evals))
  for key in keys:
    other = summarize(results, finished_only=True, scores_of=dataset_scores(key))
    lines += [''] + evaluation_heading(
        next(r.evals[key] for r in results if key in r.evals)) + ['']
    lines += score_table(runs, results, other, missing='not evaluated')
    lines += [''] + per_class_table(other)
  if per_class_table(summaries):
    lines += ['', '## Per-class val IoU (%), mean over finished seeds', '']
    lines += per_class_table(summaries)
  return lines


def _curve_and_check_lines(runs: Sequence[Run], results: Sequence[RunResult],
                           curves_link: str) -> list[str]:
  """The learning curves' figure, the schedule check and the bfloat16
  check (where the grid has its variant)."""
  lines = ['', '## Learning curves', '',
           f'![val mIoU and train loss vs step]({curves_link})',
           '', '### Schedule check', '']
  # pCE's first labels spec (MSRC's grid starts with boxes, which pCE is
  # not for).
  lines += schedule_check(results, next(
      (r.cell.labels for r in runs if r.cell.method == 'pce_only'),
      runs[0].cell.labels))
  dtype_lines = dtype_check(results)
  if dtype_lines or any(r.cell.variant == DTYPE_CHECK_VARIANT for r in runs):
    lines += ['', '## bfloat16 check', ''] + (
        dtype_lines or ['Not run yet.'])
  return lines


def _figure_and_diagnostic_lines(results: Sequence[RunResult],
                                 overlay_links: Sequence[str],
                                 diagnostics: Sequence[str]) -> list[str]:
  """The overlay grids, the pseudo-label quality, target-vs-prediction and
  G-vs-p sections, each where there is something to show."""
  lines = []
  if overlay_links:
    lines += ['', '## Qualitative results', '',
              'Val images at training resolution; ground truth and the best '
              'seed of each method overlaid (void and unlabeled pixels '
              'uncoloured). A grid is drawn from the runs\' checkpoints; '
              'while a method\'s best seed has no workdir on the machine, '
              'the grid of an earlier report stays.', '']
    lines += [f'![{os.path.basename(p)}]({p})' for p in overlay_links]
  quality_lines = pseudo_label_table(results)
  if quality_lines:
    lines += ['', '## Pseudo-label quality', '',
              "Each finished run's pseudo-label pass against the dense "
              'labels of the same training images (never trained on): the '
              'share of the densely labeled pixels it labeled, its pixel '
              'accuracy, mIoU and per-class IoU (%); read from the pass\'s '
              '`quality.json` when it wrote one, else measured '
              '(benchmarks/study/pass_quality.py).', ''] + quality_lines
  target_lines = target_table(results)
  if target_lines:
    lines += ['', '## Target vs prediction (benchmarks/study/targets.py)', '',
              "Each run's latest checkpoint on the first training images "
              '(the record says how many): is the target its loss builds '
              'more accurate than the prediction it supervises? Measured on '
              'the unlabeled, non-void pixels whose class is labeled in the '
              'image, against the dense labels (never trained on).', '']
    lines += target_lines
  if diagnostics:
    lines += ['', '## G vs p diagnostic (benchmarks/gmm_diagnostic.py)', '']
    lines += list(diagnostics)
  return lines


def _run_lines(runs: Sequence[Run], results: Sequence[RunResult]
               ) -> list[str]:
  """Each planned run's step, score, wall time, rate and status; the
  commands."""
  lines = ['', '## Runs: commands and wall times', '',
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
    wall = format_duration(result.wall_s) + (
        ' (events)' if result.wall_from_events else '')
    rate = median_img_per_s(result)
    rate_text = '' if np.isnan(rate) else f'{rate:.0f}'
    lines.append(f'| {run.cell.name} | {run.seed} | {result.last_step} | '
                 f'{miou} | {wall} | {rate_text} | {status} |')
  # A run archived under other bookkeeping flags: the command that made it.
  commands = [result_of[run.cell, run.seed].run.command
              if (run.cell, run.seed) in result_of else run.command
              for run in runs]
  return lines + ['', '```bash'] + commands + ['```']


def _cpus_lines(results: Sequence[RunResult]) -> list[str]:
  """A line naming which runs each CPU made, when the runs recorded more
  than one: XLA:CPU compiles for the host's vector extension, so the same
  command rounds, and scores, differently on each."""
  runs_by_cpu: dict[str, list[str]] = {}
  for r in results:
    if r.machine and r.machine.get('cpu'):
      runs_by_cpu.setdefault(cpu_label(r.machine), []).append(
          f'{r.run.cell.name} seed {r.run.seed}')
  if len(runs_by_cpu) < 2:
    return []
  return [f'- CPUs: {len(runs_by_cpu)} (XLA:CPU compiles '
          'for the vector extension, so each rounds, and scores, its own '
          'way; a label without one was recorded before the field existed): '
          + '; '.join(f'{label}: {", ".join(runs)}'
                      for label, runs in runs_by_cpu.items())]


def _machine_lines(results: Sequence[RunResult],
                   machines: Sequence[Mapping[str, Any]]) -> list[str]:
  """The machine the runs recorded (else this one), the load at their
  start, and the fewer-cores note."""
  recorded = list(machines) or [r.machine for r in results if r.machine]
  machine = recorded[0] if recorded else machine_description()
  lines = ['', '## Machine', '',
           *(_cpus_lines(results) or [
               f'- CPU: {cpu_label(machine)}'
               + ('' if recorded else ' (of the machine that wrote this '
                  'report; no run recorded its own)')]),
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
  return lines + _fewer_cores_lines(results, machine)


def hand_written_tail(markdown_path: str) -> str:
  """The part of an earlier report from its HAND_WRITTEN heading on ('' if
  none): a regenerated report keeps the explanation written under it."""
  try:
    with open(markdown_path) as f:
      text = f.read()
  except FileNotFoundError:
    return ''
  start = text.find(f'\n{HAND_WRITTEN}')
  return '' if start < 0 else text[start:]
