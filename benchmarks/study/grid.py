"""The study's grid: cells (label spec x method), their runs as `main.py`
command lines, the named presets (`--preset`), and the config a run's command
trains (the dataset's config file, benchmarks/study/datasets.py, with the
command's overrides).
"""

import ast
import dataclasses
import os
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks.study.datasets import (
    CAMVID, DATASETS, MSRC, StudyDataset, dataset_of_config)
from configs import presets

CONFIG_FILE = CAMVID.config_file
DEFAULT_LABELS = ('clicks:20', 'clicks:100', 'points:1')
FULL = 'full'
# Every loss preset (configs/presets.py) and dense labels; the default grid
# is the original study's.
METHODS = presets.PRESETS + (FULL,)
DEFAULT_METHODS = ('pce_only', 'agmm_released', 'agmm_paper', FULL)
DEFAULT_SEEDS = (0, 1)
DEFAULT_ROOT = CAMVID.default_root
# The label kinds (a spec's prefix before ':', data_prep/sparse_labels.py)
# each method is for, where it is not for every kind; the grid skips its
# cells on the others. SPML's two presets carry its VOC points values and its
# VOC scribble values (configs/presets.py).
METHOD_LABEL_KINDS = {
    'spml': ('points', 'clicks'),
    'spml_scribble': ('scribbles',),
}
# The label kinds without labeled pixels: only their own presets train on
# them, and those train on nothing else.
BOX_KIND, TAGS_KIND = 'boxes', 'tags'
# The CAM pipeline's presets (configs/msrc.py: labels=tags, or labels=boxes
# with each class's maps restricted to its boxes, SPML's box seeds).
TAG_METHODS = presets.TAG_PRESETS
KIND_METHODS = {BOX_KIND: presets.BOX_PRESETS + TAG_METHODS,
                TAGS_KIND: TAG_METHODS}
# Every method a grid may name (the box and tags presets on MSRC only).
ALL_METHODS = METHODS + presets.BOX_PRESETS + TAG_METHODS

# Overrides that change only how often a run saves or logs, or how many
# threads read its data, never what it computes (resumption is exact): two
# commands that differ only in them make the same run, and an archived record
# of one stands for the other (same_run).
BOOKKEEPING_OVERRIDES = ('checkpoint_every_steps', 'keep_checkpoint_every_steps',
                         'log_every_steps', 'data.num_threads')

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def labels_tag(spec: str) -> str:
  """File-name form of a sparse-label spec: 'clicks:20' -> 'clicks20'."""
  return spec.replace(':', '').replace('=', '')


def labels_kind(spec: str) -> str:
  """The kind of a sparse-label spec: 'clicks:20' -> 'clicks'."""
  return spec.split(':', 1)[0]


def applies(method: str, spec: str) -> bool:
  """Whether `method` is for the labels of `spec` (KIND_METHODS: boxes and
  tags have their own presets; METHOD_LABEL_KINDS)."""
  kind = labels_kind(spec)
  own_kinds = [k for k, weak_methods in KIND_METHODS.items()
               if method in weak_methods]
  if own_kinds or kind in KIND_METHODS:
    return kind in own_kinds
  kinds = METHOD_LABEL_KINDS.get(method)
  return kinds is None or kind in kinds


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


def _without_bookkeeping(command: str) -> list[str]:
  return [arg for arg in shlex.split(command)
          if not (arg.startswith('--config.') and arg[len('--config.'):].split(
              '=', 1)[0] in BOOKKEEPING_OVERRIDES)]


def same_run(command: str, other: str) -> bool:
  """Whether two commands train the same run: equal but for
  BOOKKEEPING_OVERRIDES."""
  return _without_bookkeeping(command) == _without_bookkeeping(other)


def plan_runs(labels: Sequence[str] = DEFAULT_LABELS,
              methods: Sequence[str] = DEFAULT_METHODS,
              seeds: Sequence[int] = DEFAULT_SEEDS, *, steps: int = -1,
              size: str = 'cpu', lseed: int = 0, root: str = DEFAULT_ROOT,
              overrides: Sequence[str] = (),
              python: str = 'python', variant: str = '',
              dataset: StudyDataset = CAMVID,
              kind_methods: Mapping[str, Sequence[str]] | None = None
              ) -> list[Run]:
  """The runs of the study, seed-major (every cell at seed 0 first); a
  method's cells on label kinds it is not for (METHOD_LABEL_KINDS) are left
  out.

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
    dataset: whose config file the commands train (datasets.DATASETS).
    kind_methods: `{label kind: methods}`: a method is planned on a labels
      spec only when listed for its kind (None: every method that applies).

  Raises:
    ValueError: naming an unknown method, an empty list, a bad override, or
      methods none of which is for the given labels.
  """
  for method in methods:
    if method not in ALL_METHODS:
      raise ValueError(f'--methods: unknown method {method!r}, expected some '
                       f'of {ALL_METHODS}')
  if not labels or not methods or not seeds:
    raise ValueError('--labels, --methods and --seeds must not be empty')
  for override in overrides:
    if '=' not in override or override.startswith('config.'):
      raise ValueError(f'--override {override!r}: expected KEY=VALUE with KEY '
                       'relative to the config, e.g. data.num_threads=2')
  labels, methods, seeds = (list(dict.fromkeys(x))
                             for x in (labels, methods, seeds))
  def planned(method: str, spec: str) -> bool:
    listed = (kind_methods is None
              or method in kind_methods.get(labels_kind(spec), ()))
    return method != FULL and listed and applies(method, spec)

  cells = []
  for spec in labels:
    cells += [Cell(spec, m, variant) for m in methods if planned(m, spec)]
  full_labels, full_method = dataset.full_config_args(labels[0])
  if FULL in methods:
    cells.append(Cell(full_labels, FULL, variant))
  if not cells:
    raise ValueError(f'--methods {",".join(methods)}: none is for the label '
                     f'kinds of --labels {",".join(labels)} (KIND_METHODS, '
                     'METHOD_LABEL_KINDS in benchmarks/study/grid.py)')
  runs = []
  for seed in seeds:
    for cell in cells:
      workdir = os.path.join(root, f'{cell.name}_seed{seed}')
      method = full_method if cell.method == FULL else cell.method
      config_arg = (f'{dataset.config_file}:labels={cell.labels},'
                    f'method={method},size={size},lseed={lseed}')
      argv = [python, 'main.py', f'--config={config_arg}',
              f'--workdir={workdir}', f'--config.seed={seed}']
      if steps > 0:
        argv.append(f'--config.num_train_steps={steps}')
      argv += [f'--config.{override}' for override in overrides]
      runs.append(Run(cell, int(seed), workdir, tuple(argv)))
  return runs


