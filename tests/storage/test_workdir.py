"""The workdir's records (agmm_jax.storage.workdir): every config the run was
started with, the class list of its checkpoints (damaged files as one line
naming them) and which stage folders hold a checkpoint."""

import json
import os

import pytest

from agmm_jax.storage import run_identity
from agmm_jax.storage import workdir as workdir_lib
from configs import tiny
from tests import fixtures

CLASSES = ['sky', 'road', 'car']


def test_config_dump_keeps_every_config_of_the_workdir(tmp_path):
  config = tiny.get_config()
  config.data.dir = 'unused'
  workdir = str(tmp_path)
  path = workdir_lib.write_config(config, workdir)
  first = open(path).read()
  workdir_lib.write_config(config, workdir)
  assert sorted(os.listdir(workdir)) == ['config.json']
  config.num_train_steps = 8
  workdir_lib.write_config(config, workdir)
  assert sorted(os.listdir(workdir)) == ['config.1.json', 'config.json']
  assert open(os.path.join(workdir, 'config.1.json')).read() == first
  assert json.loads(open(path).read())['num_train_steps'] == 8


def test_recorded_classes_are_checked_against_the_data(tmp_path):
  workdir = str(tmp_path)
  assert workdir_lib.checkpoint_classes(workdir) is None
  workdir_lib.check_classes(workdir, ['anything'], 'DATA')   # nothing recorded
  workdir_lib.record_classes(workdir, CLASSES)
  assert sorted(os.listdir(workdir)) == ['classes.json']
  assert workdir_lib.checkpoint_classes(workdir) == CLASSES
  workdir_lib.check_classes(workdir, list(CLASSES), 'DATA')
  with pytest.raises(ValueError) as error:
    workdir_lib.check_classes(workdir, ['sky', 'car', 'road'], 'DATA')
  message = str(error.value)
  assert '\n' not in message
  assert f"trained on 3 classes {CLASSES} but DATA has 3 classes ['sky', 'car', 'road']" in message


def test_runs_without_classes_json_read_the_classes_of_their_recorded_data(tmp_path):
  data_dir = fixtures.make_folder_dataset_tfrecords(tmp_path / 'data', num_classes=3)
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'config.json').write_text(json.dumps({'data': {'dir': data_dir}}))
  assert workdir_lib.checkpoint_classes(str(workdir)) == ['class_0', 'class_1', 'class_2']
  (workdir / 'config.json').write_text(json.dumps({'data': {'dir': str(tmp_path / 'gone')}}))
  assert workdir_lib.checkpoint_classes(str(workdir)) is None


@pytest.mark.parametrize('name, text', [
    ('classes.json', '["sky", '), ('classes.json', '{"sky": 0}'), ('classes.json', '[1, 2]'),
    ('config.json', '{"data": '), ('config.json', '{"model": {}}'),
    ('classes.json', b'\xff\xfe["sky"]')])
def test_a_damaged_record_is_one_line_naming_the_file(tmp_path, name, text):
  path = tmp_path / name
  if isinstance(text, bytes):
    path.write_bytes(text)
  else:
    path.write_text(text)
  with pytest.raises(ValueError) as error:
    workdir_lib.checkpoint_classes(str(tmp_path))
  message = str(error.value)
  assert message.startswith(f'{path} is damaged') and '\n' not in message


def test_has_checkpoint_needs_a_finalized_step_in_the_stage_folder(tmp_path):
  """Eval/predict restore the last stage whose folder passes this: a stage
  killed before its first save leaves an empty or unfinished checkpoints/."""
  assert not run_identity.has_checkpoint(str(tmp_path))
  assert not run_identity.has_checkpoint(str(tmp_path / 'stage2'))
  os.makedirs(tmp_path / 'stage2' / 'checkpoints')
  assert not run_identity.has_checkpoint(str(tmp_path / 'stage2'))
  os.makedirs(tmp_path / 'stage2' / 'checkpoints' / '40.orbax-checkpoint-tmp-1')
  assert not run_identity.has_checkpoint(str(tmp_path / 'stage2'))
  os.makedirs(tmp_path / 'stage2' / 'checkpoints' / '40')
  assert run_identity.has_checkpoint(str(tmp_path / 'stage2'))
  assert not run_identity.has_checkpoint(str(tmp_path))
