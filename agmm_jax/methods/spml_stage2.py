"""SPML's second stage (Ke et al., ICLR 2021; code twke18/SPML): pseudo-labels
of the training split by a random walk on the stage-1 embedding, then the
final classifier trained on them with everything else fixed.

What SPML's scripts do after the embedding (``bashscripts/voc12/
train_spml_point.sh`` and ``train_spml_scribble.sh``, identical there):

1. ``pyscripts/inference/pseudo_softmaxrw_crf.py``: for every training image
   at full size, the stage-1 softmax classifier (``segsort_softmax``'s head
   on the detached embedding) gives probabilities and the embedding an
   affinity, both at image size // 8 and averaged over the image and its
   flip; the random walk of :func:`agmm_jax.methods.spml_walk.random_walk`
   (``exp(5 (cos - 1))^20``, column-normalized, squared 6 times; class maps
   divided by their maximum, classes absent from the image's sparse labels
   zeroed) refines them; resized to the image, a dense CRF (10 iterations),
   argmax: a pseudo-label for every pixel, written as PNGs.
2. ``pyscripts/train/train_classifier.py`` with ``config_classifier.yaml``:
   a new ``softmax_classifier`` (3x3 conv, BatchNorm, ReLU, dropout 0.65, 1x1
   conv) on the fixed embedding (the embedding network restored from stage 1,
   in eval mode, under ``no_grad``) trained by cross-entropy on the
   pseudo-labels: 4000 iterations at batch 16 (stage 1: 30000 at 4 x 4),
   the stage-1 learning rate 3e-3 with the poly policy, weight decay 5e-4,
   classifier weights at 10x (biases 20x, no decay), random grayscale and
   blur added to the augmentation.
3. ``pyscripts/inference/inference_softmax.py``: that classifier on the val
   split (with CRF) is SPML's reported result.

Here, for ``spml`` losses (:func:`is_enabled`), SPML's stage plan
(:func:`stages`, registered by ``methods/spml.py``; run by
``agmm_jax.train.stages``) follows stage 1 with two stages:

* :func:`write_pseudo_labels`: the pass over the training split (records in
  order, padded to the split's largest image, ``config.eval.batch_size`` at a
  time) with the eval-mode stage-1 model: probabilities of the stage-1
  classifier (the ``spml_classifier`` head when its term is active, SPML's
  detached classifier; else the model's own, trained by pCE), the walk of
  :func:`agmm_jax.methods.spml_walk.pseudo_labels` on every 8th label pixel.
  Opt-in, off by default: ``config.spml_stage2.flip``, SPML's flip
  (:func:`flip_averaged_outputs`: the image and its mirror within its width,
  padding kept on the right; the two probabilities averaged, and the two
  affinities, each of its normalized embedding, the mirror's embedding
  flipped back by linear interpolation on the stride-4 grid where SPML flips
  at full resolution); ``config.spml_stage2.crf_iterations`` > 0, SPML's
  dense CRF of the walked maps at label resolution
  (:mod:`agmm_jax.methods.dense_crf`, SPML's kernels ``spml_walk.CRF_*``; its
  appearance kernel by the bilateral grid at coarse cells, not pydensecrf's
  permutohedral lattice; SPML runs 10 iterations). Still left out: SPML's
  full-resolution embedding and logits (here the stride-4 grid and the
  label-resolution softmax sampled every 8th pixel) and its
  ``cv2.resize`` (half-pixel) where this resizes with aligned corners.
  Written by the pseudo-label facility (:mod:`agmm_jax.data.pseudo_labels`:
  the training records with the pseudo-label as their sparse label,
  ``metadata.json`` with the training split only) into
  ``WORKDIR/spml_pseudo_labels`` (beside, renamed when complete; a killed
  pass resumes at its first incomplete shard); a complete one is reused.
* the training stage ``spml_stage2``: the final classifier is the model's own classifier
  (1x1 conv on the 256-channel decoder features, which the embedding is a
  projection of), trained on the fixed eval-mode network (its gradient stops
  at the decoder features) by cross-entropy on the pseudo-labels with
  ``config.optimizer`` (SPML uses its stage-1 rate and decay too; the
  classifier gets the head rate) over ``config.spml_stage2.num_train_steps``
  (-1: stage 1's steps x 4000 / 30000). The usual augmentation, no
  grayscale or blur. Checkpoints (state and data iterator) under
  ``WORKDIR/spml_stage2/`` (:func:`make_stage2_step`), resumable like
  stage 1; scalars and evaluations
  in WORKDIR's events at steps ``stage-1 steps + s``, so the workdir's last
  ``eval/miou`` is the final model's.
"""

