r"""The CAM stages (agmm_jax/methods/cam_stages.py) through ``main.py`` (CPU,
subprocesses) with the tiny config on a dataset of tags: the classifier,
the pseudo-label pass, the segmenter.

Run A goes through uninterrupted. Run B is SIGKILLed right after the
segmenter's third step (its step-2 checkpoint saved) and rerun: the
classifier and the pass are not redone (their files unchanged), and B's
final state equals A's. The pass's pseudo-labels and its quality.json are
checked against loops over the records; the box-restricted pass in-process.

This file is also the command line of the runs (it adds the kill):

  CAM_KILL_AFTER_SEGMENTER_STEP=N python tests/methods/test_cam_stages.py \
      --config=configs/tiny.py:method=pce_only --workdir=DIR --config.cam.enabled=True ...
"""

import dataclasses
import json
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
import ml_collections
import numpy as np
import pytest

from agmm_jax.data import input_pipeline
from agmm_jax.data import labels as labels_lib
from agmm_jax.data import tfrecord
from agmm_jax.data import weak_labels
from agmm_jax.methods import cam_stages
from agmm_jax.runtime import sharding as sharding_lib
from agmm_jax.train import state as train_state_lib
from configs import tiny
from tests import fixtures
from tests.train import test_trainer
from tests.train.test_resume import checkpoint_steps
from tests.train.test_resume import assert_resume_matches
from tests.train.test_resume import load_step
from tests.train.test_resume import modification_times
from tests.train.test_resume import start_script_run

STEPS = 4        # per training stage
KILL_AT = 3      # the segmenter's step after which run B is killed
KILL_ENV = 'CAM_KILL_AFTER_SEGMENTER_STEP'
NUM_CLASSES = 4
PASS = cam_stages.PSEUDO_LABEL_DIR
SEGMENTER = cam_stages.SEGMENTER_STAGE


def _wait_for_saves_in_flight(folder: str) -> None:
  while any('.orbax-checkpoint-tmp' in name for name in os.listdir(folder)):
    time.sleep(0.01)


def killing_stages(config, loss):
  """The CAM plan with a segmenter step that SIGKILLs after ``$KILL_ENV``."""
  plan = PLAN(config, loss)
  kill_at = int(os.environ.get(KILL_ENV, '0'))
  segmenter = plan[-1]

  def make_step(context, initial, total_steps):
    step_fn = segmenter.make_step(context, initial, total_steps)

    def maybe_killed(state, batch):
      state, metrics = step_fn(state, batch)
      if kill_at and int(train_state_lib.host(state['step'])) == kill_at:
        _wait_for_saves_in_flight(os.path.join(context.run.workdir, SEGMENTER, 'checkpoints'))
        os.kill(os.getpid(), signal.SIGKILL)
      return state, metrics

    return maybe_killed

  return plan[:-1] + [dataclasses.replace(segmenter, make_step=make_step)]


PLAN = cam_stages.stages


def start(workdir, data_dir, cache_dir, log_path, kill_at=0):
  return start_script_run(
      __file__, '--config=configs/tiny.py:method=pce_only',
      ['--config.cam.enabled=True', f'--config.cam.num_train_steps={STEPS}',
       '--config.cam.crf_iterations=2', f'--config.num_train_steps={STEPS}'],
      KILL_ENV, kill_at, workdir, data_dir, cache_dir, log_path)


def classifier_files(workdir):
  """The classifier stage's checkpoints (it lives in WORKDIR itself)."""
  files = {}
  for folder in ('checkpoints', 'checkpoints_best'):
    files.update(modification_times(os.path.join(workdir, folder)))
  assert files
  return files


