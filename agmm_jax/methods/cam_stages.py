"""The CAM stages: segmentation from image-level tags (or boxes) in three
stages, IRN's pipeline (Ahn, Cho and Kwak, CVPR 2019; code jiwoon-ahn/irn)
on the stage model (:mod:`agmm_jax.train.stages`), for a run whose
``config.cam.enabled`` (``configs/msrc.py:labels=tags``):

1. ``cam_classifier`` (checkpoints in WORKDIR, scalars ``cam_classifier/*``):
   a new model with the bias-free ``cam`` head trained by the ``cam_bce``
   term alone (IRN's ``train_cam.py``: global average pooling + multi-label
   BCE against the records' tags), with ``config.optimizer``, for
   ``config.cam.num_train_steps`` steps (-1: ``config.cam.num_epochs``
   epochs). It is evaluated, and its best checkpoint chosen, by the CAM's
   own segmentation of the eval split given each image's true classes (the
   classes of its dense labels; :func:`agmm_jax.methods.cam.cam_prediction`,
   IRN's ``eval_cam.py``, one forward pass over the canvas whatever
   ``config.eval.mode``).
2. ``cam_pseudo_labels`` (the pass, into WORKDIR/cam_pseudo_labels by
   :mod:`agmm_jax.data.pseudo_labels`: atomic, resumable by shard): every
   training record through the final classifier in eval mode, its CAMs
   (flip-summed with ``config.cam.flip``) restricted to the record's tags
   (``config.cam.restrict=tags``) or each class to its boxes (``boxes``:
   SPML's box seeds; a pixel in no box is ignored, or background when the
   dataset has a background class), max-normalized, thresholded and
   refined by IRN's dense CRF (:func:`agmm_jax.methods.cam.refined_seeds`,
   ``config.cam.crf_iterations``, 0: none). Why the dense CRF of the three
   affinity kernels the project has: it is IRN's own refinement of its
   seeds (``crf_inference_label``), it reads the image (colour and position)
   and so brings evidence the classifier's maps do not have; SPML's random
   walk needs an embedding trained for affinities (SPML's stage 1), which a
   classifier does not have, and APro's tree propagation is a training loss
   on the network's own predictions, not a labeller of fixed maps. The
   pass writes its quality against the dense training labels
   (:func:`write_quality`: mIoU over the labeled pixels, seed precision,
   coverage) into ``cam_pseudo_labels/quality.json`` and logs it.
3. ``cam_segmenter`` (checkpoints in WORKDIR/cam_segmenter, scalars
   ``cam_segmenter/*``; eval and predict restore it): the run's loss
   (``config.loss``: pCE by default in configs/msrc.py, any pixel-label
   preset) trained on the pseudo-labels for the run's length
   (``num_train_steps`` / ``num_epochs``). ``config.cam.segmenter_init``:
   ``classifier`` (default) starts from the classifier's network (backbone,
   decoder and BatchNorm statistics; new classifier and optimizer state),
   ``scratch`` from a new one (``config.model.pretrained`` when given), as
   IRN does: IRN trains its segmenter anew from ImageNet weights, but the
   CPU configs have none, and then the classifier's backbone is the only
   pretraining there is.
"""

import dataclasses
import json
import os
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from agmm_jax import methods
from agmm_jax.data import input_pipeline
from agmm_jax.data import labels as labels_lib
from agmm_jax.data import pseudo_labels
from agmm_jax.data import tfrecord
from agmm_jax.data import weak_labels
from agmm_jax.evaluation import evaluator
from agmm_jax.evaluation import metrics
from agmm_jax.methods import boxes as boxes_lib
from agmm_jax.methods import cam
from agmm_jax.methods import core
from agmm_jax.runtime import sharding as sharding_lib
from agmm_jax.train import stages as stages_lib
from agmm_jax.train import state as train_state_lib

CLASSIFIER_STAGE = 'cam_classifier'
PSEUDO_LABEL_DIR = 'cam_pseudo_labels'
SEGMENTER_STAGE = 'cam_segmenter'
QUALITY_FILE = 'quality.json'
RESTRICTIONS = ('tags', 'boxes')
SEGMENTER_INITS = ('classifier', 'scratch')

