"""agmm_jax.storage.checkpoint: the best-by-mIoU manager while saves are in flight,
and the fallback past unreadable checkpoints."""

import asyncio
import errno
import gc
import importlib.util
import logging
import os
import shutil
import sys
import time
import warnings

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agmm_jax.storage import checkpoint
from tests import fixtures


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


# A saved state: NUM_ARRAYS arrays of ARRAY_SIZE floats (38 MB, like 16
# 3x3x256x256 kernels), enough that TensorStore reads are still in flight when
# a restore of a damaged step fails (smaller states fail before that).
NUM_ARRAYS = 16
ARRAY_SIZE = 3 * 3 * 256 * 256


def _weights(step: int) -> list[jax.Array]:
  return [step * jnp.arange(float(ARRAY_SIZE)) + i for i in range(NUM_ARRAYS)]


def _saved_steps(workdir: str, steps: tuple[int, ...]) -> dict[int, tuple]:
  """Saves step ``s`` as ``_weights(s)`` with the iterator ``s`` elements in;
  returns ``{step: (stacked weights, next element)}``."""
  checkpointer = checkpoint.Checkpointer(workdir, keep=len(steps))
  iterator = iter(grain.MapDataset.range(100).to_iter_dataset())
  expected = {}
  for step in steps:
    while next(iterator) < step - 1:
      pass
    weights = _weights(step)
    checkpointer.save(step, {'weights': weights}, iterator)
    expected[step] = (np.stack(weights), step)
  checkpointer.wait_until_finished()
  checkpointer.close()
  return expected


def _restore(workdir: str, read_only: bool = False, size: int = ARRAY_SIZE):
  checkpointer = checkpoint.Checkpointer(workdir, read_only=read_only)
  iterator = iter(grain.MapDataset.range(100).to_iter_dataset())
  target = {'weights': [jax.ShapeDtypeStruct((size,), jnp.float32)] *
                        NUM_ARRAYS}
  try:
    state, step = checkpointer.restore_latest(target, iterator)
    return np.stack(state['weights']), step, next(iterator), checkpointer
  except Exception:
    checkpointer.close()
    raise


def test_restore_falls_back_past_unreadable_steps(tmp_path, caplog,
                                                  monkeypatch):
  workdir = str(tmp_path)
  expected = _saved_steps(workdir, (1, 2, 3))
  latest = tmp_path / 'checkpoints'
  fixtures.truncate_largest_file(str(latest / '3' / 'state'))
  os.remove(latest / '2' / 'data' / 'process_0-of-1.json')
  printed = []  # What Python would print as "Exception ignored in ...".
  monkeypatch.setattr(sys, 'unraisablehook', printed.append)

  with caplog.at_level(logging.WARNING):
    weights, step, next_element, checkpointer = _restore(workdir)
  # The failed restore's leftover reads finish within about a second.
  time.sleep(2)
  gc.collect()
  assert printed == []
  assert step == 1
  np.testing.assert_array_equal(weights, expected[1][0])
  assert next_element == expected[1][1]
  warnings = [r.getMessage() for r in caplog.records
              if 'unreadable' in r.getMessage()]
  assert [w.split()[1] for w in warnings] == ['3', '2']
  assert all('\n' not in w for w in warnings)
  # Set aside, not deleted: the resumed run saves those steps afresh.
  assert sorted(os.listdir(tmp_path / 'checkpoints_unreadable')) == ['2', '3']
  assert checkpointer.latest_step() == 1
  assert checkpointer.save(2, {'weights': _weights(0)},
                           iter(grain.MapDataset.range(3).to_iter_dataset()))
  checkpointer.wait_until_finished()
  checkpointer.close()


