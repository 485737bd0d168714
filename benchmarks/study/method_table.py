"""README's method table, generated from the study's committed records
(`python -m benchmarks.camvid_study --readme_table`).

Every record under the archive (docs/results/records/ROOT/*.json, one per
finished run) is read as an Entry: its dataset (the command's config file),
budget ('200 steps' from `--config.num_train_steps`, else the config's
epochs), labels, method, seed and final val mIoU. Entries of the same
(dataset, budget, labels, method) form a Row: mean ± sample sd over the
seeds, gaps to pCE (same labels and budget) and to dense labels (same
budget), mean wall time, the command. The table replaces the block between
BEGIN and END in README.md; the per-class IoU of every row goes to
PER_CLASS_DOC, one section per (dataset, budget), linked from the rows.

Separation rule (`separation`), written once here and stated under the
table: a method separates from pCE when it has at least two seeds, as pCE
does, every seed of it is above pCE's best seed (below its worst for
'below'), and its mean gap exceeds SEPARATION_POOLED_SDS pooled sample
standard deviations of the two cells. A cell with one seed (its or pCE's)
is 'n/a (one seed)' until a second lands, except where the two cells'
seed ranges already overlap: further seeds only widen the ranges, so
neither 'above' nor 'below' can follow, and the verdict is 'no' at once.
"""

import dataclasses
import glob
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from benchmarks.study.datasets import DATASETS, dataset_of_config
from benchmarks.study.grid import (BOOKKEEPING_OVERRIDES, BOX_KIND, FULL,
                                   TAGS_KIND, labels_kind)
from benchmarks.study.report import format_duration
from benchmarks.study.runner import attempts_wall_s, cpu_label, utc_now

BEGIN = '<!-- method-table:begin -->'
END = '<!-- method-table:end -->'
README = 'README.md'
PER_CLASS_DOC = 'docs/results_per_class.md'
PCE = 'pce_only'
# What "pCE" means for the label kinds whose labels mark no pixel: for boxes
# the partial-label cross-entropy over the classes of the boxes that hold a
# pixel (the plain box loss), for tags the plain CAM pipeline (its segmenter
# trains pCE on the CAM pseudo-labels). Every other kind: pce_only.
BASELINE_OF_KIND = {BOX_KIND: 'box_pce', TAGS_KIND: 'cam'}
SEPARATION_POOLED_SDS = 2.0
DENSE_LABELS = 'dense'
# Label kinds in the table's order; others follow alphabetically.
KIND_ORDER = ('clicks', 'points', 'scribbles', 'boxes', 'tags', DENSE_LABELS)


def baseline_method(labels: str) -> str:
  """The method the other methods on `labels` are compared with."""
  return BASELINE_OF_KIND.get(labels_kind(labels), PCE)


def baseline_name(labels: str) -> str:
  """How the sentences name it: 'pCE', or the kind's baseline method."""
  method = baseline_method(labels)
  return 'pCE' if method == PCE else method


@dataclasses.dataclass(frozen=True)
class Entry:
  """One finished run's record: where it belongs and its final scores."""
  dataset: str
  budget: str
  budget_steps: int
  labels: str
  method: str
  seed: int
  miou: float
  final_step: int
  per_class: Mapping[str, float]
  span_s: float | None
  command: str
  pseudo_labels: Mapping[str, Any]
  machine: str
  targets: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def _config_args(command: str) -> tuple[str, dict[str, str]] | None:
  """(config file, its key=value arguments) of a main.py command."""
  match = re.search(r'--config=([^\s:]+):(\S+)', command)
  if not match:
    return None
  return match.group(1), dict(item.split('=', 1)
                              for item in match.group(2).split(',')
                              if '=' in item)


# Overrides that change neither what is trained nor how long (or whose
# length the budget states): the rest, and a size other than cpu, name a
# setting of their own beside the budget (the GPU study's backbone, its
# bfloat16 check), so that their runs never pool with the CPU grid's.
SCHEDULE_OVERRIDES = ('seed', 'num_train_steps', 'num_epochs',
                      'eval_every_steps') + BOOKKEEPING_OVERRIDES


