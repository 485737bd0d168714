"""The training loop of every training stage (``agmm_jax.train.stages``): steps,
logged means, evaluations, checkpoints, NaN checks and SIGTERM, written once
so that every stage follows one set of rules.

* Scalars of the steps are merged on the device (``clu.metrics`` collections)
  and written as their means over each logging period (``log_every``) and
  at the last step, with the progress rate and ETA.
* A NaN/inf loss or gradient norm (checked at every log step and before
  every save) or parameter (checked before every save) raises
  ``NonFiniteError``; nothing of the bad state is saved.
* Evaluation every ``eval_every`` steps and at the last one; the best
  evaluation's state is kept (``Checkpointer.save_best``).
* A checkpoint (state and data iterator) every ``checkpoint_every`` steps
  and at the last one.
* SIGTERM (``SigtermFlag``) saves after the current step and raises
  ``Preempted`` (``main.py`` exits with ``EXIT_PREEMPTED``); several
  processes agree on it at log steps (a collective), so they all save the
  same step. Rerunning resumes from the latest checkpoint.
"""

import contextlib
import dataclasses
import signal
from typing import Any, Callable

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from agmm_jax.evaluation import evaluator
from agmm_jax.storage import checkpoint as checkpoint_lib
from agmm_jax.runtime import sharding as sharding_lib
from agmm_jax.train import steps
from agmm_jax.storage import summary
from agmm_jax.train import state as train_state_lib

# Exit status of a run stopped by SIGTERM after saving its checkpoint
# (128 + SIGTERM, as a shell reports it): rerunning the command resumes.
EXIT_PREEMPTED = 128 + signal.SIGTERM


class NonFiniteError(RuntimeError):
  """A loss, gradient or parameter became NaN or infinite."""


class Preempted(Exception):
  """SIGTERM arrived; the state was saved at ``step``."""

  def __init__(self, step: int):
    super().__init__(f'stopped by SIGTERM after saving step {step}; rerun the '
                     'same command to resume')
    self.step = step


class SigtermFlag:
  """Sets a flag on SIGTERM (the loop saves at the next step and stops)."""

  def __init__(self):
    self.received = False
    self._previous = None

  def __enter__(self):
    def handler(signum, frame):
      del signum, frame
      self.received = True
    try:
      self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # Not the main thread: leave SIGTERM alone.
      self._previous = None
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def any_process(self) -> bool:
    """True when any process got SIGTERM (a collective if multi-process)."""
    if jax.process_count() == 1:
      return self.received
    flags = multihost_utils.process_allgather(np.asarray(self.received))
    return bool(np.any(flags))


@dataclasses.dataclass(frozen=True)
class Schedule:
  """When the loop logs, evaluates and saves, in steps of one stage
  (``run_spec.Periods.steps``)."""
  total_steps: int
  log_every: int
  eval_every: int
  checkpoint_every: int



@dataclasses.dataclass(frozen=True)
class Reporting:
  """Where a stage's records go.

  ``name``: prefix of its log lines and errors ('' for stage 1);
  ``scalar_prefix``: of its training scalars (``train``); ``step_offset``:
  added to its steps in the summaries and in ``Preempted`` (a second stage
  continues the first's step axis); ``class_names``: of its evaluation
  scalars.
  """
  name: str
  scalar_prefix: str
  step_offset: int
  class_names: list[str]