@dataclasses.dataclass(frozen=True)
class Options:
  """``config.cam`` read once and checked (:meth:`from_config`), with the
  dataset's background class (``config.loss.background_class``)."""
  restrict: str
  num_epochs: int
  num_train_steps: int
  flip: bool
  foreground: float
  background: float
  crf_iterations: int
  segmenter_init: str
  background_class: int

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'Options':
    """One-line ValueError naming the ``config.cam`` field of a bad value."""
    block = config.cam

    def integer(field, minimum, also=()):
      value = block[field]
      if isinstance(value, bool) or not isinstance(value, int) or (
          value < minimum and value not in also):
        allowed = ' or '.join([str(v) for v in also] + [f'>= {minimum}'])
        raise ValueError(f'config.cam.{field} must be an int {allowed}, got {value!r}')
      return value

    for field, choices in (('restrict', RESTRICTIONS), ('segmenter_init', SEGMENTER_INITS)):
      if block[field] not in choices:
        raise ValueError(f'config.cam.{field} must be one of {choices}, got {block[field]!r}')
    foreground, background = (float(block.foreground_threshold),
                              float(block.background_threshold))
    if not 0.0 <= background < foreground <= 1.0:
      raise ValueError('config.cam.background_threshold and foreground_threshold must '
                       f'satisfy 0 <= background < foreground <= 1, got {background} '
                       f'and {foreground}')
    return cls(restrict=str(block.restrict), num_epochs=integer('num_epochs', 1),
               num_train_steps=integer('num_train_steps', 1, also=(-1,)),
               flip=bool(block.flip), foreground=foreground, background=background,
               crf_iterations=integer('crf_iterations', 0),
               segmenter_init=str(block.segmenter_init),
               background_class=int(config.loss.background_class))

  def classifier_steps(self, steps_per_epoch: int) -> int:
    """The classifier stage's length: ``num_train_steps``, -1: ``num_epochs``
    epochs."""
    return (self.num_train_steps if self.num_train_steps > 0
            else self.num_epochs * steps_per_epoch)


def classifier_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """The classifier stage's length (``config.cam.num_train_steps``, -1:
  ``config.cam.num_epochs`` epochs); the study's planner counts it too."""
  return Options.from_config(config).classifier_steps(steps_per_epoch)


def is_enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether the run is the CAM stages' (``config.cam.enabled``)."""
  return 'cam' in config and bool(config.cam.enabled)


def classifier_loss(options: Options) -> methods.Loss:
  """The classifier stage's loss: ``cam_bce`` alone."""
  return methods.build_loss(methods.loss_config(
      {'cam_bce': 1.0}, background_class=options.background_class))


def check_data(config: ml_collections.ConfigDict) -> None:
  """One-line ValueError when the training records hold no tags."""
  metadata = input_pipeline.read_metadata(str(config.data.dir))
  split = metadata['splits'].get(str(config.data.train_split), {})
  if not split.get('has_weak_labels'):
    raise ValueError(f'config.cam.enabled: {config.data.dir} split '
                     f'{config.data.train_split!r} has no tags; prepare it with '
                     '--config.data.prepare.sparse=tags (or boxes)')


def class_box_masks(boxes: jax.Array, num_classes: int, height: int,
                    width: int) -> jax.Array:
  """bool ``[B, H, W, K]``: pixel inside a box of class k, of ``boxes`` int32
  ``[B, N, 5]`` rows ``(class, y0, x0, y1, x1)`` (class -1: none)."""
  rows = jnp.arange(height)[None, None, :, None]
  cols = jnp.arange(width)[None, None, None, :]
  part = [boxes[..., i, None, None] for i in range(5)]
  inside = ((rows >= part[1]) & (rows < part[3]) & (cols >= part[2])
            & (cols < part[4])).astype(jnp.float32)
  classes = (boxes[..., 0, None] == jnp.arange(num_classes)).astype(jnp.float32)
  return jnp.einsum('bnhw,bnk->bhwk', inside, classes) > 0


def image_widths(valid: jax.Array) -> jax.Array:
  """int32 ``[B]``: the real columns of each image (padding on the right)."""
  return jnp.sum(jnp.any(valid, axis=1), axis=-1).astype(jnp.int32)


def _maps_fn(model: Any) -> Callable[[jax.Array], jax.Array]:
  """``images -> the cam head's maps`` of an eval-mode model."""
  return lambda images: model.extra_outputs(model(images)[0])[cam.CAM_HEAD]


def make_cam_eval_fn(model_defs: train_state_lib.ModelDefs, num_classes: int,
                     mesh: jax.sharding.Mesh, background_class: int
                     ) -> Callable[..., jax.Array]:
  """Jitted ``(params, model_state, eval batch) -> confusion [K, K]`` of the
  CAM's segmentation (:func:`cam.cam_prediction`) with each image's classes
  taken from its dense labels."""

  def eval_fn(params, model_state, batch):
    model = nnx.merge(model_defs.eval, params, model_state)
    label = batch['label']
    valid = labels_lib.real_mask(label)
    present = (labels_lib.labeled_class_counts(label, num_classes) > 0)[:, None, None, :]
    maps = cam.upsampled_maps(_maps_fn(model), batch['image'], batch['width'],
                              label.shape[1:3], flip=False)
    prediction = cam.cam_prediction(cam.normalized_maps(maps, present, valid), present,
                                    background_class=background_class)
    return metrics.confusion_matrix(prediction, label, num_classes)

  replicated = sharding_lib.replicated_sharding(mesh)
  return jax.jit(eval_fn, in_shardings=(replicated, replicated,
                                        sharding_lib.data_sharding(mesh)),
                 out_shardings=replicated)


