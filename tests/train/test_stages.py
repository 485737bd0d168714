r"""A toy two-stage method, defined here alone, through ``main.py`` (CPU,
subprocesses): stage 1 trains the loss, a pass writes pseudo-labels of the
training split with the pseudo-label facility (the stage-1 model's argmax on
every real pixel), stage 2 trains a new model on them.

Run A goes through uninterrupted. Run B is SIGKILLed right after stage 2's
third step (its step-2 checkpoint saved) and rerun: stage 1 and the pass are
not redone, and B's final state equals A's.

This file is also the toy method's command line (the subprocesses run it):

  TOY_KILL_AFTER_STAGE2_STEP=N python tests/train/test_stages.py \
      --config=configs/tiny.py --workdir=DIR [--config.X=...]
"""

import dataclasses
import os
import signal
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == '__main__':
  sys.path.insert(0, REPO_ROOT)

# pylint: disable=wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from agmm_jax.data import input_pipeline
from agmm_jax.data import labels as labels_lib
from agmm_jax.data import pseudo_labels
from agmm_jax.data import tfrecord
from agmm_jax.methods import core as methods_core
from agmm_jax.runtime import sharding
from agmm_jax.train import stages
from agmm_jax.train import steps
from agmm_jax.train import state as train_state_lib
from benchmarks.study import results
from configs import tiny
from tests import fixtures
from tests.train import test_trainer
from tests.train.test_resume import checkpoint_steps
from tests.train.test_resume import assert_resume_matches
from tests.train.test_resume import load_step
from tests.train.test_resume import modification_times
from tests.train.test_resume import start_script_run

PASS = 'toy_pseudo_labels'
STAGE2 = 'toy_stage2'
TOTAL_STEPS = 4   # per training stage
KILL_AT = 3       # stage 2's step after which run B is killed
KILL_ENV = 'TOY_KILL_AFTER_STAGE2_STEP'


def toy_write(context: stages.Context, target: str, stop) -> None:
  """Pseudo-labels: stage 1's argmax on every real pixel."""
  stage1 = context.results[stages.TRAIN_STAGE]
  model_defs, state = stage1.model_defs, stage1.state

  @jax.jit
  def label_batch(params, model_state, images, label):
    logits = nnx.merge(model_defs.eval, params, model_state)(images)[1]
    predicted = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jnp.where(labels_lib.real_mask(label), predicted, labels_lib.PADDING)

  spec = context.run
  pseudo_labels.write(
      target, data_dir=spec.config.data.dir, split=spec.config.data.train_split,
      label_kind='sparse', batch_size=spec.eval.batch_size, stop=stop,
      label_batch=lambda images, label: np.asarray(label_batch(
          state['params'], state['model_state'], images, label)))


def _wait_for_saves_in_flight(folder: str) -> None:
  while any('.orbax-checkpoint-tmp' in name for name in os.listdir(folder)):
    time.sleep(0.01)


def toy_stage2_step(context, initial, total_steps):
  """The loss's step; SIGKILLs the process after step ``$KILL_ENV``."""
  step_fn = stages.loss_training_stage().make_step(context, initial, total_steps)
  kill_at = int(os.environ.get(KILL_ENV, '0'))

  def maybe_killed(state, batch):
    state, metrics = step_fn(state, batch)
    if kill_at and int(train_state_lib.host(state['step'])) == kill_at:
      _wait_for_saves_in_flight(os.path.join(context.run.workdir, STAGE2, 'checkpoints'))
      os.kill(os.getpid(), signal.SIGKILL)
    return state, metrics

  return maybe_killed


def toy_stages(config, loss):
  """The toy method's plan: train, pseudo-label, train on the pseudo-labels."""
  del config, loss
  second = stages.loss_training_stage(STAGE2, STAGE2, STAGE2,
                                      data=stages.prepared_data(PASS))
  return [stages.loss_training_stage(),
          stages.PassStage(name=PASS, folder=PASS, write=toy_write),
          dataclasses.replace(second, make_step=toy_stage2_step)]


def start(workdir, data_dir, cache_dir, log_path, kill_at=0):
  return start_script_run(
      __file__, '--config=configs/tiny.py',
      [f'--config.num_train_steps={TOTAL_STEPS}'],
      KILL_ENV, kill_at, workdir, data_dir, cache_dir, log_path)