@pytest.fixture(scope='module')
def runs(tmp_path_factory, session_compilation_cache):
  tmp = tmp_path_factory.mktemp('cam_stages')
  data_dir = fixtures.make_folder_dataset_tfrecords(
      tmp / 'data', num_train=6, num_val=2, num_classes=NUM_CLASSES, sparse='tags')
  cache = session_compilation_cache
  work_a, work_b = str(tmp / 'a'), str(tmp / 'b')
  logs = {name: str(tmp / f'{name}.log') for name in ('a', 'b1', 'b2')}
  run_a = start(work_a, data_dir, cache, logs['a'])
  run_b = start(work_b, data_dir, cache, logs['b1'], kill_at=KILL_AT)
  killed_status = run_b.wait(timeout=900)
  killed = dict(status=killed_status, classifier=checkpoint_steps(work_b),
                segmenter=checkpoint_steps(os.path.join(work_b, SEGMENTER)),
                classifier_files=classifier_files(work_b),
                pass_files=modification_times(os.path.join(work_b, PASS)))
  run_b = start(work_b, data_dir, cache, logs['b2'])
  assert run_b.wait(timeout=900) == 0, open(logs['b2'], encoding='utf-8').read()[-3000:]
  assert run_a.wait(timeout=900) == 0, open(logs['a'], encoding='utf-8').read()[-3000:]
  return dict(work_a=work_a, work_b=work_b, killed=killed, data_dir=data_dir,
              first_log=open(logs['b1'], encoding='utf-8').read(),
              resumed_log=open(logs['b2'], encoding='utf-8').read())


def test_every_stage_ran_and_the_kill_lands_in_the_segmenter(runs):
  killed = runs['killed']
  assert killed['status'] == -signal.SIGKILL
  assert killed['classifier'] == [2, 4]
  assert killed['segmenter'] == [2]
  assert any(name.endswith('quality.json') for name in killed['pass_files'])
  # The classifier was evaluated by its CAM segmentation, logged as usual.
  assert 'step 4: eval mIoU' in runs['first_log']
  tags = test_trainer.read_event_tags(runs['work_a'])
  assert sorted(tags['cam_classifier/cam_bce']) == [1, 2, 3, 4]
  assert sorted(tags[f'{SEGMENTER}/pce']) == [5, 6, 7, 8]


def test_finished_stages_are_not_redone(runs):
  work_b, killed = runs['work_b'], runs['killed']
  assert classifier_files(work_b) == killed['classifier_files']
  assert modification_times(os.path.join(work_b, PASS)) == killed['pass_files']
  log = runs['resumed_log']
  assert 'cam_classifier: already trained to step 4' in log
  assert f'{PASS}: {os.path.join(work_b, PASS)} already written' in log
  assert f'{SEGMENTER}: resumed from' in log


def test_resumed_run_equals_uninterrupted_run(runs):
  assert_resume_matches(os.path.join(runs['work_a'], SEGMENTER),
                        os.path.join(runs['work_b'], SEGMENTER), STEPS, resumed_from=2)


def test_the_segmenter_starts_from_the_classifier_network(runs):
  classifier, _ = load_step(runs['work_a'], STEPS)
  segmenter, _ = load_step(os.path.join(runs['work_a'], SEGMENTER), 2)
  flat = dict(jax.tree_util.tree_flatten_with_path(classifier['params'])[0])
  kernels = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(segmenter['params'])[0]:
    name = jax.tree_util.keystr(path)
    if 'backbone' in name and leaf.size >= 1000:
      kernels += 1
      # Two steps moved it, but it started from the classifier's (a new
      # initialization would be uncorrelated).
      assert np.corrcoef(np.ravel(flat[path]), np.ravel(leaf))[0, 1] > 0.9, name
  assert kernels > 10


def pass_records(folder, num_classes=NUM_CLASSES):
  metadata = input_pipeline.read_metadata(folder)
  for shard in metadata['splits']['train']['shards']:
    for data in tfrecord.read_all_records(os.path.join(folder, shard)):
      example = tfrecord.decode_example(data)
      yield (example, input_pipeline.decode_label_png(example['label/dense/encoded'], num_classes),
             input_pipeline.decode_label_png(example['label/sparse/encoded'], num_classes))