def max_classes_per_image(data_dir: str, split: str) -> int:
  """The most classes an image of ``split`` has tags or boxes of (at least
  1): the CRF's class channels (``cam.crf_labels``' ``max_classes``)."""
  metadata = input_pipeline.read_metadata(data_dir)
  most = 1
  for shard in metadata['splits'][split]['shards']:
    for data in tfrecord.read_all_records(os.path.join(data_dir, shard)):
      example = tfrecord.decode_example(data)
      classes = set(np.flatnonzero(example.get(weak_labels.TAGS_KEY, [])).tolist())
      classes.update(example.get(weak_labels.BOXES_KEY, [])[::weak_labels.BOX_COLUMNS])
      most = max(most, len(classes))
  return most


def make_pseudo_label_fn(model_defs: train_state_lib.ModelDefs, num_classes: int,
                         mesh: jax.sharding.Mesh, options: Options,
                         max_classes: int | None = None) -> Callable[..., jax.Array]:
  """Jitted ``(params, model_state, image [B, Hc, Wc, 3], label [B, Hc, Wc],
  tags [B, K], boxes [B, N, 5]) -> pseudo-labels [B, Hc, Wc]`` (module
  docstring, stage 2); the CRF on ``max_classes`` class channels
  (:func:`max_classes_per_image`; None: all)."""

  def pseudo_label_fn(params, model_state, image, label, tags, boxes):
    model = nnx.merge(model_defs.eval, params, model_state)
    valid = labels_lib.real_mask(label)
    size = label.shape[1:3]
    if options.restrict == 'boxes':
      allowed = class_box_masks(boxes, num_classes, *size)
    else:
      allowed = (tags > 0)[:, None, None, :]
    maps = cam.upsampled_maps(_maps_fn(model), image, image_widths(valid), size,
                              flip=options.flip)
    return cam.refined_seeds(
        cam.normalized_maps(maps, allowed, valid), allowed, valid,
        core.normalized_to_rgb(image), background_class=options.background_class,
        foreground=options.foreground, background=options.background,
        crf_iterations=options.crf_iterations, max_classes=max_classes)

  replicated = sharding_lib.replicated_sharding(mesh)
  data = sharding_lib.data_sharding(mesh)
  return jax.jit(pseudo_label_fn, in_shardings=(replicated, replicated) + (data,) * 4,
                 out_shardings=replicated)


def write_quality(folder: str, split: str) -> dict[str, Any]:
  """Measures the pseudo-labels of ``folder`` against the records' dense
  labels, writes ``folder/quality.json`` (written beside and renamed) and
  returns it: ``miou``, ``per_class`` (IoU by class name) and
  ``pixel_accuracy`` over the pixels that have both a dense and a
  pseudo-label, ``seed_precision`` (the share of those that agree: the
  same as ``pixel_accuracy``, by its seed name), ``coverage`` (the share of
  densely labeled pixels that got a pseudo-label); the keys the study's
  ``benchmarks/study/pass_quality.py`` reads. Without dense labels in the records: ``{}``, nothing
  written."""
  try:
    confusion, pseudo_labeled, dense_labeled = pseudo_labels.confusion_with_dense(folder, split)
  except KeyError:
    logging.info('%s: the records have no dense labels; quality not measured', folder)
    return {}
  scores = metrics.segmentation_scores(confusion)
  classes = input_pipeline.class_names(input_pipeline.read_metadata(folder))
  quality = {
      'miou': float(scores['miou']),
      'per_class': {name: float(iou) for name, iou in zip(classes, scores['per_class_iou'])},
      'pixel_accuracy': float(scores['pixel_accuracy']),
      'seed_precision': float(np.trace(confusion) / max(pseudo_labeled, 1)),
      'coverage': float(pseudo_labeled / max(dense_labeled, 1)),
      'pseudo_labeled_pixels': int(pseudo_labeled),
      'dense_labeled_pixels': int(dense_labeled),
  }
  path = os.path.join(folder, QUALITY_FILE)
  with open(f'{path}.part', 'w', encoding='utf-8') as f:
    json.dump(quality, f, indent=2)
  os.replace(f'{path}.part', path)
  logging.info('%s: pseudo-label mIoU %.2f%% (labeled pixels), seed precision %.2f%%, '
               'coverage %.2f%%', folder, 100 * quality['miou'],
               100 * quality['seed_precision'], 100 * quality['coverage'])
  return quality


