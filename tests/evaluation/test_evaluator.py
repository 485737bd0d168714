"""Tests of agmm_jax.evaluation.evaluator: the prediction modes against NumPy
re-implementations of the official AGMM evaluation loops (util/utils.py:
``pre_slide``, ``ms_test``, ``evaluate``) run per image at its true size,
without any canvas; the evaluator of a split (EvalSpec, make_evaluator)
against a per-image loop over the split's records; scores' printing and
scalars."""

import dataclasses
import functools
import json
import math
import os
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from agmm_jax.evaluation import evaluator
from agmm_jax.data import augment
from agmm_jax.data import input_pipeline
from agmm_jax.data import labels
from agmm_jax.model import resample
from agmm_jax.runtime import sharding as sharding_lib
from agmm_jax.train import state as train_state_lib
from configs import tiny
from tests import conftest

NUM_CLASSES = 4
CANVAS = (20, 24)
CROP = 9
SCALES = (0.5, 1.0, 1.5)
# (height, width) of each example; the last one is an all-padding example.
SIZES = ((20, 24), (13, 17), (7, 9), (10, 5), (0, 0))


class FakeModel:
  """A deterministic model: 1x1 conv plus a term of the pixel position.

  ``logits[y, x] = image[y, x] @ weight + bias + sin(0.7 y) a + cos(0.5 x) c``
  with (y, x) measured from the top-left of the model input, so the result
  depends on where a window or scaled image starts but not on pixels outside
  the receptive field (1x1); padding therefore cannot leak into real pixels and
  the canvas implementation must agree exactly with the per-image reference.
  Counts its Python calls to detect re-tracing.
  """

  def __init__(self, seed):
    rng = np.random.default_rng(seed)
    self.variables = {
        'weight': rng.normal(size=(3, NUM_CLASSES)).astype(np.float32),
        'bias': rng.normal(size=(NUM_CLASSES,)).astype(np.float32),
        'row': rng.normal(size=(NUM_CLASSES,)).astype(np.float32),
        'col': rng.normal(size=(NUM_CLASSES,)).astype(np.float32),
    }
    self.calls = 0

  def apply(self, variables, images):
    self.calls += 1
    return self._logits(jnp, variables, images)

  def numpy_logits(self, image):
    variables = {k: v.astype(np.float64) for k, v in self.variables.items()}
    return self._logits(np, variables, image[None].astype(np.float64))[0]

  @staticmethod
  def _logits(xp, variables, images):
    height, width = images.shape[1:3]
    rows = xp.sin(0.7 * xp.arange(height))[:, None, None]
    cols = xp.cos(0.5 * xp.arange(width))[None, :, None]
    return (images @ variables['weight'] + variables['bias']
            + rows * variables['row'] + cols * variables['col'])


def softmax(logits):
  shifted = np.exp(logits - logits.max(-1, keepdims=True))
  return shifted / shifted.sum(-1, keepdims=True)


