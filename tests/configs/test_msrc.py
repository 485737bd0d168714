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


def test_tags_run_the_cam_stages_with_the_method_as_segmenter():
  config = msrc.get_config('labels=tags')
  assert config.data.prepare.sparse == 'tags'
  assert config.data.dir == 'data/msrc_tags_lseed0'
  assert config.cam.enabled and config.cam.restrict == 'tags'
  assert config.cam.num_epochs == config.num_epochs
  assert dict(config.loss.weights) == {'pce': 1.0}
  assert config.loss.background_class == -1
  config = msrc.get_config('labels=tags,method=pce_ncut')
  assert dict(config.loss.weights) == {'pce': 1.0, 'ncut': 1.0}
  # The segmenter starts from the classifier, not from a pCE warm-up.
  assert msrc.get_config('labels=tags,method=soft_self_labeling').warmup.fraction == 0.0
  assert msrc.get_config('labels=scribbles,method=soft_self_labeling').warmup.fraction == 0.25
  # The tags preset: the CAM stages with pCE.
  config = msrc.get_config('labels=tags,method=cam')
  assert config.cam.enabled and dict(config.loss.weights) == {'pce': 1.0}


def test_boxes_with_a_pixel_method_run_the_box_restricted_cam_stages():
  config = msrc.get_config('labels=boxes,method=pce_only')
  assert config.cam.enabled and config.cam.restrict == 'boxes'
  assert config.data.prepare.sparse == f'boxes:min_area={msrc.BOX_MIN_AREA}'
  assert dict(config.loss.weights) == {'pce': 1.0}
  # The CAM preset names the same pipeline.
  assert msrc.get_config('labels=boxes,method=cam').to_dict() == config.to_dict()
  for arg in ('labels=boxes', 'labels=boxes,method=boxinst', 'labels=points:1',
              'labels=dense'):
    assert not msrc.get_config(arg).cam.enabled, arg


@pytest.mark.parametrize('arg, words', [
    ('labels=tags,method=box_pce', 'needs labels=boxes'),
    ('labels=tags,method=full', 'trains on dense labels; use labels=dense'),
    ('labels=scribbles,method=cam', 'method=cam needs labels=tags or boxes'),
    ('labels=points:1,method=box_pce', 'needs labels=boxes'),
    ('labels=lines', 'sparse spec'),
    ('size=gpu', 'size must be')])
def test_bad_arguments_are_one_line(arg, words):
  with pytest.raises(ValueError, match=re.escape(words)) as error:
    msrc.get_config(arg)
  assert '\n' not in str(error.value)
