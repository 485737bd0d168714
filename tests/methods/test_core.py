"""The methods interface (agmm_jax.methods.core): a toy method defined in this
file alone (a term with an extra head and an extra batch field) trains with
the tiny config, plus the registry's config handling and declarations."""

import threading

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from agmm_jax.data import augment
from agmm_jax import methods
from agmm_jax.model import deeplab
from agmm_jax.train import trainer
from agmm_jax.methods import core
from configs import tiny
from tests.train import test_trainer

TOY_TERM = 'test_toy_regression'
TOY_HEAD = 'test_toy_head'
TOY_FIELD = 'test_toy_brightness'
NUM_CLASSES = 4
FEATURE_STRIDE = 4


class ToyHead(nnx.Module):
  """One 1x1 convolution to a scalar map ``[B, h, w]``."""

  def __init__(self, in_features: int, *, num_classes: int, dtype, rngs: nnx.Rngs):
    del num_classes
    self.conv = nnx.Conv(in_features, 1, (1, 1), dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.conv(x)[..., 0]


_FIELD_CALLS = []
_FIELD_LOCK = threading.Lock()


def brightness(example) -> np.ndarray:
  """The toy batch field: the mean over channels of the normalized crop."""
  with _FIELD_LOCK:
    _FIELD_CALLS.append(example['image'].shape)
  return example['image'].mean(axis=-1).astype(np.float32)


def toy_regression(inputs: methods.LossInputs, *, scale: float = 1.0) -> jax.Array:
  """``scale * mean((head(f) - brightness[::4, ::4])^2)``: the head learns the
  brightness of the crop at the feature grid's pixels."""
  prediction = inputs.output(TOY_HEAD)
  target = inputs.field(TOY_FIELD)[:, ::FEATURE_STRIDE, ::FEATURE_STRIDE]
  if prediction.shape != target.shape:
    raise ValueError(f'toy head {prediction.shape} vs field {target.shape}')
  return scale * jnp.mean(jnp.square(prediction - target))


if TOY_TERM not in methods.registered_terms():
  methods.register_term(TOY_TERM, needs=methods.Needs(
      image=True, heads={TOY_HEAD: ToyHead},
      batch_fields={TOY_FIELD: brightness}))(toy_regression)


def test_a_method_defined_in_a_test_file_trains_and_its_loss_is_used(tiny_data_dir, tmp_path):
  config = tiny.get_config()
  config.data.dir = tiny_data_dir
  config.num_train_steps = 2
  config.loss = methods.loss_config({'pce': 1.0, TOY_TERM: 1.0}, **{TOY_TERM: {'scale': 2.0}})
  _FIELD_CALLS.clear()
  scores = trainer.train_and_evaluate(config, str(tmp_path))
  assert scores['step'] == 2
  # The pipeline computed the field for at least the 2 x 8 trained examples.
  assert len(_FIELD_CALLS) >= 2 * config.global_batch_size
  assert set(_FIELD_CALLS) == {(config.data.crop_size, config.data.crop_size, 3)}
  tags = test_trainer.read_event_tags(str(tmp_path))
  assert tags.get(f'train/{TOY_TERM}') == [1, 2]
  # Only the toy term reaches the head: its weights moved from their initial
  # values (same seed), so the term's gradient was applied.
  restored = ocp.StandardCheckpointer().restore(str(tmp_path / 'checkpoints' / '2' / 'state'))
  (trained_kernel,) = jax.tree.leaves(restored['params']['extra_heads'][TOY_HEAD]['conv']['kernel'])
  initial = deeplab.build_model(config.model, NUM_CLASSES, rngs=nnx.Rngs(config.seed),
                               extra_heads={TOY_HEAD: ToyHead})
  initial_kernel = np.asarray(initial.extra_heads[TOY_HEAD].conv.kernel.get_value())
  assert trained_kernel.shape == initial_kernel.shape
  assert np.abs(np.asarray(trained_kernel) - initial_kernel).max() > 1e-6
  # Without the toy term the model has no such head.
  plain = deeplab.build_model(config.model, NUM_CLASSES, rngs=nnx.Rngs(0))
  assert not plain.extra_outputs(jnp.zeros((1, 9, 9, deeplab.DECODER_CHANNELS)))


def test_loss_config_fills_option_blocks_from_the_signatures():
  config = methods.loss_config({'pce': 1.0}, gmm={'form': 'paper'}, rows_per_chunk=8)
  assert config.gmm.form == 'paper'
  assert config.gmm.sigma_stop_gradient is True
  assert config.prototype.batch_reduction == 'official_sum'
  assert config[TOY_TERM].scale == 1.0
  # An option three terms share lives at the loss level, not in their blocks.
  assert config.rows_per_chunk == 8 and 'rows_per_chunk' not in config.gmm
  assert 'pce' not in config
  with pytest.raises(ValueError, match="'gmmm'"):
    methods.loss_config({'pce': 1.0}, gmmm={'form': 'paper'})
  with pytest.raises(ValueError, match='unknown loss term'):
    methods.loss_config({'crf': 1.0})


def test_build_loss_merges_needs_and_names_a_conflict():
  loss = methods.build_loss(methods.loss_config({'pce': 1.0, TOY_TERM: 1.0}))
  assert loss.needs.image
  assert dict(loss.needs.heads) == {TOY_HEAD: ToyHead}
  assert dict(loss.needs.batch_fields) == {TOY_FIELD: brightness}
  assert loss.terms == ('pce', TOY_TERM)
  assert loss.summary is None
  agmm = methods.build_loss(methods.loss_config({'pce': 1.0, 'gmm': 1.0}))
  assert agmm.summary_name == 'gmm_response'
  assert not agmm.needs.heads and not agmm.needs.image
  other = methods.Needs(heads={TOY_HEAD: lambda *a, **k: None})
  with pytest.raises(ValueError, match="loss term 'x': Needs.heads\\['test_toy_head'\\]"):
    methods.Needs(heads={TOY_HEAD: ToyHead}).merge(other, "loss term 'x'")
  with pytest.raises(ValueError, match='loss_config.weights.crf'):
    methods.build_loss(ml_collections.ConfigDict({'weights': {'crf': 1.0}}))
  with pytest.raises(ValueError, match=f'loss_config.{TOY_TERM}.shift'):
    methods.build_loss(ml_collections.ConfigDict(
        {'weights': {TOY_TERM: 1.0}, TOY_TERM: {'shift': 1.0}}))
  with pytest.raises(ValueError, match='loss_config.tree'):
    methods.build_loss(ml_collections.ConfigDict({'weights': {'pce': 1.0}, 'tree': 1}))


def test_loss_inputs_accessors():
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, size=(2, 5, 6, 3)).astype(np.uint8)
  image = np.stack([augment.normalize(x) for x in rgb])
  label = np.full((2, 5, 6), -1, np.int32)
  label[:, -1] = -2
  inputs = methods.LossInputs(jnp.zeros((2, 5, 6, 3)), jnp.zeros((2, 2, 2, 4)),
                              jnp.asarray(label), jnp.zeros((2, 3)), image=jnp.asarray(image))
  np.testing.assert_allclose(inputs.rgb(), rgb.astype(np.float32), atol=1e-3)
  np.testing.assert_array_equal(inputs.valid, label != -2)
  with pytest.raises(ValueError, match="outputs has no 'embedding'"):
    inputs.output('embedding')
  with pytest.raises(ValueError, match="fields has no 'segments'"):
    inputs.field('segments')
  with pytest.raises(ValueError, match='Needs\\(image=True\\)'):
    inputs._replace(image=None).rgb()


