"""The training run: ``train_and_evaluate(config, workdir)``.

Builds the loss (``agmm_jax.methods``, from ``config.loss``), the model with
the heads the loss declares, the input pipeline with the batch fields it
declares, and the replicated train state (``agmm_jax.train.state``); then runs
the jitted step (``agmm_jax.train.steps``) in the loop of ``agmm_jax.train.loop``
(logged means, periodic evaluation, checkpoints, NaN checks, SIGTERM:
``loop.NonFiniteError``, ``loop.Preempted``); then, for a loss with SPML's
term, SPML's second stage (``agmm_jax.methods.spml_stage2``: pseudo-labels, the final
classifier in the same loop, evaluated at steps after the first stage's).
Rerunning resumes from the latest checkpoint, data iterator included. Kills,
failed checkpoint writes and unreadable checkpoints: docs/reliability.md.
"""

import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from agmm_jax.storage import checkpoint as checkpoint_lib
from agmm_jax.evaluation import evaluator
from agmm_jax.evaluation import modes
from agmm_jax.data import input_pipeline
from agmm_jax.train import loop
from agmm_jax import methods
from agmm_jax.runtime import sharding as sharding_lib
from agmm_jax.methods import spml_stage2
from agmm_jax.train import steps
from agmm_jax.storage import summary
from agmm_jax.train import state as train_state_lib
from agmm_jax.evaluation import visualize


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
    # Written beside and renamed: a run killed mid-write leaves the previous
    # config.json whole.
    with open(f'{path}.tmp', 'w') as f:
      f.write(text)
    os.replace(f'{path}.tmp', path)
  return path


def _image_summaries(local_batch: dict[str, np.ndarray], prediction: np.ndarray,
                     response: np.ndarray | None,
                     response_name: str | None) -> dict[str, np.ndarray]:
  """uint8 ``[1, H, W, 3]`` images of example 0: input, labels, prediction
  and the loss's summary map (as ``response_name``) where it has one."""
  image = visualize.denormalize(local_batch['image'][0])
  label = local_batch['label'][0]
  images = {
      'input': image[None],
      'sparse_labels': visualize.colorize(label)[None],
      'prediction': visualize.overlay(image, prediction)[None],
  }
  if response_name is not None:
    images[response_name] = visualize.heatmap(response)[None]
  return images


