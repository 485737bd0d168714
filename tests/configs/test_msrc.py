"""configs/msrc.py: labels and methods."""

import re

import pytest

from configs import msrc


def test_boxes_prepare_weak_labels_and_train_a_box_preset():
  config = msrc.get_config()
  assert config.data.prepare.sparse == f'boxes:min_area={msrc.BOX_MIN_AREA}'
  assert config.data.prepare.root == '../shared/datasets/msrc'
  assert config.data.train_labels == 'sparse'
  assert dict(config.loss.weights) == {'box_pce': 1.0, 'box_outside': 1.0}
  assert config.loss.background_class == -1
  config = msrc.get_config('labels=boxes:min_area=30,method=boxinst')
  assert config.data.prepare.sparse == 'boxes:min_area=30'
  assert 'box_projection' in config.loss.weights


@pytest.mark.parametrize('labels, spec, method', [
    ('points:2', 'points:2:margin=0:min_area=1', 'agmm_released'),
    ('clicks:20', 'clicks:20', 'agmm_released'),
    ('scribbles', 'scribbles:0.5:erode=2:min_area=1:width=1',
     'agmm_released')])
def test_pixel_labels_use_the_generator_spec(labels, spec, method):
  config = msrc.get_config(f'labels={labels}')
  assert config.data.prepare.sparse == spec
  assert dict(config.loss.weights) == dict(
      msrc.common.presets.preset(method).weights)


def test_dense_labels_train_on_the_dense_map():
  config = msrc.get_config('labels=dense')
  assert config.data.train_labels == 'dense'
  assert dict(config.loss.weights) == {'pce': 1.0}


@pytest.mark.parametrize('arg, words', [
    ('labels=tags', 'tags need the CAM stages (not yet landed)'),
    ('labels=boxes,method=pce_only', 'needs labeled pixels'),
    ('labels=points:1,method=box_pce', 'needs labels=boxes'),
    ('labels=lines', 'sparse spec'),
    ('size=gpu', 'size must be')])
def test_bad_arguments_are_one_line(arg, words):
  with pytest.raises(ValueError, match=re.escape(words)) as error:
    msrc.get_config(arg)
  assert '\n' not in str(error.value)
