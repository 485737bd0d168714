"""The jitted functions of a run: train step and summary maps (the
evaluation step is ``agmm_jax.evaluation.evaluator``'s).

One train step is ONE ``jax.jit``-compiled function of ``(state, batch)`` with
the state replicated and donated and the batch split over the ``data`` axis;
XLA inserts the gradient all-reduce, and the BatchNorm means/variances over the
batch axis become statistics of the global batch (synchronized BatchNorm).

The step feeds the loss what its terms declared (``Loss.needs``): the input
image, the model's extra heads on the decoder features and the extra batch
fields, so that a new method changes nothing here.
"""

from typing import Any, Callable

from clu import metrics as clu_metrics
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from agmm_jax import methods
from agmm_jax.runtime import sharding as sharding_lib
from agmm_jax.train import state as train_state_lib
from agmm_jax.train.state import ModelDefs
from agmm_jax.train.state import TrainState

# Scalars every train step reports beside the loss terms.
STEP_SCALARS = ('loss', 'grad_norm', 'lr_backbone', 'lr_head', 'finite')


def train_metrics_class(loss: methods.Loss) -> type[clu_metrics.Collection]:
  """The CLU collection of a train step's scalars: the mean over the steps
  merged of ``STEP_SCALARS`` and of every loss term (``finite`` is 1.0 for a
  step whose loss and gradients were all finite)."""
  return clu_metrics.Collection.create(**{
      name: clu_metrics.Average.from_output(name)
      for name in STEP_SCALARS + loss.terms})


def loss_inputs(model: nnx.Module, batch: dict[str, jax.Array],
                needs: methods.Needs, method_state: Any = None
                ) -> methods.LossInputs:
  """Runs ``model`` on the batch; the :class:`LossInputs` of ``needs``
  (``method_state``: the train state's ``method_state``, if any)."""
  features, logits = model(batch['image'])
  return methods.LossInputs(
      logits=logits.astype(jnp.float32),
      decoder_features=features.astype(jnp.float32),
      label=batch['label'], class_present=batch['class_present'],
      image=batch['image'] if needs.image else None,
      outputs=model.extra_outputs(features) if needs.heads else None,
      fields={name: batch[name] for name in needs.batch_fields} or None,
      state=method_state)


def make_train_step(model_defs: ModelDefs, loss: methods.Loss,
                    tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                    *, lr_schedule: optax.Schedule, head_lr_multiplier: float
                    ) -> Callable[[TrainState, dict[str, jax.Array]],
                                  tuple[TrainState, clu_metrics.Collection]]:
  """The jitted ``(state, batch) -> (state, metrics)``; the state is donated.

  ``metrics``: a :func:`train_metrics_class` collection of this step:
  ``loss`` (total), every loss term, ``grad_norm`` (global L2),
  ``lr_backbone``, ``lr_head``, and ``finite`` (1.0 when loss and gradients
  are all finite), replicated. A method's state (``state['method_state']``)
  is passed to the loss and replaced by the state it returns.
  """
  metrics_class = train_metrics_class(loss)

  def step_fn(state, batch):
    # model_state is an argument (not closed over) so that BatchNorm updates
    # happen on variables of the differentiated trace.
    def compute_loss(params, model_state):
      model = nnx.merge(model_defs.train, params, model_state, copy=True)
      total, terms, method_state = loss.apply(
          loss_inputs(model, batch, loss.needs, state.get('method_state')))
      return total, (terms, nnx.state(model, nnx.Not(nnx.Param)), method_state)

    (total, (terms, model_state, method_state)), grads = jax.value_and_grad(
        compute_loss, has_aux=True)(state['params'], state['model_state'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    lr = lr_schedule(state['step'])
    metrics = step_metrics(metrics_class, total, terms, grads, lr_backbone=lr,
                           lr_head=head_lr_multiplier * lr)
    new_state = {'params': params, 'model_state': model_state,
                 'opt_state': opt_state, 'step': state['step'] + 1}
    if 'method_state' in state:
      new_state['method_state'] = method_state
    return new_state, metrics

  return jit_train_step(step_fn, mesh, with_method_state=bool(loss.needs.state))


def step_metrics(metrics_class: type[clu_metrics.Collection], total: jax.Array,
                 terms: dict[str, jax.Array], grads: Any, *, lr_backbone: jax.Array,
                 lr_head: jax.Array) -> clu_metrics.Collection:
  """One step's collection (:func:`train_metrics_class`): the loss and its
  terms, the gradients' global L2 norm, the learning rates, and ``finite``
  (1.0 when the loss and the gradient norm are finite), for every step
  function the loop drives."""
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
  return metrics_class.single_from_model_output(
      loss=total, **terms, grad_norm=grad_norm, lr_backbone=lr_backbone,
      lr_head=lr_head, finite=finite.astype(jnp.float32))


def jit_train_step(step_fn: Callable[..., Any], mesh: jax.sharding.Mesh, *,
                   with_method_state: bool) -> Callable[..., Any]:
  """``step_fn(state, batch) -> (state, metrics)`` jitted for the loop: the
  state replicated (its method state, if any, split over ``data``) and
  donated, the batch split over ``data``, the metrics replicated."""
  state_sharding = train_state_lib.state_shardings(mesh, with_method_state)
  data = sharding_lib.data_sharding(mesh)
  replicated = sharding_lib.replicated_sharding(mesh)
  return jax.jit(step_fn, in_shardings=(state_sharding, data),
                 out_shardings=(state_sharding, replicated), donate_argnums=0)


def make_summary_fn(model_defs: ModelDefs, mesh: jax.sharding.Mesh,
                    loss: methods.Loss):
  """Jitted ``(state, batch) -> (prediction [H, W], response [H, W])`` of
  example 0 with the eval-mode model (running BatchNorm statistics).

  ``response`` is the loss's summary map (``loss.summary``, e.g. AGMM's GMM
  response) of the first class labeled in the crop (all zeros when the crop
  has no labeled pixel or the loss has no summary map).
  """
  replicated = sharding_lib.replicated_sharding(mesh)
  data = sharding_lib.data_sharding(mesh)
  state_sharding = train_state_lib.state_shardings(mesh, bool(loss.needs.state))

  def summary_fn(state, batch):
    model = nnx.merge(model_defs.eval, state['params'], state['model_state'])
    first = {name: value[:1] for name, value in batch.items()}
    method_state = jax.tree.map(lambda x: x[:1], state.get('method_state'))
    inputs = loss_inputs(model, first, loss.needs, method_state)
    prediction = jnp.argmax(inputs.logits[0], axis=-1).astype(jnp.int32)
    if loss.summary is None:
      return prediction, jnp.zeros(prediction.shape, jnp.float32)
    response = loss.summary(inputs)
    labeled = jnp.any(
        inputs.label[0, ..., None] == jnp.arange(inputs.logits.shape[-1]), axis=(0, 1))
    return prediction, response[0, ..., jnp.argmax(labeled)]

  return jax.jit(summary_fn, in_shardings=(state_sharding, data),
                 out_shardings=replicated)




def merge(accumulated: Any, new: Any) -> Any:
  """``new`` merged into ``accumulated`` (None: nothing yet)."""
  return new if accumulated is None else accumulated.merge(new)
