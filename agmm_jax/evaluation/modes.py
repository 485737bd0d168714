"""Inference from a run's checkpoints: the eval and predict modes (both
through ``agmm_jax.evaluation.evaluator``).
"""

import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from agmm_jax.storage import checkpoint as checkpoint_lib
from agmm_jax.storage import workdir as workdir_lib
from agmm_jax.evaluation import evaluator
from agmm_jax.data import input_pipeline
from agmm_jax.runtime import sharding as sharding_lib
from agmm_jax.train import stages
from agmm_jax.evaluation import visualize


# What the workdir records (agmm_jax.storage.workdir), under the names
# callers of this module used.
CLASSES_FILE = workdir_lib.CLASSES_FILE
checkpoint_classes = workdir_lib.checkpoint_classes
check_classes = workdir_lib.check_classes
record_classes = workdir_lib.record_classes


def restore_for_inference(config: ml_collections.ConfigDict, workdir: str,
                          num_classes: int, mesh: jax.sharding.Mesh,
                          stage_name: str | None = None):
  """Model defs and the best (or latest, ``config.eval.checkpoint``)
  checkpointed state of ``workdir``'s final model: of the last stage of the
  run's plan that has a checkpoint (``agmm_jax.train.stages.
  inference_state``), or of its training stage ``stage_name``, its step
  being that stage's."""
  which = config.eval.checkpoint
  if which not in ('best', 'latest'):
    raise ValueError(f"config.eval.checkpoint must be 'best' or 'latest', got {which!r}")
  # Only the count shapes the state.
  class_names = [f'class_{i}' for i in range(num_classes)]
  state, model_defs, folder = stages.inference_state(config, workdir, class_names, mesh,
                                                     stage_name)
  checkpointer = checkpoint_lib.Checkpointer(
      folder, keep=int(config.keep_checkpoints), read_only=True)
  try:
    if which == 'best' and checkpointer.best_step() is not None:
      state, step = checkpointer.restore_best(checkpoint_lib.abstract_like(state))
    else:
      state, step = checkpointer.restore_latest(checkpoint_lib.abstract_like(state))
  finally:
    checkpointer.close()
  logging.info('restored step %d from %s', step, folder)
  return state, model_defs, step


def evaluate_checkpoint(config: ml_collections.ConfigDict,
                        workdir: str) -> dict[str, Any]:
  """Evaluates the best (``config.eval.checkpoint``) checkpoint of ``workdir``
  and prints the per-class IoU table (process 0)."""
  mesh = sharding_lib.create_mesh(config.mesh)
  class_names = input_pipeline.class_names(input_pipeline.checked_metadata(config.data))
  check_classes(workdir, class_names, config.data.dir)
  spec = evaluator.EvalSpec.from_config(config, class_names)
  spec.check(mesh)
  state, model_defs, step = restore_for_inference(
      config, workdir, spec.num_classes, mesh)
  scores = evaluator.make_evaluator(model_defs, spec, mesh)(state)
  evaluator.print_scores(spec, step, scores)
  scores['step'] = step
  return scores


IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')


# Images larger than the eval canvas are padded to the next multiple of this,
# so a folder of mixed sizes compiles a few programs, not one per size.
PREDICT_CANVAS_MULTIPLE = 128