@pytest.fixture(scope='module')
def runs(tmp_path_factory, session_compilation_cache):
  tmp = tmp_path_factory.mktemp('stages')
  data_dir = fixtures.make_folder_dataset_tfrecords(tmp / 'data', num_train=6,
                                                    num_val=2, num_classes=4)
  cache = session_compilation_cache
  work_a, work_b = str(tmp / 'a'), str(tmp / 'b')
  logs = {name: str(tmp / f'{name}.log') for name in ('a', 'b1', 'b2')}
  run_a = start(work_a, data_dir, cache, logs['a'])
  run_b = start(work_b, data_dir, cache, logs['b1'], kill_at=KILL_AT)
  killed_status = run_b.wait(timeout=600)
  killed = dict(status=killed_status, stage1=checkpoint_steps(work_b),
                stage2=checkpoint_steps(os.path.join(work_b, STAGE2)),
                stage1_files=modification_times(os.path.join(work_b, 'checkpoints')),
                pass_files=modification_times(os.path.join(work_b, PASS)))
  run_b = start(work_b, data_dir, cache, logs['b2'])
  assert run_b.wait(timeout=600) == 0, open(logs['b2'], encoding='utf-8').read()[-3000:]
  assert run_a.wait(timeout=600) == 0, open(logs['a'], encoding='utf-8').read()[-3000:]
  return dict(work_a=work_a, work_b=work_b, killed=killed,
              resumed_log=open(logs['b2'], encoding='utf-8').read())


def test_the_kill_lands_in_stage_2(runs):
  killed = runs['killed']
  assert killed['status'] == -signal.SIGKILL
  assert killed['stage1'] == [2, 4]
  assert killed['stage2'] == [2]
  assert killed['pass_files'], 'the pass had not written its folder'


def test_stage_1_and_the_pass_are_not_redone(runs):
  work_b, killed = runs['work_b'], runs['killed']
  assert modification_times(os.path.join(work_b, 'checkpoints')) == killed['stage1_files']
  assert modification_times(os.path.join(work_b, PASS)) == killed['pass_files']
  log = runs['resumed_log']
  assert 'train: already trained to step 4' in log
  assert f'{PASS}: {os.path.join(work_b, PASS)} already written' in log
  assert f'{STAGE2}: resumed from' in log
  assert 'step 1/4:' not in log   # stage 1 logged no step
  tags = test_trainer.read_event_tags(work_b)
  assert sorted(tags['train/loss']) == [1, 2, 3, 4]   # each stage-1 step once
  assert max(tags[f'{STAGE2}/loss']) == 2 * TOTAL_STEPS


def test_both_runs_wrote_the_same_pseudo_labels(runs):
  """Both runs wrote the same pseudo-labels, a class on every pixel."""
  records = {}
  for name in ('work_a', 'work_b'):
    folder = os.path.join(runs[name], PASS)
    (shard,) = [n for n in os.listdir(folder) if n.endswith('.tfrecord')]
    # Decoded: protobuf orders an Example's features per process.
    records[name] = [tfrecord.decode_example(data) for data in
                     tfrecord.read_all_records(os.path.join(folder, shard))]
  assert records['work_a'] == records['work_b'] and len(records['work_a']) == 6
  for example in records['work_a']:
    label = labels_lib.decode_png(example['label/sparse/encoded'])
    assert np.all(label < 4)


def test_resumed_run_equals_uninterrupted_run(runs):
  state, _ = load_step(os.path.join(runs['work_b'], STAGE2), TOTAL_STEPS)
  assert int(state['step']) == TOTAL_STEPS
  # Stage 2 was killed after its step-2 checkpoint and resumed from it.
  assert_resume_matches(os.path.join(runs['work_a'], STAGE2),
                        os.path.join(runs['work_b'], STAGE2), TOTAL_STEPS, resumed_from=2)


def test_the_plan_is_the_one_answering_method_or_the_loss_stage(monkeypatch):
  """The registry of stage plans (methods.core.register_stages): no plan
  answers -> the loss's one stage; one answers -> its stages, its
  'module:function' imported on demand; two answer -> one line naming them."""
  spec = type('Spec', (), {'config': 'CONFIG', 'loss': 'LOSS'})()
  asked = []

  def toy(config, loss):
    asked.append((config, loss))
    return toy_stages(config, loss)

  monkeypatch.setattr(methods_core, '_STAGE_PLANS', {'silent': lambda c, l: None})
  (only,) = stages.plan(spec)
  assert (only.name, only.folder, only.scalar_prefix) == (stages.TRAIN_STAGE, '', 'train')
  methods_core.register_stages('toy', toy)
  with pytest.raises(ValueError, match="stage plan 'toy' is already registered"):
    methods_core.register_stages('toy', toy)
  assert [s.name for s in stages.plan(spec)] == [stages.TRAIN_STAGE, PASS, STAGE2]
  assert asked == [('CONFIG', 'LOSS')]
  methods_core.register_stages('lazy', 'tests.train.test_stages:toy_stages')
  with pytest.raises(ValueError) as error:
    stages.plan(spec)
  assert str(error.value) == ('the config selects the stages of several methods '
                              '(toy, lazy); keep one')
  assert methods_core._STAGE_PLANS['lazy'] is toy_stages  # pylint: disable=protected-access
  monkeypatch.setattr(methods_core, '_STAGE_PLANS', {
      'twice': lambda c, l: [stages.loss_training_stage(), stages.loss_training_stage()]})
  with pytest.raises(ValueError, match='must be distinct'):
    stages.plan(spec)