@dataclasses.dataclass(frozen=True)
class StudyPreset:
  """A named grid: what `--preset=NAME` plans.

  `core_methods` on the first labels spec run first on a device (the cells
  the issue's "done when" needs), `dtype_check` names the method of one extra
  run (first labels spec, first seed) in bfloat16 beside its float32 twin,
  `compilation_cache_dir` (relative to the repository) is JAX's persistent
  compilation cache of the runs; `dataset` names the dataset
  (datasets.DATASETS), `kind_methods` the methods of each label kind
  (plan_runs; None: every method on every kind it applies to).
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
  dataset: str = CAMVID.name
  kind_methods: Mapping[str, tuple[str, ...]] | None = None


# The MSRC preset's methods per label kind: the best of each kind (the
# 200-step CamVid winner pce_ncut on clicks; the CRF and self-labeling
# losses on scribbles; on boxes BoxInst's projection term and the boxes as
# labels with the smaller box in front (box_fill) as well, since the box
# terms alone label an object's box with the class of the larger box around
# it, docs/results_msrc.md; and the CAM stages restricted to the boxes)
# beside pCE.
MSRC_KIND_METHODS = {
    BOX_KIND: ('box_pce_gatedcrf', 'box_pce', 'boxinst', 'box_fill') + TAG_METHODS,
    'points': ('pce_only', 'pce_ncut'),
    'clicks': ('pce_only', 'pce_ncut'),
    'scribbles': ('pce_only', 'pce_densecrf', 'soft_self_labeling'),
    TAGS_KIND: TAG_METHODS,
}
MSRC_METHODS = tuple(dict.fromkeys(
    m for methods in MSRC_KIND_METHODS.values() for m in methods)) + (FULL,)

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
    # MSRC-v2 (issue 31's evidence): per label kind the best method of that
    # kind, beside pCE where it applies, and dense labels; size=cpu: 276 // 8
    # = 34 steps an epoch, 40 epochs (1360 steps), val every 5 epochs (170
    # steps). Records under docs/results/records/msrc/.
    'msrc': StudyPreset(
        labels=('boxes', 'clicks:20', 'scribbles', TAGS_KIND),
        methods=MSRC_METHODS, seeds=(0, 1), size='cpu', root='runs/msrc',
        overrides=('eval_every_steps=170', 'data.num_threads=2'),
        core_methods=('box_pce_gatedcrf', 'box_pce', FULL),
        dataset=MSRC.name, kind_methods=MSRC_KIND_METHODS),
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
                     root=root or preset.root, python=python,
                     dataset=DATASETS[preset.dataset])
  all_overrides = list(preset.overrides) + list(overrides)
  runs = plan_runs(labels, methods or preset.methods, seeds,
                   overrides=all_overrides, kind_methods=preset.kind_methods,
                   **common_args)
  if preset.dtype_check:
    runs += plan_runs(labels[:1], [preset.dtype_check], seeds[:1],
                      overrides=all_overrides + [DTYPE_CHECK_OVERRIDE],
                      variant=DTYPE_CHECK_VARIANT, **common_args)
  return runs


def config_overrides(run: Run) -> list[str]:
  """The `KEY=VALUE` config overrides of `run`'s command (seed excluded)."""
  prefix = '--config.'
  return [a[len(prefix):] for a in run.argv
          if a.startswith(prefix) and not a.startswith(prefix + 'seed=')]


def common_args_of(run: Run) -> dict[str, str]:
  """The `key=value` arguments of `run`'s config file argument."""
  arguments = run.config_arg.split(':', 1)[1]
  return dict(item.split('=', 1) for item in arguments.split(','))


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


def dataset_of(run: Run) -> StudyDataset | None:
  """The dataset whose config file `run`'s command trains (None: a command
  of another config file)."""
  return dataset_of_config(run.config_arg.split(':', 1)[0])


def run_config(run: Run, overrides: Sequence[str] = ()) -> Any:
  """The ConfigDict that `run`'s command trains (for data preparation).

  Raises:
    ValueError: the config refuses the command's arguments (MSRC's
      labels=tags until the CAM stages land), or a bad override.
  """
  dataset = dataset_of(run)
  if dataset is None:
    raise ValueError(f'{run.config_arg}: not the config file of a study '
                     f'dataset ({", ".join(DATASETS)})')
  # The config imports JAX, which --plan does not need before this.
  config = dataset.get_config(run.config_arg.split(':', 1)[1])
  config.seed = run.seed
  _apply_overrides(config, overrides)
  return config


def config_error(run: Run) -> str:
  """Why `run`'s config cannot be built today ('' when it can): a grid
  accepts the cells of a method still to land and runs them later."""
  try:
    run_config(run, config_overrides(run))
  except ValueError as e:
    return str(e)
  return ''
