"""The train state, its optimizer and its replication over the mesh.

The train state is a dict of pytrees, replicated on every device of a
``('data',)`` mesh:

* ``params``: the model's ``nnx.Param``s (float32);
* ``model_state``: everything else of the model (BatchNorm running statistics,
  dropout RNG state);
* ``opt_state``: the optax state; ``step``: int32 scalar, steps done;
* ``method_state``, only for a loss whose method declares state
  (``Needs.state``, e.g. SPML's memory bank): ``Loss.init_state`` of the
  global batch, every leaf ``[global batch, ...]`` and sharded over the
  ``data`` axis like the batch (the step updates it; checkpoints keep it).

Optimizer (the official AGMM recipe, PyTorch SGD semantics):
``g <- grad + weight_decay * p``; ``m <- momentum * m + g``;
``p <- p - lr_t * m``
with ``lr_t = lr * (1 - t / T) ** poly_power`` (t = steps done, T = total
steps) for the backbone and ``head_lr_multiplier * lr_t`` for every other
parameter (the decoder, the classifier and a method's extra heads). (The
official loop sets ``lr_i`` after step ``i``, so its steps 0 and 1 both use
``lr``; here step ``t`` uses ``lr_t``, a one-step shift.)
"""

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from agmm_jax.model import deeplab
from agmm_jax.model import pretrained
from agmm_jax.runtime import sharding as sharding_lib

TrainState = dict[str, Any]
BACKBONE = 'backbone'
HEAD = 'head'


def param_labels(params: Any) -> Any:
  """Per-leaf ``'backbone'`` (under the model's ``backbone``) or ``'head'``."""

  def label(path, _):
    first = path[0]
    name = getattr(first, 'key', getattr(first, 'name', None))
    return BACKBONE if name == BACKBONE else HEAD

  return jax.tree_util.tree_map_with_path(label, params)


def learning_rate_schedule(optimizer_config: Any,
                           total_steps: int) -> optax.Schedule:
  """Backbone rate ``lr * (1 - t / total_steps) ** poly_power``."""
  return optax.polynomial_schedule(
      init_value=float(optimizer_config.lr), end_value=0.0,
      power=float(optimizer_config.poly_power),
      transition_steps=max(int(total_steps), 1))


def create_optimizer(optimizer_config: Any,
                     total_steps: int) -> optax.GradientTransformation:
  """SGD with coupled weight decay, momentum and poly rates per group."""
  backbone_lr = learning_rate_schedule(optimizer_config, total_steps)
  multiplier = float(optimizer_config.head_lr_multiplier)

  def sgd(schedule):
    return optax.chain(
        optax.add_decayed_weights(float(optimizer_config.weight_decay)),
        optax.trace(decay=float(optimizer_config.momentum), nesterov=False),
        optax.scale_by_learning_rate(schedule))

  return optax.multi_transform(
      {BACKBONE: sgd(backbone_lr),
       HEAD: sgd(lambda step: multiplier * backbone_lr(step))},
      param_labels)


def state_shardings(mesh: jax.sharding.Mesh, with_method_state: bool
                    ) -> dict[str, jax.sharding.NamedSharding]:
  """The shardings of the train state's entries (a pytree prefix of it):
  replicated, but ``method_state`` split over ``data`` like the batch."""
  replicated = sharding_lib.replicated_sharding(mesh)
  shardings = {name: replicated for name in ('params', 'model_state', 'opt_state', 'step')}
  if with_method_state:
    shardings['method_state'] = sharding_lib.data_sharding(mesh)
  return shardings


def shard_like_batch(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Host pytree with leaves ``[global batch, ...]`` (the same on every
  process) -> arrays split over the ``data`` axis."""
  sharding = sharding_lib.data_sharding(mesh)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree)


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Host/single-device pytree -> arrays replicated over ``mesh``.

  Every process must pass the same values (same seed, same weights).
  """
  sharding = sharding_lib.replicated_sharding(mesh)

  def put(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      data = put(jax.random.key_data(x))
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))

  return jax.tree.map(put, tree)


class ModelDefs:
  """Static halves of the model: train-mode and eval-mode graph definitions."""

  def __init__(self, train: nnx.GraphDef, eval_: nnx.GraphDef):
    self.train = train
    self.eval = eval_


def create_train_state(config: ml_collections.ConfigDict, num_classes: int,
                       mesh: jax.sharding.Mesh, total_steps: int, *,
                       extra_heads: Mapping[str, Any] | None = None,
                       method_state: Mapping[str, Any] | None = None,
                       load_pretrained: bool = True
                       ) -> tuple[TrainState, ModelDefs,
                                  optax.GradientTransformation]:
  """Builds the model (plus pretrained weights) and a replicated train state.

  ``extra_heads``: the loss's declared heads (``build_loss(config.loss).
  needs.heads``), so that a checkpoint of a method with heads restores into
  the same structure. ``method_state``: ``Loss.init_state(global batch,
  num_classes)``, kept as ``state['method_state']`` when not empty.
  """
  model = deeplab.build_model(config.model, num_classes,
                             rngs=nnx.Rngs(config.seed), extra_heads=extra_heads)
  if load_pretrained and config.model.pretrained:
    if not os.path.isdir(config.model.pretrained):
      raise FileNotFoundError(
          f'config.model.pretrained={config.model.pretrained}: no such folder')
    pretrained.load_pretrained(model, config.model.pretrained)
  model.eval()
  eval_graphdef = nnx.graphdef(model)
  model.train()
  train_graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  tx = create_optimizer(config.optimizer, total_steps)
  state = {
      'params': params,
      'model_state': model_state,
      'opt_state': tx.init(params),
      'step': jnp.zeros((), jnp.int32),
  }
  state = replicate(state, mesh)
  if method_state:
    state['method_state'] = shard_like_batch(dict(method_state), mesh)
  return state, ModelDefs(train_graphdef, eval_graphdef), tx


@jax.jit
def all_finite(tree: Any) -> jax.Array:
  """True when every floating leaf of ``tree`` is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves))


def host(x: jax.Array) -> np.ndarray:
  """The local copy of a replicated array (works with several processes)."""
  return np.asarray(x.addressable_data(0))
