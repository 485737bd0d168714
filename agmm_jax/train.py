"""Training, evaluation and prediction: ``run(config, workdir)``.

The train state is a dict of pytrees, replicated on every device of a
``('data',)`` mesh:

* ``params``: the model's ``nnx.Param``s (float32);
* ``model_state``: everything else of the model (BatchNorm running statistics,
  dropout RNG state);
* ``opt_state``: the optax state; ``step``: int32 scalar, steps done.

One train step is ONE ``jax.jit``-compiled function of ``(state, batch)`` with
the state replicated and donated and the batch split over the ``data`` axis;
XLA inserts the gradient all-reduce, and the BatchNorm means/variances over the
batch axis become statistics of the global batch (synchronized BatchNorm).

Optimizer (the official AGMM recipe, PyTorch SGD semantics):
``g <- grad + weight_decay * p``; ``m <- momentum * m + g``;
``p <- p - lr_t * m``
with ``lr_t = lr * (1 - t / T) ** poly_power`` (t = steps done, T = total
steps) for the backbone and ``head_lr_multiplier * lr_t`` for every other
parameter. (The official loop sets ``lr_i`` after step ``i``, so its steps 0
and 1 both use ``lr``; here step ``t`` uses ``lr_t``, a one-step shift.)

Robustness: a NaN/inf loss, gradient norm (checked at every log step and
before every save) or parameter (checked before every save) raises
``NonFiniteError`` and nothing of the bad state is saved. SIGTERM sets a
flag; the loop saves after the current step and raises ``Preempted``
(``main.py`` exits with ``EXIT_PREEMPTED`` = 143); rerunning resumes from the
latest checkpoint, data iterator included.
"""

import os
import signal
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from PIL import Image

from agmm_jax import checkpoint as checkpoint_lib
from agmm_jax import evaluate
from agmm_jax import input_pipeline
from agmm_jax import losses
from agmm_jax import metrics as metrics_lib
from agmm_jax import models
from agmm_jax import sharding as sharding_lib
from agmm_jax import summary
from agmm_jax import visualize

TrainState = dict[str, Any]
BACKBONE = 'backbone'
HEAD = 'head'
# Exit status of a run stopped by SIGTERM after saving its checkpoint
# (128 + SIGTERM, as a shell reports it): rerunning the command resumes.
EXIT_PREEMPTED = 128 + signal.SIGTERM


class NonFiniteError(RuntimeError):
  """A loss, gradient or parameter became NaN or infinite."""


class Preempted(Exception):
  """SIGTERM arrived; the state was saved at ``step``."""

  def __init__(self, step: int):
    super().__init__(f'stopped by SIGTERM after saving step {step}; rerun the '
                     'same command to resume')
    self.step = step


# --------------------------------------------------------------------------
# Optimizer and state.


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


def _replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
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
                       mesh: jax.sharding.Mesh, total_steps: int,
                       *, load_pretrained: bool = True
                       ) -> tuple[TrainState, ModelDefs,
                                  optax.GradientTransformation]:
  """Builds the model (plus pretrained weights) and a replicated train state."""
  model = models.build_model(config.model, num_classes,
                             rngs=nnx.Rngs(config.seed))
  if load_pretrained and config.model.pretrained:
    if not os.path.isdir(config.model.pretrained):
      raise FileNotFoundError(
          f'config.model.pretrained={config.model.pretrained}: no such folder')
    models.load_pretrained(model, config.model.pretrained)
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
  return _replicate(state, mesh), ModelDefs(train_graphdef, eval_graphdef), tx


# --------------------------------------------------------------------------
# Compiled steps.