# The pCE warm-up (config.warmup.fraction): unit checks, then a run.

def test_shared_leaves_are_taken_by_path_and_shape_except_skipped_keys():
  target = {'backbone': {'w': np.zeros(3), 'v': np.zeros(2)}, 'classifier': {'w': np.zeros(2)},
            'own': np.zeros(1)}
  source = {'backbone': {'w': np.ones(3), 'v': np.ones(4)}, 'classifier': {'w': np.ones(2)},
            'cam': np.ones(1)}
  got = stages.shared_leaves(target, source, ('classifier',))
  np.testing.assert_array_equal(got['backbone']['w'], np.ones(3))   # same path and shape
  np.testing.assert_array_equal(got['backbone']['v'], np.zeros(2))  # other shape
  np.testing.assert_array_equal(got['classifier']['w'], np.zeros(2))  # skipped
  np.testing.assert_array_equal(got['own'], np.zeros(1))            # not in the source


@pytest.mark.parametrize('fraction,run_steps,expected', [
    (0.0, 8, 0), (0.25, 8, 2), (0.25, 10, 2), (0.29, 10, 2), (0.3, 10, 3), (0.01, 8, 1), (0.9, 2, 1)])
def test_warmup_takes_its_share_of_the_run_leaving_a_step_to_each(fraction, run_steps,
                                                                  expected):
  config = tiny.get_config()
  config.warmup.fraction = fraction
  assert stages.warmup_steps(config, run_steps) == expected


def test_warmup_goes_before_the_loss_stage_and_nowhere_else():
  config = tiny.get_config()
  plain = [stages.loss_training_stage(), stages.PassStage('p', 'p', toy_write)]
  assert stages.with_warmup(config, plain) == plain   # fraction 0: unchanged
  config.warmup.fraction = 0.25
  warm = stages.with_warmup(config, plain)
  assert [(s.name, s.folder) for s in warm] == [
      (stages.WARMUP_STAGE, stages.WARMUP_STAGE), (stages.TRAIN_STAGE, ''), ('p', 'p')]
  context = stages.Context(type('Spec', (), {'total_steps': 10})(), None)
  context.results[stages.WARMUP_STAGE] = type('Done', (), {'total_steps': 2})()
  assert warm[0].total_steps(context, 5) == 2 and warm[1].total_steps(context, 5) == 8
  first_not_by_loss = dataclasses.replace(stages.loss_training_stage(), init=lambda *a: None)
  with pytest.raises(ValueError, match="config.warmup.fraction=0.25: .* starts with 'train'"):
    stages.with_warmup(config, [first_not_by_loss])
  for bad in (1.0, -0.1):
    config.warmup.fraction = bad
    with pytest.raises(ValueError, match=rf'config.warmup.fraction={bad}: expected'):
      stages.with_warmup(config, plain)


def _scalars_by_step(workdir):
  """``{tag: {step: value}}`` of the run's events."""
  return {tag: dict(zip(*values)) for tag, values in results.read_scalars(workdir)[0].items()}


def _tiny_pce(data_dir, **changes):
  config = tiny.get_config('method=pce_only')
  config.data.dir = data_dir
  config.update(changes)
  return config


@pytest.fixture(scope='module')
def warmed_up(tiny_data_dir, tmp_path_factory):
  """A 4-step pCE run with half of it as warm-up, and a plain 2-step pCE run."""
  import main  # pylint: disable=g-import-not-at-top
  warm = str(tmp_path_factory.mktemp('warmed_up'))
  plain = str(tmp_path_factory.mktemp('plain_pce'))
  config = _tiny_pce(tiny_data_dir)
  config.warmup.fraction = 0.5
  scores = main.run(config, warm)
  main.run(_tiny_pce(tiny_data_dir, num_train_steps=2), plain)
  return dict(warm=warm, plain=plain, scores=scores, config=config, main=main)


