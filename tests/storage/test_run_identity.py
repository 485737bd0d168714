"""agmm_jax.storage.run_identity: a resumed run may not change what it trains.

The work directories are made by hand (the config.json a run writes, one
checkpoint folder): the check runs before anything else reads them.
"""

import json
import logging
import os

import pytest

from agmm_jax.storage import lock as lock_lib
from agmm_jax.storage import run_identity
from configs import tiny
from data_prep import auto
import main
from tests.storage import workdir_helpers


def tiny_config(data_dir: str):
  config = tiny.get_config()
  config.data.dir = data_dir
  return config


def checkpointed_workdir(tmp_path, data_dir: str, with_checkpoint=True) -> str:
  """A work directory as a run of ``tiny_config`` leaves it: its resolved
  config in config.json (as train/trainer.py writes it) and a step folder."""
  workdir = str(tmp_path / 'run')
  os.makedirs(os.path.join(workdir, 'checkpoints', '2' if with_checkpoint
                           else '2.orbax-checkpoint-tmp'))
  config = auto.resolved_paths(tiny_config(data_dir), workdir)
  with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  return workdir


@pytest.mark.parametrize('override, old, new', [
    ('data.crop_size', 33, 41),
    ('loss.gmm.form', 'released', 'paper'),
    ('data.prepare.sparse', 'clicks:10', 'clicks:50'),
    ('model.depth', 18, 34),
    ('optimizer.lr', 0.01, 0.02),
    ('global_batch_size', 8, 4),
    ('seed', 0, 1),
    ('warmup.fraction', 0.0, 0.25),
    ('eval.given_classes', False, True),
    ('eval.scales', [0.75, 1.0], [1.0]),
])
def test_a_changed_identity_field_is_refused_before_anything_is_written(
    tmp_path, tiny_data_dir, override, old, new):
  workdir = checkpointed_workdir(tmp_path, tiny_data_dir)
  before = workdir_helpers.snapshot(workdir)
  config = tiny_config(tiny_data_dir)
  parent, _, field = override.rpartition('.')
  node = config[parent] if parent else config
  assert json.loads(json.dumps(node[field])) == old  # The test's premise.
  node[field] = tuple(new) if isinstance(new, list) else new
  with pytest.raises(ValueError) as raised:
    main.run(config, workdir)
  message = str(raised.value)
  assert '\n' not in message
  assert f'{override} {json.dumps(old)} -> {json.dumps(new)}' in message
  assert 'use a new --workdir' in message
  # The lock file is the only one the refused run created.
  assert workdir_helpers.snapshot(workdir, ignore=('.lock',)) == before


def test_every_changed_identity_field_is_named_in_one_line(tmp_path,
                                                            tiny_data_dir):
  workdir = checkpointed_workdir(tmp_path, tiny_data_dir)
  before = workdir_helpers.snapshot(workdir)
  result = workdir_helpers.run_main([
      '--config=configs/tiny.py', f'--workdir={workdir}',
      f'--config.data.dir={tiny_data_dir}', '--config.model.depth=34',
      '--config.data.crop_size=41', '--config.num_train_steps=9'])
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith('error: ')
  assert 'data.crop_size 33 -> 41; model.depth 18 -> 34; a resumed' in (
      lines[-1])
  assert 'num_train_steps' not in lines[-1]  # Allowed to change.
  assert 'Traceback' not in result.stderr
  assert workdir_helpers.snapshot(workdir, ignore=('.lock',)) == before


def test_an_older_run_without_a_field_added_since_is_compared_with_its_old_value(
    tmp_path, tiny_data_dir):
  """A run recorded before config.warmup (config.eval.given_classes) existed
  trained without a warm-up (chose its best checkpoint without given
  classes): resuming it with one is refused; resuming it as it was passes."""
  workdir = checkpointed_workdir(tmp_path, tiny_data_dir)
  path = os.path.join(workdir, 'config.json')
  with open(path, encoding='utf-8') as f:
    recorded = json.load(f)
  del recorded['warmup']
  del recorded['eval']['given_classes']
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(recorded, f)
  config = tiny_config(tiny_data_dir)
  run_identity.check_resumable(auto.resolved_paths(config, workdir), workdir)
  config.warmup.fraction = 0.25
  with pytest.raises(ValueError, match=r'warmup.fraction 0.0 -> 0.25; a resumed run'):
    run_identity.check_resumable(auto.resolved_paths(config, workdir), workdir)
  config.warmup.fraction = 0.0
  config.eval.given_classes = True
  with pytest.raises(ValueError, match=r'eval.given_classes false -> true; a resumed'):
    run_identity.check_resumable(auto.resolved_paths(config, workdir), workdir)


def test_allowed_changes_pass_and_are_logged(tmp_path, tiny_data_dir, caplog):
  workdir = checkpointed_workdir(tmp_path, tiny_data_dir)
  config = tiny_config(tiny_data_dir)
  config.num_train_steps = 9
  config.eval_every_steps = 3
  config.data.num_threads = 2
  with caplog.at_level(logging.INFO):
    run_identity.check_resumable(auto.resolved_paths(config, workdir),
                                 workdir)
  logged = sorted(r.getMessage().split(' with a changed ')[1]
                  for r in caplog.records if 'with a changed' in r.getMessage())
  assert logged == ['data.num_threads 1 -> 2', 'eval_every_steps 2 -> 3',
                    'num_train_steps 4 -> 9']


def test_no_comparison_without_a_complete_checkpoint(tmp_path, tiny_data_dir):
  workdir = checkpointed_workdir(tmp_path, tiny_data_dir,
                                 with_checkpoint=False)
  config = tiny_config(tiny_data_dir)
  config.model.depth = 34
  run_identity.check_resumable(auto.resolved_paths(config, workdir), workdir)


def test_a_damaged_config_json_is_one_line_naming_it(tmp_path, tiny_data_dir):
  workdir = checkpointed_workdir(tmp_path, tiny_data_dir)
  path = os.path.join(workdir, 'config.json')
  with open(path, 'r+', encoding='utf-8') as f:
    f.truncate(40)
  before = workdir_helpers.snapshot(workdir)
  with pytest.raises(ValueError, match=f'^{path} is damaged') as raised:
    main.run(tiny_config(tiny_data_dir), workdir)
  assert '\n' not in str(raised.value)
  assert workdir_helpers.snapshot(workdir, ignore=('.lock',)) == before
  # The refused run released its lock.
  lock_lib.WorkdirLock(workdir).acquire().release()


def test_identity_fields():
  assert run_identity.is_identity_field('data.prepare.sparse')
  assert run_identity.is_identity_field('loss.weights.gmm')
  assert run_identity.is_identity_field('seed')
  assert run_identity.is_identity_field('cam.restrict')
  assert not run_identity.is_identity_field('seed_other')
  for field in ('num_train_steps', 'num_epochs', 'eval_every_steps',
                'checkpoint_every_steps', 'model.dilated_conv',
                'eval.batch_size', 'spml_stage2.num_train_steps', 'mesh.data',
                'cam.num_epochs', 'cam.num_train_steps'):
    assert not run_identity.is_identity_field(field), field