def make_train_step(model_defs: ModelDefs, loss_fn: Callable[..., Any],
                    tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                    *, lr_schedule: optax.Schedule, head_lr_multiplier: float
                    ) -> Callable[[TrainState, dict[str, jax.Array]],
                                  tuple[TrainState, dict[str, jax.Array]]]:
  """The jitted ``(state, batch) -> (state, metrics)``; the state is donated.

  ``metrics``: replicated scalars ``loss`` (total), every loss term,
  ``grad_norm`` (global L2), ``lr_backbone``, ``lr_head``, and ``finite``
  (1.0 when loss and gradients are all finite).
  """
  replicated = sharding_lib.replicated_sharding(mesh)
  data = sharding_lib.data_sharding(mesh)

  def step_fn(state, batch):
    # model_state is an argument (not closed over) so that BatchNorm updates
    # happen on variables of the differentiated trace.
    def compute_loss(params, model_state):
      model = nnx.merge(model_defs.train, params, model_state, copy=True)
      features, logits = model(batch['image'])
      total, terms = loss_fn(losses.LossInputs(
          logits=logits.astype(jnp.float32),
          decoder_features=features.astype(jnp.float32),
          label=batch['label'], class_present=batch['class_present']))
      return total, (terms, nnx.state(model, nnx.Not(nnx.Param)))

    (total, (terms, model_state)), grads = jax.value_and_grad(
        compute_loss, has_aux=True)(state['params'], state['model_state'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    grad_norm = optax.tree.norm(grads)
    lr = lr_schedule(state['step'])
    metrics = {'loss': total, **terms, 'grad_norm': grad_norm,
               'lr_backbone': lr, 'lr_head': head_lr_multiplier * lr,
               'finite': jnp.isfinite(total) & jnp.isfinite(grad_norm)}
    new_state = {'params': params, 'model_state': model_state,
                 'opt_state': opt_state, 'step': state['step'] + 1}
    return new_state, metrics

  return jax.jit(step_fn, in_shardings=(replicated, data),
                 out_shardings=(replicated, replicated), donate_argnums=0)


def make_summary_fn(model_defs: ModelDefs, mesh: jax.sharding.Mesh,
                    gmm_form: str):
  """Jitted ``(state, batch) -> (prediction [H, W], response [H, W])`` of
  example 0 with the eval-mode model (running BatchNorm statistics).

  ``response`` is the loss's GMM response (``gmm_form``) of the first class
  labeled in the crop (all zeros when the crop has no labeled pixel).
  """
  replicated = sharding_lib.replicated_sharding(mesh)
  data = sharding_lib.data_sharding(mesh)

  def summary_fn(state, batch):
    model = nnx.merge(model_defs.eval, state['params'], state['model_state'])
    features, logits = model(batch['image'][:1])
    label = batch['label'][:1]
    response = losses.gmm_response(losses.LossInputs(
        logits=logits, decoder_features=features, label=label,
        class_present=batch['class_present'][:1]), form=gmm_form)
    labeled = jnp.any(label[0, ..., None] == jnp.arange(logits.shape[-1]),
                      axis=(0, 1))
    shown_class = jnp.argmax(labeled)
    prediction = jnp.argmax(logits[0], axis=-1).astype(jnp.int32)
    return prediction, response[0, ..., shown_class]

  return jax.jit(summary_fn, in_shardings=(replicated, data),
                 out_shardings=replicated)


def _eval_apply_fn(model_defs: ModelDefs):
  """``apply_fn(variables, images) -> logits`` of ``evaluate`` with
  ``variables = (params, model_state)`` and the eval-mode model."""

  def apply_fn(variables, images):
    params, model_state = variables
    return nnx.merge(model_defs.eval, params, model_state)(images)[1]

  return apply_fn


def make_eval_fn(model_defs: ModelDefs, config: ml_collections.ConfigDict,
                 num_classes: int, mesh: jax.sharding.Mesh):
  """Jitted ``(params, model_state, batch) -> confusion [K, K]`` (int32)."""
  replicated = sharding_lib.replicated_sharding(mesh)
  data = sharding_lib.data_sharding(mesh)
  eval_step = evaluate.make_eval_step(
      _eval_apply_fn(model_defs), mode=config.eval.mode,
      num_classes=num_classes, crop_size=int(config.data.crop_size),
      scales=tuple(config.eval.scales), flip=bool(config.eval.flip), jit=False)

  def eval_fn(params, model_state, batch):
    return eval_step((params, model_state), batch)

  return jax.jit(eval_fn, in_shardings=(replicated, replicated, data),
                 out_shardings=replicated)


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves))


