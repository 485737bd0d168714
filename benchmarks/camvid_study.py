r"""The label-supervision study (docs/results*.md): plan, run, report.

A study is a grid of cells (label spec x method) trained with
`configs/camvid_clicks.py` (or `configs/msrc.py`, `--dataset=msrc`) at several
seeds. Every run is one ordinary
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
with an `eval/miou` scalar, i.e. the final weights on the validation split); a
cell's score is the mean over its *finished* seeds with the sample standard
deviation (ddof=1) as the spread. A cell with fewer finished seeds than planned
is marked partial in the report; unfinished runs are listed with the step they
reached, never averaged.

Presets (`--preset=NAME` fills --labels, --methods, --seeds, --size and adds
overrides; explicit flags still win):

  # The GPU study: every method of the registry x clicks:20, scribbles x 2
  # seeds at 40 epochs, plus one bfloat16 check run; --plan prints the
  # predicted device time and splits the grid into device calls:
  python -m benchmarks.camvid_study --plan --preset=gpu
  # One device call (benchmarks/gpu_study.sh wraps this; docs/benchmarks.md):
  python -m benchmarks.camvid_study --run --preset=gpu --call=1 --deadline_s=500
  python -m benchmarks.camvid_study --pack=$OUT --preset=gpu --call=1
  # Back on this machine: docs/results.md from the folder(s) that came back:
  python -m benchmarks.camvid_study --report --preset=gpu --from=FOLDER
  # The CPU 40-epoch schedule across sessions (resumable; --status says
  # which runs are done, in progress (step reached) or not started):
  python -m benchmarks.camvid_study --run --preset=cpu40
  python -m benchmarks.camvid_study --status --preset=cpu40

MSRC-v2 (`--dataset=msrc`, configs/msrc.py: labels=boxes|tags|points:N|
clicks:N|scribbles, dense labels as the `full` cell; records under
docs/results/records/msrc/). Its preset trains, per label kind, the best
methods of that kind beside pCE (boxes: box_pce_gatedcrf, box_pce; clicks:
pce_only, pce_ncut; scribbles: pce_only, pce_densecrf, soft_self_labeling;
tags: the CAM pipeline, `cam`) and dense labels, 2 seeds at 40 epochs; the
report adds the pseudo-label quality of the runs that made a pass:

  python -m benchmarks.camvid_study --plan --preset=msrc
  python -m benchmarks.camvid_study --run --preset=msrc
  python -m benchmarks.camvid_study --report --preset=msrc  # docs/results_msrc.md
  # Plus each finished run with its images' classes given (recognition set
  # apart from localization: the tags runs' CAM is scored so):
  python -m benchmarks.camvid_study --report --preset=msrc --eval_given_classes

README's method table (between its method-table markers) and
docs/results_per_class.md, generated from every archived record (both
CamVid budgets and MSRC; benchmarks/study/method_table.py states the
"separates from pCE" rule):

  python -m benchmarks.camvid_study --readme_table

Issue 33's target diagnostic (is the target a loss builds, AGMM's G, TEL's,
APro's, soft self-labeling's, more accurate than the prediction it
supervises?): `--run --target_images=64` keeps it in each finished run's
record and the report tables it; `python -m benchmarks.study.targets
--workdirs=...` prints it for any workdir with a checkpoint.

The archive (`--archive`, default docs/results/records/): a session's runs/
does not outlive it, so `--run` writes each run it finishes (or finds
finished) as one JSON record there, to be committed; `--run` skips archived
runs, `--status` and `--report` read a run from its record when its workdir
is gone. Overlays, the G-vs-p diagnostic and `--eval_data_dir` need a
workdir's checkpoints and cover only runs still present; a qualitative grid
is redrawn only while every method's best seed has its workdir, otherwise
the grid of an earlier report stays.

Device time (GPU preset): runs are separate `main.py` processes sharing JAX's
persistent compilation cache (JAX_COMPILATION_CACHE_DIR in the children's
environment), not cells inside one Python process. A cell's seeds and its
other label type compile the same programs (labels change values, not shapes),
so they load them from the cache; different methods are different programs
either way, so one process would only save the per-run start-up and cache
load (seconds), while separate processes keep every run an ordinary,
resumable command (SIGTERM at a call's deadline checkpoints it; a crash or a
NaN in one cell does not end the call) and need no second training driver.
The cache folder is git-ignored, so it survives between calls while the
device machine stays warm.
"""

import os
import sys
from collections.abc import Sequence

from benchmarks.study import cli


def main(argv: Sequence[str] | None = None) -> int:
  """The study's command line (benchmarks/study/cli.py) with this usage text;
  `argv`: the flags (None: sys.argv). Returns the exit status."""
  return cli.main(argv, usage=__doc__)


if __name__ == '__main__':
  try:
    sys.exit(main())
  except BrokenPipeError:
    # `--plan | head` closed the pipe: stop quietly, as other command-line
    # tools do (Python's recipe: no traceback, nothing more flushed to it).
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(1)
