"""Stages: the phases of a training run, run in order, each resumable.

A run is a list of stages. A :class:`TrainingStage` trains a state in the
loop (:func:`agmm_jax.train.loop.run`: logging, evaluation, best and latest
checkpoints, NaN checks, SIGTERM); it declares its name, its checkpoint
folder (``WORKDIR/FOLDER/checkpoints``; ``''`` is WORKDIR itself), the
prefix of its training scalars, and how to build, when it starts, its
initial state, its data source, its number of steps and its step function.
A :class:`PassStage` writes a folder once (e.g. pseudo-labels, through
:mod:`agmm_jax.data.pseudo_labels`: written beside and renamed when
complete). Both may use what the stages before them left
(:class:`Context`: a training stage's final state, a pass's folder).

:func:`run` drives them: the step axis of the summaries is the run's (a
stage's steps are offset by the steps of the training stages before it), a
finished stage is never redone (a training stage whose latest checkpoint is
its last step only restores it; a pass whose folder exists is skipped), and
SIGTERM during a pass raises ``loop.Preempted`` with the pass left to be
resumed.

Which stages a run has: the method's (:func:`plan`, from the stage plans
methods register with ``methods.core.register_stages``), or the one stage
that trains the config's loss (:func:`loss_training_stage`); with
``config.warmup.fraction`` > 0, a partial cross-entropy warm-up before them
(:func:`with_warmup`).
"""

import dataclasses
import math
import os
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np
import optax

from agmm_jax.data import input_pipeline
from agmm_jax.evaluation import evaluator
from agmm_jax.evaluation import visualize
from agmm_jax.methods import core as methods_core
from agmm_jax.storage import checkpoint as checkpoint_lib
from agmm_jax.storage import run_identity
from agmm_jax.storage import summary
from agmm_jax.train import loop
from agmm_jax.train import run_spec as run_spec_lib
from agmm_jax.train import state as train_state_lib
from agmm_jax.train import steps

# The first stage's name, folder and scalar prefix: a one-stage run's
# workdir is laid out as before stages existed.
TRAIN_STAGE = 'train'
# The pCE warm-up's name, folder (WORKDIR/warmup/checkpoints) and prefix.
WARMUP_STAGE = 'warmup'


@dataclasses.dataclass
class Trained:
  """What a training stage leaves: its final ``state`` and ``model_defs``,
  the last evaluation's ``scores`` (empty when it trained nothing now),
  ``step`` (its steps done) of ``total_steps``, its ``step_offset`` on the
  run's axis, and ``evaluate(state)``."""
  state: train_state_lib.TrainState
  model_defs: train_state_lib.ModelDefs
  scores: dict[str, Any]
  step: int
  total_steps: int
  step_offset: int
  evaluate: Callable[[Any], dict[str, Any]]


@dataclasses.dataclass
class Context:
  """The run's spec, its SIGTERM flag and the results of the stages run so
  far by name (:class:`Trained`, or the folder a pass wrote)."""
  run: run_spec_lib.RunSpec
  sigterm: loop.SigtermFlag
  results: dict[str, Any] = dataclasses.field(default_factory=dict)
  # Evaluations by the model definitions they run (stages that share a
  # network share its compiled evaluation).
  _evaluators: dict[int, Any] = dataclasses.field(default_factory=dict)

  def evaluator(self, model_defs: train_state_lib.ModelDefs
                ) -> Callable[[Any], dict[str, Any]]:
    """``evaluate(state) -> scores`` of the run's eval spec for ``model_defs``."""
    if id(model_defs) not in self._evaluators:
      self._evaluators[id(model_defs)] = (model_defs, make_evaluate(self.run, model_defs))
    return self._evaluators[id(model_defs)][1]

  def last_trained(self) -> Trained:
    """The result of the latest training stage."""
    trained = [r for r in self.results.values() if isinstance(r, Trained)]
    if not trained:
      raise ValueError('no training stage ran before this stage')
    return trained[-1]


@dataclasses.dataclass(frozen=True)
class Initial:
  """A training stage's initial state, the model definitions it is trained
  with, and the optimizer of its ``opt_state``."""
  state: train_state_lib.TrainState
  model_defs: train_state_lib.ModelDefs
  tx: optax.GradientTransformation


@dataclasses.dataclass(frozen=True)
class DataSource:
  """A training stage's data: the data block of the input pipeline (``dir``,
  ``train_split``, ``train_labels``, augmentation) and the extra batch
  fields its step needs."""
  data: ml_collections.ConfigDict
  batch_fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)