def interpolation_matrix(in_size, out_size):
  """``[out, in]`` weights of 1-D linear interpolation with align_corners."""
  matrix = np.zeros((out_size, in_size))
  for o in range(out_size):
    position = o * (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    lower = min(int(math.floor(position)), in_size - 1)
    fraction = position - lower
    matrix[o, lower] += 1 - fraction
    matrix[o, min(lower + 1, in_size - 1)] += fraction
  return matrix


def resize_align_corners(x, size):
  """Bilinear interpolation with align_corners=True of ``[h, w, C]``."""
  rows = interpolation_matrix(x.shape[0], size[0])
  cols = interpolation_matrix(x.shape[1], size[1])
  return np.einsum('oh,hwc,pw->opc', rows, x, cols)


def reference_sliding_window(model, image, tile):
  """The official pre_slide loop (padding fixed to bottom/right)."""
  height, width = image.shape[:2]
  stride = math.ceil(tile * (1 - 2 / 3))
  tile_rows = max(int(math.ceil((height - tile) / stride) + 1), 1)
  tile_cols = max(int(math.ceil((width - tile) / stride) + 1), 1)
  full = np.zeros((height, width, NUM_CLASSES))
  count = np.zeros((height, width, 1))
  for row in range(tile_rows):
    for col in range(tile_cols):
      x1, y1 = col * stride, row * stride
      x2, y2 = min(x1 + tile, width), min(y1 + tile, height)
      x1, y1 = max(x2 - tile, 0), max(y2 - tile, 0)
      window = image[y1:y2, x1:x2]
      padded = np.zeros((tile, tile, 3))
      padded[:y2 - y1, :x2 - x1] = window
      probabilities = softmax(model.numpy_logits(padded))
      full[y1:y2, x1:x2] += probabilities[:y2 - y1, :x2 - x1]
      count[y1:y2, x1:x2] += 1
  return full / count


def reference_multi_scale(model, image, scales, flip):
  """The official ms_test loop on softmax probabilities."""
  height, width = image.shape[:2]
  total = np.zeros((height, width, NUM_CLASSES))
  for scale in scales:
    scaled = resize_align_corners(image, (int(height * scale),
                                          int(width * scale)))
    probabilities = softmax(model.numpy_logits(scaled))
    if flip:
      probabilities = probabilities + softmax(
          model.numpy_logits(scaled[:, ::-1]))[:, ::-1]
    total += resize_align_corners(probabilities, (height, width))
  return total


def make_batch(seed, sizes=SIZES):
  """An eval batch on the canvas; labels hold class ids even in the padding
  so that only the height/width masking can keep padding out of the counts."""
  rng = np.random.default_rng(seed)
  batch_size = len(sizes)
  image = np.zeros((batch_size,) + CANVAS + (3,), np.float32)
  label = rng.integers(0, NUM_CLASSES, (batch_size,) + CANVAS).astype(np.int32)
  for index, (height, width) in enumerate(sizes):
    image[index, :height, :width] = rng.normal(size=(height, width, 3))
    void = rng.random((height, width)) < 0.2
    label[index, :height, :width][void] = labels.UNLABELED
  return {
      'image': image,
      'label': label,
      'height': np.array([s[0] for s in sizes], np.int32),
      'width': np.array([s[1] for s in sizes], np.int32),
  }


def reference_confusion(predictions, batch, region=None):
  """Confusion over labeled pixels inside each true image (and the region)."""
  confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
  for index, prediction in enumerate(predictions):
    height, width = batch['height'][index], batch['width'][index]
    label = batch['label'][index, :height, :width]
    counted = label >= 0
    if region is not None:
      counted &= region[index]
    np.add.at(confusion, (label[counted], prediction[counted]), 1)
  return confusion


def reference_predictions(model, batch, mode):
  predictions = []
  for index in range(len(batch['height'])):
    height, width = batch['height'][index], batch['width'][index]
    image = batch['image'][index, :height, :width].astype(np.float64)
    if height == 0:
      predictions.append(np.zeros((0, 0), np.int64))
    elif mode == 'sliding_window':
      predictions.append(
          reference_sliding_window(model, image, CROP).argmax(-1))
    elif mode == 'multi_scale':
      predictions.append(
          reference_multi_scale(model, image, SCALES, True).argmax(-1))
    else:
      predictions.append(model.numpy_logits(image).argmax(-1))
  return predictions


@pytest.fixture(scope='module', params=['whole', 'sliding_window',
                                        'multi_scale'])
def mode_run(request):
  """Runs one mode's eval step and predict fn on three batches."""
  mode = request.param
  model = FakeModel(seed=0)
  kwargs = dict(mode=mode, num_classes=NUM_CLASSES, crop_size=CROP,
                scales=SCALES, flip=True)
  eval_step = evaluator.make_eval_step(model.apply, **kwargs)
  predict = evaluator.make_predict_fn(model.apply, **kwargs)
  batches = [make_batch(seed) for seed in range(3)]
  batches[1]['height'] = np.array([5, 20, 11, 3, 0], np.int32)
  batches[1]['width'] = np.array([24, 6, 9, 2, 0], np.int32)
  variables = {k: jnp.asarray(v) for k, v in model.variables.items()}
  confusions = [np.asarray(eval_step(variables, batch)) for batch in batches]
  calls_after_eval = model.calls
  predictions = np.asarray(
      predict(variables, batches[0]['image'], batches[0]['height'],
              batches[0]['width']))
  return dict(mode=mode, model=model, batches=batches, confusions=confusions,
              predictions=predictions, calls_after_eval=calls_after_eval)


def test_eval_step_confusion_matches_reference(mode_run):
  model = mode_run['model']
  for batch, confusion in zip(mode_run['batches'], mode_run['confusions']):
    expected = reference_confusion(
        reference_predictions(model, batch, mode_run['mode']), batch)
    np.testing.assert_array_equal(confusion, expected)


def test_eval_step_is_traced_once_for_all_batches(mode_run):
  calls_per_trace = len(SCALES) if mode_run['mode'] == 'multi_scale' else 1
  assert mode_run['calls_after_eval'] == calls_per_trace


def test_predict_marks_padding_and_matches_reference(mode_run):
  batch = mode_run['batches'][0]
  predictions = mode_run['predictions']
  references = reference_predictions(mode_run['model'], batch, mode_run['mode'])
  for index, reference in enumerate(references):
    height, width = batch['height'][index], batch['width'][index]
    np.testing.assert_array_equal(predictions[index, :height, :width],
                                  reference)
    outside = np.ones(CANVAS, bool)
    outside[:height, :width] = False
    assert (predictions[index][outside] == labels.PADDING).all()


def test_multi_scale_probabilities_match_reference():
  model = FakeModel(seed=1)
  batch = make_batch(seed=7)
  variables = {k: jnp.asarray(v) for k, v in model.variables.items()}
  multi_scale = jax.jit(
      functools.partial(evaluator._multi_scale_probabilities, model.apply),  # pylint: disable=protected-access
      static_argnums=(4, 5))
  probabilities = np.asarray(multi_scale(
      variables, jnp.asarray(batch['image']),
      jnp.asarray(batch['height']), jnp.asarray(batch['width']), SCALES, True))
  for index, (height, width) in enumerate(SIZES[:-1]):
    expected = reference_multi_scale(
        model, batch['image'][index, :height, :width].astype(np.float64),
        SCALES, flip=True)
    np.testing.assert_allclose(probabilities[index, :height, :width], expected,
                               atol=2e-5)


def test_sliding_window_probabilities_match_reference():
  model = FakeModel(seed=2)
  batch = make_batch(seed=8)
  variables = {k: jnp.asarray(v) for k, v in model.variables.items()}
  sliding_window = jax.jit(
      functools.partial(evaluator._sliding_window_probabilities, model.apply),  # pylint: disable=protected-access
      static_argnums=(4, 5))
  probabilities = np.asarray(sliding_window(
      variables, jnp.asarray(batch['image']),
      jnp.asarray(batch['height']), jnp.asarray(batch['width']), CROP,
      NUM_CLASSES))
  for index, (height, width) in enumerate(SIZES[:-1]):
    expected = reference_sliding_window(
        model, batch['image'][index, :height, :width].astype(np.float64), CROP)
    np.testing.assert_allclose(probabilities[index, :height, :width], expected,
                               atol=1e-5)


def test_center_crop_counts_only_pixels_in_the_crop():
  model = FakeModel(seed=3)
  sizes = ((20, 24), (13, 17), (7, 9), (0, 0))
  batch = make_batch(seed=9, sizes=sizes)
  variables = {k: jnp.asarray(v) for k, v in model.variables.items()}
  kwargs = dict(mode='center_crop', num_classes=NUM_CLASSES, crop_size=CROP)
  confusion = np.asarray(
      evaluator.make_eval_step(model.apply, **kwargs)(variables, batch))
  predictions = np.asarray(evaluator.make_predict_fn(model.apply, **kwargs)(
      variables, batch['image'], batch['height'], batch['width']))
  expected_predictions, regions = [], []
  for index, (height, width) in enumerate(sizes):
    top = min(max((height - CROP) // 2, 0), CANVAS[0] - CROP)
    left = min(max((width - CROP) // 2, 0), CANVAS[1] - CROP)
    crop = batch['image'][index, top:top + CROP, left:left + CROP]
    full = np.full(CANVAS, labels.UNLABELED)
    full[top:top + CROP, left:left + CROP] = model.numpy_logits(crop).argmax(-1)
    full[height:] = labels.PADDING
    full[:, width:] = labels.PADDING
    expected_predictions.append(full[:height, :width])
    region = np.zeros((height, width), bool)
    region[top:top + CROP, left:left + CROP] = True
    regions.append(region)
    np.testing.assert_array_equal(predictions[index], full)
  np.testing.assert_array_equal(
      confusion, reference_confusion(expected_predictions, batch, regions))
  assert confusion.sum() < (batch['label'][:, :CROP, :CROP] >= 0).sum() * 3


def reference_scores(model, image, mode):
  """The scores a mode's arg-max is taken over, per image (loops above)."""
  if mode == 'sliding_window':
    return reference_sliding_window(model, image, CROP)
  if mode == 'multi_scale':
    return reference_multi_scale(model, image, SCALES, True)
  return model.numpy_logits(image)


@pytest.mark.parametrize('mode', ['whole', 'sliding_window', 'multi_scale',
                                  'center_crop'])
def test_given_classes_predict_among_each_images_labeled_classes(mode):
  model = FakeModel(seed=4)
  sizes = ((20, 24), (13, 17), (7, 9), (0, 0))
  batch = make_batch(seed=11, sizes=sizes)
  # Two classes per image (the padding keeps every class id, so the classes
  # must be read inside the true size only).
  for index, (height, width) in enumerate(sizes):
    region = batch['label'][index, :height, :width]
    region[region >= 0] = np.where(region[region >= 0] % 2 == 0, index,
                                   (index + 1) % NUM_CLASSES)
  variables = {k: jnp.asarray(v) for k, v in model.variables.items()}
  kwargs = dict(mode=mode, num_classes=NUM_CLASSES, crop_size=CROP,
                scales=SCALES, flip=True)
  given = np.asarray(evaluator.make_eval_step(
      model.apply, given_classes=True, **kwargs)(variables, batch))
  free = np.asarray(evaluator.make_eval_step(model.apply, **kwargs)(
      variables, batch))
  expected, regions = [], []
  for index, (height, width) in enumerate(sizes):
    label = batch['label'][index, :height, :width]
    present = np.zeros(NUM_CLASSES, bool)
    present[np.unique(label[label >= 0])] = True
    region = np.ones((height, width), bool)
    image = batch['image'][index, :height, :width].astype(np.float64)
    if mode == 'center_crop':
      top = min(max((height - CROP) // 2, 0), CANVAS[0] - CROP)
      left = min(max((width - CROP) // 2, 0), CANVAS[1] - CROP)
      scores = np.full((height, width, NUM_CLASSES), -np.inf)
      crop = batch['image'][index, top:top + CROP, left:left + CROP]
      scores[top:top + CROP, left:left + CROP] = model.numpy_logits(
          crop)[:height - top, :width - left]
      region[:] = False
      region[top:top + CROP, left:left + CROP] = True
    else:
      scores = (reference_scores(model, image, mode) if height else
                np.zeros((0, 0, NUM_CLASSES)))
    prediction = np.full((height, width), -1)
    for y, x in np.ndindex(height, width):
      allowed = [k for k in range(NUM_CLASSES) if present[k]]
      prediction[y, x] = allowed[int(np.argmax(scores[y, x, allowed]))]
    expected.append(prediction)
    regions.append(region)
  np.testing.assert_array_equal(given, reference_confusion(expected, batch,
                                                           regions))
  # The same pixels counted; the restriction moved some of them.
  assert (given != free).any()
  assert given.sum() == free.sum()


def test_resize_region_matches_torch_interpolate():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(4)
  x = rng.normal(size=(2, 9, 11, 3)).astype(np.float32)
  source = (np.array([9, 5]), np.array([11, 7]))
  target = (np.array([13, 1]), np.array([4, 10]))
  out = np.asarray(resample.resize_region_align_corners(
      jnp.asarray(x), source, target, (14, 12)))
  for index in range(2):
    region = torch.from_numpy(
        x[index:index + 1, :source[0][index], :source[1][index]])
    expected = torch.nn.functional.interpolate(
        region.permute(0, 3, 1, 2),
        size=(int(target[0][index]), int(target[1][index])), mode='bilinear',
        align_corners=True).permute(0, 2, 3, 1)[0].numpy()
    np.testing.assert_allclose(
        out[index, :target[0][index], :target[1][index]], expected, atol=1e-6)
    outside = np.ones((14, 12), bool)
    outside[:target[0][index], :target[1][index]] = False
    assert (out[index][outside] == 0).all()


def test_sliding_window_grid_matches_official_arithmetic():
  # The official float expression ceil(321 * (1 - 2/3)) gives 108, not 107.
  assert evaluator.sliding_window_stride(321) == 108
  assert evaluator.sliding_window_stride(769) == 257
  for length in (100, 321, 322, 500, 1024, 2048):
    stride = evaluator.sliding_window_stride(321)
    official = max(int(math.ceil((length - 321) / stride) + 1), 1)
    assert evaluator.sliding_window_count(length, 321, stride) == official


def test_bad_mode_and_missing_crop_are_rejected():
  with pytest.raises(ValueError, match='not one of'):
    evaluator.make_eval_step(lambda v, x: x, mode='tiles', num_classes=2)
  with pytest.raises(ValueError, match='crop_size'):
    evaluator.make_eval_step(lambda v, x: x, mode='sliding_window',
                            num_classes=2)


SHARDED_WORKER = r'''
import sys
import jax
import jax.numpy as jnp
import numpy as np
sys.path.insert(0, sys.argv[1])
import test_evaluator as t
from agmm_jax.evaluation import evaluator
assert jax.device_count() == 2, jax.devices()
# Auto axes, like agmm_jax/runtime/sharding.py (an Explicit-axes mesh would need
# out_sharding on the scatter of the confusion matrix).
mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
model = t.FakeModel(seed=5)
variables = {k: jnp.asarray(v) for k, v in model.variables.items()}
batch = t.make_batch(seed=11, sizes=((20, 24), (13, 17), (7, 9), (0, 0)))
sharded = {k: jax.device_put(v, data) for k, v in batch.items()}
results = []
for mode in evaluator.EVAL_MODES:
  step = evaluator.make_eval_step(model.apply, mode=mode,
                                 num_classes=t.NUM_CLASSES, crop_size=t.CROP,
                                 scales=t.SCALES, flip=True)
  results.append(np.asarray(step(variables, sharded)))
  results.append(np.asarray(step(variables, batch)))
np.save(sys.argv[2], np.stack(results))
'''


def test_eval_step_on_two_devices_equals_one_device(tmp_path):
  """The batch sharded over 2 (fake CPU) devices gives the same confusion."""
  output = tmp_path / 'confusions.npy'
  environment = dict(os.environ, JAX_PLATFORMS='cpu',
                     XLA_FLAGS='--xla_force_host_platform_device_count=2')
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  environment['PYTHONPATH'] = os.pathsep.join(
      [os.path.dirname(os.path.dirname(tests_dir)), environment.get('PYTHONPATH', '')])
  subprocess.run([sys.executable, '-c', SHARDED_WORKER, tests_dir,
                  str(output)], check=True, env=environment, timeout=300)
  confusions = np.load(output)
  for sharded, single in zip(confusions[0::2], confusions[1::2]):
    np.testing.assert_array_equal(sharded, single)
    assert sharded.sum() > 0


# The evaluator of a split.


def test_eval_spec_from_config_casts_once_and_freezes_the_data():
  config = tiny.get_config()
  config.data.dir = '/data/a'
  config.eval.mode = 'multi_scale'
  config.eval.scales = (1, 1.5)
  spec = evaluator.EvalSpec.from_config(config, ['road', 'car'])
  assert (spec.mode, spec.crop_size, spec.flip, spec.batch_size,
          spec.split) == ('multi_scale', config.data.crop_size, True, 8,
                          config.data.eval_split)
  assert spec.scales == (1.0, 1.5)
  assert all(isinstance(scale, float) for scale in spec.scales)
  assert spec.class_names == ('road', 'car') and spec.num_classes == 2
  assert spec.mode_options() == dict(
      mode='multi_scale', num_classes=2, crop_size=config.data.crop_size,
      scales=(1.0, 1.5), flip=True)
  # The spec keeps the data block as it was: later edits of the config and
  # writes to the spec do not reach it.
  config.data.dir = '/data/b'
  assert spec.data.dir == '/data/a'
  assert isinstance(spec.data, ml_collections.FrozenConfigDict)
  with pytest.raises(dataclasses.FrozenInstanceError):
    spec.mode = 'whole'
  assert evaluator.EvalSpec.from_config(config, ['a'], split='test').split == (
      'test')
  assert (spec.given_classes, spec.description) == (False, 'multi_scale')
  config.eval.given_classes = True
  given = evaluator.EvalSpec.from_config(config, ['a'])
  assert (given.given_classes, given.description) == (
      True, 'multi_scale, given classes')
  # A config.json recorded before the field existed: evaluated without.
  recorded = ml_collections.ConfigDict(json.loads(config.to_json()))
  del recorded.eval['given_classes']
  assert not evaluator.EvalSpec.from_config(recorded, ['a']).given_classes


@pytest.mark.parametrize('field, value, message', [
    ('eval.mode', 'tiles', "config.eval.mode='tiles' is not one of"),
    ('eval.batch_size', 0, 'config.eval.batch_size=0 must be positive'),
    ('eval.scales', (1.0, 0.0), 'config.eval.scales must be positive'),
])
def test_eval_spec_names_the_config_field_of_a_bad_value(field, value, message):
  config = tiny.get_config()
  config.eval.mode = 'multi_scale'
  group, name = field.split('.')
  setattr(config[group], name, value)
  with pytest.raises(ValueError, match=message):
    evaluator.EvalSpec.from_config(config, ['a', 'b'])


def test_eval_spec_needs_a_crop_for_the_window_modes():
  config = tiny.get_config()
  config.data.crop_size = 0
  config.eval.mode = 'sliding_window'
  with pytest.raises(ValueError, match='config.data.crop_size > 0, got 0'):
    evaluator.EvalSpec.from_config(config, ['a'])
  config.eval.mode = 'whole'
  assert evaluator.EvalSpec.from_config(config, ['a']).crop_size == 0


# Python calls of PixelModel (each one is a trace of the jitted eval step).
PIXEL_MODEL_CALLS = []


class PixelModel(nnx.Module):
  """Per-pixel logits ``image @ weight`` written as a product and a sum over
  the 3 channels, so a pixel's logits are the same bits whatever the batch
  or canvas (padding cannot leak in) and the evaluator's predictions equal a
  per-image loop's exactly. Returns ``(features, logits)`` like the model."""

  def __init__(self, num_classes: int, seed: int):
    weight = np.random.default_rng(seed).normal(size=(3, num_classes))
    self.weight = nnx.Param(jnp.asarray(weight, jnp.float32))
    self.scale = nnx.BatchStat(jnp.ones((), jnp.float32))

  def __call__(self, images):
    PIXEL_MODEL_CALLS.append(images.shape)
    logits = (images[..., :, None] * self.weight[...]).sum(axis=-2)
    return images, logits * self.scale[...]


def split_model(model):
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  return (train_state_lib.ModelDefs(graphdef, graphdef),
          {'params': params, 'model_state': model_state})


def reference_split_confusion(model, data_dir, split, num_classes):
  """Confusion of ``model`` over ``split``, one record at a time at its own
  size, counted pixel by pixel in a Python loop."""
  metadata = input_pipeline.read_metadata(data_dir)
  source = input_pipeline.TFRecordSource(
      [os.path.join(data_dir, shard)
       for shard in metadata['splits'][split]['shards']])
  confusion = np.zeros((num_classes, num_classes), np.int64)
  for index in range(len(source)):
    image, label, _ = input_pipeline.decode_record(
        source[index], num_classes=num_classes,
        label_key=input_pipeline.LABEL_KEYS['dense'])
    pixels = jnp.asarray(augment.normalize(np.asarray(image))[None])
    prediction = np.asarray(jnp.argmax(model(pixels)[1], axis=-1))[0]
    for truth, predicted in zip(label.reshape(-1), prediction.reshape(-1)):
      if 0 <= truth < num_classes:
        confusion[truth, predicted] += 1
  return confusion, len(source)


def test_make_evaluator_matches_a_per_image_loop_over_the_split(tiny_data_dir):
  num_classes = conftest.TINY_NUM_CLASSES
  config = tiny.get_config()
  config.data.dir = tiny_data_dir
  config.data.eval_canvas = (48, 64)  # Beyond the 40x56 images: padding.
  config.eval.batch_size = 2  # 3 images: the second batch has a filler.
  class_names = [f'class_{k}' for k in range(num_classes)]
  spec = evaluator.EvalSpec.from_config(config, class_names)
  mesh = sharding_lib.create_mesh(config.mesh)
  spec.check(mesh)
  model = PixelModel(num_classes, seed=0)
  model_defs, state = split_model(model)
  PIXEL_MODEL_CALLS.clear()
  evaluate = evaluator.make_evaluator(model_defs, spec, mesh)
  scores = evaluate(state)
  # Another state through the same evaluator: its own scores, no new trace.
  other_model = PixelModel(num_classes, seed=1)
  other = evaluate(split_model(other_model)[1])
  assert len(PIXEL_MODEL_CALLS) == 1  # One trace for all batches and states.
  expected, num_images = reference_split_confusion(
      model, tiny_data_dir, spec.split, num_classes)
  assert num_images == 3
  np.testing.assert_array_equal(scores['confusion'], expected)
  iou = [expected[k, k] / (expected[k].sum() + expected[:, k].sum()
                           - expected[k, k]) for k in range(num_classes)]
  np.testing.assert_allclose(scores['per_class_iou'], iou)
  assert scores['miou'] == pytest.approx(np.mean(iou))
  assert scores['pixel_accuracy'] == pytest.approx(
      np.trace(expected) / expected.sum())
  other_expected, _ = reference_split_confusion(
      other_model, tiny_data_dir, spec.split, num_classes)
  np.testing.assert_array_equal(other['confusion'], other_expected)
  assert not np.array_equal(other_expected, expected)


def test_eval_spec_check_names_a_canvas_smaller_than_the_images(tiny_data_dir):
  config = tiny.get_config()
  config.data.dir = tiny_data_dir
  config.data.eval_canvas = (32, 64)
  spec = evaluator.EvalSpec.from_config(config, ['a'])
  with pytest.raises(ValueError, match='config.data.eval_canvas=.*smaller'):
    spec.check(sharding_lib.create_mesh(config.mesh))


def test_print_scores_prints_the_header_and_every_class(capsys):
  config = tiny.get_config()
  spec = evaluator.EvalSpec.from_config(config, ['road', 'car'], split='test')
  evaluator.print_scores(spec, 7, {'per_class_iou': np.array([0.5, np.nan]),
                                   'miou': 0.5, 'pixel_accuracy': 0.25})
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == 'test at step 7 (whole):'
  assert lines[2].split() == ['road', '50.00']
  assert lines[3].split() == ['car', 'n/a']
  assert lines[-2].split() == ['mIoU', '50.00']


def test_eval_scalars_name_every_class():
  scalars = evaluator.eval_scalars(
      {'miou': np.float64(0.5), 'pixel_accuracy': 0.75,
       'per_class_iou': np.array([0.25, 0.75, np.nan])}, ['road', 'car', 'sky'])
  assert sorted(scalars) == ['eval/iou/car', 'eval/iou/road', 'eval/iou/sky',
                             'eval/miou', 'eval/pixel_accuracy']
  assert scalars['eval/miou'] == 0.5 and scalars['eval/pixel_accuracy'] == 0.75
  assert (scalars['eval/iou/road'], scalars['eval/iou/car']) == (0.25, 0.75)
  assert np.isnan(scalars['eval/iou/sky'])
  assert all(type(value) is float for value in scalars.values())