from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from agmm_jax import methods
from agmm_jax.data import input_pipeline
from agmm_jax.data import labels as labels_lib
from agmm_jax.data import pseudo_labels
from agmm_jax.evaluation import evaluator
from agmm_jax.model import resample
from agmm_jax.runtime import sharding as sharding_lib
from agmm_jax.train import stages as stages_lib
from agmm_jax.train import state as train_state_lib
from agmm_jax.train import steps
from agmm_jax.methods import bilateral
from agmm_jax.methods import core
from agmm_jax.methods import spml
from agmm_jax.methods import spml_walk

PSEUDO_LABEL_DIR = 'spml_pseudo_labels'
STAGE2_DIR = 'spml_stage2'
# SPML's scripts: the embedding trains 30000 iterations, the final classifier
# 4000, both at a global batch of 16.
SPML_STAGE1_ITERATIONS = 30000
SPML_STAGE2_ITERATIONS = 4000


def is_enabled(config: ml_collections.ConfigDict) -> bool:
  """True when ``config.spml_stage2.enabled`` and the loss has the spml term."""
  return (bool(config.spml_stage2.enabled)
          and float(config.loss.weights.get('spml', 0.0)) != 0.0)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises a one-line ValueError naming the ``config.spml_stage2`` field of
  a value that cannot work (a CRF grid over its limit: :func:`check_crf_grid`),
  or saying that stage 2 runs in one process; called before stage 1 so that a
  bad value fails before any training."""
  stage2 = config.spml_stage2
  steps_wanted = stage2.num_train_steps
  if isinstance(steps_wanted, bool) or not isinstance(steps_wanted, int) or (
      steps_wanted < 1 and steps_wanted != -1):
    raise ValueError('config.spml_stage2.num_train_steps must be an int >= 1 or -1, '
                     f'got {steps_wanted!r}')
  for field in ('walk_beta', 'walk_gamma'):
    value = stage2[field]
    if not isinstance(value, (int, float)) or not 0 < float(value) < float('inf'):
      raise ValueError(f'config.spml_stage2.{field} must be a finite number > 0, '
                       f'got {value!r}')
  for field in ('walk_doublings', 'crf_iterations'):
    value = stage2[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise ValueError(f'config.spml_stage2.{field} must be an int >= 0, got {value!r}')
  check_crf_grid(config)
  if jax.process_count() > 1:
    raise ValueError('SPML stage 2 runs in one process; set '
                     '--config.spml_stage2.enabled=False for a multi-process run')


def stage2_steps(config: ml_collections.ConfigDict, stage1_steps: int) -> int:
  """``config.spml_stage2.num_train_steps``, or for -1 stage 1's steps
  scaled as SPML's scripts (4000 / 30000), at least 1."""
  steps_wanted = int(config.spml_stage2.num_train_steps)
  if steps_wanted > 0:
    return steps_wanted
  return max(1, round(stage1_steps * SPML_STAGE2_ITERATIONS / SPML_STAGE1_ITERATIONS))


def initial_state(config: ml_collections.ConfigDict, stage1_state: train_state_lib.TrainState,
                  mesh: jax.sharding.Mesh, total_steps: int
                  ) -> tuple[train_state_lib.TrainState, optax.GradientTransformation]:
  """The stage-2 state of a stage-1 state and its optimizer (``config.
  optimizer`` over ``total_steps``, on the classifier's parameters only):
  ``params`` and ``model_state`` of stage 1, ``opt_state`` of the
  classifier, ``step`` 0; no method state. Replicated over ``mesh``."""
  params = stage1_state['params']
  tx = train_state_lib.create_optimizer(config.optimizer, total_steps)
  state = train_state_lib.replicate(
      {'params': params, 'model_state': stage1_state['model_state'],
       'opt_state': tx.init(params['classifier']), 'step': jnp.zeros((), jnp.int32)}, mesh)
  return state, tx


