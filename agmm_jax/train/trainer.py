"""The training run: ``train_and_evaluate(config, workdir)``.

Resolves the run once (``agmm_jax.train.run_spec``: mesh, batches, steps,
schedule, classes, loss, eval spec; every check the data can fail before
anything is built), records ``config.json``, ``classes.json`` and
``environment.json`` (``agmm_jax.storage.workdir``), then runs the run's stages in order
(``agmm_jax.train.stages``: the method's stage plan, or the one stage that
trains the loss), each in the loop of ``agmm_jax.train.loop`` (logged means,
periodic evaluation, checkpoints, NaN checks, SIGTERM: ``loop.NonFiniteError``,
``loop.Preempted``). Rerunning resumes the unfinished stage from its latest
checkpoint, data iterator included; a finished stage is not redone. Kills,
failed checkpoint writes and unreadable checkpoints: docs/reliability.md.
"""

import time
from typing import Any

import ml_collections

from agmm_jax.evaluation import evaluator
from agmm_jax.storage import workdir as workdir_lib
from agmm_jax.train import loop
from agmm_jax.train import run_spec as run_spec_lib
from agmm_jax.train import stages as stages_lib


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains with periodic evaluation and checkpoints; resumes from ``workdir``.

  Returns the final evaluation scores (``miou``, ``per_class_iou``,
  ``pixel_accuracy``, ...) plus ``step`` (on the run's axis: after the
  steps of every stage before the last).

  Raises:
    FileNotFoundError / ValueError: bad data folder or config.
    loop.NonFiniteError: a NaN/inf loss, gradient or parameter (the last good
      checkpoint is kept; the bad state is never saved).
    checkpoint_lib.SaveError: a checkpoint could not be written (disk full);
      the last complete one is intact.
    loop.Preempted: SIGTERM arrived (at any time after the start); the state of the
      next step was saved first.
  """
  with loop.SigtermFlag() as sigterm:
    spec = run_spec_lib.resolve(config, workdir)
    # Everything the data can contradict is checked before the first step.
    workdir_lib.check_classes(spec.workdir, list(spec.class_names), config.data.dir)
    stages = stages_lib.plan(spec)
    workdir_lib.write_config(config, spec.workdir)
    workdir_lib.record_environment(
        spec.workdir, time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()),
        [stage.folder for stage in stages])
    workdir_lib.record_classes(spec.workdir, list(spec.class_names))
    scores = stages_lib.run(stages, spec, sigterm)
  evaluator.print_scores(spec.eval, scores['step'], scores)
  return scores
