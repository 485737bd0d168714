"""Inference from a run's checkpoints: the eval and predict modes (both
through ``agmm_jax.evaluation.evaluator``).
"""

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from agmm_jax.storage import checkpoint as checkpoint_lib
from agmm_jax.evaluation import evaluator
from agmm_jax.data import input_pipeline
from agmm_jax import methods
from agmm_jax.runtime import sharding as sharding_lib
from agmm_jax.methods import spml_stage2
from agmm_jax.train import state as train_state_lib
from agmm_jax.evaluation import visualize


# The class names a run's checkpoints were trained on, next to config.json.
CLASSES_FILE = 'classes.json'


def checkpoint_classes(workdir: str) -> list[str] | None:
  """The class names of ``workdir``'s checkpoints, or None when unknown.

  From ``WORKDIR/classes.json`` (written by training), or for runs older than
  that file from the metadata of the ``data.dir`` recorded in
  ``WORKDIR/config.json``.
  """
  path = os.path.join(workdir, CLASSES_FILE)
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      return [str(name) for name in json.load(f)]
  try:
    with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
      data_dir = json.load(f)['data']['dir']
    return input_pipeline.class_names(input_pipeline.read_metadata(data_dir))
  except (OSError, ValueError, KeyError, TypeError):
    return None


def check_classes(workdir: str, class_names: list[str], data_dir: str) -> None:
  """Raises a one-line ValueError naming both class lists when the data's
  differ from those ``workdir``'s checkpoints were trained on."""
  trained = checkpoint_classes(workdir)
  if trained is not None and trained != list(class_names):
    raise ValueError(
        f'the checkpoints of {workdir} were trained on {len(trained)} classes '
        f'{trained} but {data_dir} has {len(class_names)} classes '
        f'{list(class_names)}; use data with the checkpoint\'s classes (same '
        'names, same order in classes.txt)')


def record_classes(workdir: str, class_names: list[str]) -> None:
  """Writes ``WORKDIR/classes.json`` (process 0), the list
  ``checkpoint_classes`` reads."""
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CLASSES_FILE)
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
      json.dump(list(class_names), f)
    os.replace(path + '.tmp', path)


def restore_for_inference(config: ml_collections.ConfigDict, workdir: str,
                           num_classes: int, mesh: jax.sharding.Mesh):
  """Model defs and the best (or latest) checkpointed state of ``workdir``:
  of SPML's final model (``WORKDIR/spml_stage2``) once its second stage has
  a checkpoint, the step then being the second stage's."""
  # The training loss's heads and method state give the checkpoint's structure.
  loss = methods.build_loss(config.loss)
  state, model_defs, _ = train_state_lib.create_train_state(
      config, num_classes, mesh, total_steps=1, extra_heads=loss.needs.heads,
      method_state=loss.init_state(int(config.global_batch_size), num_classes),
      load_pretrained=False)
  if spml_stage2.is_enabled(config) and spml_stage2.has_checkpoint(workdir):
    state, _ = spml_stage2.initial_state(config, state, mesh, total_steps=1)
    workdir = os.path.join(workdir, spml_stage2.STAGE2_DIR)
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
