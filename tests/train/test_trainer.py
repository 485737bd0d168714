"""The real train loop (configs/tiny.py) on a tiny prepared dataset, on CPU.

One module-scoped run of ``main.run`` (4 steps, evaluations at steps 2 and 4,
checkpoints at 2 and 4) feeds most tests; eval and predict mode then read its
work directory. Bad-input cases run ``main.py`` in subprocesses.
"""

import glob
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from agmm_jax.evaluation import modes
from agmm_jax.train import loop
from agmm_jax.train import trainer
from agmm_jax.train import state as train_state
from configs import tiny
import main
from tests import conftest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_CLASSES = conftest.TINY_NUM_CLASSES


def reference_scores(confusion: np.ndarray) -> tuple[float, np.ndarray, float]:
  """mIoU (nanmean over classes with a non-empty union), IoU, pixel accuracy."""
  confusion = confusion.astype(np.float64)
  iou = np.full(confusion.shape[0], np.nan)
  for k in range(confusion.shape[0]):
    union = confusion[k, :].sum() + confusion[:, k].sum() - confusion[k, k]
    if union > 0:
      iou[k] = confusion[k, k] / union
  return float(np.nanmean(iou)), iou, float(np.trace(confusion) / confusion.sum())


def read_event_tags(workdir: str) -> dict[str, list[int]]:
  """Tag -> steps of every scalar / image in the event files of ``workdir``."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  tags: dict[str, list[int]] = {}
  for path in glob.glob(os.path.join(workdir, 'events.out.tfevents.*')):
    accumulator = event_accumulator.EventAccumulator(path, size_guidance={
        event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0,
        event_accumulator.TENSORS: 0})
    accumulator.Reload()
    for kind in ('scalars', 'images', 'tensors'):
      for tag in accumulator.Tags().get(kind, []):
        events = getattr(accumulator, {'scalars': 'Scalars', 'images': 'Images',
                                       'tensors': 'Tensors'}[kind])(tag)
        tags.setdefault(tag, []).extend(e.step for e in events)
  return tags


def tiny_config(data_dir: str):
  config = tiny.get_config()
  config.data.dir = data_dir
  return config


@pytest.fixture(scope='module')
def data_dir(tiny_data_dir):
  return tiny_data_dir


@pytest.fixture(scope='module')
def trained(tiny_trained_run):
  return tiny_trained_run


def test_train_returns_scores_of_its_confusion(trained):
  _, scores = trained
  assert scores['step'] == 4
  miou, iou, accuracy = reference_scores(scores['confusion'])
  assert np.isfinite(scores['miou']) and 0.0 <= scores['miou'] <= 1.0
  np.testing.assert_allclose(scores['miou'], miou, rtol=1e-12)
  np.testing.assert_allclose(scores['per_class_iou'], iou, rtol=1e-12)
  np.testing.assert_allclose(scores['pixel_accuracy'], accuracy, rtol=1e-12)
  # Every labeled validation pixel is counted exactly once.
  assert scores['confusion'].sum() > 0


def test_train_writes_config_events_and_checkpoints(trained, data_dir):
  workdir, _ = trained
  with open(os.path.join(workdir, 'config.json')) as f:
    dumped = json.load(f)
  assert dumped['data']['dir'] == data_dir
  assert dumped['model']['depth'] == 18
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']
  best = os.listdir(os.path.join(workdir, 'checkpoints_best'))
  assert len(best) == 1 and best[0] in ('2', '4')
  for step in ('2', '4'):
    data_item = os.path.join(workdir, 'checkpoints', step, 'data')
    assert os.listdir(data_item) and any(
        n.startswith('process_0-of-1') for n in os.listdir(data_item))
  tags = read_event_tags(workdir)
  for tag in ('train/loss', 'train/pce', 'train/gmm', 'train/lr_backbone',
              'train/lr_head', 'train/images_per_second'):
    assert tags.get(tag) == [1, 2, 3, 4], (tag, sorted(tags))
  for tag in ('eval/miou', 'eval/pixel_accuracy', 'eval/iou/class_0'):
    assert tags.get(tag) == [2, 4], (tag, sorted(tags))
  for tag in ('train/input', 'train/sparse_labels', 'train/prediction',
              'train/gmm_response'):
    assert tag in tags, (tag, sorted(tags))


def test_rerun_of_a_finished_run_trains_no_further(trained, data_dir):
  workdir, train_scores = trained
  result = main.run(tiny_config(data_dir), workdir)
  assert result['step'] == 4
  assert result['miou'] == pytest.approx(train_scores['miou'])
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']


def test_eval_mode_matches_training_eval_and_prints_table(trained, data_dir,
                                                          capsys):
  workdir, train_scores = trained
  config = tiny_config(data_dir)
  config.mode = 'eval'
  config.eval.checkpoint = 'latest'
  scores = main.run(config, workdir)
  assert scores['step'] == 4
  np.testing.assert_array_equal(scores['confusion'], train_scores['confusion'])
  printed = capsys.readouterr().out
  for k in range(NUM_CLASSES):
    assert f'class_{k}' in printed
  assert f'{100 * scores["miou"]:.2f}' in printed


def test_predict_mode_writes_palette_pngs(trained, data_dir, tmp_path):
  workdir, _ = trained
  input_dir = tmp_path / 'images'
  input_dir.mkdir()
  rng = np.random.default_rng(0)
  # Sizes below and above the (48, 64) eval canvas of the tiny config.
  sizes = {'a.png': (40, 56), 'b.jpg': (40, 56), 'c.png': (70, 50),
           'd.png': (30, 20)}
  for name, (h, w) in sizes.items():
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
        input_dir / name)
  config = tiny_config(data_dir)
  config.mode = 'predict'
  config.predict.input_dir = str(input_dir)
  config.predict.output_dir = str(tmp_path / 'out')
  written = main.run(config, workdir)
  assert sorted(os.path.basename(p) for p in written) == [
      'a.png', 'b.png', 'c.png', 'd.png']
  for name, (h, w) in sizes.items():
    stem = os.path.splitext(name)[0]
    with Image.open(tmp_path / 'out' / f'{stem}.png') as label:
      assert label.mode == 'P' and label.size == (w, h)
      assert np.asarray(label).max() < NUM_CLASSES
    with Image.open(tmp_path / 'out' / f'{stem}_overlay.jpg') as overlay:
      assert overlay.size == (w, h)


@pytest.mark.parametrize('size, canvas', [((40, 56), (48, 64)),
                                          ((48, 64), (48, 64)),
                                          ((70, 50), (128, 128)),
                                          ((30, 300), (128, 384))])
def test_predict_pads_to_the_canvas_or_a_multiple_of_128(size, canvas):
  assert modes._predict_canvas(*size, (48, 64)) == canvas  # pylint: disable=protected-access


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  config = tiny_config(data_dir)
  config.optimizer.lr = 1e30
  config.num_train_steps = 6
  config.checkpoint_every_steps = 1
  config.eval_every_steps = 0
  config.image_summary_every_steps = 0
  with pytest.raises(loop.NonFiniteError) as error:
    main.run(config, str(tmp_path))
  message = str(error.value)
  assert '\n' not in message and ('not finite' in message or 'NaN' in message)
  steps = sorted(int(s) for s in os.listdir(tmp_path / 'checkpoints'))
  assert steps and steps[-1] < 6
  assert f'last good checkpoint: {steps[-1]}' in message
  restored = ocp.StandardCheckpointer().restore(
      str(tmp_path / 'checkpoints' / str(steps[-1]) / 'state'))
  import jax  # pylint: disable=g-import-not-at-top
  for leaf in jax.tree.leaves(restored['params']):
    assert np.all(np.isfinite(leaf))


def run_main(args, num_devices=1):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={num_devices}')
  return subprocess.Popen(
      [sys.executable, 'main.py', '--config=configs/tiny.py', *args],
      cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)


def test_bad_input_exits_with_one_line(data_dir, tmp_path):
  cases = {
      'missing_data': (run_main([f'--workdir={tmp_path}/a',
                                 '--config.data.dir=/nonexistent/data']),
                       "config.data.dir='/nonexistent/data'"),
      'indivisible': (run_main([f'--workdir={tmp_path}/b',
                                f'--config.data.dir={data_dir}',
                                '--config.global_batch_size=6'],
                               num_devices=4),
                      'config.global_batch_size=6 is not a positive multiple '
                      'of the 4 devices'),
      'unknown_key': (run_main([f'--workdir={tmp_path}/c',
                                '--config.optimizer.no_such_key=1']),
                      'no_such_key'),
  }
  for name, (process, expected) in cases.items():
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0, name
    last_line = stderr.strip().splitlines()[-1]
    assert expected in last_line, (name, stderr[-2000:])
  assert not os.path.exists(tmp_path / 'b' / 'checkpoints')


def test_optimizer_matches_torch_sgd_with_poly_rates():
  """Naive NumPy reference of PyTorch SGD (coupled weight decay, momentum,
  dampening 0) with lr_t = lr (1 - t / T)^0.9 and the head at 10x."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  class Tiny(nnx.Module):
    def __init__(self):
      self.backbone = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
      self.classifier = nnx.Linear(2, 2, rngs=nnx.Rngs(1))

  params = nnx.state(Tiny(), nnx.Param)
  config = tiny.get_config().optimizer
  config.lr, config.weight_decay, config.momentum = 0.1, 0.01, 0.9
  total_steps = 5
  tx = train_state.create_optimizer(config, total_steps)
  labels = jax.tree.leaves(train_state.param_labels(params))
  assert labels.count('backbone') == 2 and labels.count('head') == 2

  rng = np.random.default_rng(0)
  grads_per_step = [jax.tree.map(
      lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
                    for _ in range(3)]
  opt_state = tx.init(params)
  current = params
  for grads in grads_per_step:
    updates, opt_state = tx.update(grads, opt_state, current)
    current = jax.tree.map(lambda p, u: p + u, current, updates)

  reference = [np.asarray(p, np.float64) for p in jax.tree.leaves(params)]
  buffers = [np.zeros_like(p) for p in reference]
  for t, grads in enumerate(grads_per_step):
    lr_t = 0.1 * (1 - t / total_steps) ** 0.9
    for i, (g, label) in enumerate(zip(jax.tree.leaves(grads), labels)):
      d = np.asarray(g, np.float64) + 0.01 * reference[i]
      buffers[i] = 0.9 * buffers[i] + d
      rate = lr_t * (10.0 if label == 'head' else 1.0)
      reference[i] = reference[i] - rate * buffers[i]
  for got, want in zip(jax.tree.leaves(current), reference):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
