"""Device mesh, shardings and host-local -> global batch conversion.

Training is data parallel over a one-axis mesh ``('data',)``: the global batch
``[B, ...]`` is split along its first axis over all devices of all processes
(``B / num_devices`` examples per device) and the train state is replicated.
Under ``jax.jit`` with these shardings XLA (GSPMD) inserts the all-reduces, so
gradients and BatchNorm statistics are over the global batch.

Each process reads only its own ``B / process_count`` examples (its
``process_index`` slice of the data); ``global_batch`` assembles those
per-process NumPy arrays into global ``jax.Array``s without moving data between
hosts.
"""

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'


def create_mesh(mesh_config: Any) -> Mesh:
  """A ``('data',)`` mesh over ``mesh_config.data`` devices (-1: all devices).

  Raises:
    ValueError: when ``mesh_config.data`` is neither -1 nor the number of
      devices (the only axis must cover every device of every process).
  """
  devices = jax.devices()
  data = int(mesh_config.data)
  if data == -1:
    data = len(devices)
  if data != len(devices):
    raise ValueError(
        f'config.mesh.data={mesh_config.data} but there are {len(devices)} '
        f'devices; set it to -1 or {len(devices)}')
  return Mesh(np.asarray(devices).reshape(data), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Splits the leading (batch) axis over the ``data`` axis."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """A full copy on every device (train state, scalars)."""
  return NamedSharding(mesh, PartitionSpec())


def per_process_batch_size(global_batch_size: int, mesh: Mesh,
                           what: str = 'config.global_batch_size') -> int:
  """``global_batch_size / process_count`` after checking divisibility.

  Raises:
    ValueError: when the global batch does not split evenly over the devices
      of the mesh (and hence over the processes), naming ``what``.
  """
  num_devices = mesh.devices.size
  if global_batch_size <= 0 or global_batch_size % num_devices:
    raise ValueError(
        f'{what}={global_batch_size} is not a positive multiple of the '
        f'{num_devices} devices ({jax.process_count()} processes)')
  return global_batch_size // jax.process_count()


def eval_batch_size_per_process(eval_batch_size: int, mesh: Mesh) -> int:
  """Per-process eval batch: ``eval_batch_size`` rounded up to whole devices.

  Evaluation pads its last batches with all-padding filler examples anyway,
  so an eval batch of 2 on 8 devices simply becomes 8 (one per device)
  instead of failing.
  """
  if eval_batch_size <= 0:
    raise ValueError(f'config.eval.batch_size={eval_batch_size} must be '
                     'positive')
  num_devices = mesh.devices.size
  rounded = -(-eval_batch_size // num_devices) * num_devices
  return per_process_batch_size(rounded, mesh, 'config.eval.batch_size')


def global_batch(local_batch: Mapping[str, np.ndarray],
                 mesh: Mesh) -> dict[str, jax.Array]:
  """Per-process NumPy arrays ``[b, ...]`` -> global arrays ``[b * P, ...]``.

  Process ``p`` contributes rows ``p * b .. (p + 1) * b - 1`` of the global
  batch; non-array entries (e.g. host-side string ids) are dropped.
  """
  sharding = data_sharding(mesh)
  return {
      name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
      for name, value in local_batch.items()
      if isinstance(value, np.ndarray) and value.dtype.kind in 'biuf'
  }
