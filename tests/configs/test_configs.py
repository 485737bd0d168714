"""Every config in configs/ loads, keeps the schema and states its protocol."""

import importlib
import os

import pytest

from configs import common

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'configs')
CONFIG_NAMES = sorted(
    name[:-3] for name in os.listdir(CONFIG_DIR)
    if name.endswith('.py') and name not in ('__init__.py', 'common.py', 'presets.py'))


def _flat_keys(config, prefix=''):
  keys = set()
  for key, value in config.items():
    path = f'{prefix}{key}'
    if hasattr(value, 'items') and key != 'loss':
      keys |= _flat_keys(value, path + '.')
    else:
      keys.add(path)
  return keys


@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_config_keeps_the_schema_and_shows_its_command(name):
  module = importlib.import_module(f'configs.{name}')
  config = module.get_config()
  assert _flat_keys(config) == _flat_keys(common.base_config())
  assert 'python main.py --config=configs/' in module.__doc__


def test_voc_point_is_the_official_protocol():
  from configs import voc_point  # pylint: disable=g-import-not-at-top
  config = voc_point.get_config()
  assert (config.model.depth, config.model.stem, config.model.output_stride,
          tuple(config.model.aspp_rates)) == (101, 'deep', 8, (6, 12, 18))
  assert (config.data.crop_size, config.num_epochs,
          config.global_batch_size) == (321, 80, 16)
  assert (config.optimizer.lr, config.optimizer.head_lr_multiplier,
          config.optimizer.momentum, config.optimizer.weight_decay,
          config.optimizer.poly_power) == (1e-3, 10.0, 0.9, 1e-4, 0.9)


@pytest.mark.parametrize('clicks', ['20', '50', '100'])
def test_cityscapes_selects_the_click_folder(clicks):
  from configs import cityscapes_clicks  # pylint: disable=g-import-not-at-top
  config = cityscapes_clicks.get_config(f'clicks={clicks}')
  assert config.data.dir == f'data/cityscapes_{clicks}clicks'
  assert (config.model.depth, config.model.multi_grid,
          tuple(config.model.aspp_rates), config.data.crop_size,
          config.optimizer.lr, config.optimizer.head_lr_multiplier,
          config.num_epochs, config.eval.mode) == (
              50, True, (12, 24, 36), 721, 5e-3, 1.0, 240, 'sliding_window')


@pytest.mark.parametrize('arg', ['clicks=30', 'click=20', 'clicks'])
def test_bad_config_arguments_name_the_key(arg):
  from configs import cityscapes_clicks  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match='clicks'):
    cityscapes_clicks.get_config(arg)


def test_camvid_full_supervision_uses_dense_labels_and_pce():
  from configs import camvid_clicks  # pylint: disable=g-import-not-at-top
  config = camvid_clicks.get_config('labels=points:1,method=full')
  assert config.data.train_labels == 'dense'
  assert dict(config.loss.weights) == {'pce': 1.0}
  assert config.data.prepare.sparse == 'points:1'


@pytest.mark.parametrize('name', ['voc_point', 'voc_scribble',
                                  'cityscapes_clicks', 'demo', 'camvid_clicks',
                                  'tiny'])
def test_method_argument_selects_the_loss_preset(name):
  module = importlib.import_module(f'configs.{name}')
  paper = module.get_config('method=agmm_paper')
  assert paper.loss.gmm.form == 'paper'
  baseline = module.get_config('method=pce_only')
  assert dict(baseline.loss.weights) == {'pce': 1.0}
  for method in ('tel', 'apro'):
    assert dict(module.get_config(f'method={method}').loss.weights) == {'pce': 1.0, method: 0.4}
  # Soft self-labeling's runs start with its pCE warm-up; the others none.
  assert module.get_config('method=soft_self_labeling').warmup.fraction == 0.25
  assert baseline.warmup.fraction == paper.warmup.fraction == 0.0
  full = module.get_config('method=full')
  assert (full.data.train_labels, dict(full.loss.weights)) == (
      'dense', {'pce': 1.0})
  with pytest.raises(ValueError, match='method') as raised:
    module.get_config('method=crf')
  assert "'pce_only'" in str(raised.value) and "'full'" in str(raised.value)


def _tiny_with(**values):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.update(values)
  return config


@pytest.mark.parametrize('values', [
    {}, {'num_train_steps': -1}, {'num_train_steps': 1},
    {'num_train_steps': 5, 'num_epochs': -1}, {'eval_every_steps': -1},
    {'eval_every_steps': 0, 'checkpoint_every_steps': 0,
     'image_summary_every_steps': 0}])
def test_start_up_values_accepted(values):
  common.check_values(_tiny_with(**values))


@pytest.mark.parametrize('values, field', [
    ({'num_train_steps': 0}, 'num_train_steps'),
    ({'num_train_steps': -5}, 'num_train_steps'),
    ({'num_train_steps': -1, 'num_epochs': 0}, 'num_epochs'),
    ({'log_every_steps': 0}, 'log_every_steps'),
    ({'eval_every_steps': -2}, 'eval_every_steps'),
    ({'checkpoint_every_steps': -1}, 'checkpoint_every_steps'),
    ({'image_summary_every_steps': -3}, 'image_summary_every_steps'),
    ({'keep_checkpoints': 0}, 'keep_checkpoints'),
    ({'keep_checkpoint_every_steps': -1}, 'keep_checkpoint_every_steps')])
def test_start_up_values_refused_naming_the_field(values, field):
  with pytest.raises(ValueError) as raised:
    common.check_values(_tiny_with(**values))
  assert str(raised.value).startswith(f'config.{field} must be an integer ')
  assert f'got {values[field]}' in str(raised.value)
