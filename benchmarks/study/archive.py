"""The study's committed archive: one JSON record (results.run_record) per
finished run, under `docs/results/records/` by default.

A session's `runs/` (checkpoints, event files) does not outlive the session:
only what is committed does. So every run the study finishes is archived as
its record (scalars, marker, config, evaluations: tens of KB), and the study
reads the archive where a workdir is missing: `--run` skips an archived run,
`--status` counts it done, `--report` tables it. A grid can then progress
across sessions, one commit of records at a time; only a run cut mid-way by
the end of a session starts again. What needs a checkpoint (overlays, the
G-vs-p diagnostic, an evaluation on another dataset) is made only for runs
whose workdir is still here.
"""

import dataclasses
import json
import os
import shlex
import sys

from agmm_jax.storage import run_identity
from benchmarks.study.grid import (
    REPO_ROOT, Run, config_error, config_overrides, dataset_of, run_config,
    same_run)
from benchmarks.study.results import (
    DEFAULT_IOU_PREFIX, DEFAULT_LOSS_TAG, DEFAULT_MIOU_TAG, RunResult,
    read_run, result_from_record, run_record)
from benchmarks.study.runner import read_marker

DEFAULT_ARCHIVE = 'docs/results/records'


def record_path(run: Run, archive: str, repo_root: str = REPO_ROOT) -> str:
  """`ARCHIVE/ROOT/CELL_seedS.json` for the workdir `.../ROOT/CELL_seedS`
  (its last two components: the study root's name and the run's)."""
  root, name = os.path.split(os.path.normpath(run.workdir))
  return os.path.join(repo_root, archive, os.path.basename(root),
                      name + '.json')


def _loss_config_now(run: Run) -> dict | None:
  """The loss config `run`'s command trains with today's code, as the
  trainer's config.json holds it (None: a command of no study dataset, or
  one its config refuses today)."""
  if dataset_of(run) is None or config_error(run):
    return None
  config = run_config(run, config_overrides(run))
  return json.loads(config.loss.to_json_best_effort(sort_keys=True))


def load(run: Run, archive: str, repo_root: str = REPO_ROOT
         ) -> dict | None:
  """The archived record of `run`'s command (or of one that differs only in
  bookkeeping flags, grid.same_run), or None: none, one of another command
  (a different schedule under the same workdir name), or a
  stale one, trained with another loss config than the command gives today
  (a preset's default changed since; a warning names the file).

  Raises:
    ValueError: naming the file when it is not valid JSON.
  """
  if not archive:
    return None
  path = record_path(run, archive, repo_root)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    try:
      record = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}: not valid JSON ({e})') from None
  if not same_run(record.get('command', ''), run.command):
    return None
  trained = (record.get('config') or {}).get('loss')
  now = _loss_config_now(run)
  if trained is None or now is None:
    return record
  # Compared as a resumed run is (run_identity.check_resumable): an added
  # field the record lacks means the value of ADDED_FIELDS, or is an option
  # the run did not have (a term added since), and is not compared.
  now = run_identity.flatten(now)
  trained = run_identity.with_added_fields(
      run_identity.flatten(trained), now, prefix='loss.')
  changed = [f'loss.{field} {json.dumps(before)} -> {json.dumps(after)}'
             for field, before, after in run_identity.changed_fields(
                 trained, now)]
  if changed:
    print(f'warning: {path}: trained with another loss config than '
          f'{run.cell.method} has now ({"; ".join(changed)}); not counted '
          '(rerun the cell)', file=sys.stderr)
    return None
  return record


def is_archived(run: Run, archive: str, repo_root: str = REPO_ROOT) -> bool:
  """True when the archive holds a finished record of `run`'s command."""
  record = load(run, archive, repo_root)
  marker = (record or {}).get('marker') or {}
  return bool(marker.get('done')
              and same_run(marker.get('command', ''), run.command))


def save(run: Run, archive: str, repo_root: str = REPO_ROOT, *,
         target_images: int = 0) -> str | None:
  """Archives `run`'s record read from its workdir (atomically); returns the
  path, or None when the workdir has no event file or no archive is set.
  `target_images` > 0: the record also keeps the target-vs-prediction
  diagnostic of the run's latest checkpoint on that many training images
  (benchmarks/study/targets.py; `{'error': ...}` for a loss without a
  target map); 0: the diagnostic the archived record has, if any, is kept."""
  if not archive:
    return None
  record = run_record(run, repo_root=repo_root)
  if record is None:
    return None
  if target_images > 0:
    # Imported here: the diagnostic loads JAX and the model.
    from benchmarks.study import targets  # pylint: disable=g-import-not-at-top
    record['targets'] = targets.record_of(
        os.path.join(repo_root, run.workdir), target_images)
  else:
    # A record saved again (a new evaluation) keeps the diagnostic it has.
    earlier = load(run, archive, repo_root)
    if earlier and earlier.get('targets'):
      record['targets'] = earlier['targets']
  path = record_path(run, archive, repo_root)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + '.tmp', 'w') as f:
    json.dump(record, f, separators=(',', ':'))
    f.write('\n')
  os.replace(path + '.tmp', path)
  return path


def read_result(run: Run, archive: str, *, repo_root: str = REPO_ROOT,
                miou_tag: str = DEFAULT_MIOU_TAG,
                loss_tag: str = DEFAULT_LOSS_TAG,
                iou_prefix: str = DEFAULT_IOU_PREFIX) -> RunResult | None:
  """The RunResult of `run`: its workdir when the run finished there, else
  its archived record, else the unfinished workdir (None: neither holds
  anything)."""
  tags = dict(miou_tag=miou_tag, loss_tag=loss_tag, iou_prefix=iou_prefix)
  marker = read_marker(os.path.join(repo_root, run.workdir)) or {}
  result = read_run(_as_made(run, marker.get('command')), repo_root=repo_root,
                    **tags)
  if result is not None and result.finished:
    # What only the archive keeps of it (save's target diagnostic).
    record = load(run, archive, repo_root)
    if record and record.get('targets'):
      result.targets = record['targets']
    return result
  record = load(run, archive, repo_root)
  if record is not None:
    return result_from_record(_as_made(run, record['command']), record, **tags)
  return result


def _as_made(run: Run, command: str | None) -> Run:
  """`run` as `command` made it, when that is the same run with other
  bookkeeping flags (grid.same_run): its marker and record are that
  command's."""
  if command and command != run.command and same_run(command, run.command):
    return dataclasses.replace(run, argv=tuple(shlex.split(command)))
  return run
