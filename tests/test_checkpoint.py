"""agmm_jax.checkpoint: the best-by-mIoU manager while saves are in flight."""

import jax.numpy as jnp

from agmm_jax import checkpoint


def test_save_best_compares_with_a_save_still_in_flight(tmp_path):
  checkpointer = checkpoint.Checkpointer(str(tmp_path))
  state = {'weights': jnp.arange(4.0)}
  assert checkpointer.save_best(2, state, 0.5)
  # Read back at once, before the asynchronous save has finalized.
  assert checkpointer.best_miou() == 0.5
  assert not checkpointer.save_best(4, state, 0.4)
  assert checkpointer.save_best(6, state, 0.7)
  assert checkpointer.best_miou() == 0.7
  checkpointer.wait_until_finished()
  assert checkpointer.best_step() == 6
  checkpointer.close()
  reopened = checkpoint.Checkpointer(str(tmp_path), read_only=True)
  assert reopened.best_step() == 6 and reopened.best_miou() == 0.7
  reopened.close()
