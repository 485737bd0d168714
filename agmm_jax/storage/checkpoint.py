"""Orbax checkpoints of the train state and the input iterator.

Layout under the work directory:

* ``checkpoints/<step>/state``: the train state pytree (parameters, BatchNorm
  statistics and dropout RNG state, optimizer state, step), ``data``: the Grain
  train iterator state (one JSON file per process). The latest
  ``config.keep_checkpoints`` steps are kept; resuming restores both items so a
  resumed run sees exactly the batches an uninterrupted run would.
* ``checkpoints_best/<step>/state``: the state with the best evaluation mIoU
  (one step kept, chosen by Orbax from the saved metrics).

Saves are asynchronous (the arrays are copied to host memory before ``save``
returns, so donating the state to the next train step is safe); call
``wait_until_finished`` before exiting.

Faults (docs/reliability.md): Orbax writes each step into
``<step>.orbax-checkpoint-tmp`` and renames it when complete, so a killed save
leaves no step behind (the leftover temporary folder is removed when the next
run opens the work directory). A newest step that exists but cannot be read
(truncated or deleted files) is moved to ``checkpoints_unreadable/`` with a
one-line warning and the previous readable step is restored instead. A
write that fails (disk full, permissions; in the background thread of an
asynchronous save, so it surfaces at the next save or wait) raises
``SaveError`` naming the last complete step, which stays intact.
"""

import contextlib
import logging as py_logging
import os
import re
import sys
import traceback
from typing import Any, Iterator, Optional
import warnings

from absl import logging
import grain
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

LATEST_DIR = 'checkpoints'
BEST_DIR = 'checkpoints_best'
UNREADABLE_DIR = 'checkpoints_unreadable'
STATE_ITEM = 'state'
DATA_ITEM = 'data'
BEST_METRIC = 'miou'
# What marks a file of Orbax's package in a path.
_ORBAX_DIR = f'{os.sep}orbax{os.sep}'
# An absl status code, as TensorStore's errors begin.
_TENSORSTORE_STATUS = re.compile(r'[A-Z][A-Z_]+: ')
# The RuntimeWarning of Orbax's shard-read coroutine when a failed restore
# leaves it unstarted (its loop closed first; see _is_failed_restore_leftover).
_UNSTARTED_READ_WARNING = (
    "coroutine '_read_array_index_and_device_put' was never awaited")


class SaveError(OSError):
  """Writing a checkpoint failed; the earlier complete steps are intact."""


class UnreadableCheckpoint(ValueError):
  """A checkpoint does not restore (damaged files, or another model's)."""


def _first_line(error: BaseException) -> str:
  """The first line of ``error``'s message (Orbax's can run to 100s)."""
  line = (str(error).strip().splitlines() or [type(error).__name__])[0]
  # TensorStore appends a dump of its spec to the reason.
  return line.split(' See full TensorStore details')[0][:300]


def _is_failed_restore_leftover(unraisable: Any) -> bool:
  """True for the "unraisable" errors a failed Orbax restore leaves behind.

  When a restore fails, Orbax closes its event loop while TensorStore reads
  are still in flight: each one completing later raises
  ``RuntimeError('Event loop is closed')`` in a callback, and read coroutines
  never awaited raise the read error again when collected. Python prints each
  as a traceback (dozens, up to a second later); the restore's own error is
  already handled.
  """
  error, source = unraisable.exc_value, unraisable.object
  if isinstance(error, RuntimeError) and str(error) == 'Event loop is closed':
    return True
  code = getattr(source, 'cr_code', None)
  return code is not None and _ORBAX_DIR in code.co_filename


def _raised_in_orbax(error: Optional[BaseException]) -> bool:
  """True when a frame of ``error``'s traceback is in Orbax's code."""
  return error is not None and any(
      _ORBAX_DIR in frame.filename
      for frame in traceback.extract_tb(error.__traceback__))


def _set_by_tensorstore(error: Optional[BaseException]) -> bool:
  """True for a TensorStore read error handed to an asyncio future: set from
  native code, so never raised in Python (no traceback), and worded as a
  status (``OUT_OF_RANGE: Error reading ...``)."""
  return (error is not None and error.__traceback__ is None
          and _TENSORSTORE_STATUS.match(str(error)) is not None)