def _write_pass(options: Options, context: stages_lib.Context, target: str,
                stop: Callable[[], None]) -> None:
  """The pseudo-label pass of the classifier (module docstring)."""
  spec = context.run
  classifier = context.results[CLASSIFIER_STAGE]
  data_dir, split = str(spec.config.data.dir), str(spec.config.data.train_split)
  label_fn = make_pseudo_label_fn(classifier.model_defs, spec.num_classes, spec.mesh,
                                  options, max_classes_per_image(data_dir, split))
  state = classifier.state

  def label_batch(images: np.ndarray, label: np.ndarray,
                  weak: dict[str, np.ndarray]) -> np.ndarray:
    batch = sharding_lib.global_batch({'image': images, 'label': label, **weak}, spec.mesh)
    return train_state_lib.host(label_fn(
        state['params'], state['model_state'], batch['image'], batch['label'],
        batch['tags'], batch['boxes']))

  pseudo_labels.write(target, data_dir=data_dir, split=split,
                      label_kind='sparse', batch_size=spec.eval.batch_size,
                      label_batch=label_batch, stop=stop, max_boxes=boxes_lib.MAX_BOXES)
  write_quality(target, split)


def _segmenter_data(context: stages_lib.Context) -> stages_lib.DataSource:
  """The pseudo-labels (their quality measured first if a kill left it
  unmeasured)."""
  folder = context.results[PSEUDO_LABEL_DIR]
  split = str(context.run.config.data.train_split)
  if not os.path.exists(os.path.join(folder, QUALITY_FILE)):
    write_quality(folder, split)
  return stages_lib.prepared_data(PSEUDO_LABEL_DIR)(context)


def _segmenter_init(options: Options) -> Callable[..., stages_lib.Initial]:
  """The segmenter's initial state (``config.cam.segmenter_init``)."""
  new_model = stages_lib.loss_training_stage().init

  def init(context: stages_lib.Context, total_steps: int,
           load_pretrained: bool) -> stages_lib.Initial:
    initial = new_model(context, total_steps, load_pretrained)
    if options.segmenter_init == 'scratch':
      return initial
    return stages_lib.started_from(initial, context.results[CLASSIFIER_STAGE].state,
                                   context.run.mesh, skip=('classifier',))

  return init


def _classifier_stage(options: Options) -> stages_lib.TrainingStage:
  """Stage 1 (module docstring)."""
  loss = classifier_loss(options)

  def data(context):
    check_data(context.run.config)
    return stages_lib.DataSource(context.run.config.data, loss.needs.batch_fields)

  def total_steps(context, steps_per_epoch):
    del context
    return options.classifier_steps(steps_per_epoch)

  def init(context, total, load_pretrained):
    spec = context.run
    state, model_defs, tx = train_state_lib.create_train_state(
        spec.config, spec.num_classes, spec.mesh, total, extra_heads=loss.needs.heads,
        load_pretrained=load_pretrained)
    return stages_lib.Initial(state, model_defs, tx)

  def make_step(context, initial, total):
    return stages_lib.train_step_of(loss, context, initial, total)

  def evaluate(context, initial):
    spec = context.run
    eval_fn = make_cam_eval_fn(initial.model_defs, spec.num_classes, spec.mesh,
                               options.background_class)
    return lambda state: evaluator.evaluate_dataset(eval_fn, state, spec.eval, spec.mesh)

  return stages_lib.TrainingStage(
      name=CLASSIFIER_STAGE, folder='', scalar_prefix=CLASSIFIER_STAGE, data=data,
      total_steps=total_steps, init=init, make_step=make_step, evaluate=evaluate)


def stages(config: ml_collections.ConfigDict, loss: methods.Loss
           ) -> list[stages_lib.Stage] | None:
  """The CAM stages' plan (``methods.core.register_stages``) when
  :func:`is_enabled`; ``config.cam`` is checked here, before any stage runs
  (the records' tags when the classifier stage starts: :func:`check_data`)."""
  del loss
  if not is_enabled(config):
    return None
  options = Options.from_config(config)
  if jax.process_count() > 1:
    raise ValueError('the CAM stages run in one process; config.cam.enabled needs a '
                     'single-process run')
  segmenter = stages_lib.loss_training_stage(
      SEGMENTER_STAGE, SEGMENTER_STAGE, SEGMENTER_STAGE, data=_segmenter_data)
  return [
      _classifier_stage(options),
      stages_lib.PassStage(name=PSEUDO_LABEL_DIR, folder=PSEUDO_LABEL_DIR,
                           write=lambda *args: _write_pass(options, *args)),
      dataclasses.replace(segmenter, init=_segmenter_init(options)),
  ]