def flip_grid_horizontally(grid: jax.Array, width: jax.Array, stride: int) -> jax.Array:
  """Mirrors a grid within each example's image: column ``c`` of ``grid``
  ``[B, h, w, C]`` sits at pixel ``stride c``; the result's column ``c`` (for
  ``stride c < width_b``) is ``grid`` at pixel ``width_b - 1 - stride c``,
  linearly interpolated between its columns (the last one repeated past
  it); other columns stay. ``stride`` 1 is an exact mirror of the pixels
  ``[0, width_b)`` (:func:`agmm_jax.evaluation.evaluator.flip_region_horizontally`).

  Args:
    grid: ``[B, h, w, C]``.
    width: int ``[B]``, the images' widths in pixels.
    stride: pixels per grid column.
  """
  columns = grid.shape[2]
  column = jnp.arange(columns, dtype=jnp.int32)[None, :]
  width = jnp.asarray(width, jnp.int32)[:, None]
  source = (width - 1 - stride * column).astype(jnp.float32) / stride
  low = jnp.clip(jnp.floor(source), 0, columns - 1).astype(jnp.int32)
  high = jnp.minimum(low + 1, columns - 1)
  fraction = jnp.clip(source - low, 0.0, 1.0)[:, None, :, None]
  take = jax.vmap(lambda image, index: jnp.take(image, index, axis=1))
  mirrored = (1.0 - fraction) * take(grid, low) + fraction * take(grid, high)
  return jnp.where((stride * column < width)[:, None, :, None], mirrored, grid)


def image_widths(label: jax.Array) -> jax.Array:
  """int32 ``[B]``: the real columns of each image (padding is on the right)."""
  return jnp.sum(jnp.any(labels_lib.real_mask(label), axis=1), axis=-1).astype(jnp.int32)