class _FailedRestoreTasks(py_logging.Filter):
  """Drops asyncio's "<Task, _GatheringFuture or Future> exception was never
  retrieved" records of Orbax's reads (the third form the leftovers of a
  failed restore take): the record names Orbax's coroutine (a task), its
  exception was raised in Orbax's code (a gather of those tasks) or
  TensorStore set it (a read's own future; these can be collected, and
  logged, at exit, after the error line)."""

  def filter(self, record) -> bool:
    message = record.getMessage()
    if 'exception was never retrieved' not in message.split('\n', 1)[0]:
      return True
    error = record.exc_info[1] if record.exc_info else None
    return not (_ORBAX_DIR in message or _raised_in_orbax(error)
                or _set_by_tensorstore(error))


def _ignore_failed_restore_leftovers() -> None:
  """Keeps those leftovers off stderr from now on (called before every
  restore); any other unraisable error goes to the previous hook.

  The fourth form is a warning, not an error: Orbax's shard reads that the
  closed loop never started warn "coroutine ... was never awaited" when
  collected, at any later point of the run. Its filter is set again on every
  call: ``warnings.catch_warnings`` blocks (pytest's, per test) drop filters
  added inside them, and setting an existing filter does not duplicate it.
  """
  warnings.filterwarnings('ignore', message=re.escape(_UNSTARTED_READ_WARNING),
                          category=RuntimeWarning)
  previous = sys.unraisablehook
  if getattr(previous, 'ignores_failed_restore_leftovers', False):
    return
  py_logging.getLogger('asyncio').addFilter(_FailedRestoreTasks())

  def hook(unraisable):
    if not _is_failed_restore_leftover(unraisable):
      previous(unraisable)
  hook.ignores_failed_restore_leftovers = True
  sys.unraisablehook = hook