def _host(x: jax.Array) -> np.ndarray:
  """The local copy of a replicated array (works with several processes)."""
  return np.asarray(x.addressable_data(0))


# --------------------------------------------------------------------------
# Evaluation.


def evaluate_dataset(eval_fn, state: TrainState,
                     config: ml_collections.ConfigDict,
                     mesh: jax.sharding.Mesh,
                     num_classes: int) -> dict[str, Any]:
  """Runs ``eval_fn`` over ``config.data.eval_split``; returns the scores of
  ``metrics.segmentation_scores`` plus ``confusion`` (NumPy ``[K, K]``)."""
  batch_per_process = sharding_lib.eval_batch_size_per_process(
      int(config.eval.batch_size), mesh)
  iterator = input_pipeline.create_eval_iterator(
      config.data, config.data.eval_split,
      batch_size_per_process=batch_per_process,
      process_index=jax.process_index(), process_count=jax.process_count())
  confusion = None
  for local_batch in iterator:
    batch = sharding_lib.global_batch(local_batch, mesh)
    counts = eval_fn(state['params'], state['model_state'], batch)
    confusion = counts if confusion is None else confusion + counts
  if confusion is None:
    raise ValueError(f'{config.data.dir}: split {config.data.eval_split!r} '
                     'has no examples')
  confusion = _host(confusion)
  scores = metrics_lib.segmentation_scores(confusion)
  scores['confusion'] = confusion
  return scores


# --------------------------------------------------------------------------
# Helpers of the train loop.


def _num_examples(metadata: dict[str, Any], split: str, data_dir: str) -> int:
  """Number of examples of ``split`` from the dataset's metadata.json."""
  if split not in metadata['splits']:
    raise ValueError(f'{data_dir}/metadata.json: no split {split!r} (has '
                     f'{sorted(metadata["splits"])})')
  return int(metadata['splits'][split]['num_examples'])


def _check_data_dir(config: ml_collections.ConfigDict) -> dict[str, Any]:
  data_dir = config.data.dir
  if not data_dir or not os.path.isdir(data_dir):
    raise FileNotFoundError(f'config.data.dir={data_dir!r}: no such directory')
  return input_pipeline.read_metadata(data_dir)


def _class_names(metadata: dict[str, Any]) -> list[str]:
  """Class names from metadata.json (``class_<i>`` where it has none)."""
  num_classes = int(metadata['num_classes'])
  names = list(metadata.get('classes') or [])
  if len(names) != num_classes:
    names = [f'class_{i}' for i in range(num_classes)]
  return [str(name) for name in names]