def _predict_canvas(height: int, width: int,
                    eval_canvas: tuple[int, ...]) -> tuple[int, int]:
  """The padded input size for an image: the eval canvas when it fits (an
  empty canvas fits nothing)."""
  if eval_canvas and height <= eval_canvas[0] and width <= eval_canvas[1]:
    return int(eval_canvas[0]), int(eval_canvas[1])
  return tuple(-(-size // PREDICT_CANVAS_MULTIPLE) * PREDICT_CANVAS_MULTIPLE
               for size in (height, width))


PREDICT_ON_UNREADABLE = ('skip', 'fail')
UNREADABLE_FILE = 'unreadable.txt'


def _readable_images(input_dir: str, names: list[str],
                     on_unreadable: str) -> list[str]:
  """The names of ``input_dir`` that decode as images.

  With ``on_unreadable='skip'`` the others are logged, one per line; with
  ``'fail'`` they raise one ValueError listing them all.
  """
  if on_unreadable not in PREDICT_ON_UNREADABLE:
    raise ValueError(f'config.predict.on_unreadable must be one of '
                     f'{PREDICT_ON_UNREADABLE}, got {on_unreadable!r}')
  readable, unreadable = [], []
  for name in names:
    try:
      input_pipeline.load_image_for_predict(os.path.join(input_dir, name))
      readable.append(name)
    except ValueError as error:
      unreadable.append(str(error))
  if unreadable and on_unreadable == 'fail':
    raise ValueError(
        f'{len(unreadable)} unreadable image(s) in {input_dir}, nothing '
        f'written ({"; ".join(unreadable)}); set '
        '--config.predict.on_unreadable=skip to segment the others')
  if not readable:
    raise ValueError(f'{input_dir}: none of its {len(names)} image file(s) '
                     f'decodes ({"; ".join(unreadable)})')
  for problem in unreadable:
    logging.warning('skipped: %s', problem)
  return readable


def _image_files(input_dir: str, skip_dir: str) -> list[str]:
  """The image files under ``input_dir``, subfolders included, as sorted
  relative paths (hidden folders and ``skip_dir``, the output folder when it
  lies inside, are not walked)."""
  skip_dir = os.path.realpath(skip_dir)
  names = []
  for directory, subdirs, files in os.walk(input_dir):
    subdirs[:] = [d for d in subdirs if not d.startswith('.') and
                  os.path.realpath(os.path.join(directory, d)) != skip_dir]
    relative = os.path.relpath(directory, input_dir)
    names.extend(os.path.normpath(os.path.join(relative, n)) for n in files
                 if n.lower().endswith(IMAGE_EXTENSIONS))
  return sorted(names)


def _data_canvas(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """``data.eval_canvas``, sized from the eval split when empty and the data
  are at hand; ``()`` otherwise (each image then gets its own canvas)."""
  if config.data.eval_canvas or not os.path.isfile(
      os.path.join(config.data.dir, input_pipeline.METADATA_FILE)):
    return tuple(config.data.eval_canvas)
  return input_pipeline.eval_canvas(config.data, config.data.eval_split)


def predict(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """Segments every image of ``config.predict.input_dir`` and its
  subfolders, as viewers show it (EXIF orientation applied, any bit depth).

  Writes ``NAME.png`` (palette PNG of class ids) and ``NAME_overlay.jpg`` to
  ``config.predict.output_dir`` (default ``workdir/predictions``; the
  subfolders mirror the input's) and returns
  the written label paths. Files that do not decode as images are skipped and
  listed (log and ``unreadable.txt`` of the output folder), or fail the whole
  run before anything is written (``config.predict.on_unreadable``). The
  class list is the checkpoint's (the training data are not needed when the
  run recorded it). Single process.
  """
  input_dir = config.predict.input_dir
  if not input_dir or not os.path.isdir(input_dir):
    raise FileNotFoundError(
        f'config.predict.input_dir={input_dir!r}: no such directory')
  output_dir = config.predict.output_dir or os.path.join(workdir, 'predictions')
  names = _image_files(input_dir, output_dir)
  if not names:
    raise FileNotFoundError(
        f'{input_dir}: no {"/".join(IMAGE_EXTENSIONS)} files (subfolders '
        'included)')
  readable = _readable_images(input_dir, names, config.predict.on_unreadable)
  class_names = checkpoint_classes(workdir) or input_pipeline.class_names(
      input_pipeline.checked_metadata(config.data))
  base_canvas = _data_canvas(config)
  mesh = sharding_lib.create_mesh(config.mesh)
  state, model_defs, _ = restore_for_inference(config, workdir,
                                               len(class_names), mesh)
  variables = (state['params'], state['model_state'])
  predict_fn = evaluator.make_predict_fn(
      evaluator.eval_apply_fn(model_defs),
      **evaluator.EvalSpec.from_config(config, class_names).mode_options())
  os.makedirs(output_dir, exist_ok=True)
  skipped = sorted(set(names) - set(readable))
  unreadable_path = os.path.join(output_dir, UNREADABLE_FILE)
  if skipped:
    with open(unreadable_path, 'w', encoding='utf-8') as f:
      f.write(''.join(f'{os.path.join(input_dir, n)}\n' for n in skipped))
  elif os.path.exists(unreadable_path):
    os.remove(unreadable_path)
  written = []
  for name in readable:
    path = os.path.join(input_dir, name)
    image = input_pipeline.load_image_for_predict(path)
    height, width = image.shape[:2]
    canvas = _predict_canvas(height, width, base_canvas)
    padded = np.zeros((1, *canvas, 3), np.float32)
    padded[0, :height, :width] = image
    prediction = np.asarray(predict_fn(
        variables, padded, np.array([height], np.int32),
        np.array([width], np.int32)))[0, :height, :width]
    stem = os.path.splitext(name)[0]
    label_path = os.path.join(output_dir, stem + '.png')
    os.makedirs(os.path.dirname(label_path), exist_ok=True)
    visualize.save_palette_png(label_path, prediction)
    overlay = visualize.overlay(visualize.denormalize(image), prediction)
    Image.fromarray(overlay).save(
        os.path.join(output_dir, stem + '_overlay.jpg'))
    written.append(label_path)
  logging.info('wrote %d predictions to %s%s', len(written), output_dir,
               f'; skipped {len(skipped)} unreadable, listed in '
               f'{unreadable_path}' if skipped else '')
  return written