def _reader_module(root, package: str,
                   source: str = 'async def read():\n  raise ValueError("damaged chunk")\n'):
  """The module ``root/package/reader.py`` of ``source`` (by default a
  ``read`` coroutine that raises), loaded."""
  folder = root / package
  folder.mkdir()
  (folder / 'reader.py').write_text(source)
  spec = importlib.util.spec_from_file_location(
      f'{package}_reader', folder / 'reader.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _unretrieved_read_errors(reader) -> None:
  """Leaves a gather and a task of ``reader.read`` failed and unretrieved,
  as a failed restore leaves Orbax's reads, and collects them."""

  async def start_reads():
    # Referenced until they have failed, then dropped unretrieved.
    reads = (asyncio.gather(reader.read()),
             asyncio.ensure_future(reader.read()))
    await asyncio.sleep(0.01)
    del reads

  loop = asyncio.new_event_loop()
  loop.run_until_complete(start_reads())
  loop.close()
  gc.collect()


def _unretrieved_set_errors(*errors: Exception) -> None:
  """Leaves futures failed with ``errors`` (set, never raised, as
  TensorStore sets a read's error) unretrieved, and collects them."""
  loop = asyncio.new_event_loop()
  futures = [loop.create_future() for _ in errors]
  for future, error in zip(futures, errors):
    future.set_exception(error)
  del futures, future
  loop.close()
  gc.collect()


def test_unretrieved_read_errors_are_dropped_only_when_raised_in_orbax(
    tmp_path, caplog, monkeypatch):
  """The third form of a failed restore's leftovers: asyncio's "Task /
  _GatheringFuture exception was never retrieved" records, with a traceback,
  and "Future exception ..." records of TensorStore's errors (a status, no
  traceback); the same records of any other code still reach the log."""
  monkeypatch.setattr(sys, 'unraisablehook', lambda unraisable: None)
  monkeypatch.setattr(logging.getLogger('asyncio'), 'filters', [])
  checkpoint._ignore_failed_restore_leftovers()
  unretrieved = lambda: [r.getMessage().split('\n')[0] for r in caplog.records
                         if 'never retrieved' in r.getMessage()]

  with caplog.at_level(logging.ERROR):
    _unretrieved_read_errors(_reader_module(tmp_path, 'orbax'))
    _unretrieved_set_errors(ValueError(
        'OUT_OF_RANGE: Error reading "params.w/0.0" in OCDBT database at '
        'local file "/x/state/": Requested byte range [4, 9) is not valid'))
    assert unretrieved() == []
    _unretrieved_read_errors(_reader_module(tmp_path, 'elsewhere'))
    _unretrieved_set_errors(ValueError('damaged chunk'))
  assert sorted(unretrieved()) == [
      'Future exception was never retrieved',
      'Task exception was never retrieved',
      '_GatheringFuture exception was never retrieved']


def _unstarted_coroutine_warnings(module) -> list[str]:
  """The warnings of a coroutine of ``module``'s
  ``_read_array_index_and_device_put`` and of its ``read``, each created and
  dropped unstarted (as a failed restore leaves Orbax's shard
  reads), under the filters ``_ignore_failed_restore_leftovers`` sets."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    checkpoint._ignore_failed_restore_leftovers()
    for name in ('_read_array_index_and_device_put', 'read'):
      getattr(module, name)()  # Created, never awaited, dropped.
    gc.collect()
  return sorted(str(w.message) for w in caught
                if issubclass(w.category, RuntimeWarning))


def test_unstarted_orbax_reads_do_not_warn_and_other_coroutines_do(tmp_path):
  """The fourth form of a failed restore's leftovers: Orbax's unstarted
  shard reads warn "never awaited" when collected, at any later point of the
  run; that warning is dropped, the same warning of another coroutine is not."""
  # At a module's top level: the warning names the coroutine's qualified name.
  module = _reader_module(
      tmp_path, 'coroutines',
      'async def _read_array_index_and_device_put():\n  pass\n\n\n'
      'async def read():\n  pass\n')
  assert _unstarted_coroutine_warnings(module) == [
      "coroutine 'read' was never awaited"]


def test_read_only_restore_falls_back_and_moves_nothing(tmp_path):
  expected = _saved_steps(str(tmp_path), (1, 2))
  fixtures.truncate_largest_file(
      str(tmp_path / 'checkpoints' / '2' / 'state'))
  weights, step, _, checkpointer = _restore(str(tmp_path), read_only=True)
  checkpointer.close()
  assert step == 1
  np.testing.assert_array_equal(weights, expected[1][0])
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', '2']
  assert not os.path.exists(tmp_path / 'checkpoints_unreadable')


def test_restore_of_another_shape_raises_and_moves_nothing(tmp_path):
  """No step restores: a mismatch, not damage; every step stays in place."""
  _saved_steps(str(tmp_path), (1, 2))
  with pytest.raises(ValueError):
    _restore(str(tmp_path), size=10)
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', '2']
  assert not os.path.exists(tmp_path / 'checkpoints_unreadable')


def _full_disk(self, directory, *args, **kwargs):
  """A checkpoint writer that finds the disk full."""
  del self, args, kwargs
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))


def test_failed_write_raises_one_line_and_keeps_the_previous_step(
    tmp_path, monkeypatch):
  """ENOSPC from the writer of the iterator state, in Orbax's save thread."""
  expected = _saved_steps(str(tmp_path), (1,))
  handler_save = grain.checkpoint.CheckpointHandler.save

  monkeypatch.setattr(grain.checkpoint.CheckpointHandler, 'save', _full_disk)
  checkpointer = checkpoint.Checkpointer(str(tmp_path))
  iterator = iter(grain.MapDataset.range(100).to_iter_dataset())
  with pytest.raises(checkpoint.SaveError) as raised:
    checkpointer.save(2, {'weights': _weights(2)}, iterator)
    checkpointer.close()
  message = str(raised.value)
  assert '\n' not in message
  assert 'No space left on device' in message
  assert 'the last complete checkpoint, step 1, is intact' in message

  monkeypatch.setattr(grain.checkpoint.CheckpointHandler, 'save', handler_save)
  weights, step, next_element, checkpointer = _restore(str(tmp_path))
  checkpointer.close()
  assert step == 1 and next_element == expected[1][1]
  np.testing.assert_array_equal(weights, expected[1][0])


def _saved_best(workdir: str, step: int) -> None:
  checkpointer = checkpoint.Checkpointer(workdir)
  checkpointer.save_best(step, {'weights': _weights(step)}, 0.5)
  checkpointer.close()


def test_unreadable_best_is_one_line_naming_it_and_offering_latest(tmp_path):
  _saved_steps(str(tmp_path), (1, 2))
  _saved_best(str(tmp_path), 2)
  best = tmp_path / 'checkpoints_best' / '2'
  fixtures.truncate_largest_file(str(best / 'state'))
  checkpointer = checkpoint.Checkpointer(str(tmp_path), read_only=True)
  target = {'weights': [jax.ShapeDtypeStruct((ARRAY_SIZE,), jnp.float32)] *
                        NUM_ARRAYS}
  with pytest.raises(checkpoint.UnreadableCheckpoint) as raised:
    checkpointer.restore_best(target)
  checkpointer.close()
  message = str(raised.value)
  assert '\n' not in message
  assert message.startswith(f'the best checkpoint, step 2 ({best}), does not '
                            'restore: ')
  assert message.endswith('--config.eval.checkpoint=latest uses the latest '
                          'one, step 2')


def test_no_readable_latest_is_one_line_naming_it_and_offering_best(tmp_path):
  _saved_steps(str(tmp_path), (1, 2))
  _saved_best(str(tmp_path), 2)
  for step in ('1', '2'):
    os.remove(tmp_path / 'checkpoints' / step / 'data' / 'process_0-of-1.json')
  with pytest.raises(checkpoint.UnreadableCheckpoint) as raised:
    _restore(str(tmp_path), read_only=True)
  message = str(raised.value)
  assert '\n' not in message
  assert message.startswith(
      f'checkpoint 2 ({tmp_path / "checkpoints" / "2"}) does not restore (nor '
      'do the older steps 1): ')
  assert message.endswith('--config.eval.checkpoint=best uses the best one, '
                          'step 2')
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', '2']


def test_failed_first_write_says_there_is_no_complete_checkpoint(
    tmp_path, monkeypatch):
  monkeypatch.setattr(grain.checkpoint.CheckpointHandler, 'save', _full_disk)
  checkpointer = checkpoint.Checkpointer(str(tmp_path))
  iterator = iter(grain.MapDataset.range(100).to_iter_dataset())
  with pytest.raises(checkpoint.SaveError) as raised:
    checkpointer.save(1, {'weights': _weights(1)}, iterator)
    checkpointer.close()
  message = str(raised.value)
  assert '\n' not in message and 'None' not in message
  assert message.endswith('there is no complete checkpoint yet: fix the cause '
                          '(e.g. free disk space) and rerun the same command '
                          '(it starts from step 0)')


def test_best_without_its_metrics_has_no_miou(tmp_path):
  _saved_best(str(tmp_path), 2)
  shutil.rmtree(tmp_path / 'checkpoints_best' / '2' / 'metrics')
  checkpointer = checkpoint.Checkpointer(str(tmp_path), read_only=True)
  assert checkpointer.best_miou() is None
  checkpointer.close()


def test_keep_period_keeps_multiples_beside_the_latest_and_each_restores(tmp_path):
  """keep=1, keep_period=3 over steps 1..7: the multiples of 3 and the latest
  stay; restore_step gives each its own state."""
  workdir = str(tmp_path)
  checkpointer = checkpoint.Checkpointer(workdir, keep=1, keep_period=3)
  iterator = iter(grain.MapDataset.range(100).to_iter_dataset())
  for step in range(1, 8):
    checkpointer.save(step, {'w': jnp.full((4,), float(step))}, iterator)
    checkpointer.wait_until_finished()
  checkpointer.close()
  reopened = checkpoint.Checkpointer(workdir, keep=1, keep_period=3, read_only=True)
  try:
    assert reopened.all_steps() == [3, 6, 7]
    for step in reopened.all_steps():
      state = reopened.restore_step({'w': jax.ShapeDtypeStruct((4,), jnp.float32)}, step)
      np.testing.assert_array_equal(state['w'], np.full(4, float(step)))
  finally:
    reopened.close()
