"""Evaluations of finished runs by other programs: main.py's eval mode on a
second prepared dataset (`--eval_data_dir`) or with each image's classes
given (`--eval_given_classes`, config.eval.given_classes: recognition set
apart from localization), with their commands, output parsing and the
WORKDIR/study_evals.json store; and benchmarks/gmm_diagnostic.py's G-vs-p
table (`--diagnostic_images`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from benchmarks.study.grid import REPO_ROOT, Run

# For annotations only: results.py imports this module (read_evals).
if TYPE_CHECKING:
  from benchmarks.study.results import RunResult

# Written by evaluate_finished into each workdir: {evaluation_key: evaluation}.
EVAL_FILE = 'study_evals.json'
# evaluation_key's name of a run's own eval split (data_dir '').
OWN_EVAL_SPLIT = 'own eval split'
GIVEN_CLASSES = 'given classes'


def evaluation_key(data_dir: str, given_classes: bool = False) -> str:
  """EVAL_FILE's key of an evaluation: the dataset folder (OWN_EVAL_SPLIT
  for '', the run's own), then ', given classes' when they were."""
  where = data_dir or OWN_EVAL_SPLIT
  return f'{where}, {GIVEN_CLASSES}' if given_classes else where


def eval_flags(data_dir: str, given_classes: bool = False) -> tuple[str, ...]:
  """The flags of an evaluation in eval mode: on the dataset folder
  `data_dir` ('': the run's own eval split), with each image's classes given
  when `given_classes`."""
  flags = ('--config.mode=eval',)
  if data_dir:
    flags += (f'--config.eval.data_dir={data_dir}',)
  if given_classes:
    flags += ('--config.eval.given_classes=true',)
  return flags


def eval_argv(run: Run, data_dir: str, given_classes: bool = False
              ) -> tuple[str, ...]:
  """`run`'s command with eval_flags, on the weights of its last step (the
  ones its final val evaluation scored), so the tables score the same
  model."""
  return (run.argv + eval_flags(data_dir, given_classes)
          + ('--config.eval.checkpoint=latest',))


def eval_command(run: Run, data_dir: str, given_classes: bool = False) -> str:
  return shlex.join(eval_argv(run, data_dir, given_classes))


def is_current(run: Run, key: str, evaluation: Mapping[str, Any]) -> bool:
  """Whether `evaluation`, stored under `key`, is `run`'s: made by the eval
  command of this run's command (an older evaluation has no
  'given_classes': it had none)."""
  data_dir = evaluation.get('data_dir', key)
  given = bool(evaluation.get('given_classes', False))
  return (key == evaluation_key(data_dir, given)
          and evaluation.get('command') == eval_command(run, data_dir, given))


def parse_eval_output(text: str) -> dict[str, Any]:
  """The last IoU table of main.py's eval mode output.

  The table is agmm_jax.evaluation.evaluator.print_scores': a line 'SPLIT at step N
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
                      given_classes: bool = False,
                      runner: Runner = run_command,
                      repo_root: str = REPO_ROOT) -> dict[str, str]:
  """Evaluates every finished run once (eval_argv: on `data_dir`, '' its own
  eval split; `given_classes`), storing the parsed table in
  WORKDIR/study_evals.json under evaluation_key with its command; a run
  already evaluated so is skipped.
  Returns `{workdir: 'evaluated' | 'skipped' | 'failed: REASON'}`.
  """
  key = evaluation_key(data_dir, given_classes)
  statuses = {}
  for result in results:
    run = result.run
    if not result.finished:
      continue
    if key in result.evals:
      statuses[run.workdir] = 'skipped'
      continue
    workdir = os.path.join(repo_root, run.workdir)
    completed = runner(eval_argv(run, data_dir, given_classes), repo_root)
    try:
      if completed.returncode != 0:
        raise ValueError(f'exit {completed.returncode}: '
                         f'{(completed.stderr or "").strip()[-300:]}')
      evaluation = parse_eval_output(completed.stdout)
    except ValueError as e:
      statuses[run.workdir] = f'failed: {e}'
      print(f'eval of {run.workdir} ({key}) failed: {e}', file=sys.stderr)
      continue
    evaluation.update(command=eval_command(run, data_dir, given_classes),
                      data_dir=data_dir, given_classes=given_classes)
    evals = {**read_evals(workdir), key: evaluation}
    path = os.path.join(workdir, EVAL_FILE)
    with open(path + '.tmp', 'w') as f:
      json.dump(evals, f, indent=2)
    os.replace(path + '.tmp', path)
    result.evals[key] = evaluation
    statuses[run.workdir] = 'evaluated'
  return statuses


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
