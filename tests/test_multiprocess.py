"""Two JAX processes on localhost train like one process.

Two worker processes (one CPU device each, connected with
``jax.distributed.initialize`` on a free 127.0.0.1 port; CPU collectives over
gloo) each feed their half of the global batch to the same jitted train step
(``tests/test_sharding.py`` holds the worker). The loss and every updated
parameter and BatchNorm statistic must equal a single-process, single-device
step on the whole batch.
"""

import socket

import numpy as np
import pytest

from tests import test_sharding


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def results(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('multiprocess')
  coordinator = f'127.0.0.1:{free_port()}'
  reference_path = str(tmp / 'single.npz')
  two_process_path = str(tmp / 'two_processes.npz')
  processes = [test_sharding.spawn_worker(reference_path, 1)] + [
      test_sharding.spawn_worker(two_process_path, 1,
                                 (coordinator, '2', str(process_id)))
      for process_id in (0, 1)]
  for process in processes:
    test_sharding.finish(process)
  return dict(np.load(reference_path)), dict(np.load(two_process_path))


def test_two_processes_match_one(results):
  reference, two_processes = results
  assert int(reference['num_devices']) == 1
  assert int(two_processes['num_devices']) == 2
  test_sharding.assert_same_step(two_processes, reference)
