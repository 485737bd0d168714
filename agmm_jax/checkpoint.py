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
"""

import os
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp

LATEST_DIR = 'checkpoints'
BEST_DIR = 'checkpoints_best'
STATE_ITEM = 'state'
DATA_ITEM = 'data'
BEST_METRIC = 'miou'


def abstract_like(tree: Any) -> Any:
  """Shape/dtype/sharding placeholders of ``tree`` (the restore target)."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      tree)


class Checkpointer:
  """Latest-N and best-by-mIoU checkpoint managers of one work directory."""

  def __init__(self, workdir: str, *, keep: int = 3,
               read_only: bool = False):
    if keep < 1:
      raise ValueError(f'config.keep_checkpoints must be >= 1, got {keep}')
    workdir = os.path.abspath(workdir)
    self._latest = ocp.CheckpointManager(
        os.path.join(workdir, LATEST_DIR),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, read_only=read_only),
        item_handlers={
            STATE_ITEM: ocp.StandardCheckpointHandler(),
            DATA_ITEM: grain.checkpoint.CheckpointHandler(),
        })
    self._best = ocp.CheckpointManager(
        os.path.join(workdir, BEST_DIR),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda metrics: metrics[BEST_METRIC],
            best_mode='max', create=not read_only, read_only=read_only),
        item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler()})
    # The mIoU of the best checkpoint this process saved: Orbax records a
    # step's metrics only when its asynchronous save finalizes, so reading
    # them back right after a save can find none.
    self._saved_best_miou: Optional[float] = None

  def latest_step(self) -> Optional[int]:
    """Step of the newest checkpoint under ``checkpoints/`` (None if none)."""
    return self._latest.latest_step()

  def best_step(self) -> Optional[int]:
    """Step of the best-mIoU checkpoint (None if no evaluation was saved)."""
    return self._best.best_step()

  def best_miou(self) -> Optional[float]:
    """mIoU of the best checkpoint (None if none)."""
    if self._saved_best_miou is not None:
      return self._saved_best_miou
    step = self._best.best_step()
    if step is None:
      return None
    return float(self._best.metrics(step)[BEST_METRIC])

  def save(self, step: int, state: Any, data_iterator: Any) -> bool:
    """Saves ``state`` and the iterator state as step ``step``.

    Returns False (and saves nothing) when that step is already saved.
    """
    if step in self._latest.all_steps():
      return False
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
    saved = self._best.save(
        step,
        args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state)}),
        metrics={BEST_METRIC: float(miou)}, force=True)
    if saved:
      self._saved_best_miou = float(miou)
    return saved

  def restore_latest(self, abstract_state: Any,
                     data_iterator: Any = None) -> tuple[Any, int]:
    """Restores the newest checkpoint into ``abstract_state``'s structure.

    When ``data_iterator`` is given its position is restored in place too.

    Raises:
      FileNotFoundError: when there is no checkpoint.
    """
    step = self._latest.latest_step()
    if step is None:
      raise FileNotFoundError(
          f'no checkpoint in {self._latest.directory}')
    items = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items[DATA_ITEM] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._latest.restore(step, args=ocp.args.Composite(**items))
    return restored[STATE_ITEM], step

  def restore_best(self, abstract_state: Any) -> tuple[Any, int]:
    """Restores the best-mIoU checkpoint.

    Raises:
      FileNotFoundError: when no evaluated checkpoint was saved.
    """
    step = self._best.best_step()
    if step is None:
      raise FileNotFoundError(f'no best checkpoint in {self._best.directory}')
    restored = self._best.restore(
        step, args=ocp.args.Composite(
            **{STATE_ITEM: ocp.args.StandardRestore(abstract_state)}))
    return restored[STATE_ITEM], step

  def wait_until_finished(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._latest.wait_until_finished()
    self._best.wait_until_finished()

  def close(self) -> None:
    self._latest.close()
    self._best.close()