def _budget(command: str, config: Mapping[str, Any], train_images: int,
            size: str) -> tuple[str, int]:
  """('200 steps', 200) or ('40 epochs', steps of 40 epochs), the setting
  appended where it is not the CPU grid's ('40 epochs, size=gpu_r18')."""
  steps = re.search(r'--config\.num_train_steps=(\d+)', command)
  if steps and int(steps.group(1)) > 0:
    label, total = f'{int(steps.group(1))} steps', int(steps.group(1))
  else:
    epochs = int(config['num_epochs'])
    per_epoch = max(train_images // int(config['global_batch_size']), 1)
    label, total = f'{epochs} epochs', epochs * per_epoch
  setting = [] if size in ('', 'cpu') else [f'size={size}']
  setting += [o for o in re.findall(r'--config\.(\S+)', command)
              if o.split('=', 1)[0] not in SCHEDULE_OVERRIDES]
  return ', '.join([label] + setting), total


def _wall_s(record: Mapping[str, Any]) -> float | None:
  """A run's wall time: the sum of its attempts (the study marker of the
  record's command: each process from start to exit, so the gaps between
  sessions are not counted), else the span of its scalar events."""
  wall_s = attempts_wall_s(record.get('marker'), record.get('command', ''))
  return record.get('span_s') if wall_s is None else wall_s


def entry_of_record(record: Mapping[str, Any]) -> Entry | None:
  """The Entry of one archived record (None: not a study dataset's command,
  not finished, or without an evaluation)."""
  parsed = _config_args(record.get('command', ''))
  dataset = parsed and dataset_of_config(parsed[0])
  marker = record.get('marker') or {}
  miou = record.get('scalars', {}).get('eval/miou')
  if not dataset or not record.get('config') or not miou or not miou[0]:
    return None
  if marker and not marker.get('done'):
    return None
  args = parsed[1]
  method = args.get('method', '')
  labels = args.get('labels', '')
  if method == FULL or labels == DENSE_LABELS:
    method, labels = FULL, DENSE_LABELS
  final_step = miou[0][-1]
  per_class = {}
  for name in record.get('class_order', []):
    steps, values = record['scalars'].get(f'eval/iou/{name}', ([], []))
    if final_step in steps:
      per_class[name] = float(values[steps.index(final_step)])
  budget, budget_steps = _budget(record['command'], record['config'],
                                 dataset.train_images, args.get('size', ''))
  seed = re.search(r'--config\.seed=(\d+)', record['command'])
  cpu = (marker.get('machine') or {})
  return Entry(dataset=dataset.name, budget=budget, budget_steps=budget_steps,
               labels=labels, method=method,
               seed=int(seed.group(1)) if seed else 0,
               miou=float(miou[1][-1]), final_step=int(final_step),
               per_class=per_class,
               span_s=_wall_s(record), command=record['command'],
               pseudo_labels=record.get('pseudo_labels') or {},
               targets=record.get('targets') or {},
               machine=cpu_label(cpu))


def read_entries(archive: str) -> list[Entry]:
  """The Entries of every record under `archive`/*/ (sorted paths)."""
  entries = []
  for path in sorted(glob.glob(os.path.join(archive, '*', '*.json'))):
    with open(path) as f:
      try:
        record = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}: not valid JSON ({e})') from None
    entry = entry_of_record(record)
    if entry is not None:
      entries.append(entry)
  return entries


@dataclasses.dataclass
class Row:
  """The runs of one (dataset, budget, labels, method) over their seeds."""
  entries: list[Entry]

  @property
  def key(self) -> tuple[str, str, str, str]:
    e = self.entries[0]
    return e.dataset, e.budget, e.labels, e.method

  @property
  def scores(self) -> np.ndarray:
    return np.array([e.miou for e in self.entries])

  @property
  def mean(self) -> float:
    return float(self.scores.mean())

  @property
  def sd(self) -> float:
    """Sample standard deviation (ddof=1); NaN for one seed."""
    return float(self.scores.std(ddof=1)) if len(self.entries) > 1 else math.nan

  @property
  def wall_s(self) -> float | None:
    spans = [e.span_s for e in self.entries if e.span_s is not None]
    return float(np.mean(spans)) if spans else None


def group_rows(entries: Sequence[Entry]) -> list[Row]:
  """Rows by (dataset, budget, labels, method), seeds sorted, in the
  table's order: dataset, budget (steps), label kind (KIND_ORDER), pCE
  first, then by mean mIoU, dense labels last."""
  by_key: dict[tuple, list[Entry]] = {}
  for e in entries:
    by_key.setdefault((e.dataset, e.budget, e.labels, e.method), []).append(e)
  rows = [Row(sorted(v, key=lambda e: e.seed)) for v in by_key.values()]

  def order(row: Row) -> tuple:
    e = row.entries[0]
    kind = labels_kind(e.labels)
    kind_rank = KIND_ORDER.index(kind) if kind in KIND_ORDER else len(
        KIND_ORDER) - 1
    return (list(DATASETS).index(e.dataset), e.budget_steps, e.budget,
            kind_rank, e.labels, e.method != baseline_method(e.labels),
            -row.mean)
  return sorted(rows, key=order)