def test_the_warmup_is_the_plain_pce_run_of_its_length(warmed_up):
  """The warm-up's network is, bit for bit, that of a pCE run of its steps
  (same seed, data order and schedule length)."""
  warm_state, _ = load_step(os.path.join(warmed_up['warm'], stages.WARMUP_STAGE), 2)
  plain_state, _ = load_step(warmed_up['plain'], 2)
  leaves = jax.tree_util.tree_flatten_with_path(warm_state)[0]
  plain = dict(jax.tree_util.tree_flatten_with_path(plain_state)[0])
  assert len(leaves) == len(plain) > 10
  for path, leaf in leaves:
    np.testing.assert_array_equal(fixtures.host_array(leaf), fixtures.host_array(plain[path]),
                                  err_msg=jax.tree_util.keystr(path))


def test_the_loss_stage_trains_the_rest_on_a_new_schedule(warmed_up):
  warm = warmed_up['warm']
  assert checkpoint_steps(os.path.join(warm, stages.WARMUP_STAGE)) == [2]
  assert checkpoint_steps(warm) == [2]   # the loss stage's own steps
  assert warmed_up['scores']['step'] == 4
  tags = test_trainer.read_event_tags(warm)
  assert sorted(tags['warmup/pce']) == [1, 2] and sorted(tags['train/pce']) == [3, 4]
  scalars = _scalars_by_step(warm)
  # Each stage's poly schedule starts at the base rate.
  base = warmed_up['config'].optimizer.lr
  assert scalars['warmup/lr_backbone'][1] == pytest.approx(base)
  assert scalars['train/lr_backbone'][3] == pytest.approx(base)
  assert scalars['train/lr_backbone'][4] < base


def _values(tree):
  """A restored checkpoint's nested dict without its variables' ``value``
  level (the pure dict of ``nnx.replace_by_pure_dict``)."""
  if isinstance(tree, dict):
    return tree['value'] if set(tree) == {'value'} else {k: _values(v) for k, v in tree.items()}
  return tree


def _first_batch_pce(config, params, model_state):
  """pCE of the network ``(params, model_state)`` (train mode) on the first
  batch of ``config``'s training data, computed here outside the loop."""
  fresh, model_defs, _ = train_state_lib.create_train_state(
      config, 4, sharding.create_mesh(config.mesh), 1, load_pretrained=False)
  batch = next(input_pipeline.create_train_iterator(
      config.data, batch_size_per_process=config.global_batch_size, seed=config.seed))
  nnx.replace_by_pure_dict(fresh['params'], _values(params))
  nnx.replace_by_pure_dict(fresh['model_state'], _values(model_state))
  model = nnx.merge(model_defs.train, fresh['params'], fresh['model_state'])
  loss = methods_core.build_loss(methods_core.loss_config({'pce': 1.0}))
  _, terms, _ = loss.apply(steps.loss_inputs(model, jax.tree.map(jnp.asarray, batch),
                                             loss.needs))
  return float(terms['pce'])


def test_the_loss_stage_starts_from_the_warmup_network(warmed_up):
  """The loss stage's first step (run step 3, its data iterator new: the
  first batch again) logs the pCE of the warm-up's final network on that
  batch; a new model (the seed's initialization, as the warm-up's first
  step) would log the warm-up's step-1 value instead."""
  warm = warmed_up['warm']
  scalars = _scalars_by_step(warm)
  warm_state, _ = load_step(os.path.join(warm, stages.WARMUP_STAGE), 2)
  expected = _first_batch_pce(warmed_up['config'], warm_state['params'],
                              warm_state['model_state'])
  assert scalars['train/pce'][3] == pytest.approx(expected, rel=1e-4)
  assert scalars['train/pce'][3] != pytest.approx(scalars['warmup/pce'][1], rel=1e-3)


def test_a_rerun_of_the_warmed_up_run_trains_nothing(warmed_up):
  warm = warmed_up['warm']
  before = modification_times(os.path.join(warm, 'checkpoints'))
  again = warmed_up['main'].run(warmed_up['config'], warm)
  assert again['step'] == 4 and again['miou'] == pytest.approx(warmed_up['scores']['miou'])
  assert modification_times(os.path.join(warm, 'checkpoints')) == before

if __name__ == '__main__':
  import main  # pylint: disable=g-import-not-at-top
  from absl import app  # pylint: disable=g-import-not-at-top
  methods_core.register_stages('toy_two_stage', toy_stages)
  app.run(main.main, flags_parser=main.parse_flags)
