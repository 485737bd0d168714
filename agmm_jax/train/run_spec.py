"""The run spec: what a training run is, resolved once from the config and the
prepared data's metadata.

:func:`resolve` reads the config fields that size and schedule a run (the
mesh, the global batch, the step counts, the logging / evaluation /
checkpoint periods, the keep count), the dataset's class names and example
count, builds the loss (checked at the training shape) and the evaluation
spec, and checks everything the data can contradict before anything is
built. The stages, the loop and the trainer then read the :class:`RunSpec`,
never those config fields again; the config itself travels along only for
the blocks that are built from it as a whole (``model``, ``optimizer``,
``data``, a method's own block).
"""

import dataclasses
import os
from typing import Sequence

import jax
import ml_collections

from agmm_jax import methods
from agmm_jax.data import input_pipeline
from agmm_jax.evaluation import evaluator
from agmm_jax.runtime import sharding as sharding_lib


@dataclasses.dataclass(frozen=True)
class Periods:
  """How often a stage logs, evaluates and saves, as the config says:
  ``eval_every`` -1 is once per epoch; a period of 0 (or below, other than
  eval's -1) means only at a stage's last step."""
  log_every: int
  eval_every: int
  checkpoint_every: int
  image_summary_every: int

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'Periods':
    return cls(log_every=int(config.log_every_steps),
               eval_every=int(config.eval_every_steps),
               checkpoint_every=int(config.checkpoint_every_steps),
               image_summary_every=int(config.image_summary_every_steps))

  def steps(self, steps_per_epoch: int, total_steps: int) -> tuple[int, int, int]:
    """``(log_every, eval_every, checkpoint_every)`` in steps of a stage of
    ``total_steps`` whose epoch is ``steps_per_epoch`` steps."""
    eval_every = steps_per_epoch if self.eval_every == -1 else self.eval_every
    return (max(self.log_every, 1),
            eval_every if eval_every > 0 else total_steps,
            self.checkpoint_every if self.checkpoint_every > 0 else total_steps)


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Whole global batches in an epoch of ``num_examples``, at least 1."""
  return max(num_examples // global_batch_size, 1)


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """A training run, resolved (module docstring).

  Attributes:
    config: the config, for the blocks built whole (model, optimizer, data).
    workdir: absolute path of the run's folder.
    mesh: the device mesh.
    seed: of the model's initialization and the input pipeline.
    global_batch_size / batch_per_process: the training batch.
    steps_per_epoch: of the first stage (the prepared training split).
    total_steps: of the first stage (``num_train_steps``, or ``num_epochs``
      epochs).
    periods: the schedule's periods (:class:`Periods`).
    keep_checkpoints: latest checkpoints kept per stage.
    keep_checkpoint_every_steps: steps whose checkpoints are kept too (0: none).
    class_names: the dataset's classes, in order.
    loss: the training loss, checked at the training shape.
    eval: the evaluation spec (``evaluator.EvalSpec``).
  """
  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  seed: int
  global_batch_size: int
  batch_per_process: int
  steps_per_epoch: int
  total_steps: int
  periods: Periods
  keep_checkpoints: int
  keep_checkpoint_every_steps: int
  class_names: tuple[str, ...]
  loss: methods.Loss
  eval: evaluator.EvalSpec

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def training_loss(config: ml_collections.ConfigDict,
                  num_classes: int) -> methods.Loss:
  """The loss of ``config.loss``, its options checked at the training shape
  (global batch, crop, ``num_classes``; e.g. a bilateral grid over its
  memory limit is a one-line ValueError here, before anything is built)."""
  return methods.build_loss(config.loss, methods.TrainShape(
      batch_size=int(config.global_batch_size),
      crop_size=int(config.data.crop_size), num_classes=int(num_classes)))


def resolve(config: ml_collections.ConfigDict, workdir: str) -> RunSpec:
  """The :class:`RunSpec` of ``config`` on its prepared data; one-line
  ValueError / FileNotFoundError for a batch the devices cannot split, data
  that are missing or contradict the config (crop size, eval canvas) or a
  loss whose options cannot work at the training shape."""
  mesh = sharding_lib.create_mesh(config.mesh)
  global_batch_size = int(config.global_batch_size)
  batch_per_process = sharding_lib.per_process_batch_size(global_batch_size, mesh)
  metadata = input_pipeline.checked_metadata(config.data)
  class_names = tuple(input_pipeline.class_names(metadata))
  loss = training_loss(config, len(class_names))
  num_train = input_pipeline.num_examples(metadata, config.data.train_split,
                                          config.data.dir)
  input_pipeline.check_crop_size(config.data)
  eval_spec = evaluator.EvalSpec.from_config(config, class_names)
  eval_spec.check(mesh)
  epoch = steps_per_epoch(num_train, global_batch_size)
  total_steps = (int(config.num_train_steps) if config.num_train_steps > 0
                 else int(config.num_epochs) * epoch)
  return RunSpec(
      config=config, workdir=os.path.abspath(workdir), mesh=mesh, seed=int(config.seed),
      global_batch_size=global_batch_size, batch_per_process=batch_per_process,
      steps_per_epoch=epoch, total_steps=total_steps,
      periods=Periods.from_config(config),
      keep_checkpoints=int(config.keep_checkpoints),
      keep_checkpoint_every_steps=int(config.keep_checkpoint_every_steps),
      class_names=class_names,
      loss=loss, eval=eval_spec)


def for_inference(config: ml_collections.ConfigDict, workdir: str,
                  class_names: Sequence[str], mesh: jax.sharding.Mesh) -> RunSpec:
  """A spec that gives a run's state structure without its training data
  (eval and predict, possibly on other data): one-step stages, the loss
  unchecked against a training shape."""
  return RunSpec(
      config=config, workdir=os.path.abspath(workdir), mesh=mesh, seed=int(config.seed),
      global_batch_size=int(config.global_batch_size), batch_per_process=1,
      steps_per_epoch=1, total_steps=1, periods=Periods.from_config(config),
      keep_checkpoints=int(config.keep_checkpoints),
      keep_checkpoint_every_steps=0,  # Nothing is saved (older configs lack it).
      class_names=tuple(class_names),
      loss=methods.build_loss(config.loss),
      eval=evaluator.EvalSpec.from_config(config, class_names))