def run(state: train_state_lib.TrainState,
        train_step: Callable[[Any, dict[str, jax.Array]], tuple[Any, Any]],
        train_iter: Any, mesh: jax.sharding.Mesh, schedule: Schedule,
        checkpointer: checkpoint_lib.Checkpointer, writer: Any,
        evaluate: Callable[[Any], dict[str, Any]], sigterm: SigtermFlag,
        global_batch_size: int, reporting: Reporting,
        after_step: Callable[[int, Any, dict[str, np.ndarray], dict[str, jax.Array]],
                             None] | None = None) -> tuple[Any, dict[str, Any]]:
  """Trains ``state`` from its step to ``schedule.total_steps`` (module
  docstring); closes ``checkpointer`` (waiting for the saves in flight) and
  ``writer`` on the way out, whatever happened.

  ``evaluate(state)``: its scores on the eval split. ``after_step(step,
  state, local_batch, global_batch)``: called after every step (e.g. image
  summaries). Returns the final state and the last evaluation's scores
  (empty when there was no step left to train).

  Raises:
    NonFiniteError: a NaN/inf loss, gradient or parameter.
    checkpoint_lib.SaveError: a checkpoint could not be written.
    Preempted: SIGTERM arrived; the state of the step after it was saved.
  """
  step = int(train_state_lib.host(state['step']))
  total_steps = schedule.total_steps
  prefix = reporting.name
  offset = reporting.step_offset

  def save(at_step: int) -> None:
    if not bool(train_state_lib.host(train_state_lib.all_finite(state['params']))):
      raise NonFiniteError(f'{prefix}parameters are NaN/inf at step {at_step}; not '
                           f'saving (last good checkpoint: '
                           f'{checkpointer.latest_step()})')
    checkpointer.save(at_step, state, train_iter)

  def checked_means(since: int, metrics: Any) -> dict[str, float]:
    """Host means of the steps merged in ``metrics`` (steps after ``since``);
    raises if any of them had a non-finite loss or gradient."""
    means = {k: float(train_state_lib.host(v)) for k, v in metrics.compute().items()}
    if means['finite'] < 1.0:
      raise NonFiniteError(
          f'{prefix}loss {means["loss"]} / gradient norm {means["grad_norm"]} is not '
          f'finite in steps {since + 1}..{step}; stopping (last good '
          f'checkpoint: {checkpointer.latest_step()} in '
          f'{checkpointer.latest_dir})')
    return means

  def check_unchecked() -> None:
    """Raises for a non-finite step not yet checked; before every save."""
    nonlocal unchecked_start, unchecked_metrics
    if unchecked_metrics is not None:
      checked_means(unchecked_start, unchecked_metrics)
      unchecked_start, unchecked_metrics = step, None

  scores: dict[str, Any] = {}
  # The steps since the last log step, merged on the device (clu.metrics).
  period_start, period_metrics = step, None
  # Steps not yet checked for finiteness (a save happens only after a check).
  unchecked_start, unchecked_metrics = step, None
  # Called at log steps only, so every call reports (progress and ETA);
  # evaluation and checkpointing run paused and do not lower the rate.
  progress = summary.ReportProgress(total_steps, every_steps=1, every_secs=None,
                                    global_batch_size=global_batch_size)
  progress(step)
  with contextlib.ExitStack() as closing:
    closing.callback(writer.close)
    # Closed first: waits for the saves in flight and raises
    # checkpoint_lib.SaveError if one failed (the earlier ones are intact).
    closing.callback(checkpointer.close)
    while step < total_steps:
      local_batch = next(train_iter)
      batch = sharding_lib.global_batch(local_batch, mesh)
      state, step_metrics = train_step(state, batch)
      step += 1
      period_metrics = steps.merge(period_metrics, step_metrics)
      unchecked_metrics = steps.merge(unchecked_metrics, step_metrics)

      is_last = step == total_steps
      if step % schedule.log_every == 0 or is_last:
        means = checked_means(period_start, period_metrics)
        period_start, period_metrics = step, None
        unchecked_start, unchecked_metrics = step, None
        del means['finite']
        means['images_per_second'] = progress(step)['images_per_sec']
        writer.write_scalars(offset + step, {f'{reporting.scalar_prefix}/{k}': v
                                             for k, v in means.items()})
        logging.info('%sstep %d/%d: %s', prefix, step, total_steps,
                     ', '.join(f'{k}={v:.4g}' for k, v in means.items()))

      if after_step is not None:
        after_step(step, state, local_batch, batch)

      if step % schedule.eval_every == 0 or is_last:
        with progress.paused():
          check_unchecked()
          scores = evaluate(state)
          writer.write_scalars(offset + step,
                               evaluator.eval_scalars(scores, reporting.class_names))
          logging.info('%sstep %d: eval mIoU %.2f%%, pixel accuracy %.2f%%', prefix,
                       step, 100 * scores['miou'], 100 * scores['pixel_accuracy'])
          if np.isfinite(scores['miou']):
            checkpointer.save_best(step, state, scores['miou'])

      if step % schedule.checkpoint_every == 0 or is_last:
        with progress.paused():
          check_unchecked()
          save(step)

      if (sigterm.received if jax.process_count() == 1
          else step % schedule.log_every == 0):
        if sigterm.any_process():
          check_unchecked()
          save(step)
          raise Preempted(offset + step)
    writer.flush()
  return state, scores
