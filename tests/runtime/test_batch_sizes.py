"""Batch-size rules of agmm_jax.runtime.sharding (no devices needed)."""

import numpy as np
import pytest

from agmm_jax.runtime import sharding


class _FakeMesh:
  """Just the device count that the batch-size helpers read."""

  def __init__(self, num_devices: int):
    self.devices = np.empty((num_devices,), object)


@pytest.mark.parametrize('eval_batch, devices, expected',
                         [(2, 8, 8), (8, 8, 8), (9, 8, 16), (3, 1, 3)])
def test_eval_batch_rounds_up_to_whole_devices(eval_batch, devices, expected):
  assert sharding.eval_batch_size_per_process(
      eval_batch, _FakeMesh(devices)) == expected


def test_train_batch_must_divide_the_devices():
  with pytest.raises(ValueError, match=r'global_batch_size=6 .* 4 devices'):
    sharding.per_process_batch_size(6, _FakeMesh(4))
  with pytest.raises(ValueError, match='eval.batch_size=0'):
    sharding.eval_batch_size_per_process(0, _FakeMesh(4))