StepFn = Callable[[Any, dict[str, jax.Array]], tuple[Any, Any]]
AfterStep = Callable[[int, Any, dict[str, np.ndarray], dict[str, jax.Array]], None]


@dataclasses.dataclass(frozen=True)
class TrainingStage:
  """A stage the loop trains (module docstring).

  ``data(context)``: its :class:`DataSource`. ``total_steps(context,
  steps_per_epoch)``: its length (``steps_per_epoch`` of its data).
  ``init(context, total_steps, load_pretrained)``: its :class:`Initial`
  (``load_pretrained`` is False when a checkpoint will replace it).
  ``make_step(context, initial, total_steps)``: its jitted step.
  ``after_step(context, initial, writer)``: a callback after every step
  (image summaries), or None. ``evaluate(context, initial)``: its
  ``evaluate(state) -> scores`` (``miou``, ``pixel_accuracy``,
  ``per_class_iou``: what the loop logs and keeps the best checkpoint by),
  or None for the run's evaluation of the model's segmentation.
  """
  name: str
  folder: str
  scalar_prefix: str
  data: Callable[[Context], DataSource]
  total_steps: Callable[[Context, int], int]
  init: Callable[[Context, int, bool], Initial]
  make_step: Callable[[Context, Initial, int], StepFn]
  after_step: Callable[[Context, Initial, Any], AfterStep] | None = None
  evaluate: Callable[[Context, Initial], Callable[[Any], dict[str, Any]]] | None = None


@dataclasses.dataclass(frozen=True)
class PassStage:
  """A stage that writes ``WORKDIR/FOLDER`` once: ``write(context, target,
  stop)`` writes it (beside, renamed when complete: a folder that exists is
  complete) and calls ``stop()`` between units of work, which raises
  ``loop.Preempted`` once SIGTERM arrived."""
  name: str
  folder: str
  write: Callable[[Context, str, Callable[[], None]], None]


Stage = TrainingStage | PassStage


def make_evaluate(spec: run_spec_lib.RunSpec, model_defs: train_state_lib.ModelDefs
                  ) -> Callable[[Any], dict[str, Any]]:
  """``evaluate(state) -> scores`` of ``spec.eval`` for ``model_defs``."""
  return evaluator.make_evaluator(model_defs, spec.eval, spec.mesh)


def _image_summaries(local_batch: dict[str, np.ndarray], prediction: np.ndarray,
                     response: np.ndarray | None,
                     response_name: str | None) -> dict[str, np.ndarray]:
  """uint8 ``[1, H, W, 3]`` images of example 0: input, labels, prediction
  and the loss's summary map (as ``response_name``) where it has one."""
  image = visualize.denormalize(local_batch['image'][0])
  images = {
      'input': image[None],
      'sparse_labels': visualize.colorize(local_batch['label'][0])[None],
      'prediction': visualize.overlay(image, prediction)[None],
  }
  if response_name is not None:
    images[response_name] = visualize.heatmap(response)[None]
  return images


def _loss_image_summaries(context: Context, initial: Initial, writer: Any) -> AfterStep:
  """Image summaries of the loss's training stage every
  ``image_summary_every`` steps and at its first step."""
  spec = context.run
  every = spec.periods.image_summary_every
  summary_fn = steps.make_summary_fn(initial.model_defs, spec.mesh, spec.loss)

  def after_step(at_step: int, state: Any, local_batch: dict[str, np.ndarray],
                 batch: dict[str, jax.Array]) -> None:
    if every > 0 and (at_step % every == 0 or at_step == 1):
      prediction, response = summary_fn(state, batch)
      if jax.process_index() == 0:
        writer.write_images(at_step, {
            f'train/{k}': v for k, v in _image_summaries(
                local_batch, train_state_lib.host(prediction),
                train_state_lib.host(response), spec.loss.summary_name).items()})

  return after_step


def _loss_init(context: Context, total_steps: int, load_pretrained: bool) -> Initial:
  """A new model with the loss's heads and method state."""
  spec = context.run
  state, model_defs, tx = train_state_lib.create_train_state(
      spec.config, spec.num_classes, spec.mesh, total_steps,
      extra_heads=spec.loss.needs.heads,
      method_state=spec.loss.init_state(spec.global_batch_size, spec.num_classes),
      load_pretrained=load_pretrained)
  return Initial(state, model_defs, tx)


