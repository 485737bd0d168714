"""Inference from a run's checkpoints: evaluation and prediction modes, and
the evaluation of a train state over a dataset split (shared with training).
"""

import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from agmm_jax import checkpoint as checkpoint_lib
from agmm_jax import evaluate
from agmm_jax import input_pipeline
from agmm_jax import methods
from agmm_jax import metrics as metrics_lib
from agmm_jax import sharding as sharding_lib
from agmm_jax import steps
from agmm_jax import train_state as train_state_lib
from agmm_jax import visualize


def evaluate_dataset(eval_fn, state: train_state_lib.TrainState,
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
    confusion = steps.merge(
        confusion, eval_fn(state['params'], state['model_state'], batch))
  if confusion is None:
    raise ValueError(f'{config.data.dir}: split {config.data.eval_split!r} '
                     'has no examples')
  confusion = train_state_lib.host(confusion.compute())
  scores = metrics_lib.segmentation_scores(confusion)
  scores['confusion'] = confusion
  return scores


def print_scores(config: ml_collections.ConfigDict, step: int,
                 scores: dict[str, Any], class_names: list[str]) -> None:
  """Prints the per-class IoU table of an evaluation (process 0 only)."""
  if jax.process_index() == 0:
    print(f'{config.data.eval_split} at step {step} ({config.eval.mode}):')
    print(metrics_lib.format_iou_table(
        scores['per_class_iou'], class_names, scores['miou'],
        scores['pixel_accuracy']))


def restore_for_inference(config: ml_collections.ConfigDict, workdir: str,
                           num_classes: int, mesh: jax.sharding.Mesh):
  """Model defs and the best (or latest) checkpointed state of ``workdir``."""
  # The training loss's heads and method state give the checkpoint's structure.
  loss = methods.build_loss(config.loss)
  state, model_defs, _ = train_state_lib.create_train_state(
      config, num_classes, mesh, total_steps=1, extra_heads=loss.needs.heads,
      method_state=loss.init_state(int(config.global_batch_size), num_classes),
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
  class_names = input_pipeline.class_names(input_pipeline.checked_metadata(config.data))
  state, model_defs, step = restore_for_inference(
      config, workdir, len(class_names), mesh)
  eval_fn = steps.make_eval_fn(model_defs, config, len(class_names), mesh)
  scores = evaluate_dataset(eval_fn, state, config, mesh, len(class_names))
  print_scores(config, step, scores, class_names)
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
  class_names = input_pipeline.class_names(input_pipeline.checked_metadata(config.data))
  mesh = sharding_lib.create_mesh(config.mesh)
  state, model_defs, _ = restore_for_inference(config, workdir,
                                               len(class_names), mesh)
  variables = (state['params'], state['model_state'])
  predict_fn = evaluate.make_predict_fn(
      steps.eval_apply_fn(model_defs), mode=config.eval.mode,
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
