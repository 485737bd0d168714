r"""The CAM stages from boxes (``config.cam.restrict=boxes``, what
``configs/msrc.py:labels=boxes`` runs) through ``main.py`` (CPU, subprocesses)
with the tiny config on a dataset of boxes, killed inside the pseudo-label
pass.

Run A goes through uninterrupted. Run B is SIGKILLed in the pass once its
first shard is complete (two records a shard here, so the six records make
three) and rerun: the classifier is not redone, the complete shard is kept
as it was, the rest is written, and B's pseudo-labels and final segmenter
state equal A's. Every pseudo-label lies inside a box of its class (a loop
over the records' boxes).

This file is also the command line of the runs (it sets the shard size and
adds the kill):

  CAM_BOX_KILL_IN_PASS=1 python tests/methods/test_cam_box_stages.py \
      --config=configs/tiny.py:method=pce_only --workdir=DIR \
      --config.cam.enabled=True --config.cam.restrict=boxes ...
"""

import os
import signal
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == '__main__':
  sys.path.insert(0, REPO_ROOT)

# pylint: disable=wrong-import-position
import numpy as np
import pytest

from agmm_jax.data import pseudo_labels
from agmm_jax.data import weak_labels
from agmm_jax.methods import cam_stages
from tests import fixtures
from tests.methods.test_cam_stages import pass_records
from tests.methods.test_cam_stages import classifier_files
from tests.train.test_resume import assert_resume_matches
from tests.train.test_resume import checkpoint_steps
from tests.train.test_resume import modification_times
from tests.train.test_resume import start_script_run

STEPS = 4             # per training stage
RECORDS_PER_SHARD = 2
NUM_TRAIN = 6         # three shards
KILL_ENV = 'CAM_BOX_KILL_IN_PASS'
NUM_CLASSES = 4
PASS = cam_stages.PSEUDO_LABEL_DIR
SEGMENTER = cam_stages.SEGMENTER_STAGE


def _complete_shards(folder: str) -> list[str]:
  return sorted(name for name in os.listdir(folder) if name.endswith('.tfrecord'))


def killing_write(target: str, *, label_batch, **kwargs) -> str:
  """``pseudo_labels.write`` with small shards; with ``$KILL_ENV`` set, the
  process SIGKILLs itself when asked for a batch after a shard is complete."""
  partial = f'{target}.tmp'

  def maybe_killed(*args):
    if os.environ.get(KILL_ENV) == '1' and _complete_shards(partial):
      os.kill(os.getpid(), signal.SIGKILL)
    return label_batch(*args)

  return WRITE(target, label_batch=maybe_killed,
               **dict(kwargs, records_per_shard=RECORDS_PER_SHARD))


WRITE = pseudo_labels.write


def start(workdir, data_dir, cache_dir, log_path, kill=False):
  return start_script_run(
      __file__, '--config=configs/tiny.py:method=pce_only',
      ['--config.cam.enabled=True', '--config.cam.restrict=boxes',
       f'--config.cam.num_train_steps={STEPS}', '--config.cam.crf_iterations=2',
       f'--config.num_train_steps={STEPS}'],
      KILL_ENV, int(kill), workdir, data_dir, cache_dir, log_path)


