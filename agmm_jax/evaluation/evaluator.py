"""The one evaluator: training, eval mode and every stage evaluate through it.

* :class:`EvalSpec`: what an evaluation does (mode, crop, scales, flip,
  batch, split, data, classes), read from the config and cast once
  (:meth:`EvalSpec.from_config`), then passed instead of the config.
* :func:`make_evaluator` ``(model_defs, spec, mesh) -> evaluate(state) ->
  scores``: the split's batches through one jitted step, the confusion
  summed on the device, scored once on the host (``metrics``).
* :func:`print_scores` (the per-class IoU table) and :func:`eval_scalars`
  (the TensorBoard scalars of an evaluation).
* The prediction modes below, on arrays: :func:`make_predict_fn` (class
  ids) and :func:`make_eval_step` (confusion of one batch), with
  :func:`eval_apply_fn` the model's ``apply_fn``.

Evaluation images arrive padded to one canvas ``[B, Hc, Wc, 3]`` with their
true sizes ``height, width: int32 [B]`` (pixels ``y >= height`` or
``x >= width`` are padding, labeled ``PADDING``). Every mode below keeps all
shapes static (fixed window / scale counts derived from the canvas and the crop
size, per-example positions as data), so one compiled function serves every
batch whatever the image sizes.

Modes (following ``evaluate``, ``pre_slide`` and ``ms_test`` of the official
PyTorch code, util/utils.py of Luffy03/AGMM-SASS):

* ``whole``: one forward pass over the canvas; class = argmax of the logits.
* ``center_crop``: the ``crop x crop`` window starting at
  ``((height - crop) // 2, (width - crop) // 2)`` (clamped into the canvas) is
  predicted; only pixels inside it count (the rest are "not predicted", -1).
* ``sliding_window``: square windows of side ``crop`` with 2/3 overlap, i.e.
  stride ``s = ceil(crop * (1 - 2/3))`` (for crop 321 the official float
  expression gives 108, kept as is). Along an axis of true length ``L`` there
  are ``n = ceil((L - crop) / s) + 1`` windows (1 if ``L <= crop``); window
  ``i`` covers ``[max(min(i s + crop, L) - crop, 0), ... + crop)``, so the last
  window ends at the image border. Softmax probabilities of overlapping windows
  are averaged: ``p(x) = sum_w p_w(x) / #{w covering x}``.
* ``multi_scale``: for each scale ``r`` the image (its true ``height x width``
  region) is resized with align-corners bilinear interpolation to
  ``floor(height r) x floor(width r)``, predicted (plus, with ``flip``, the
  horizontally flipped image, flipped back), and the softmax probabilities are
  resized back to ``height x width`` and summed over scales and flips.

Given classes (``config.eval.given_classes``, any mode): each image's
prediction is the arg-max over the classes of its own label map only (the
classes with a labeled pixel: the image-level tags an oracle would give), the
protocol class activation maps are scored with. Beside the ordinary score it
separates recognition (which classes are in the image) from localization
(where they are): a model trained from tags can localize far better than it
recognizes.

Differences from the official code, all deliberate:

* The model sees the padded canvas, not the bare image (the official code runs
  batch size 1 at the native size). Predictions of real pixels near the padding
  and the model's global pooling see the canvas padding values (the input
  pipeline pads with 0, i.e. the ImageNet mean colour, like the official
  ``pad_image``).
* Sliding windows on images smaller than the crop are padded at the bottom and
  right (the official ``pad_image`` passes its padding amounts to the wrong
  ``F.pad`` axes), and ``n >= 1`` always.
* The official model already returns softmax probabilities in eval mode and
  ``pre_slide`` applies a second softmax; here ``apply_fn`` returns logits and
  exactly one softmax is applied.

``apply_fn(variables, images [N, h, w, 3]) -> logits [N, h, w, K]`` is the
model in evaluation mode (BatchNorm running averages, no dropout). The model's
variables are an explicit argument so that a jitted evaluation step never bakes
stale parameters into its compiled code; for a Flax NNX model::

  graphdef, state = nnx.split(model)
  apply_fn = lambda state, images: nnx.merge(graphdef, state)(images)[1]
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from agmm_jax.data import input_pipeline
from agmm_jax.data import labels
from agmm_jax.evaluation import metrics
from agmm_jax.model import resample
from agmm_jax.runtime import sharding as sharding_lib

EVAL_MODES = ('whole', 'center_crop', 'sliding_window', 'multi_scale')
SLIDING_WINDOW_OVERLAP = 2 / 3

ApplyFn = Callable[[Any, jax.Array], jax.Array]
Scores = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class EvalSpec:
  """What one evaluation does; build it with :meth:`from_config`.

  ``mode``: one of ``EVAL_MODES``; ``crop_size``: the window of
  ``center_crop`` and ``sliding_window``; ``scales`` and ``flip``: of
  ``multi_scale``; ``batch_size``: the global eval batch (rounded up to
  whole devices); ``split`` of ``data`` (the config's data block, frozen:
  ``dir``, ``eval_canvas``, ...); ``class_names``: the classes scored, in
  the order of the label ids; ``given_classes``: predict among each image's
  labeled classes only (module docstring).
  """
  mode: str
  crop_size: int
  scales: tuple[float, ...]
  flip: bool
  batch_size: int
  split: str
  data: ml_collections.FrozenConfigDict
  class_names: tuple[str, ...]
  given_classes: bool = False

  def __post_init__(self):
    # Named by their config fields: a spec comes from the config.
    if self.mode not in EVAL_MODES:
      raise ValueError(f'config.eval.mode={self.mode!r} is not one of '
                       f'{EVAL_MODES}')
    if self.mode in ('center_crop', 'sliding_window') and self.crop_size <= 0:
      raise ValueError(f'config.eval.mode={self.mode!r} needs '
                       f'config.data.crop_size > 0, got {self.crop_size}')
    if self.mode == 'multi_scale' and (not self.scales
                                       or min(self.scales) <= 0):
      raise ValueError('config.eval.scales must be positive for '
                       f'config.eval.mode=multi_scale, got {self.scales}')
    if self.batch_size <= 0:
      raise ValueError(f'config.eval.batch_size={self.batch_size} must be '
                       'positive')

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict,
                  class_names: Sequence[str],
                  split: str | None = None) -> 'EvalSpec':
    """The evaluation of ``config`` (``config.eval.*``, ``config.data``) on
    ``split`` (default ``config.data.eval_split``); one-line ValueError
    naming the field of a bad value. A config recorded before
    ``eval.given_classes`` existed (a workdir's config.json, rebuilt for
    inference) has none: its run evaluated without them."""
    return cls(mode=str(config.eval.mode),
               crop_size=int(config.data.crop_size),
               scales=tuple(float(scale) for scale in config.eval.scales),
               flip=bool(config.eval.flip),
               batch_size=int(config.eval.batch_size),
               split=str(split or config.data.eval_split),
               data=ml_collections.FrozenConfigDict(config.data),
               class_names=tuple(str(name) for name in class_names),
               given_classes=bool(config.eval.get('given_classes', False)))

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def description(self) -> str:
    """The mode, and whether the classes were given: ``whole`` or
    ``whole, given classes``."""
    return f'{self.mode}, given classes' if self.given_classes else self.mode

  def mode_options(self) -> dict[str, Any]:
    """The keyword arguments of :func:`make_predict_fn` for this spec."""
    return dict(mode=self.mode, num_classes=self.num_classes,
                crop_size=self.crop_size, scales=self.scales, flip=self.flip)

  def check(self, mesh: jax.sharding.Mesh) -> None:
    """Raises the one-line ValueError of what the mesh or the data
    contradict (call it before training starts): an eval batch that does not
    split over the processes, a missing split, an image larger than
    ``data.eval_canvas``."""
    sharding_lib.eval_batch_size_per_process(self.batch_size, mesh)
    input_pipeline.eval_canvas(self.data, self.split)


def make_evaluator(model_defs: Any, spec: EvalSpec, mesh: jax.sharding.Mesh
                   ) -> Callable[[Mapping[str, Any]], Scores]:
  """``evaluate(state) -> scores`` of ``spec`` over its split.

  ``model_defs``: a ``train.state.ModelDefs`` (its ``eval`` graph is used);
  ``state``: a train state (its ``params`` and ``model_state``). ``scores``:
  those of ``metrics.segmentation_scores`` (``miou``, ``per_class_iou``,
  ``pixel_accuracy``, ``mean_class_accuracy``) plus ``confusion`` (NumPy
  int ``[K, K]``, rows: truth). The step compiles once, on the first call.
  """
  eval_fn = make_eval_fn(model_defs, spec, mesh)

  def evaluate(state: Mapping[str, Any]) -> Scores:
    return evaluate_dataset(eval_fn, state, spec, mesh)

  return evaluate


def make_eval_fn(model_defs: Any, spec: EvalSpec, mesh: jax.sharding.Mesh
                 ) -> Callable[..., jax.Array]:
  """Jitted ``(params, model_state, batch) -> confusion int32 [K, K]`` of one
  global batch (sharded on ``data``), replicated."""
  replicated = sharding_lib.replicated_sharding(mesh)
  data = sharding_lib.data_sharding(mesh)
  eval_step = make_eval_step(eval_apply_fn(model_defs), jit=False,
                             given_classes=spec.given_classes,
                             **spec.mode_options())

  def eval_fn(params, model_state, batch):
    return eval_step((params, model_state), batch)

  return jax.jit(eval_fn, in_shardings=(replicated, replicated, data),
                 out_shardings=replicated)


def evaluate_dataset(eval_fn: Callable[..., jax.Array],
                     state: Mapping[str, Any], spec: EvalSpec,
                     mesh: jax.sharding.Mesh) -> Scores:
  """The scores of ``state`` (:func:`make_evaluator`) with the eval step
  ``eval_fn`` of :func:`make_eval_fn`."""
  iterator = input_pipeline.create_eval_iterator(
      spec.data, spec.split,
      batch_size_per_process=sharding_lib.eval_batch_size_per_process(
          spec.batch_size, mesh),
      process_index=jax.process_index(), process_count=jax.process_count())
  confusion = None
  for local_batch in iterator:
    counts = eval_fn(state['params'], state['model_state'],
                     sharding_lib.global_batch(local_batch, mesh))
    confusion = counts if confusion is None else confusion + counts
  if confusion is None:
    raise ValueError(f'{spec.data.dir}: split {spec.split!r} has no examples')
  # Replicated: every process holds the whole sum.
  confusion = np.asarray(confusion.addressable_data(0))
  scores = metrics.segmentation_scores(confusion)
  scores['confusion'] = confusion
  return scores


def print_scores(spec: EvalSpec, step: int, scores: Mapping[str, Any]) -> None:
  """Prints the per-class IoU table of an evaluation (process 0 only) under
  the line ``SPLIT at step N (MODE):`` (the study's report parses it)."""
  if jax.process_index() == 0:
    print(f'{spec.split} at step {step} ({spec.description}):')
    print(metrics.format_iou_table(
        scores['per_class_iou'], spec.class_names, scores['miou'],
        scores['pixel_accuracy']))


def eval_scalars(scores: Mapping[str, Any],
                 class_names: Sequence[str]) -> dict[str, float]:
  """The scalars of an evaluation: ``eval/miou``, ``eval/pixel_accuracy`` and
  ``eval/iou/<class>`` of ``metrics.segmentation_scores``' ``scores``."""
  return {'eval/miou': float(scores['miou']),
          'eval/pixel_accuracy': float(scores['pixel_accuracy']),
          **{f'eval/iou/{name}': float(iou)
             for name, iou in zip(class_names, scores['per_class_iou'])}}


def eval_apply_fn(model_defs: Any) -> ApplyFn:
  """``apply_fn(variables, images) -> logits`` of the prediction modes with
  ``variables = (params, model_state)`` and ``model_defs.eval``, the
  eval-mode model (BatchNorm running statistics)."""

  def apply_fn(variables, images):
    params, model_state = variables
    return nnx.merge(model_defs.eval, params, model_state)(images)[1]

  return apply_fn


def sliding_window_stride(window: int) -> int:
  """Stride of the official 2/3-overlap window (its float expression)."""
  return math.ceil(window * (1 - SLIDING_WINDOW_OVERLAP))


def sliding_window_count(length: int, window: int, stride: int) -> int:
  """Number of windows along an axis of ``length`` pixels (at least 1)."""
  if length <= window:
    return 1
  return -(-(length - window) // stride) + 1


def sliding_window_starts(length: jax.Array, window: int, stride: int,
                          count: int) -> tuple[jax.Array, jax.Array]:
  """Per-example window starts along one axis.

  Args:
    length: int32 ``[B]`` true image lengths along the axis.
    window: window side.
    stride: window stride.
    count: static number of window slots (the count for the canvas length,
      which bounds the count for every ``length`` on that canvas).

  Returns:
    ``starts``: int32 ``[B, count]``, ``max(min(i s + window, L) - window, 0)``;
    ``valid``: bool ``[B, count]``, whether slot ``i`` is one of the
    ``sliding_window_count(L)`` windows of that example.
  """
  length = jnp.asarray(length, jnp.int32)[:, None]
  slot = jnp.arange(count, dtype=jnp.int32)[None, :]
  starts = jnp.maximum(jnp.minimum(slot * stride + window, length) - window, 0)
  num_windows = jnp.where(
      length > window, (length - window + stride - 1) // stride + 1, 1)
  return starts, slot < num_windows


def flip_region_horizontally(x: jax.Array, width: jax.Array) -> jax.Array:
  """Mirrors columns ``[0, width_b)`` of each example; other columns stay.

  Args:
    x: ``[B, H, W, ...]``.
    width: int ``[B]``.
  """
  column = jnp.arange(x.shape[2], dtype=jnp.int32)[None, :]
  width = jnp.asarray(width, jnp.int32)[:, None]
  source_column = jnp.where(column < width, width - 1 - column, column)
  return jax.vmap(lambda image, index: jnp.take(image, index, axis=1, mode='clip'))(
      x, source_column)


def make_predict_fn(apply_fn: ApplyFn, *, mode: str, num_classes: int,
                    crop_size: int = 0,
                    scales: Sequence[float] = (1.0,),
                    flip: bool = False,
                    jit: bool = True) -> Callable[..., jax.Array]:
  """Builds ``predict(variables, images, height, width) -> class ids``.

  Args:
    apply_fn: ``apply_fn(variables, images [N, h, w, 3])`` -> logits
      ``[N, h, w, K]``.
    mode: one of ``EVAL_MODES``.
    num_classes: K.
    crop_size: window side for ``center_crop`` and ``sliding_window``.
    scales: resize factors for ``multi_scale``.
    flip: for ``multi_scale``, also predict the horizontally flipped image.
    jit: return a ``jax.jit``-compiled function.

  Returns:
    ``predict(variables, images [B, Hc, Wc, 3], height [B], width [B],
    classes=None)`` -> int32 ``[B, Hc, Wc]``: class ids; ``UNLABELED`` (-1)
    where the mode makes no prediction (outside the center crop); ``PADDING``
    (-2) outside the true image. ``classes`` (bool ``[B, K]``): each image's
    arg-max is taken over its classes only (:func:`class_argmax`).
  """
  if mode not in EVAL_MODES:
    raise ValueError(f'eval mode {mode!r} is not one of {EVAL_MODES}')
  if mode in ('center_crop', 'sliding_window') and crop_size <= 0:
    raise ValueError(f'eval mode {mode!r} needs crop_size > 0, got {crop_size}')
  if mode == 'multi_scale' and (not scales or min(scales) <= 0):
    raise ValueError(
        f'eval mode multi_scale needs positive scales, got {scales}')

  def checked_logits(variables: Any, images: jax.Array) -> jax.Array:
    logits = apply_fn(variables, images)
    expected = images.shape[:3] + (num_classes,)
    if logits.shape != expected:
      raise ValueError(f'apply_fn returned logits of shape {logits.shape} for '
                       f'images {images.shape}; expected {expected}')
    return logits.astype(jnp.float32)

  def predict(variables: Any, images: jax.Array, height: jax.Array,
              width: jax.Array, classes: jax.Array | None = None) -> jax.Array:
    height = jnp.asarray(height, jnp.int32)
    width = jnp.asarray(width, jnp.int32)
    if mode == 'whole':
      prediction = class_argmax(checked_logits(variables, images), classes)
    elif mode == 'center_crop':
      prediction = _center_crop_prediction(checked_logits, variables, images,
                                           height, width, crop_size, classes)
    elif mode == 'sliding_window':
      prediction = class_argmax(
          _sliding_window_probabilities(checked_logits, variables, images,
                                        height, width, crop_size,
                                        num_classes), classes)
    else:
      prediction = class_argmax(
          _multi_scale_probabilities(checked_logits, variables, images, height,
                                     width, tuple(scales), flip), classes)
    inside = resample.region_mask(height, width, images.shape[1:3])
    return jnp.where(inside, prediction, labels.PADDING).astype(jnp.int32)

  return jax.jit(predict) if jit else predict


def class_argmax(scores: jax.Array, classes: jax.Array | None) -> jax.Array:
  """The arg-max of ``scores [B, H, W, K]`` over the last axis, over each
  image's ``classes`` (bool ``[B, K]``) only when given (an image without a
  class gets class 0)."""
  if classes is None:
    return jnp.argmax(scores, axis=-1)
  return jnp.argmax(jnp.where(classes[:, None, None, :], scores, -jnp.inf),
                    axis=-1)


def labeled_classes(label: jax.Array, height: jax.Array, width: jax.Array,
                    num_classes: int) -> jax.Array:
  """bool ``[B, K]``: the classes with a labeled pixel in each label map
  ``[B, Hc, Wc]`` inside its true ``height x width`` region."""
  inside = resample.region_mask(jnp.asarray(height, jnp.int32),
                                jnp.asarray(width, jnp.int32), label.shape[1:3])
  label = jnp.where(inside, label, labels.UNLABELED)
  return labels.labeled_class_counts(label, num_classes, jnp.int32) > 0


def make_eval_step(apply_fn: ApplyFn, *, mode: str, num_classes: int,
                   crop_size: int = 0,
                   scales: Sequence[float] = (1.0,),
                   flip: bool = False,
                   given_classes: bool = False,
                   jit: bool = True) -> Callable[[Any, dict[str, jax.Array]],
                                                 jax.Array]:
  """Builds ``eval_step(variables, batch) -> confusion int32 [K, K]``.

  ``batch`` is an eval batch (``docs/design.md``): ``image [B, Hc, Wc, 3]``,
  ``label [B, Hc, Wc]``, ``height [B]``, ``width [B]``. The step predicts with
  ``make_predict_fn`` and counts the confusion of labeled pixels that the mode
  predicts (``label >= 0`` and, for ``center_crop``, inside the crop). Sum the
  returned matrices over batches (on device; int32 holds 2^31 - 1 pixels per
  cell, e.g. all 500 Cityscapes val images) and score them with
  ``metrics.segmentation_scores``. ``given_classes``: each image is predicted
  among the classes of its own label map (:func:`labeled_classes`; module
  docstring). Other arguments as in ``make_predict_fn``.
  """
  predict = make_predict_fn(apply_fn, mode=mode, num_classes=num_classes,
                            crop_size=crop_size, scales=scales, flip=flip,
                            jit=False)

  def eval_step(variables: Any, batch: dict[str, jax.Array]) -> jax.Array:
    classes = (labeled_classes(batch['label'], batch['height'], batch['width'],
                               num_classes) if given_classes else None)
    prediction = predict(variables, batch['image'], batch['height'],
                         batch['width'], classes)
    return metrics.confusion_matrix(prediction, batch['label'], num_classes)

  return jax.jit(eval_step) if jit else eval_step


def _center_crop_prediction(logits_fn: ApplyFn, variables: Any,
                            images: jax.Array, height: jax.Array,
                            width: jax.Array, crop: int,
                            classes: jax.Array | None = None) -> jax.Array:
  """Class ids of the center crop pasted into a canvas of ``UNLABELED``."""
  canvas_hw = images.shape[1:3]
  images = _pad_to_at_least(images, crop)
  padded_h, padded_w = images.shape[1:3]
  # Floor division like the official code, clamped so the crop stays on the
  # canvas (images smaller than the crop are predicted from the top-left).
  start_y = jnp.clip((height - crop) // 2, 0, padded_h - crop)
  start_x = jnp.clip((width - crop) // 2, 0, padded_w - crop)
  crops = jax.vmap(
      lambda image, y, x: jax.lax.dynamic_slice(image, (y, x, 0),
                                                (crop, crop, image.shape[-1]))
  )(images, start_y, start_x)
  crop_prediction = class_argmax(logits_fn(variables, crops), classes)
  canvas = jnp.full((images.shape[0], padded_h, padded_w), labels.UNLABELED,
                    crop_prediction.dtype)
  canvas = jax.vmap(
      lambda canvas, crop_ids, y, x: jax.lax.dynamic_update_slice(
          canvas, crop_ids, (y, x)))(canvas, crop_prediction, start_y, start_x)
  return canvas[:, :canvas_hw[0], :canvas_hw[1]]


def _sliding_window_probabilities(logits_fn: ApplyFn, variables: Any,
                                  images: jax.Array, height: jax.Array,
                                  width: jax.Array, window: int,
                                  num_classes: int) -> jax.Array:
  """Average softmax probabilities of the sliding windows ``[B, Hc, Wc, K]``.

  The windows are visited with ``lax.scan`` so the model appears once in the
  compiled program; each step predicts one window position for every example
  of the batch (positions differ per example since image sizes do).
  """
  batch_size = images.shape[0]
  canvas_hw = images.shape[1:3]
  images = _pad_to_at_least(images, window)
  padded_h, padded_w = images.shape[1:3]
  stride = sliding_window_stride(window)
  rows = sliding_window_count(padded_h, window, stride)
  cols = sliding_window_count(padded_w, window, stride)
  row_starts, row_valid = sliding_window_starts(height, window, stride, rows)
  col_starts, col_valid = sliding_window_starts(width, window, stride, cols)
  # Slot t = r * cols + c, laid out as scan inputs of shape [rows * cols, B].
  starts_y = jnp.repeat(row_starts, cols, axis=1).T
  starts_x = jnp.tile(col_starts, (1, rows)).T
  valid = (jnp.repeat(row_valid, cols, axis=1)
           & jnp.tile(col_valid, (1, rows))).T

  def add_window(accumulated, slot):
    probability_sum, window_count = accumulated
    y, x, is_valid = slot
    crops = jax.vmap(
        lambda image, y, x: jax.lax.dynamic_slice(
            image, (y, x, 0), (window, window, image.shape[-1])))(images, y, x)
    probabilities = jax.nn.softmax(logits_fn(variables, crops), axis=-1)
    weight = is_valid.astype(jnp.float32)[:, None, None, None]

    def add_at(total, update, y, x):
      current = jax.lax.dynamic_slice(total, (y, x, 0), update.shape)
      return jax.lax.dynamic_update_slice(total, current + update, (y, x, 0))

    probability_sum = jax.vmap(add_at)(probability_sum,
                                       probabilities * weight, y, x)
    window_count = jax.vmap(add_at)(
        window_count, jnp.broadcast_to(weight, (batch_size, window, window, 1)),
        y, x)
    return (probability_sum, window_count), None

  initial = (jnp.zeros((batch_size, padded_h, padded_w, num_classes),
                       jnp.float32),
             jnp.zeros((batch_size, padded_h, padded_w, 1), jnp.float32))
  (probability_sum, window_count), _ = jax.lax.scan(
      add_window, initial, (starts_y, starts_x, valid))
  average = probability_sum / jnp.maximum(window_count, 1.0)
  return average[:, :canvas_hw[0], :canvas_hw[1]]


def _multi_scale_probabilities(logits_fn: ApplyFn, variables: Any,
                               images: jax.Array, height: jax.Array,
                               width: jax.Array, scales: tuple[float, ...],
                               flip: bool) -> jax.Array:
  """Sum over scales (and flips) of resized softmax probabilities."""
  canvas_hw = images.shape[1:3]
  # Examples that are all padding (size 0) get a harmless 1x1 region.
  source_hw = (jnp.maximum(height, 1), jnp.maximum(width, 1))
  total = None
  for scale in scales:
    scaled_canvas = (max(int(canvas_hw[0] * scale), 1),
                     max(int(canvas_hw[1] * scale), 1))
    scaled_hw = tuple(
        jnp.maximum(jnp.floor(size.astype(jnp.float32) * scale), 1.0)
        .astype(jnp.int32) for size in source_hw)
    scaled = resample.resize_region_align_corners(images, source_hw, scaled_hw,
                                         scaled_canvas)
    if flip:
      both = jnp.concatenate(
          [scaled, flip_region_horizontally(scaled, scaled_hw[1])], axis=0)
      probabilities, flipped = jnp.split(
          jax.nn.softmax(logits_fn(variables, both), axis=-1), 2, axis=0)
      probabilities = probabilities + flip_region_horizontally(
          flipped, scaled_hw[1])
    else:
      probabilities = jax.nn.softmax(logits_fn(variables, scaled), axis=-1)
    resized = resample.resize_region_align_corners(probabilities, scaled_hw, source_hw,
                                          canvas_hw)
    total = resized if total is None else total + resized
  return total


def _pad_to_at_least(images: jax.Array, size: int) -> jax.Array:
  """Zero-pads ``[B, H, W, C]`` at the bottom/right to at least ``size``."""
  pad_h = max(size - images.shape[1], 0)
  pad_w = max(size - images.shape[2], 0)
  if pad_h or pad_w:
    images = jnp.pad(images, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
  return images