def abstract_like(tree: Any) -> Any:
  """Shape/dtype/sharding placeholders of ``tree`` (the restore target)."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      tree)


class Checkpointer:
  """Latest-N and best-by-mIoU checkpoint managers of one work directory."""

  def __init__(self, workdir: str, *, keep: int = 3, keep_period: int = 0,
               read_only: bool = False):
    """``keep`` latest steps, and every step that is a multiple of
    ``keep_period`` (0: none)."""
    if keep < 1:
      raise ValueError(f'config.keep_checkpoints must be >= 1, got {keep}')
    workdir = os.path.abspath(workdir)
    self._workdir = workdir
    self._read_only = read_only
    # A failed save leaves the same leftovers as a failed restore (dozens of
    # "Event loop is closed" tracebacks after a full disk).
    _ignore_failed_restore_leftovers()
    # cleanup_tmp_directories: the temporary folders of saves a killed run
    # left unfinished are deleted when a run opens the work directory.
    self._latest = ocp.CheckpointManager(
        os.path.join(workdir, LATEST_DIR),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, keep_period=keep_period or None,
            create=not read_only, read_only=read_only,
            cleanup_tmp_directories=not read_only),
        item_handlers={
            STATE_ITEM: ocp.StandardCheckpointHandler(),
            DATA_ITEM: grain.checkpoint.CheckpointHandler(),
        })
    self._best = ocp.CheckpointManager(
        os.path.join(workdir, BEST_DIR),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda metrics: metrics[BEST_METRIC],
            best_mode='max', create=not read_only, read_only=read_only,
            cleanup_tmp_directories=not read_only),
        item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler()})
    # The mIoU of the best checkpoint this process saved: Orbax records a
    # step's metrics only when its asynchronous save finalizes, so reading
    # them back right after a save can find none.
    self._saved_best_miou: Optional[float] = None

  @contextlib.contextmanager
  def _reporting_failed_writes(self) -> Iterator[None]:
    """Turns a failed checkpoint write into one ``SaveError`` line."""
    try:
      yield
    except SaveError:
      raise
    except (OSError, ValueError) as error:
      # Orbax drops a failed step from its list; reread the folder to name
      # the newest complete one.
      self._latest.reload()
      last = self._latest.latest_step()
      kept = (f'the last complete checkpoint, step {last}, is intact: fix the '
              'cause (e.g. free disk space) and rerun the same command to '
              'resume' if last is not None else
              'there is no complete checkpoint yet: fix the cause (e.g. free '
              'disk space) and rerun the same command (it starts from step 0)')
      raise SaveError(f'writing a checkpoint in {self._workdir} failed: '
                      f'{_first_line(error)}; {kept}') from error

  @property
  def latest_dir(self) -> str:
    """The folder of the latest-N checkpoints (``WORKDIR/checkpoints``)."""
    return os.path.join(self._workdir, LATEST_DIR)

  def latest_step(self) -> Optional[int]:
    """Step of the newest checkpoint under ``checkpoints/`` (None if none)."""
    return self._latest.latest_step()

  def all_steps(self) -> list[int]:
    """Steps of the checkpoints under ``checkpoints/``, oldest first."""
    return sorted(self._latest.all_steps())

  def restore_step(self, abstract_state: Any, step: int) -> Any:
    """The state of checkpoint ``step`` (one of :meth:`all_steps`)."""
    return self._latest.restore(step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardRestore(abstract_state)}))[STATE_ITEM]

  def best_step(self) -> Optional[int]:
    """Step of the best-mIoU checkpoint (None if no evaluation was saved)."""
    return self._best.best_step()

  def best_miou(self) -> Optional[float]:
    """mIoU of the best checkpoint (None if none)."""
    if self._saved_best_miou is not None:
      return self._saved_best_miou
    step = self._best.best_step()
    metrics = self._best.metrics(step) if step is not None else None
    if not metrics or BEST_METRIC not in metrics:
      return None  # No best checkpoint, or one without its metrics file.
    return float(metrics[BEST_METRIC])

  def save(self, step: int, state: Any, data_iterator: Any) -> bool:
    """Saves ``state`` and the iterator state as step ``step``.

    Returns False (and saves nothing) when that step is already saved.
    """
    if step in self._latest.all_steps():
      return False
    # A best save of this step still in flight finalizes first: otherwise a
    # kill could leave the latest step on disk without its best checkpoint,
    # and the resumed run would never evaluate (nor offer) that step again.
    with self._reporting_failed_writes():
      self._best.wait_until_finished()
      return self._latest.save(
          step,
          args=ocp.args.Composite(**{
              STATE_ITEM: ocp.args.StandardSave(state),
              DATA_ITEM: grain.checkpoint.CheckpointSave(data_iterator),
          }),
          force=True)

  def save_best(self, step: int, state: Any, miou: float) -> bool:
    """Offers ``state`` with its mIoU; kept only if it is the best so far."""
    best = self.best_miou()
    if step in self._best.all_steps() or (best is not None and miou <= best):
      return False
    with self._reporting_failed_writes():
      saved = self._best.save(
          step,
          args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state)}),
          metrics={BEST_METRIC: float(miou)}, force=True)
    if saved:
      self._saved_best_miou = float(miou)
    return saved

  def restore_latest(self, abstract_state: Any,
                     data_iterator: Any = None) -> tuple[Any, int]:
    """Restores the newest readable checkpoint into ``abstract_state``.

    When ``data_iterator`` is given its position is restored in place too.
    Steps are tried newest first. A step that fails to restore while an older
    one succeeds is unreadable (truncated or deleted files): a one-line
    warning names it, and unless read-only it is moved to
    ``WORKDIR/checkpoints_unreadable/`` so that the resumed run saves that step
    afresh. When no step restores (say, a checkpoint of another model)
    nothing is moved.

    Raises:
      FileNotFoundError: when there is no checkpoint.
      UnreadableCheckpoint: when no step restores (one line naming the newest
        step's folder and the newest's error, offering the best checkpoint
        when read-only).
    """
    steps = sorted(self._latest.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(
          f'no checkpoint in {self._latest.directory}')
    items = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items[DATA_ITEM] = grain.checkpoint.CheckpointRestore(data_iterator)
    unreadable: list[tuple[int, Exception]] = []
    # Before, not after, a failure: under load Orbax's leftover reads can
    # fire while the failed restore is still unwinding.
    _ignore_failed_restore_leftovers()
    for step in steps:
      try:
        restored = self._latest.restore(step,
                                        args=ocp.args.Composite(**items))
      except Exception as error:  # pylint: disable=broad-exception-caught
        # Which errors mean "damaged" depends on the file and the storage
        # layer (ValueError from TensorStore, FileNotFoundError, JSON
        # errors); an older step that restores tells damage from mismatch.
        unreadable.append((step, error))
        continue
      for bad_step, error in unreadable:
        self._set_aside(bad_step, error, step)
      return restored[STATE_ITEM], step
    raise self._none_restores(unreadable)

  def _none_restores(self, unreadable: list[tuple[int, Exception]]
                     ) -> UnreadableCheckpoint:
    """The one-line error when no step of ``checkpoints/`` restores."""
    newest, error = unreadable[0]
    older = [str(step) for step, _ in unreadable[1:]]
    older = f' (nor do the older steps {", ".join(older)})' if older else ''
    if self._read_only:
      best = self.best_step()
      other = (f'--config.eval.checkpoint=best uses the best one, step {best}'
               if best is not None else 'there is no best checkpoint either')
    else:
      other = (f'set {self.latest_dir} aside to train from step 0, or use a '
               'new --workdir')
    return UnreadableCheckpoint(
        f'checkpoint {newest} ({os.path.join(self.latest_dir, str(newest))}) '
        f'does not restore{older}: {_first_line(error)}; its files are '
        f'damaged or it holds another model: {other}')

  def _set_aside(self, step: int, error: Exception, fallback: int) -> None:
    """Warns that ``step`` is unreadable; moves it out of ``checkpoints/``."""
    reason = _first_line(error)
    if self._read_only:
      logging.warning('checkpoint %d in %s is unreadable (%s); using step %d',
                      step, self._latest.directory, reason, fallback)
      return
    target = os.path.join(self._workdir, UNREADABLE_DIR, str(step))
    if jax.process_index() == 0:
      suffix = 1
      while os.path.exists(target):
        target = os.path.join(self._workdir, UNREADABLE_DIR, f'{step}.{suffix}')
        suffix += 1
      os.makedirs(os.path.dirname(target), exist_ok=True)
      os.rename(os.path.join(str(self._latest.directory), str(step)), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'checkpoint_set_aside_{step}')
    self._latest.reload()
    logging.warning('checkpoint %d is unreadable (%s); moved to %s, resuming '
                    'from step %d', step, reason, target, fallback)

  def restore_best(self, abstract_state: Any) -> tuple[Any, int]:
    """Restores the best-mIoU checkpoint.

    Raises:
      FileNotFoundError: when no evaluated checkpoint was saved.
      UnreadableCheckpoint: when it does not restore (one line naming its
        folder and offering the latest checkpoint).
    """
    step = self._best.best_step()
    if step is None:
      raise FileNotFoundError(f'no best checkpoint in {self._best.directory}')
    _ignore_failed_restore_leftovers()  # As in restore_latest.
    try:
      restored = self._best.restore(
          step, args=ocp.args.Composite(
              **{STATE_ITEM: ocp.args.StandardRestore(abstract_state)}))
    except Exception as error:  # pylint: disable=broad-exception-caught
      latest = self.latest_step()
      other = (f'--config.eval.checkpoint=latest uses the latest one, step '
               f'{latest}' if latest is not None else
               'there is no latest checkpoint either')
      raise UnreadableCheckpoint(
          f'the best checkpoint, step {step} '
          f'({os.path.join(str(self._best.directory), str(step))}), does not '
          f'restore: {_first_line(error)}; its files are damaged or it holds '
          f'another model: {other}') from None
    return restored[STATE_ITEM], step

  def wait_until_finished(self) -> None:
    """Blocks until pending asynchronous saves are on disk.

    Raises:
      SaveError: when one of them failed.
    """
    with self._reporting_failed_writes():
      self._latest.wait_until_finished()
      self._best.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves (as ``wait_until_finished``) and closes.

    Raises:
      SaveError: when a pending save failed.
    """
    with self._reporting_failed_writes():
      try:
        self._latest.close()
      finally:
        self._best.close()