def flip_averaged_outputs(outputs_fn: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
                          image: jax.Array, label: jax.Array
                          ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """SPML's flip on padded images: ``outputs_fn`` (image ``[B, H, W, 3]`` ->
  embedding ``[B, h, w, D]`` on the segment grid, probabilities ``[B, H, W,
  K]``) on the images and on their mirrors within their widths (padding
  stays on the right, as SPML pads after flipping); the mirror's outputs
  mirrored back.

  Returns:
    ``(embedding, flipped_embedding, probabilities)``: the image's embedding,
    the flip's flipped back (:func:`flip_grid_horizontally`, stride
    ``spml.GRID_STRIDE``), and the mean of the two probabilities.
  """
  width = image_widths(label)
  embedding, probabilities = outputs_fn(image)
  flipped_embedding, flipped_probabilities = outputs_fn(
      evaluator.flip_region_horizontally(image, width))
  probabilities = 0.5 * (probabilities
                         + evaluator.flip_region_horizontally(flipped_probabilities, width))
  return (embedding, flip_grid_horizontally(flipped_embedding, width, spml.GRID_STRIDE),
          probabilities)


def check_crf_grid(config: ml_collections.ConfigDict) -> None:
  """One-line ValueError naming ``config.spml_stage2.crf_iterations`` when the
  CRF's bilateral grid for ``config.eval.batch_size`` images of the training
  split's canvas exceeds ``spml_walk.CRF_MAX_GRID_MIB``; nothing without the CRF
  (``config.data.dir`` is read only with it)."""
  if int(config.spml_stage2.crf_iterations) == 0 or spml_walk.CRF_APPROX != 'grid':
    return
  data_dir = str(config.data.dir)
  metadata = input_pipeline.read_metadata(data_dir)
  canvas = input_pipeline.split_image_size(data_dir, metadata, str(config.data.train_split))
  bilateral.check_grid_size(
      'config.spml_stage2.crf_iterations',
      bilateral.grid_spec(*canvas, spml_walk.CRF_APPEARANCE_SIGMA_XY, spml_walk.CRF_APPEARANCE_SIGMA_RGB,
                          spml_walk.CRF_CELL_XY, spml_walk.CRF_CELL_RGB),
      int(config.eval.batch_size), len(input_pipeline.class_names(metadata)),
      int(spml_walk.CRF_MAX_GRID_MIB * 2**20))


def make_pseudo_label_fn(model_defs: train_state_lib.ModelDefs, loss: methods.Loss,
                         mesh: jax.sharding.Mesh, config: ml_collections.ConfigDict
                         ) -> Callable[..., jax.Array]:
  """Jitted ``(params, model_state, image [B, Hc, Wc, 3], label [B, Hc, Wc])
  -> pseudo-labels [B, Hc, Wc]`` of the eval-mode stage-1 model
  (:func:`agmm_jax.methods.spml_walk.pseudo_labels`; with
  ``config.spml_stage2.flip`` of the image and its flip,
  :func:`flip_averaged_outputs`; ``crf_iterations`` > 0: with the CRF)."""
  replicated = sharding_lib.replicated_sharding(mesh)
  data = sharding_lib.data_sharding(mesh)
  detached = 'spml_classifier' in loss.terms
  stage2 = config.spml_stage2
  walk = dict(beta=float(stage2.walk_beta), gamma=float(stage2.walk_gamma),
              doublings=int(stage2.walk_doublings), crf_iterations=int(stage2.crf_iterations))

  def pseudo_label_fn(params, model_state, image, label):
    model = nnx.merge(model_defs.eval, params, model_state)

    def outputs_fn(image):
      features, logits = model(image)
      outputs = model.extra_outputs(features)
      if detached:
        logits = resample.resize_bilinear_align_corners(
            outputs[spml.CLASSIFIER_HEAD], label.shape[1:3])
      return (outputs[spml.EMBEDDING_HEAD],
              jax.nn.softmax(logits.astype(jnp.float32), axis=-1))

    if stage2.flip:
      embedding, flipped_embedding, probabilities = flip_averaged_outputs(
          outputs_fn, image, label)
    else:
      (embedding, probabilities), flipped_embedding = outputs_fn(image), None
    return spml_walk.pseudo_labels(embedding, probabilities, label,
                              flipped_embedding=flipped_embedding,
                              rgb=core.normalized_to_rgb(image), **walk)

  return jax.jit(pseudo_label_fn, in_shardings=(replicated, replicated, data, data),
                 out_shardings=replicated)


def write_pseudo_labels(config: ml_collections.ConfigDict, target: str,
                        state: train_state_lib.TrainState,
                        model_defs: train_state_lib.ModelDefs, loss: methods.Loss,
                        mesh: jax.sharding.Mesh, batch_size: int,
                        stop: Callable[[], None] = lambda: None) -> str:
  """Writes (or finds complete) the pseudo-label dataset ``target`` of the
  training split by the stage-1 ``state`` (module docstring), ``batch_size``
  images at a time, through
  :func:`agmm_jax.data.pseudo_labels.write` (atomic, resumable;
  ``stop()`` after every batch); returns its path. One process only
  (:func:`check_config`)."""
  pseudo_label_fn = make_pseudo_label_fn(model_defs, loss, mesh, config)

  def label_batch(images: np.ndarray, label: np.ndarray) -> np.ndarray:
    batch = sharding_lib.global_batch({'image': images, 'label': label}, mesh)
    return train_state_lib.host(pseudo_label_fn(
        state['params'], state['model_state'], batch['image'], batch['label']))

  pseudo_labels.write(target, data_dir=str(config.data.dir),
                      split=str(config.data.train_split),
                      label_kind=str(config.data.train_labels),
                      batch_size=batch_size, label_batch=label_batch,
                      stop=stop)
  logging.info('%s: pseudo-labels of the training split written', target)
  return target


def make_stage2_step(model_defs: train_state_lib.ModelDefs, tx: optax.GradientTransformation,
                     mesh: jax.sharding.Mesh, *, lr_schedule: optax.Schedule,
                     head_lr_multiplier: float) -> Callable[..., Any]:
  """The jitted ``(state, batch) -> (state, metrics)`` of stage 2 (state
  donated): cross-entropy over the pseudo-labeled pixels
  (``pce``) of the model's classifier on the fixed decoder features of the
  eval-mode model; only ``params['classifier']`` changes, ``opt_state`` is
  ``tx``'s state of those parameters. ``metrics`` as the train step's
  (``lr_backbone`` 0: the backbone is fixed)."""
  loss = methods.build_loss(methods.loss_config({'pce': 1.0}))
  metrics_class = steps.train_metrics_class(loss)

  def step_fn(state, batch):
    model = nnx.merge(model_defs.eval, state['params'], state['model_state'])
    features = jax.lax.stop_gradient(model(batch['image'])[0])
    classifier_def, _ = nnx.split(model.classifier)

    def compute_loss(classifier_params):
      classifier = nnx.merge(classifier_def, classifier_params)
      logits = classifier(features.astype(classifier.dtype)).astype(jnp.float32)
      logits = resample.resize_bilinear_align_corners(logits, batch['label'].shape[1:3])
      return loss(methods.LossInputs(logits=logits, decoder_features=features,
                                     label=batch['label'],
                                     class_present=batch['class_present']))

    classifier_params = state['params']['classifier']
    (total, terms), grads = jax.value_and_grad(compute_loss, has_aux=True)(classifier_params)
    updates, opt_state = tx.update(grads, state['opt_state'], classifier_params)
    params = nnx.State({**state['params'],
                        'classifier': optax.apply_updates(classifier_params, updates)})
    metrics = steps.step_metrics(
        metrics_class, total, terms, grads, lr_backbone=jnp.zeros(()),
        lr_head=head_lr_multiplier * lr_schedule(state['step']))
    return {'params': params, 'model_state': state['model_state'],
            'opt_state': opt_state, 'step': state['step'] + 1}, metrics

  return steps.jit_train_step(step_fn, mesh, with_method_state=False)


def _write_pass(context: stages_lib.Context, target: str, stop: Callable[[], None]) -> None:
  """The pseudo-label pass of the stage-1 model (:func:`write_pseudo_labels`)."""
  spec = context.run
  stage1 = context.results[stages_lib.TRAIN_STAGE]
  write_pseudo_labels(spec.config, target, stage1.state, stage1.model_defs, spec.loss,
                      spec.mesh, spec.eval.batch_size, stop)


def _stage2_init(context: stages_lib.Context, total_steps: int,
                 load_pretrained: bool) -> stages_lib.Initial:
  """Stage 1's final network with a new optimizer state of its classifier."""
  del load_pretrained
  stage1 = context.results[stages_lib.TRAIN_STAGE]
  state, tx = initial_state(context.run.config, stage1.state, context.run.mesh, total_steps)
  return stages_lib.Initial(state, stage1.model_defs, tx)


def _stage2_step(context: stages_lib.Context, initial: stages_lib.Initial,
                 total_steps: int) -> Callable[..., Any]:
  """:func:`make_stage2_step` with ``config.optimizer``'s rates."""
  optimizer = context.run.config.optimizer
  return make_stage2_step(
      initial.model_defs, initial.tx, context.run.mesh,
      lr_schedule=train_state_lib.learning_rate_schedule(optimizer, total_steps),
      head_lr_multiplier=float(optimizer.head_lr_multiplier))


def stages(config: ml_collections.ConfigDict, loss: methods.Loss
           ) -> list[stages_lib.Stage] | None:
  """SPML's stage plan (``methods.core.register_stages``) when
  :func:`is_enabled`: the embedding's training (the loss's stage), the
  pseudo-label pass into ``WORKDIR/spml_pseudo_labels``, the final
  classifier's training (checkpoints in ``WORKDIR/spml_stage2``, scalars
  ``spml_stage2/*`` at steps after stage 1's). The config is checked here
  (:func:`check_config`), before any stage runs."""
  del loss
  if not is_enabled(config):
    return None
  check_config(config)
  return [
      stages_lib.loss_training_stage(),
      stages_lib.PassStage(name=PSEUDO_LABEL_DIR, folder=PSEUDO_LABEL_DIR,
                           write=_write_pass),
      stages_lib.TrainingStage(
          name=STAGE2_DIR, folder=STAGE2_DIR, scalar_prefix=STAGE2_DIR,
          data=stages_lib.prepared_data(PSEUDO_LABEL_DIR),
          total_steps=lambda context, _: stage2_steps(
              config, context.results[stages_lib.TRAIN_STAGE].total_steps),
          init=_stage2_init, make_step=_stage2_step),
  ]
