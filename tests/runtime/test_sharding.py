"""One train step on 8 (fake CPU) devices equals the step on 1 device.

Each configuration runs in a subprocess (``XLA_FLAGS`` must be set before JAX
starts), builds the tiny model of ``configs/tiny.py``, runs ``train.
make_train_step`` once on the same deterministic global batch and writes the
loss terms and all parameters and BatchNorm statistics to an ``.npz``. The
1-device run is the reference: with the batch split over 8 devices, equal
results mean the gradients are all-reduced and the BatchNorm statistics are
taken over the global batch (per-device statistics of 1 example would give a
different loss and different running statistics).

The same worker (``python tests/runtime/test_sharding.py OUT.npz [COORD NPROC PID]``)
serves tests/runtime/test_multiprocess.py.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_CLASSES = 3
GLOBAL_BATCH = 8
TOTAL_STEPS = 10


def make_global_batch(crop: int) -> dict[str, np.ndarray]:
  """A deterministic train batch with sparse labels and some padding."""
  rng = np.random.default_rng(0)
  image = rng.normal(size=(GLOBAL_BATCH, crop, crop, 3)).astype(np.float32)
  label = np.full((GLOBAL_BATCH, crop, crop), -1, np.int32)
  points = rng.random((GLOBAL_BATCH, crop, crop)) < 0.05
  label[points] = rng.integers(0, NUM_CLASSES, size=int(points.sum()))
  label[:, -3:, :] = -2  # Crop padding.
  class_present = np.zeros((GLOBAL_BATCH, NUM_CLASSES), np.float32)
  for b in range(GLOBAL_BATCH):
    class_present[b, np.unique(label[b][label[b] >= 0])] = 1.0
  return {'image': image, 'label': label, 'class_present': class_present}


def state_arrays(state, prefix: str) -> dict[str, np.ndarray]:
  """Host copies of the params and model state leaves, keyed by path."""
  import jax  # pylint: disable=g-import-not-at-top
  arrays = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      {'params': state['params'], 'model_state': state['model_state']})[0]:
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    arrays[prefix + jax.tree_util.keystr(path)] = np.asarray(
        leaf.addressable_data(0))
  return arrays


def run_worker(out_path: str) -> None:
  """One train step of the tiny model; saves metrics and state leaves."""
  import jax  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, REPO_ROOT)
  from agmm_jax import methods  # pylint: disable=g-import-not-at-top
  from agmm_jax.runtime import sharding  # pylint: disable=g-import-not-at-top
  from agmm_jax.train import steps  # pylint: disable=g-import-not-at-top
  from agmm_jax.train import state as train_state  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top

  config = tiny.get_config()
  mesh = sharding.create_mesh(config.mesh)
  per_process = sharding.per_process_batch_size(GLOBAL_BATCH, mesh)
  state, model_defs, tx = train_state.create_train_state(
      config, NUM_CLASSES, mesh, TOTAL_STEPS)
  step = steps.make_train_step(
      model_defs, methods.build_loss(config.loss), tx, mesh,
      lr_schedule=train_state.learning_rate_schedule(config.optimizer, TOTAL_STEPS),
      head_lr_multiplier=config.optimizer.head_lr_multiplier)
  full = make_global_batch(config.data.crop_size)
  start = jax.process_index() * per_process
  local = {k: v[start:start + per_process] for k, v in full.items()}
  arrays = state_arrays(state, 'initial/')
  state, metrics = step(state, sharding.global_batch(local, mesh))
  arrays.update(state_arrays(state, 'state/'))
  arrays.update({f'metric/{k}': np.asarray(v.addressable_data(0))
                 for k, v in metrics.compute().items()})
  arrays['num_devices'] = np.int32(jax.device_count())
  if jax.process_index() == 0:
    np.savez(out_path, **arrays)


def spawn_worker(out_path: str, num_devices: int, extra_args=(),
                 ) -> subprocess.Popen:
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={num_devices}'
  env['JAX_PLATFORMS'] = 'cpu'
  return subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), out_path, *extra_args],
      env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)


def finish(process: subprocess.Popen, timeout: float = 400) -> None:
  output, _ = process.communicate(timeout=timeout)
  assert process.returncode == 0, output[-3000:]


def assert_same_step(result: dict[str, np.ndarray],
                     reference: dict[str, np.ndarray],
                     tolerance: float = 1e-4) -> None:
  """Loss within 1e-5 relative; every metric and state leaf within
  `tolerance` of the leaf's largest magnitude (BatchNorm biases start at 0,
  so elementwise relative errors of their first update are meaningless)."""
  state_keys = [k for k in reference if k.startswith('state/')]
  assert state_keys and set(state_keys) == {
      k for k in result if k.startswith('state/')}
  np.testing.assert_allclose(result['metric/loss'], reference['metric/loss'],
                             rtol=1e-5)
  for key in [k for k in reference if k.startswith('metric/')] + state_keys:
    scale = float(np.max(np.abs(reference[key]))) + 1e-12
    np.testing.assert_allclose(result[key], reference[key], rtol=0,
                               atol=tolerance * scale, err_msg=key)


@pytest.fixture(scope='module')
def one_and_eight(tmp_path_factory):
  """Runs the 1-device and the 8-device worker (concurrently)."""
  tmp = tmp_path_factory.mktemp('sharding')
  paths = {n: str(tmp / f'devices_{n}.npz') for n in (1, 8)}
  processes = {n: spawn_worker(paths[n], n) for n in (1, 8)}
  for process in processes.values():
    finish(process)
  return {n: dict(np.load(p)) for n, p in paths.items()}


def test_eight_devices_match_one(one_and_eight):
  assert int(one_and_eight[1]['num_devices']) == 1
  assert int(one_and_eight[8]['num_devices']) == 8
  assert np.isfinite(one_and_eight[1]['metric/loss'])
  assert_same_step(one_and_eight[8], one_and_eight[1])


def test_step_changes_parameters_and_batch_stats(one_and_eight):
  """The compared arrays are the updated ones (not the initial values)."""
  after = one_and_eight[8]
  initial = {k[len('initial/'):]: v for k, v in after.items()
             if k.startswith('initial/')}
  classifier = [k for k in initial if 'classifier' in k and 'kernel' in k]
  running_mean = [k for k in initial if k.endswith("['mean'].value")]
  assert classifier and running_mean
  for key in classifier + running_mean:
    assert not np.allclose(after['state/' + key], initial[key]), key
  # Both runs started from the same initial state.
  for key in initial:
    np.testing.assert_array_equal(one_and_eight[1]['initial/' + key],
                                  initial[key])


if __name__ == '__main__':
  if len(sys.argv) == 5:
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize(coordinator_address=sys.argv[2],
                               num_processes=int(sys.argv[3]),
                               process_id=int(sys.argv[4]))
  run_worker(sys.argv[1])