def test_pseudo_labels_are_tagged_classes_and_their_quality_is_measured(runs):
  folder = os.path.join(runs['work_a'], PASS)
  confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
  dense_labeled = records = 0
  for example, dense, pseudo in pass_records(folder):
    records += 1
    tags = np.asarray(example[weak_labels.TAGS_KEY])
    labeled = pseudo[pseudo >= 0]
    assert np.all(tags[labeled] == 1), 'a pseudo-label outside the tags'
    for y, x in np.ndindex(dense.shape):
      if dense[y, x] >= 0:
        dense_labeled += 1
        if pseudo[y, x] >= 0:
          confusion[dense[y, x], pseudo[y, x]] += 1
  assert records == 6
  with open(os.path.join(folder, cam_stages.QUALITY_FILE), encoding='utf-8') as f:
    quality = json.load(f)
  ious = [confusion[k, k] / (confusion[k].sum() + confusion[:, k].sum() - confusion[k, k])
          for k in range(NUM_CLASSES) if confusion[k].sum() + confusion[:, k].sum() > 0]
  assert quality['miou'] == pytest.approx(np.mean(ious), rel=1e-6)
  assert quality['seed_precision'] == pytest.approx(np.trace(confusion) / confusion.sum())
  assert quality['pixel_accuracy'] == pytest.approx(quality['seed_precision'])
  assert sorted(quality['per_class']) == [f'class_{k}' for k in range(NUM_CLASSES)]
  assert quality['coverage'] == pytest.approx(confusion.sum() / dense_labeled)
  # Both runs wrote the same pseudo-labels.
  other = [pseudo for _, _, pseudo in pass_records(os.path.join(runs['work_b'], PASS))]
  for (_, _, mine), theirs in zip(pass_records(folder), other):
    np.testing.assert_array_equal(mine, theirs)


def test_max_classes_per_image_counts_the_classes_of_the_dense_labels(tmp_path):
  data_dir = fixtures.make_folder_dataset_tfrecords(tmp_path, num_train=5, num_val=1,
                                                    num_classes=6, sparse='boxes')
  most = 0
  for _, dense, _ in pass_records(data_dir, num_classes=6):
    most = max(most, len(np.unique(dense[dense >= 0])))
  assert cam_stages.max_classes_per_image(data_dir, 'train') == most >= 2


def test_class_box_masks_are_the_union_of_each_class_boxes():
  rng = np.random.default_rng(0)
  boxes = np.full((2, 5, 5), -1, np.int32)
  for b, n in np.ndindex(2, 4):
    y0, x0 = rng.integers(0, 6, 2)
    boxes[b, n] = (rng.integers(0, 3), y0, x0, y0 + rng.integers(1, 4), x0 + rng.integers(1, 5))
  got = np.asarray(cam_stages.class_box_masks(jnp.asarray(boxes), 3, 8, 9))
  for b in range(2):
    real = boxes[b][boxes[b, :, 0] >= 0]
    masks = weak_labels.box_masks(real, 8, 9)
    for k in range(3):
      expected = masks[real[:, 0] == k].any(0) if (real[:, 0] == k).any() else np.zeros((8, 9))
      np.testing.assert_array_equal(got[b, :, :, k], expected)


def test_box_restricted_pass_labels_only_inside_boxes_of_the_class():
  config = tiny.get_config('method=pce_only')
  config.cam.restrict = 'boxes'
  config.cam.crf_iterations = 2
  options = cam_stages.Options.from_config(config)
  mesh = sharding_lib.create_mesh(config.mesh)
  loss = cam_stages.classifier_loss(options)
  state, model_defs, _ = train_state_lib.create_train_state(
      config, NUM_CLASSES, mesh, 1, extra_heads=loss.needs.heads, load_pretrained=False)
  label_fn = cam_stages.make_pseudo_label_fn(model_defs, NUM_CLASSES, mesh, options)
  rng = np.random.default_rng(1)
  image = rng.normal(size=(8, 24, 28, 3)).astype(np.float32)
  label = np.full((8, 24, 28), labels_lib.UNLABELED, np.int32)
  label[:, :, 25:] = labels_lib.PADDING
  boxes = np.full((8, 3, 5), -1, np.int32)
  boxes[:, 0] = (1, 2, 2, 14, 16)
  boxes[:, 1] = (2, 8, 10, 22, 24)
  tags = np.zeros((8, NUM_CLASSES), np.float32)
  tags[:, [1, 2]] = 1
  got = np.asarray(label_fn(state['params'], state['model_state'], *(
      jnp.asarray(x) for x in (image, label, tags, boxes))))
  masks = weak_labels.box_masks(boxes[0, :2], 24, 28)
  assert np.all(got[:, :, 25:] == labels_lib.PADDING)
  real = got[:, :, :25]
  outside = ~masks.any(0)[:, :25]
  assert np.all(real[:, outside] == labels_lib.UNLABELED)
  assert np.all((real != 1) | masks[0][:, :25]) and np.all((real != 2) | masks[1][:, :25])
  assert np.isin(real, [labels_lib.UNLABELED, 1, 2]).all() and (real >= 0).any()