def write_config(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Dumps the config to ``workdir/config.json`` (process 0); returns it.

  A rerun with a different config (say, more steps) keeps the earlier dump
  as ``config.N.json`` so the workdir records every config it was run with.
  """
  path = os.path.join(workdir, 'config.json')
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    if os.path.exists(path):
      with open(path) as f:
        previous = f.read()
      if previous == text:
        return path
      index = 1
      while os.path.exists(os.path.join(workdir, f'config.{index}.json')):
        index += 1
      os.replace(path, os.path.join(workdir, f'config.{index}.json'))
      logging.warning('%s: the config differs from the last run; the earlier '
                      'one is kept as config.%d.json', workdir, index)
    with open(path, 'w') as f:
      f.write(text)
  return path


class _SigtermFlag:
  """Sets a flag on SIGTERM (the loop saves at the next step and stops)."""

  def __init__(self):
    self.received = False
    self._previous = None

  def __enter__(self):
    def handler(signum, frame):
      del signum, frame
      self.received = True
    try:
      self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # Not the main thread: leave SIGTERM alone.
      self._previous = None
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def any_process(self) -> bool:
    """True when any process got SIGTERM (a collective if multi-process)."""
    if jax.process_count() == 1:
      return self.received
    flags = multihost_utils.process_allgather(np.asarray(self.received))
    return bool(np.any(flags))


def _image_summaries(local_batch: dict[str, np.ndarray], prediction: np.ndarray,
                     response: np.ndarray) -> dict[str, np.ndarray]:
  """uint8 ``[1, H, W, 3]`` images of example 0: input, labels, prediction."""
  image = visualize.denormalize(local_batch['image'][0])
  label = local_batch['label'][0]
  return {
      'input': image[None],
      'sparse_labels': visualize.colorize(label)[None],
      'prediction': visualize.overlay(image, prediction)[None],
      'gmm_response': visualize.heatmap(response)[None],
  }


def _print_scores(config: ml_collections.ConfigDict, step: int,
                  scores: dict[str, Any], class_names: list[str]) -> None:
  """Prints the per-class IoU table of an evaluation (process 0 only)."""
  if jax.process_index() == 0:
    print(f'{config.data.eval_split} at step {step} ({config.eval.mode}):')
    print(metrics_lib.format_iou_table(
        scores['per_class_iou'], class_names, scores['miou'],
        scores['pixel_accuracy']))


# --------------------------------------------------------------------------
# Modes.


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains with periodic evaluation and checkpoints; resumes from ``workdir``.

  Returns the final evaluation scores (``miou``, ``per_class_iou``,
  ``pixel_accuracy``, ...) plus ``step``.

  Raises:
    FileNotFoundError / ValueError: bad data folder or config.
    NonFiniteError: a NaN/inf loss, gradient or parameter (the last good
      checkpoint is kept; the bad state is never saved).
    Preempted: SIGTERM arrived (at any time after the start); the state of the
      next step was saved first.
  """
  with _SigtermFlag() as sigterm:
    return _train_and_evaluate(config, workdir, sigterm)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        sigterm: '_SigtermFlag') -> dict[str, Any]:
  """The body of ``train_and_evaluate`` (SIGTERM handler installed)."""
  workdir = os.path.abspath(workdir)
  mesh = sharding_lib.create_mesh(config.mesh)
  batch_per_process = sharding_lib.per_process_batch_size(
      int(config.global_batch_size), mesh)
  sharding_lib.eval_batch_size_per_process(int(config.eval.batch_size), mesh)
  metadata = _check_data_dir(config)
  class_names = _class_names(metadata)
  num_classes = len(class_names)
  num_train = _num_examples(metadata, config.data.train_split, config.data.dir)
  steps_per_epoch = max(num_train // int(config.global_batch_size), 1)
  total_steps = (int(config.num_train_steps) if config.num_train_steps > 0
                 else int(config.num_epochs) * steps_per_epoch)
  # Period 0 (or below, other than eval -1 = once per epoch): only at the end.
  eval_every = (steps_per_epoch if config.eval_every_steps == -1
                else int(config.eval_every_steps))
  eval_every = eval_every if eval_every > 0 else total_steps
  checkpoint_every = int(config.checkpoint_every_steps)
  checkpoint_every = checkpoint_every if checkpoint_every > 0 else total_steps
  write_config(config, workdir)

  checkpointer = checkpoint_lib.Checkpointer(
      workdir, keep=int(config.keep_checkpoints))
  resuming = checkpointer.latest_step() is not None
  state, model_defs, tx = create_train_state(
      config, num_classes, mesh, total_steps, load_pretrained=not resuming)
  train_iter = input_pipeline.create_train_iterator(
      config.data, batch_size_per_process=batch_per_process, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  if resuming:
    state, step = checkpointer.restore_latest(
        checkpoint_lib.abstract_like(state), train_iter)
    logging.info('resumed from %s at step %d', workdir, step)
  step = int(_host(state['step']))

  lr_schedule = learning_rate_schedule(config.optimizer, total_steps)
  train_step = make_train_step(
      model_defs, losses.build_loss(config.loss), tx, mesh,
      lr_schedule=lr_schedule,
      head_lr_multiplier=float(config.optimizer.head_lr_multiplier))
  summary_fn = make_summary_fn(model_defs, mesh, config.loss.gmm.form)
  eval_fn = make_eval_fn(model_defs, config, num_classes, mesh)
  writer = summary.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  if step == 0:
    writer.write_hparams({k: str(v) for k, v in config.to_dict().items()
                          if not isinstance(v, dict)})

  def save(at_step: int) -> None:
    if not bool(_host(_all_finite(state['params']))):
      raise NonFiniteError(f'parameters are NaN/inf at step {at_step}; not '
                           f'saving (last good checkpoint: '
                           f'{checkpointer.latest_step()})')
    checkpointer.save(at_step, state, train_iter)

  def check_metrics(pending: list[tuple[int, dict[str, jax.Array]]]):
    """Host copies of pending step metrics; raises on a non-finite one."""
    host = [(s, {k: float(_host(v)) for k, v in m.items()}) for s, m in pending]
    for s, m in host:
      if not m['finite']:
        raise NonFiniteError(
            f'loss {m["loss"]} / gradient norm {m["grad_norm"]} is not finite '
            f'at step {s}; stopping (last good checkpoint: '
            f'{checkpointer.latest_step()} in {workdir}/checkpoints)')
    return host

  scores: dict[str, Any] = {}
  pending: list[tuple[int, dict[str, jax.Array]]] = []
  log_every = max(int(config.log_every_steps), 1)
  # Called at log steps only, so every call reports (progress and ETA);
  # evaluation and checkpointing run paused and do not lower the rate.
  progress = summary.ReportProgress(
      total_steps, every_steps=1, every_secs=None,
      global_batch_size=int(config.global_batch_size))
  progress(step)
  try:
    while step < total_steps:
      local_batch = next(train_iter)
      batch = sharding_lib.global_batch(local_batch, mesh)
      state, step_metrics = train_step(state, batch)
      step += 1
      pending.append((step, step_metrics))

      is_last = step == total_steps
      if step % log_every == 0 or is_last:
        host = check_metrics(pending)
        pending = []
        means = {k: float(np.mean([m[k] for _, m in host]))
                 for k in host[-1][1] if k != 'finite'}
        means['images_per_second'] = progress(step)['images_per_sec']
        writer.write_scalars(step, {f'train/{k}': v for k, v in means.items()})
        logging.info('step %d/%d: %s', step, total_steps,
                     ', '.join(f'{k}={v:.4g}' for k, v in means.items()))

      if config.image_summary_every_steps > 0 and (
          step % int(config.image_summary_every_steps) == 0 or step == 1):
        prediction, response = summary_fn(state, batch)
        if jax.process_index() == 0:
          writer.write_images(step, {
              f'train/{k}': v for k, v in _image_summaries(
                  local_batch, _host(prediction), _host(response)).items()})

      if step % eval_every == 0 or is_last:
        with progress.paused():
          check_metrics(pending)
          scores = evaluate_dataset(eval_fn, state, config, mesh, num_classes)
          writer.write_scalars(step, {
              'eval/miou': scores['miou'],
              'eval/pixel_accuracy': scores['pixel_accuracy'],
              **{f'eval/iou/{name}': float(iou) for name, iou in
                 zip(class_names, scores['per_class_iou'])}})
          logging.info('step %d: eval mIoU %.2f%%, pixel accuracy %.2f%%',
                       step, 100 * scores['miou'],
                       100 * scores['pixel_accuracy'])
          if np.isfinite(scores['miou']):
            checkpointer.save_best(step, state, scores['miou'])

      if step % checkpoint_every == 0 or is_last:
        with progress.paused():
          check_metrics(pending)
          save(step)

      # Several processes agree on stopping at log steps (a collective), so
      # they all save the same step.
      if (sigterm.received if jax.process_count() == 1
          else step % log_every == 0):
        if sigterm.any_process():
          check_metrics(pending)
          save(step)
          raise Preempted(step)
    if not scores:
      # Nothing left to train (a rerun of a finished run): report the final
      # state's scores all the same.
      logging.info('%s: already trained to step %d', workdir, step)
      scores = evaluate_dataset(eval_fn, state, config, mesh, num_classes)
    writer.flush()
  finally:
    checkpointer.wait_until_finished()
    checkpointer.close()
    writer.close()
  _print_scores(config, step, scores, class_names)
  scores['step'] = step
  return scores


def _restore_for_inference(config: ml_collections.ConfigDict, workdir: str,
                           num_classes: int, mesh: jax.sharding.Mesh):
  """Model defs and the best (or latest) checkpointed state of ``workdir``."""
  state, model_defs, _ = create_train_state(config, num_classes, mesh,
                                            total_steps=1,
                                            load_pretrained=False)
  checkpointer = checkpoint_lib.Checkpointer(
      workdir, keep=int(config.keep_checkpoints), read_only=True)
  try:
    which = config.eval.checkpoint
    if which == 'best' and checkpointer.best_step() is not None:
      state, step = checkpointer.restore_best(
          checkpoint_lib.abstract_like(state))
    elif which in ('best', 'latest'):
      state, step = checkpointer.restore_latest(
          checkpoint_lib.abstract_like(state))
    else:
      raise ValueError(f"config.eval.checkpoint must be 'best' or 'latest', "
                       f'got {which!r}')
  finally:
    checkpointer.close()
  logging.info('restored step %d from %s', step, workdir)
  return state, model_defs, step


def evaluate_checkpoint(config: ml_collections.ConfigDict,
                        workdir: str) -> dict[str, Any]:
  """Evaluates the best (``config.eval.checkpoint``) checkpoint of ``workdir``
  and prints the per-class IoU table (process 0)."""
  mesh = sharding_lib.create_mesh(config.mesh)
  sharding_lib.eval_batch_size_per_process(int(config.eval.batch_size), mesh)
  class_names = _class_names(_check_data_dir(config))
  state, model_defs, step = _restore_for_inference(
      config, workdir, len(class_names), mesh)
  eval_fn = make_eval_fn(model_defs, config, len(class_names), mesh)
  scores = evaluate_dataset(eval_fn, state, config, mesh, len(class_names))
  _print_scores(config, step, scores, class_names)
  scores['step'] = step
  return scores


IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')


# Images larger than the eval canvas are padded to the next multiple of this,
# so a folder of mixed sizes compiles a few programs, not one per size.
PREDICT_CANVAS_MULTIPLE = 128


def _predict_canvas(height: int, width: int,
                    eval_canvas: tuple[int, int]) -> tuple[int, int]:
  """The padded input size for an image: the eval canvas when it fits."""
  if height <= eval_canvas[0] and width <= eval_canvas[1]:
    return int(eval_canvas[0]), int(eval_canvas[1])
  return tuple(-(-size // PREDICT_CANVAS_MULTIPLE) * PREDICT_CANVAS_MULTIPLE
               for size in (height, width))


def predict(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """Segments every image of ``config.predict.input_dir``.

  Writes ``NAME.png`` (palette PNG of class ids) and ``NAME_overlay.jpg`` to
  ``config.predict.output_dir`` (default ``workdir/predictions``) and returns
  the written label paths. Single process.
  """
  input_dir = config.predict.input_dir
  if not input_dir or not os.path.isdir(input_dir):
    raise FileNotFoundError(
        f'config.predict.input_dir={input_dir!r}: no such directory')
  names = sorted(n for n in os.listdir(input_dir)
                 if n.lower().endswith(IMAGE_EXTENSIONS))
  if not names:
    raise FileNotFoundError(
        f'{input_dir}: no {"/".join(IMAGE_EXTENSIONS)} files')
  output_dir = config.predict.output_dir or os.path.join(workdir, 'predictions')
  os.makedirs(output_dir, exist_ok=True)
  class_names = _class_names(_check_data_dir(config))
  mesh = sharding_lib.create_mesh(config.mesh)
  state, model_defs, _ = _restore_for_inference(config, workdir,
                                                len(class_names), mesh)
  variables = (state['params'], state['model_state'])
  predict_fn = evaluate.make_predict_fn(
      _eval_apply_fn(model_defs), mode=config.eval.mode,
      num_classes=len(class_names), crop_size=int(config.data.crop_size),
      scales=tuple(config.eval.scales), flip=bool(config.eval.flip))
  written = []
  for name in names:
    path = os.path.join(input_dir, name)
    image = input_pipeline.load_image_for_predict(path)
    height, width = image.shape[:2]
    canvas = _predict_canvas(height, width, config.data.eval_canvas)
    padded = np.zeros((1, *canvas, 3), np.float32)
    padded[0, :height, :width] = image
    prediction = np.asarray(predict_fn(
        variables, padded, np.array([height], np.int32),
        np.array([width], np.int32)))[0, :height, :width]
    stem = os.path.splitext(name)[0]
    label_path = os.path.join(output_dir, stem + '.png')
    visualize.save_palette_png(label_path, prediction)
    overlay = visualize.overlay(visualize.denormalize(image), prediction)
    Image.fromarray(overlay).save(
        os.path.join(output_dir, stem + '_overlay.jpg'))
    written.append(label_path)
  logging.info('wrote %d predictions to %s', len(written), output_dir)
  return written


MODES = ('train', 'eval', 'predict')


def resolve_data_dir(config: ml_collections.ConfigDict,
                     workdir: str) -> ml_collections.ConfigDict:
  """A copy of ``config`` whose ``data.dir`` holds a prepared dataset.

  With ``config.data.prepare.converter`` set, the dataset is converted on
  first use (``data_prep.auto``; process 0 converts, the others wait) into
  ``data.dir``, or ``WORKDIR/data`` when ``data.dir`` is empty.
  """
  config = config.copy_and_resolve_references()
  prepare = config.data.get('prepare')
  if prepare is None or not prepare.get('converter'):
    return config
  from data_prep import auto  # pylint: disable=g-import-not-at-top
  data_dir = config.data.dir or os.path.join(os.path.abspath(workdir), 'data')
  error = None
  if jax.process_index() == 0:
    try:
      auto.prepare_if_missing(prepare, data_dir)
    except Exception as prepare_error:  # pylint: disable=broad-exception-caught
      # Raised below, once the other processes know: left at a barrier they
      # would wait for the coordination timeout.
      error = prepare_error
  if jax.process_count() > 1:
    failed = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
    if failed and error is None:
      raise ValueError(f'data preparation of config.data.dir={data_dir!r} failed '
                       'on process 0 (its log has the reason)')
  if error is not None:
    raise error
  with config.unlocked():
    config.data.dir = data_dir
  return config


def run(config: ml_collections.ConfigDict, workdir: str) -> Any:
  """Dispatches on ``config.mode``: train | eval | predict.

  In train mode with ``config.predict.input_dir`` set (single process), the
  trained model then segments those images as in predict mode.
  """
  if config.mode not in MODES:
    raise ValueError(f'config.mode must be one of {MODES}, got {config.mode!r}')
  config = resolve_data_dir(config, workdir)
  if config.mode == 'train':
    scores = train_and_evaluate(config, workdir)
    # A train config that names images to segment (the demo) ends with them.
    if config.predict.input_dir and jax.process_count() == 1:
      predict(config, workdir)
    return scores
  if config.mode == 'eval':
    return evaluate_checkpoint(config, workdir)
  return predict(config, workdir)
