"""Two JAX processes on localhost train like one process.

Two worker processes (one CPU device each, connected with
``jax.distributed.initialize`` on a free 127.0.0.1 port; CPU collectives over
gloo) each feed their half of the global batch to the same jitted train step
(``tests/runtime/test_sharding.py`` holds the worker). The loss and every updated
parameter and BatchNorm statistic must equal one process's step with two
(fake) devices on the whole batch: the same per-device program and the same
two-term sums, so equal to rounding (they were bitwise equal on a Zen 3 EPYC).
One device against several is test_sharding's comparison; against two
processes it differed by up to 3.8e-3 of a BatchNorm bias's largest value
on that machine, as two devices in one process do: the rounding of each
device's batch shape, not the processes.
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.runtime import test_sharding


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def results(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('multiprocess')
  coordinator = f'127.0.0.1:{free_port()}'
  reference_path = str(tmp / 'two_devices.npz')
  two_process_path = str(tmp / 'two_processes.npz')
  processes = [test_sharding.spawn_worker(reference_path, 2)] + [
      test_sharding.spawn_worker(two_process_path, 1,
                                 (coordinator, '2', str(process_id)))
      for process_id in (0, 1)]
  for process in processes:
    test_sharding.finish(process)
  return dict(np.load(reference_path)), dict(np.load(two_process_path))


def test_two_processes_match_one(results):
  reference, two_processes = results
  assert int(reference['num_devices']) == 2
  assert int(two_processes['num_devices']) == 2
  test_sharding.assert_same_step(two_processes, reference, tolerance=1e-6)


def test_data_preparation_failure_on_process_0_stops_every_process(tmp_path):
  """Process 0 prepares the data; when that fails, the other process must
  exit with a one-line error too instead of waiting at a barrier until the
  coordination service times out."""
  coordinator = f'127.0.0.1:{free_port()}'
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1')
  processes = [subprocess.Popen(
      [sys.executable, 'main.py', '--config=configs/tiny.py', f'--workdir={tmp_path}/run',
       '--config.data.prepare.converter=folder',
       f'--config.data.prepare.root={tmp_path}/no_such_dataset',
       f'--config.data.dir={tmp_path}/prepared',
       f'--coordinator_address={coordinator}', '--num_processes=2',
       f'--process_id={process_id}'],
      cwd=test_sharding.REPO_ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for process_id in (0, 1)]
  last_lines = []
  for process in processes:
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 1, stderr[-2000:]
    last_lines.append(stderr.strip().splitlines()[-1])
  assert 'no_such_dataset' in last_lines[0], last_lines
  assert 'failed on process 0' in last_lines[1], last_lines
  assert not os.path.exists(tmp_path / 'prepared')