def training_loss(config: ml_collections.ConfigDict,
                  num_classes: int) -> methods.Loss:
  """The loss of ``config.loss``, its options checked at the training shape
  (global batch, crop, ``num_classes``; e.g. a bilateral grid over its
  memory limit is a one-line ValueError here, before anything is built)."""
  return methods.build_loss(config.loss, methods.TrainShape(
      batch_size=int(config.global_batch_size),
      crop_size=int(config.data.crop_size), num_classes=int(num_classes)))


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains with periodic evaluation and checkpoints; resumes from ``workdir``.

  Returns the final evaluation scores (``miou``, ``per_class_iou``,
  ``pixel_accuracy``, ...) plus ``step``.

  Raises:
    FileNotFoundError / ValueError: bad data folder or config.
    loop.NonFiniteError: a NaN/inf loss, gradient or parameter (the last good
      checkpoint is kept; the bad state is never saved).
    checkpoint_lib.SaveError: a checkpoint could not be written (disk full);
      the last complete one is intact.
    loop.Preempted: SIGTERM arrived (at any time after the start); the state of the
      next step was saved first.
  """
  with loop.SigtermFlag() as sigterm:
    return _train_and_evaluate(config, workdir, sigterm)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        sigterm: loop.SigtermFlag) -> dict[str, Any]:
  """The body of ``train_and_evaluate`` (SIGTERM handler installed)."""
  workdir = os.path.abspath(workdir)
  mesh = sharding_lib.create_mesh(config.mesh)
  batch_per_process = sharding_lib.per_process_batch_size(
      int(config.global_batch_size), mesh)
  metadata = input_pipeline.checked_metadata(config.data)
  class_names = input_pipeline.class_names(metadata)
  num_classes = len(class_names)
  loss = training_loss(config, num_classes)
  # Everything the data can contradict is checked before the first step.
  modes.check_classes(workdir, class_names, config.data.dir)
  num_train = input_pipeline.num_examples(metadata, config.data.train_split,
                                          config.data.dir)
  input_pipeline.check_crop_size(config.data)
  eval_spec = evaluator.EvalSpec.from_config(config, class_names)
  eval_spec.check(mesh)
  steps_per_epoch = max(num_train // int(config.global_batch_size), 1)
  total_steps = (int(config.num_train_steps) if config.num_train_steps > 0
                 else int(config.num_epochs) * steps_per_epoch)
  schedule = loop.Schedule.from_config(config, steps_per_epoch, total_steps)
  stage2 = spml_stage2.is_enabled(config)
  if stage2:
    spml_stage2.check_config(config)
  write_config(config, workdir)
  modes.record_classes(workdir, class_names)

  checkpointer = checkpoint_lib.Checkpointer(
      workdir, keep=int(config.keep_checkpoints))
  resuming = checkpointer.latest_step() is not None
  state, model_defs, tx = train_state_lib.create_train_state(
      config, num_classes, mesh, total_steps, extra_heads=loss.needs.heads,
      method_state=loss.init_state(int(config.global_batch_size), num_classes),
      load_pretrained=not resuming)
  train_iter = input_pipeline.create_train_iterator(
      config.data, batch_size_per_process=batch_per_process, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      batch_fields=loss.needs.batch_fields)
  if resuming:
    state, step = checkpointer.restore_latest(
        checkpoint_lib.abstract_like(state), train_iter)
    logging.info('resumed from %s at step %d', workdir, step)
  step = int(train_state_lib.host(state['step']))

  lr_schedule = train_state_lib.learning_rate_schedule(config.optimizer, total_steps)
  train_step = steps.make_train_step(
      model_defs, loss, tx, mesh, lr_schedule=lr_schedule,
      head_lr_multiplier=float(config.optimizer.head_lr_multiplier))
  summary_fn = steps.make_summary_fn(model_defs, mesh, loss)
  evaluate = evaluator.make_evaluator(model_defs, eval_spec, mesh)
  writer = summary.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  if step == 0:
    writer.write_hparams({k: str(v) for k, v in config.to_dict().items()
                          if not isinstance(v, dict)})

  def write_image_summaries(at_step: int, state: Any, local_batch: dict[str, np.ndarray],
                            batch: dict[str, jax.Array]) -> None:
    if config.image_summary_every_steps > 0 and (
        at_step % int(config.image_summary_every_steps) == 0 or at_step == 1):
      prediction, response = summary_fn(state, batch)
      if jax.process_index() == 0:
        writer.write_images(at_step, {
            f'train/{k}': v for k, v in _image_summaries(
                local_batch, train_state_lib.host(prediction),
                train_state_lib.host(response), loss.summary_name).items()})

  state, scores = loop.run(
      state, train_step, train_iter, mesh,
      schedule, checkpointer, writer, evaluate, sigterm,
      global_batch_size=int(config.global_batch_size),
      reporting=loop.Reporting(name='', scalar_prefix='train', step_offset=0,
                               class_names=class_names),
      after_step=write_image_summaries)
  step = int(train_state_lib.host(state['step']))
  if stage2:
    scores = spml_stage2.train_stage2(config, workdir, state, model_defs, loss, mesh,
                                      class_names, total_steps, evaluate, sigterm)
    step = scores.pop('step')
  elif not scores:
    # Nothing left to train (a rerun of a finished run): report the final
    # state's scores all the same.
    logging.info('%s: already trained to step %d', workdir, step)
    scores = evaluate(state)
  evaluator.print_scores(eval_spec, step, scores)
  scores['step'] = step
  return scores
