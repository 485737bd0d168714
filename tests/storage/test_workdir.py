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


def test_a_resume_in_another_environment_warns_and_every_start_is_kept(
    tmp_path, monkeypatch, caplog):
  """environment.json keeps one entry per start; a start that resumes
  trained steps (a stage's finalized checkpoint) in a changed environment
  names each changed field with both values; a first start, an unchanged one
  or one with nothing trained yet does not warn."""
  workdir = str(tmp_path)
  environment = {'backend': 'cpu', 'device_kind': 'cpu', 'device_count': 1,
                 'process_count': 1, 'host_cores': 2, 'xla_flags': '',
                 'jax': '0.0'}
  monkeypatch.setattr(workdir_lib, 'execution_environment',
                      lambda: dict(environment))

  def start(when):
    caplog.clear()
    with caplog.at_level('WARNING'):
      workdir_lib.record_environment(workdir, when,
                                     ['', 'pseudo_labels', 'stage2'])
    return [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']

  assert start('t0') == []
  environment['host_cores'] = 1
  assert start('t1') == []  # Nothing trained yet: nothing rounds differently.
  os.makedirs(tmp_path / 'checkpoints' / '20.orbax-checkpoint-tmp-1')
  os.makedirs(tmp_path / 'pseudo_labels')
  environment['host_cores'] = 2
  assert start('t2') == []  # Unfinished save: still nothing trained.
  os.makedirs(tmp_path / 'stage2' / 'checkpoints' / '40')
  assert start('t3') == []  # The same environment as the last start.
  environment.update(host_cores=1, xla_flags='--xla_cpu_use_onednn=true')
  [warning] = start('t4')
  assert warning.startswith(f'{workdir}: resumed in another environment: ')
  assert "host_cores 1 (was 2), xla_flags '--xla_cpu_use_onednn=true' (was '')" in warning
  with open(tmp_path / 'environment.json') as f:
    history = json.load(f)
  assert [h['start'] for h in history] == ['t0', 't1', 't2', 't3', 't4']
  assert [h['host_cores'] for h in history] == [2, 1, 2, 2, 1]


def test_the_environment_is_that_of_this_process():
  """The host cores are this process's affinity mask (taskset), not the
  machine's count; the devices are jax's."""
  import jax  # pylint: disable=g-import-not-at-top
  environment = workdir_lib.execution_environment()
  assert environment['host_cores'] == len(os.sched_getaffinity(0))
  assert environment['device_count'] == jax.device_count()
  assert environment['backend'] == jax.default_backend()


def test_a_damaged_environment_record_is_one_line_naming_the_file(tmp_path):
  for text in ('[{"backend": ', '{"backend": "cpu"}'):
    (tmp_path / 'environment.json').write_text(text)
    with pytest.raises(ValueError) as error:
      workdir_lib.record_environment(str(tmp_path), 't0', [''])
    message = str(error.value)
    assert message.startswith(f'{tmp_path / "environment.json"} is damaged')
    assert '\n' not in message