def test_a_batch_field_may_not_replace_the_batch(tiny_data_dir):
  from agmm_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.data.dir = tiny_data_dir
  with pytest.raises(ValueError, match="batch field 'label'"):
    input_pipeline.create_train_iterator(
        config.data, batch_size_per_process=2, seed=0,
        batch_fields={'label': brightness})


def test_a_shared_option_has_one_place_and_one_default():
  with pytest.raises(ValueError, match="'rows_per_chunk' is a loss-level option.*shared="):
    methods.register_term('test_unshared_rows')(lambda inputs, *, rows_per_chunk=16: 0.0)
  with pytest.raises(ValueError, match="'rows_per_chunk' defaults to 8, other terms to 16"):
    methods.register_term('test_other_default', shared=('rows_per_chunk',))(
        lambda inputs, *, rows_per_chunk=8: 0.0)
  with pytest.raises(ValueError, match="shared option 'stride' is not"):
    methods.register_term('test_no_such_option', shared=('stride',))(lambda inputs: 0.0)
  assert not {'test_unshared_rows', 'test_other_default',
              'test_no_such_option'} & set(methods.registered_terms())
  assert core.option_key('gmm', 'rows_per_chunk') == 'loss_config.rows_per_chunk'
  assert core.option_key('gmm', 'form') == 'loss_config.gmm.form'
