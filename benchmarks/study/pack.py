"""Packing a device call's results into two files (at most 8 files of 16 MB
come back from the device; `--pack`: the plan, every run's record, the
machine, the diagnostic and the figures) and unpacking one or more packs for
`--report --from`.
"""

import dataclasses
import json
import os
import re
import tarfile
from collections.abc import Sequence
from typing import Any

from benchmarks.study.grid import REPO_ROOT, Cell, Run
from benchmarks.study.results import run_record
from benchmarks.study.runner import machine_description, utc_now

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
  payload = {'format': PACK_FORMAT, 'created': utc_now(),
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