@pytest.fixture(scope='module')
def runs(tmp_path_factory, session_compilation_cache):
  tmp = tmp_path_factory.mktemp('cam_box_stages')
  data_dir = fixtures.make_folder_dataset_tfrecords(
      tmp / 'data', num_train=NUM_TRAIN, num_val=2, num_classes=NUM_CLASSES, sparse='boxes')
  cache = session_compilation_cache
  work_a, work_b = str(tmp / 'a'), str(tmp / 'b')
  logs = {name: str(tmp / f'{name}.log') for name in ('a', 'b1', 'b2')}
  run_a = start(work_a, data_dir, cache, logs['a'])
  run_b = start(work_b, data_dir, cache, logs['b1'], kill=True)
  killed_status = run_b.wait(timeout=900)
  partial = os.path.join(work_b, f'{PASS}.tmp')
  killed = dict(status=killed_status, classifier=checkpoint_steps(work_b),
                classifier_files=classifier_files(work_b),
                shards=_complete_shards(partial) if os.path.isdir(partial) else [],
                partial_files=modification_times(partial),
                written=os.path.exists(os.path.join(work_b, PASS)),
                segmenter=os.path.exists(os.path.join(work_b, SEGMENTER)))
  run_b = start(work_b, data_dir, cache, logs['b2'])
  assert run_b.wait(timeout=900) == 0, open(logs['b2'], encoding='utf-8').read()[-3000:]
  assert run_a.wait(timeout=900) == 0, open(logs['a'], encoding='utf-8').read()[-3000:]
  return dict(work_a=work_a, work_b=work_b, killed=killed,
              resumed_log=open(logs['b2'], encoding='utf-8').read())


def test_the_kill_lands_in_the_pass_after_its_first_shard(runs):
  killed = runs['killed']
  assert killed['status'] == -signal.SIGKILL
  assert killed['classifier'] == [2, 4]
  assert killed['shards'] == [f'train-00000-of-{NUM_TRAIN // RECORDS_PER_SHARD:05d}.tfrecord']
  assert not killed['written'] and not killed['segmenter']


def test_the_rerun_keeps_the_classifier_and_the_complete_shard(runs):
  work_b, killed = runs['work_b'], runs['killed']
  assert classifier_files(work_b) == killed['classifier_files']
  assert 'cam_classifier: already trained to step 4' in runs['resumed_log']
  shard = killed['shards'][0]
  times = modification_times(os.path.join(work_b, PASS))
  before = {os.path.basename(path): time for path, time in killed['partial_files'].items()}
  assert times[os.path.join(work_b, PASS, shard)] == before[shard]
  assert _complete_shards(os.path.join(work_b, PASS)) == [
      f'train-{i:05d}-of-00003.tfrecord' for i in range(3)]
  assert not os.path.exists(os.path.join(work_b, f'{PASS}.tmp'))


def _inside_a_box_of_its_class(pseudo: np.ndarray, boxes: np.ndarray) -> bool:
  rows = boxes.reshape(-1, weak_labels.BOX_COLUMNS)
  for y, x in np.ndindex(pseudo.shape):
    if pseudo[y, x] >= 0 and not any(
        k == pseudo[y, x] and y0 <= y < y1 and x0 <= x < x1 for k, y0, x0, y1, x1 in rows):
      return False
  return True


def test_pseudo_labels_lie_in_boxes_of_their_class_and_equal_the_uninterrupted_run(runs):
  mine = list(pass_records(os.path.join(runs['work_b'], PASS)))
  theirs = list(pass_records(os.path.join(runs['work_a'], PASS)))
  assert len(mine) == len(theirs) == NUM_TRAIN
  labeled = 0
  for (example, _, pseudo), (_, _, other) in zip(mine, theirs):
    np.testing.assert_array_equal(pseudo, other)
    assert _inside_a_box_of_its_class(pseudo, np.asarray(example[weak_labels.BOXES_KEY]))
    labeled += int((pseudo >= 0).sum())
  assert labeled > 0
  assert os.path.exists(os.path.join(runs['work_b'], PASS, cam_stages.QUALITY_FILE))


def test_resumed_run_equals_uninterrupted_run(runs):
  assert_resume_matches(os.path.join(runs['work_a'], SEGMENTER),
                        os.path.join(runs['work_b'], SEGMENTER), STEPS, resumed_from=2)


if __name__ == '__main__':
  import main  # pylint: disable=g-import-not-at-top
  from absl import app  # pylint: disable=g-import-not-at-top
  pseudo_labels.write = killing_write
  app.run(main.main, flags_parser=main.parse_flags)