def pooled_sd(a: np.ndarray, b: np.ndarray) -> float:
  """sqrt(((n_a - 1) s_a^2 + (n_b - 1) s_b^2) / (n_a + n_b - 2))."""
  dof = a.size + b.size - 2
  return math.sqrt(((a.size - 1) * a.var(ddof=1)
                    + (b.size - 1) * b.var(ddof=1)) / dof)


def separation(method: np.ndarray, pce: np.ndarray) -> str:
  """'above', 'below', 'no' or 'n/a (one seed)': the module's rule."""
  if method.size < 2 or pce.size < 2:
    overlap = method.min() <= pce.max() and method.max() >= pce.min()
    return 'no' if overlap else 'n/a (one seed)'
  gap = float(method.mean() - pce.mean())
  margin = SEPARATION_POOLED_SDS * pooled_sd(method, pce)
  if method.min() > pce.max() and gap > margin:
    return 'above'
  if method.max() < pce.min() and -gap > margin:
    return 'below'
  return 'no'


RULE_TEXT = (
    'Separates from pCE: at least two seeds in both cells, every seed of '
    "the method above pCE's best seed (below its worst: 'below'), and the "
    f'mean gap larger than {SEPARATION_POOLED_SDS:g} pooled sample standard '
    'deviations of the two cells; otherwise the difference is within the '
    'seed noise of these runs ("no"). With one seed: "n/a", or "no" where '
    "its range of seeds already overlaps pCE's, which no further seed can "
    'undo.')


def method_cost_factors(rows: Sequence[Row]) -> dict[str, float]:
  """`{method: seconds per step / pCE's}`: each row's mean wall time per
  trained step (span_s / final step: SPML's stage 2 counted) over pCE's on
  the same dataset, budget and labels, averaged over those groups."""
  pce_of, _ = _references(rows)
  per_step = lambda row: np.mean([e.span_s / e.final_step for e in row.entries
                                  if e.span_s and e.final_step > 0])
  ratios: dict[str, list[float]] = {}
  for row in rows:
    pce = pce_of.get(row.key[:3])
    if pce is not None and row is not pce and row.wall_s and pce.wall_s:
      ratios.setdefault(row.key[3], []).append(
          float(per_step(row) / per_step(pce)))
  return {method: float(np.mean(r)) for method, r in ratios.items()}


def _anchor(title: str) -> str:
  """GitHub's anchor of a Markdown heading."""
  return re.sub(r'[^a-z0-9 -]', '', title.lower()).replace(' ', '-')


def section_title(dataset: str, budget: str) -> str:
  return f'{DATASETS[dataset].display_name}, {budget}'


def _score(row: Row) -> str:
  n = len(row.entries)
  spread = '' if n == 1 else f' ± {100 * row.sd:.2f}'
  return f'{100 * row.mean:.2f}{spread} (n={n})'


def _gap(row: Row, reference: Row | None) -> str:
  if reference is None or reference is row:
    return '—'
  return f'{100 * (row.mean - reference.mean):+.2f}'


def _references(rows: Sequence[Row]
                ) -> tuple[dict[tuple, Row], dict[tuple, Row]]:
  """The baseline's row (pCE's: baseline_method) per (dataset, budget,
  labels), dense labels' per (dataset, budget)."""
  pce = {r.key[:3]: r for r in rows if r.key[3] == baseline_method(r.key[2])}
  dense = {r.key[:2]: r for r in rows if r.key[3] == FULL}
  return pce, dense


def _verdict(row: Row, pce: Row | None) -> str:
  if row.key[3] in (baseline_method(row.key[2]), FULL) or pce is None:
    return '—'
  return separation(row.scores, pce.scores)


def table_lines(rows: Sequence[Row], per_class_link: str) -> list[str]:
  """The Markdown table: one line per row."""
  pce_of, dense_of = _references(rows)
  lines = ['| dataset, budget | labels | method | val mIoU (%) | vs pCE | '
           'vs dense | separates from pCE? | wall time / run | command | '
           'per class |', '|---' * 10 + '|']
  for row in rows:
    dataset, budget, labels, method = row.key
    pce, dense = pce_of.get(row.key[:3]), dense_of.get(row.key[:2])
    title = section_title(dataset, budget)
    command = row.entries[0].command
    lines.append(
        f'| {title} | {labels} | {method} | {_score(row)} | '
        f'{_gap(row, pce)} | {_gap(row, dense)} | {_verdict(row, pce)} | '
        f'{format_duration(row.wall_s)} | `{command}` | '
        f'[table]({per_class_link}#{_anchor(title)}) |')
  return lines