def train_step_of(loss: methods_core.Loss, context: Context, initial: Initial,
                  total_steps: int) -> StepFn:
  """The train step of ``loss`` (``steps.make_train_step``) with
  ``config.optimizer``'s poly schedule over ``total_steps``."""
  optimizer = context.run.config.optimizer
  return steps.make_train_step(
      initial.model_defs, loss, initial.tx, context.run.mesh,
      lr_schedule=train_state_lib.learning_rate_schedule(optimizer, total_steps),
      head_lr_multiplier=float(optimizer.head_lr_multiplier))


def _loss_step(context: Context, initial: Initial, total_steps: int) -> StepFn:
  """The train step of the run's loss."""
  return train_step_of(context.run.loss, context, initial, total_steps)


def config_data(context: Context) -> DataSource:
  """The config's training data with the loss's batch fields."""
  return DataSource(context.run.config.data, context.run.loss.needs.batch_fields)


def run_length(context: Context, steps_per_epoch: int) -> int:
  """The run's ``total_steps`` (``num_train_steps`` or ``num_epochs`` of the
  config's data)."""
  del steps_per_epoch
  return context.run.total_steps


def loss_training_stage(
    name: str = TRAIN_STAGE, folder: str = '', scalar_prefix: str = 'train', *,
    data: Callable[[Context], DataSource] = config_data,
    total_steps: Callable[[Context, int], int] = run_length) -> TrainingStage:
  """The stage that trains a new model (pretrained backbone) by the run's
  loss, on ``data`` (default: the config's), with image summaries. With the
  defaults it is the first stage of every run."""
  return TrainingStage(name=name, folder=folder, scalar_prefix=scalar_prefix,
                       data=data, total_steps=total_steps, init=_loss_init,
                       make_step=_loss_step, after_step=_loss_image_summaries)


def prepared_data(pass_name: str) -> Callable[[Context], DataSource]:
  """``data`` of a stage that trains on the folder the pass ``pass_name``
  wrote (its sparse labels: pseudo-labels), augmented as the config says."""

  def data(context: Context) -> DataSource:
    block = context.run.config.data.copy_and_resolve_references()
    block.dir = context.results[pass_name]
    block.train_labels = 'sparse'
    return DataSource(block)

  return data


def plan(spec: run_spec_lib.RunSpec) -> list[Stage]:
  """The stages of ``spec``'s run: its method's (``methods.core.
  stages_of``), else the one stage that trains its loss; after the pCE
  warm-up when ``config.warmup.fraction`` > 0 (:func:`with_warmup`)."""
  stages = methods_core.stages_of(spec.config, spec.loss) or [loss_training_stage()]
  stages = with_warmup(spec.config, stages)
  names = [stage.name for stage in stages]
  folders = [stage.folder for stage in stages]
  if len(set(names)) != len(names) or len(set(folders)) != len(folders):
    raise ValueError(f'stages {names}: names and folders {folders} must be distinct')
  return list(stages)


def warmup_fraction(config: ml_collections.ConfigDict) -> float:
  """``config.warmup.fraction`` (0 for configs without the block); a
  one-line ValueError outside [0, 1)."""
  fraction = float(config.warmup.fraction) if 'warmup' in config else 0.0
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f'config.warmup.fraction={fraction}: expected a share of '
                     'the run in [0, 1) (0: no warm-up)')
  return fraction


def warmup_steps(config: ml_collections.ConfigDict, run_steps: int) -> int:
  """The warm-up's steps of a run of ``run_steps``: ``floor(fraction x
  run_steps)``, at least one and at most ``run_steps - 1`` (0 without a
  warm-up)."""
  fraction = warmup_fraction(config)
  if fraction == 0.0:
    return 0
  return min(max(1, math.floor(fraction * run_steps)), run_steps - 1)