@pytest.mark.parametrize('field, value, words', [
    ('restrict', 'points', "config.cam.restrict must be one of ('tags', 'boxes')"),
    ('num_epochs', 0, 'config.cam.num_epochs must be an int >= 1'),
    ('num_train_steps', 0, 'config.cam.num_train_steps must be an int -1 or >= 1'),
    ('crf_iterations', -1, 'config.cam.crf_iterations must be an int >= 0'),
    ('background_threshold', 0.5, 'must satisfy 0 <= background < foreground'),
    ('segmenter_init', 'imagenet', 'config.cam.segmenter_init must be one of')])
def test_bad_options_are_one_line(field, value, words):
  config = tiny.get_config('method=pce_only')
  config.cam.enabled = True
  config.cam[field] = value
  with pytest.raises(ValueError) as error:
    cam_stages.stages(config, None)
  assert words in str(error.value) and '\n' not in str(error.value)
  config.cam.enabled = False
  assert cam_stages.stages(config, None) is None


def test_records_without_tags_are_one_line(tmp_path):
  data_dir = fixtures.make_folder_dataset_tfrecords(tmp_path, num_train=2, num_val=1)
  config = ml_collections.ConfigDict({'data': {'dir': data_dir, 'train_split': 'train'}})
  with pytest.raises(ValueError, match='has no tags; prepare it with') as error:
    cam_stages.check_data(config)
  assert '\n' not in str(error.value)


if __name__ == '__main__':
  import main  # pylint: disable=g-import-not-at-top
  from absl import app  # pylint: disable=g-import-not-at-top
  cam_stages.stages = killing_stages
  app.run(main.main, flags_parser=main.parse_flags)


def test_recognition_reads_the_classifier_and_the_segmenter(runs):
  """benchmarks/study/recognition.py on the finished tiny run: every val
  image counted once, its true classes split into right and missed (the
  dense labels read here), both stages by name; an unknown stage is one
  line naming the plan's training stages."""
  from benchmarks.study import recognition
  metadata = input_pipeline.read_metadata(runs['data_dir'])
  true_classes = 0
  for shard in metadata['splits']['val']['shards']:
    for data in tfrecord.read_all_records(os.path.join(runs['data_dir'], shard)):
      dense = input_pipeline.decode_label_png(
          tfrecord.decode_example(data)[input_pipeline.LABEL_KEYS['dense']], NUM_CLASSES)
      true_classes += len(np.unique(dense[dense >= 0]))
  for stage in (None, cam_stages.CLASSIFIER_STAGE):
    totals = recognition.recognition(runs['work_a'], 'val', stage_name=stage)
    assert totals['images'] == metadata['splits']['val']['num_examples'] == 2
    assert totals['right'] + totals['missed'] == true_classes
    assert 0 <= totals['exact'] <= 2 and totals['step'] == STEPS
  with pytest.raises(ValueError, match=r"no training stage 'cam_pseudo_labels' \(its "
                     r'training stages: cam_classifier, cam_segmenter\)'):
    recognition.recognition(runs['work_a'], 'val', stage_name=PASS)