def best_sentences(rows: Sequence[Row]) -> list[str]:
  """Per (dataset, budget, labels): the best method in a plain sentence,
  'none beats pCE' (the kind's baseline: baseline_method), or 'not decided
  yet' while the leader is ahead on a single seed (its or the baseline's)
  and a second could still separate it."""
  pce_of, dense_of = _references(rows)
  groups = list(dict.fromkeys(r.key[:3] for r in rows if r.key[3] != FULL))
  lines = []
  for key in groups:
    title = f'{section_title(*key[:2])}, {key[2]}'
    base, pce = baseline_name(key[2]), pce_of.get(key)
    others = [r for r in rows if r.key[:3] == key and r is not pce]
    if pce is None:
      lines.append(f'- {title}: no {base} run to compare with.')
      continue
    if not others:
      lines.append(f'- {title}: only {base} has run ({_score(pce)}).')
      continue
    above = [r for r in others if _verdict(r, pce) == 'above']
    dense = dense_of.get(key[:2])
    dense_text = (f'; dense labels {_gap(dense, pce)} points over {base}'
                  if dense else '')
    if above:
      best = max(above, key=lambda r: r.mean)
      lines.append(
          f'- {title}: **{best.key[3]}** is best ({_score(best)}, '
          f'{_gap(best, pce)} points over {base}, separated){dense_text}.')
    else:
      lines.append(_no_winner_sentence(title, base, pce, others, dense_text))
  return lines


def _no_winner_sentence(title: str, base: str, pce: Row,
                        others: Sequence[Row], dense_text: str) -> str:
  """No method separates above the baseline: 'none beats' it, or 'not
  decided yet' where the leader is ahead on one seed and a second could
  still separate it (separation's 'n/a (one seed)')."""
  top = max(others, key=lambda r: r.mean)
  verdict = _verdict(top, pce)  # 'no', 'below' or 'n/a (one seed)' here.
  one_seed = min(len(top.entries), len(pce.entries)) < 2
  if verdict == 'n/a (one seed)' and top.mean > pce.mean:
    return (f'- {title}: **not decided yet**: {top.key[3]} has the highest '
            f'mean ({_score(top)}, {_gap(top, pce)} points over {base}\'s '
            f'{_score(pce)}); separation needs two seeds of each{dense_text}.')
  if verdict == 'n/a (one seed)':
    status = verdict
  elif one_seed:  # 'no' on one seed: the ranges overlap already.
    status = (f"not separated: its seeds overlap {base}'s, which no further "
              'seed can undo')
  else:
    status = 'not separated'
  return (f'- {title}: **none beats {base}** ({_score(pce)}; highest other '
          f'mean {top.key[3]} {_score(top)}, {status}){dense_text}.')


def _machines_text(rows: Sequence[Row]) -> str:
  machines = sorted({e.machine for r in rows for e in r.entries if e.machine})
  return '; '.join(machines) or 'not recorded'


def block_lines(rows: Sequence[Row], per_class_link: str,
                command_line: str) -> list[str]:
  """The README block between BEGIN and END."""
  if not rows:
    return ['No finished run is archived yet.']
  return ([f'Generated {utc_now()} by `{command_line}` from the records '
           'under docs/results/records/ (one per finished run). Val mIoU: '
           'at the final evaluation, mean ± sample sd (ddof=1) over n seeds; '
           'vs pCE / vs dense: mean difference in points against pCE on '
           f'the same labels (boxes: {BASELINE_OF_KIND[BOX_KIND]}, the '
           'partial cross-entropy over the classes of the boxes holding a '
           f'pixel; tags: the CAM pipeline {BASELINE_OF_KIND[TAGS_KIND]}) '
           'and against dense labels at the same budget; '
           "command: the first seed's (another seed S: `_seedS` and "
           '`--config.seed=S`).',
           ''] + table_lines(rows, per_class_link)
          + ['', RULE_TEXT, '',
             'Wall time: mean over the seeds of the wall time of a run\'s '
             'processes (the study marker\'s attempts: start-up, '
             'compilation, training and evaluations, not the gaps between '
             'sessions; for a run without one, the span from its first to '
             'its last scalar event), on the shared 2-core development '
             'machines, loaded by other jobs and at times paused for another '
             f'(recorded: {_machines_text(rows)}): compare them within a '
             'budget only.',
             '', 'Best method per label kind:', ''] + best_sentences(rows))