def with_warmup(config: ml_collections.ConfigDict, stages: Sequence[Stage]) -> list[Stage]:
  """``stages`` after a warm-up when ``config.warmup.fraction`` > 0.

  Soft self-labeling and the self-training methods start their own loss
  from a network that pCE has trained (a pseudo-label of a network that
  knows nothing is noise). The warm-up trains a new model (pretrained
  backbone, none of the loss's heads) by the partial cross-entropy alone
  for that share of the run's steps; the first stage then starts from its
  network (every parameter and BatchNorm statistic they share; the loss's
  own heads new) with a new optimizer state and learning-rate schedule over
  the rest of the run (the paper's warm-up, then its schedule), so the run
  costs as many steps as without one. The first stage must be the one that
  trains the loss on the run's pixel labels (:func:`loss_training_stage`).
  """
  if warmup_fraction(config) == 0.0:
    return list(stages)
  first = stages[0]
  if not isinstance(first, TrainingStage) or first.init is not _loss_init:
    raise ValueError(
        f'config.warmup.fraction={float(config.warmup.fraction)}: the pCE '
        f'warm-up comes before a stage that trains the loss on pixel labels, '
        f'and this run starts with {first.name!r}; set it to 0')
  warmup = TrainingStage(
      name=WARMUP_STAGE, folder=WARMUP_STAGE, scalar_prefix=WARMUP_STAGE,
      data=config_data,
      total_steps=lambda context, _: warmup_steps(config, context.run.total_steps),
      init=_warmup_init, make_step=_warmup_step)

  def rest_of_run(context: Context, steps_per_epoch: int) -> int:
    return (first.total_steps(context, steps_per_epoch)
            - context.results[WARMUP_STAGE].total_steps)

  return [warmup, dataclasses.replace(first, total_steps=rest_of_run,
                                      init=_init_after_warmup), *stages[1:]]


def _warmup_init(context: Context, total_steps: int, load_pretrained: bool) -> Initial:
  """A new model without the loss's heads and method state."""
  spec = context.run
  state, model_defs, tx = train_state_lib.create_train_state(
      spec.config, spec.num_classes, spec.mesh, total_steps,
      load_pretrained=load_pretrained)
  return Initial(state, model_defs, tx)


def _warmup_step(context: Context, initial: Initial, total_steps: int) -> StepFn:
  """The train step of the partial cross-entropy alone (the run's loss
  options, e.g. ``rows_per_chunk``, kept)."""
  loss_config = context.run.config.loss.copy_and_resolve_references()
  loss_config.weights = ml_collections.ConfigDict({'pce': 1.0})
  return train_step_of(methods_core.build_loss(loss_config), context, initial, total_steps)


def _init_after_warmup(context: Context, total_steps: int,
                       load_pretrained: bool) -> Initial:
  """The loss's new model started from the warm-up's network when the stage
  starts (``load_pretrained``: no checkpoint of its own will replace it)."""
  initial = _loss_init(context, total_steps, load_pretrained=False)
  if not load_pretrained:
    return initial
  return started_from(initial, context.results[WARMUP_STAGE].state, context.run.mesh)


def shared_leaves(target: Any, source: Any, skip: tuple[str, ...] = ()) -> Any:
  """``target`` with every leaf that ``source`` has at the same path and
  shape taken from ``source``, except under the top-level keys ``skip``."""
  found = dict(jax.tree_util.tree_flatten_with_path(source)[0])

  def take(path, leaf):
    first = str(getattr(path[0], 'key', '')) if path else ''
    other = found.get(path)
    if first in skip or other is None or other.shape != leaf.shape:
      return leaf
    return other

  return jax.tree_util.tree_map_with_path(take, target)


def started_from(initial: Initial, source: train_state_lib.TrainState,
                 mesh: jax.sharding.Mesh, skip: tuple[str, ...] = ()) -> Initial:
  """``initial`` with the parameters and BatchNorm statistics it shares with
  ``source``'s network (:func:`shared_leaves`; ``skip``: top-level
  parameter keys kept new) and a new optimizer state of them."""
  params = shared_leaves(initial.state['params'], source['params'], skip)
  model_state = shared_leaves(initial.state['model_state'], source['model_state'])
  state = dict(initial.state, params=params, model_state=model_state,
               opt_state=initial.tx.init(params))
  method_state = state.pop('method_state', None)
  state = train_state_lib.replicate(state, mesh)
  if method_state is not None:
    state['method_state'] = method_state
  return dataclasses.replace(initial, state=state)


def _run_pass(stage: PassStage, context: Context, offset: int) -> str:
  """Writes ``stage``'s folder unless it exists; returns its path."""
  target = os.path.join(context.run.workdir, stage.folder)
  if os.path.isdir(target):
    logging.info('%s: %s already written', stage.name, target)
    return target

  def stop() -> None:
    if context.sigterm.any_process():
      raise loop.Preempted(offset)

  stage.write(context, target, stop)
  return target