def per_class_doc(rows: Sequence[Row], command_line: str) -> str:
  """PER_CLASS_DOC: per (dataset, budget), the mean per-class val IoU of
  each row and the pseudo-label quality of the runs that made a pass."""
  lines = ['# Per-class val IoU of the method table', '',
           f'Generated {utc_now()} by `{command_line}` with the README\'s '
           'method table, from the same records: IoU (%) at the final '
           'evaluation, mean over the seeds.']
  for dataset, budget in dict.fromkeys(r.key[:2] for r in rows):
    section = [r for r in rows if r.key[:2] == (dataset, budget)]
    classes = list(dict.fromkeys(
        c for r in section for e in r.entries for c in e.per_class))
    lines += ['', f'## {section_title(dataset, budget)}', '',
              '| labels | method | ' + ' | '.join(classes) + ' | mIoU |',
              '|---|---|' + '---|' * (len(classes) + 1)]
    for row in section:
      values = []
      for c in classes:
        seeds = [e.per_class[c] for e in row.entries
                 if c in e.per_class and not math.isnan(e.per_class[c])]
        values.append(f'{100 * np.mean(seeds):.1f}' if seeds else 'n/a')
      lines.append(f'| {row.key[2]} | {row.key[3]} | ' + ' | '.join(values)
                   + f' | {100 * row.mean:.1f} |')
    passes = [(r, e, name, q) for r in section for e in r.entries
              for name, q in sorted(e.pseudo_labels.items())]
    if passes:
      lines += ['', 'Pseudo-label quality (the pass against the dense labels '
                'of the training images, %):', '',
                '| labels | method | seed | pass | labeled | mIoU |',
                '|---|---|---|---|---|---|']
      lines += [f'| {r.key[2]} | {r.key[3]} | {e.seed} | `{name}` | '
                f'{100 * q.get("coverage", math.nan):.1f} | '
                f'{100 * q.get("miou", math.nan):.1f} |'
                for r, e, name, q in passes]
    diagnosed = [(r, e) for r in section for e in r.entries
                 if e.targets.get('covered')]
    if diagnosed:
      lines += ['', 'Target vs prediction (benchmarks/study/targets.py: on '
                'the unlabeled pixels whose class is labeled in the image, '
                'how often each picks the true class, %):', '',
                '| labels | method | seed | step | target | acc target | '
                'acc p |', '|---|---|---|---|---|---|---|']
      lines += [f'| {r.key[2]} | {r.key[3]} | {e.seed} | '
                f'{int(e.targets["step"])} | {e.targets["target"]} | '
                f'{100 * e.targets["g_right"] / e.targets["covered"]:.1f} | '
                f'{100 * e.targets["p_right"] / e.targets["covered"]:.1f} |'
                for r, e in diagnosed]
  return '\n'.join(lines) + '\n'


def replace_block(text: str, block: Sequence[str]) -> str:
  """`text` with the lines between BEGIN and END replaced by `block`.

  Raises:
    ValueError: without exactly one BEGIN followed by one END.
  """
  if text.count(BEGIN) != 1 or text.count(END) != 1 or (
      text.index(BEGIN) > text.index(END)):
    raise ValueError(f'{README} needs one "{BEGIN}" line followed by one '
                     f'"{END}" line around the method table')
  head, rest = text.split(BEGIN, 1)
  _, tail = rest.split(END, 1)
  return head + BEGIN + '\n' + '\n'.join(block) + '\n' + END + tail


def write_method_table(archive: str, repo_root: str, *,
                       command_line: str) -> list[str]:
  """Rewrites README.md's method-table block and PER_CLASS_DOC from the
  records under `archive`; returns the paths written.

  Raises:
    ValueError: a record that is not valid JSON, or README without the
      block's markers.
  """
  rows = group_rows(read_entries(archive))
  readme = os.path.join(repo_root, README)
  with open(readme) as f:
    text = replace_block(f.read(), block_lines(rows, PER_CLASS_DOC,
                                               command_line))
  doc = os.path.join(repo_root, PER_CLASS_DOC)
  os.makedirs(os.path.dirname(doc), exist_ok=True)
  with open(doc, 'w') as f:
    f.write(per_class_doc(rows, command_line))
  with open(readme, 'w') as f:
    f.write(text)
  return [readme, doc]