def _run_training(stage: TrainingStage, context: Context, offset: int) -> Trained:
  """Trains ``stage`` to its last step, resuming from its checkpoints."""
  spec = context.run
  source = stage.data(context)
  metadata = input_pipeline.read_metadata(source.data.dir)
  epoch = run_spec_lib.steps_per_epoch(input_pipeline.num_examples(
      metadata, source.data.train_split, source.data.dir), spec.global_batch_size)
  total = stage.total_steps(context, epoch)
  checkpointer = checkpoint_lib.Checkpointer(
      os.path.join(spec.workdir, stage.folder), keep=spec.keep_checkpoints,
      keep_period=spec.keep_checkpoint_every_steps)
  resuming = checkpointer.latest_step() is not None
  initial = stage.init(context, total, not resuming)
  train_iter = input_pipeline.create_train_iterator(
      source.data, batch_size_per_process=spec.batch_per_process, seed=spec.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      batch_fields=source.batch_fields)
  state = initial.state
  if resuming:
    state, _ = checkpointer.restore_latest(checkpoint_lib.abstract_like(state), train_iter)
  step = int(train_state_lib.host(state['step']))
  if resuming:
    logging.info('%s: resumed from %s at step %d', stage.name, checkpointer.latest_dir, step)
  writer = summary.create_default_writer(spec.workdir, just_logging=jax.process_index() > 0)
  if offset == 0 and step == 0:
    writer.write_hparams({k: str(v) for k, v in spec.config.to_dict().items()
                          if not isinstance(v, dict)})
  evaluate = (stage.evaluate(context, initial) if stage.evaluate is not None
              else context.evaluator(initial.model_defs))
  log_every, eval_every, checkpoint_every = spec.periods.steps(epoch, total)
  state, scores = loop.run(
      state, stage.make_step(context, initial, total), train_iter, spec.mesh,
      loop.Schedule(total, log_every, eval_every, checkpoint_every),
      checkpointer, writer, evaluate, context.sigterm,
      global_batch_size=spec.global_batch_size,
      reporting=loop.Reporting(name=f'{stage.name}: ' if offset else '',
                               scalar_prefix=stage.scalar_prefix, step_offset=offset,
                               class_names=list(spec.class_names)),
      after_step=(stage.after_step(context, initial, writer)
                  if stage.after_step is not None else None))
  step = int(train_state_lib.host(state['step']))
  if not scores:
    logging.info('%s: already trained to step %d', stage.name, step)
  return Trained(state, initial.model_defs, scores, step, total, offset, evaluate)


def run(stages: Sequence[Stage], spec: run_spec_lib.RunSpec,
        sigterm: loop.SigtermFlag) -> dict[str, Any]:
  """Runs ``stages`` in order (module docstring). Returns the final
  training stage's last evaluation (of its final state when it trained
  nothing now), with ``step`` on the run's axis."""
  context = Context(spec, sigterm)
  offset = 0
  for stage in stages:
    if isinstance(stage, PassStage):
      context.results[stage.name] = _run_pass(stage, context, offset)
    else:
      trained = _run_training(stage, context, offset)
      context.results[stage.name] = trained
      offset += trained.total_steps
  final = context.last_trained()
  scores = dict(final.scores) or final.evaluate(final.state)
  scores['step'] = final.step_offset + final.step
  return scores


def inference_state(config: ml_collections.ConfigDict, workdir: str,
                    class_names: Sequence[str], mesh: jax.sharding.Mesh,
                    stage_name: str | None = None
                    ) -> tuple[train_state_lib.TrainState, train_state_lib.ModelDefs, str]:
  """The state structure, model definitions and checkpoint folder of the
  model eval and predict restore: that of the last training stage of
  ``config``'s plan whose folder holds a finalized checkpoint step (an
  empty or unfinished ``checkpoints/`` does not count; the first stage's
  when none has), or of the training stage ``stage_name``. Nothing is
  trained, loaded or restored.

  Raises:
    ValueError: one line naming the plan's training stages when
      ``stage_name`` is not one of them.
  """
  spec = run_spec_lib.for_inference(config, workdir, class_names, mesh)
  context = Context(spec, loop.SigtermFlag())
  chosen, names = None, []
  for stage in plan(spec):
    if isinstance(stage, PassStage):
      context.results[stage.name] = os.path.join(spec.workdir, stage.folder)
      continue
    initial = stage.init(context, 1, False)
    context.results[stage.name] = Trained(initial.state, initial.model_defs, {}, 0, 1, 0,
                                          lambda state: {})
    folder = os.path.join(spec.workdir, stage.folder)
    names.append(stage.name)
    if stage_name is not None:
      if stage.name == stage_name:
        return initial.state, initial.model_defs, folder
    elif chosen is None or run_identity.has_checkpoint(folder):
      chosen = (initial.state, initial.model_defs, folder)
  if stage_name is not None:
    raise ValueError(f'{workdir}: its plan has no training stage {stage_name!r} '
                     f'(its training stages: {", ".join(names)})')
  return chosen
