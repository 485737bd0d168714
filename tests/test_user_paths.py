"""The paths a new user takes (issue 19's table), through ``main.py``.

Command-line mistakes run ``main.py`` in subprocesses (all at once) and check
that stderr ends with one ``error:`` line and holds no traceback; the rest
call ``main.run`` or ``data_prep.auto`` in this process. The session's tiny
training run (conftest.tiny_trained_run) feeds the eval and predict cases.
The converter's own cases (flat folders, split names, when ``--skip_bad`` is
suggested) are in test_data_prep.py.
"""

import json
import os
import shutil
import subprocess
import sys

from absl import flags
import numpy as np
from PIL import Image
import pytest

from agmm_jax import errors
from agmm_jax.data import input_pipeline
from configs import tiny
from data_prep import auto
import main
from tests import fixtures

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_ROOT = os.path.join(REPO_ROOT, 'demo_data', 'camvid_mini')
TINY_VOID = 11  # configs/tiny.py's config.data.prepare.void_value


def tiny_config(data_dir: str = ''):
  config = tiny.get_config()
  config.data.dir = data_dir
  return config


@pytest.fixture(scope='module')
def trained(tiny_trained_run) -> str:
  """The workdir of the session's tiny run (4 steps)."""
  return tiny_trained_run[0]


def start_main(config: str, args: list[str]) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.Popen(
      [sys.executable, 'main.py', f'--config={config}', *args], cwd=REPO_ROOT,
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_command_line_mistakes_end_with_one_line(trained, tiny_data_dir,
                                                 tmp_path):
  raw_root, _ = fixtures.make_folder_root(tmp_path, name='raw')
  three_classes = fixtures.make_folder_dataset_tfrecords(
      tmp_path / 'three', num_train=1, num_val=1, num_classes=3)
  no_class_list = str(tmp_path / 'no_class_list')
  shutil.copytree(raw_root, no_class_list)
  os.remove(os.path.join(no_class_list, 'classes.txt'))
  missing_parent = str(tmp_path / 'missing_parent')
  damaged = tmp_path / 'damaged'
  damaged.mkdir()
  (damaged / 'classes.json').write_text('["class_0", ')
  cases = {
      'unknown override': (
          start_main('configs/tiny.py', [f'--workdir={tmp_path}/a',
                                         '--config.does_not_exist=1']),
          "--config.does_not_exist: the config has no field 'does_not_exist'"),
      'raw folder as data.dir': (
          start_main('configs/tiny.py', [f'--workdir={tmp_path}/b',
                                         f'--config.data.dir={raw_root}']),
          f"config.data.dir='{raw_root}' is a raw folder dataset "),
      'demo into a folder without parent': (
          start_main('configs/demo.py', [
              f'--workdir={tmp_path}/c',
              f'--config.data.dir={missing_parent}/data']),
          f'its parent {missing_parent} does not exist'),
      'other classes': (
          start_main('configs/tiny.py', [
              f'--workdir={trained}', '--config.mode=eval',
              f'--config.eval.data_dir={three_classes}']),
          "trained on 4 classes ['class_0', 'class_1', 'class_2', 'class_3'] "
          f"but {three_classes} has 3 classes ['class_0', 'class_1', "
          "'class_2']"),
      'eval folder without class list': (
          start_main('configs/tiny.py', [
              f'--workdir={trained}', '--config.mode=eval',
              f'--config.eval.data_dir={no_class_list}']),
          'config.eval.data_dir='),
      'damaged classes.json': (
          start_main('configs/tiny.py', [f'--workdir={damaged}',
                                         f'--config.data.dir={tiny_data_dir}']),
          f'{damaged}/classes.json is damaged'),
  }
  for name, (process, expected) in cases.items():
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 1, (name, stderr[-3000:])
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith('error: ') and expected in lines[-1], (
        name, stderr[-3000:])
    assert 'Traceback' not in stderr and 'Event loop' not in stderr, name
    # None of these is about bad examples.
    assert 'skip_bad' not in stderr, name
  assert not os.path.exists(missing_parent)


def test_raw_folder_error_says_how_to_convert(tmp_path):
  raw_root, _ = fixtures.make_folder_root(tmp_path, name='raw')
  config = tiny_config(raw_root)
  with pytest.raises(FileNotFoundError) as error:
    auto.prepare_missing(auto.resolved_paths(config, str(tmp_path / 'w')))
  message = str(error.value)
  assert '\n' not in message
  assert (f'python -m data_prep.folder --root={raw_root} --void_value='
          f'{TINY_VOID} --sparse={config.data.prepare.sparse} '
          f'--output={raw_root}_prepared') in message
  assert f'--config.data.dir={raw_root}_prepared' in message


def test_tiny_config_prepares_its_own_data(tmp_path, caplog):
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  config = auto.resolved_paths(tiny_config(), workdir)
  assert config.data.dir == os.path.join(workdir, 'data')
  with caplog.at_level('INFO'):
    assert auto.prepare_missing(config)
  assert any(f'config.data.dir={config.data.dir} does not exist: creating it'
             in r.getMessage() and DEMO_ROOT in r.getMessage()
             for r in caplog.records)
  metadata = input_pipeline.read_metadata(config.data.dir)
  with open(os.path.join(DEMO_ROOT, 'classes.txt')) as f:
    assert metadata['classes'] == [l.strip() for l in f if l.strip()]
  for split in ('train', 'val'):
    names = os.listdir(os.path.join(DEMO_ROOT, split, 'images'))
    assert metadata['splits'][split]['num_examples'] == len(names)
  # The shapes the start-up checks compare: every demo image shrunk 4x.
  sizes = set()
  for name in os.listdir(os.path.join(DEMO_ROOT, 'val', 'images')):
    with Image.open(os.path.join(DEMO_ROOT, 'val', 'images', name)) as image:
      sizes.add((image.height // 4, image.width // 4))
  assert input_pipeline.eval_canvas(config.data, 'val') == max(sizes)
  input_pipeline.check_crop_size(config.data)
  assert not auto.prepare_missing(config)  # Prepared once.


def test_new_data_dir_is_announced_and_no_parent_is_created(tmp_path, caplog):
  root, _ = fixtures.make_folder_root(tmp_path, void_value=TINY_VOID)
  prepare = tiny_config().data.prepare
  prepare.root = root
  with caplog.at_level('INFO'):
    assert auto.prepare_if_missing(prepare, str(tmp_path / 'new'))
  assert any(f'{tmp_path / "new"} does not exist: creating it with the folder '
             f'converter from {root}' in r.getMessage() for r in caplog.records)
  with pytest.raises(FileNotFoundError, match='its parent .*missing does not '
                     'exist'):
    auto.prepare_if_missing(prepare, str(tmp_path / 'missing' / 'new'))
  assert not (tmp_path / 'missing').exists()


def test_relative_data_dir_gets_its_parents(tmp_path, monkeypatch):
  # The configs' defaults (data/NAME) on a fresh clone, which has no data/.
  root, _ = fixtures.make_folder_root(tmp_path, void_value=TINY_VOID)
  prepare = tiny_config().data.prepare
  prepare.root = root
  clone = tmp_path / 'clone'
  clone.mkdir()
  monkeypatch.chdir(clone)
  assert auto.prepare_if_missing(prepare, os.path.join('data', 'new'))
  assert (clone / 'data' / 'new' / 'metadata.json').is_file()


@pytest.mark.parametrize('override, expected', [
    ({'eval_canvas': (20, 20)}, 'config.data.eval_canvas=(20, 20) is smaller '
     f'than the largest image ({fixtures.HEIGHT}x{fixtures.WIDTH})'),
    ({'crop_size': 1000}, 'config.data.crop_size=1000 is larger than the '
     f'longest side of every training image even at the largest scale '
     f'({fixtures.WIDTH} x 1.25'),
])
def test_shapes_are_checked_before_any_step(tiny_data_dir, tmp_path, override,
                                            expected):
  config = tiny_config(tiny_data_dir)
  for field, value in override.items():
    setattr(config.data, field, value)
  with pytest.raises(ValueError) as error:
    main.run(config, str(tmp_path))
  assert expected in str(error.value) and '\n' not in str(error.value)
  assert not (tmp_path / 'checkpoints').exists()


def test_a_loss_over_its_memory_limit_ends_with_one_line(tiny_data_dir,
                                                         tmp_path):
  """The dense CRF loss's grid at a 2000-pixel crop (over its 2048 MiB limit)
  is one ``error:`` line before anything is built."""
  process = start_main('configs/voc_point.py:method=pce_densecrf', [
      f'--workdir={tmp_path}', f'--config.data.dir={tiny_data_dir}',
      '--config.data.crop_size=2000'])
  _, stderr = process.communicate(timeout=600)
  assert process.returncode == 1, stderr[-3000:]
  lines = stderr.strip().splitlines()
  assert lines[-1].startswith('error: loss_config.densecrf.sigma_xy=100.0'), (
      stderr[-3000:])
  assert 'config.data.crop_size=2000' in lines[-1], lines[-1]
  assert 'limit loss_config.densecrf.max_grid_mib=2048.0' in lines[-1]
  assert 'Traceback' not in stderr
  assert not (tmp_path / 'checkpoints').exists()


def test_eval_on_a_raw_folder_split_sizes_the_canvas(trained, tmp_path, capsys):
  # Larger images than the training data's (40x56), another split name, the
  # checkpoint's classes.
  root, truth = fixtures.make_folder_root(
      tmp_path, split_sizes={'test': 3}, height=60, width=84,
      void_value=TINY_VOID, seed=3)
  config = tiny_config()
  config.mode = 'eval'
  config.eval.checkpoint = 'latest'
  config.eval.data_dir = root
  config.eval.split = 'test'
  scores = main.run(config, trained)
  # Every non-void pixel of the folder is scored once, padding never.
  labeled = sum(int((dense != fixtures.STORED_UNLABELED).sum())
                for dense in truth['test'].values())
  assert int(scores['confusion'].sum()) == labeled
  caches = os.listdir(os.path.join(trained, auto.EVAL_CACHE_SUBDIR))
  assert len(caches) == 1 and caches[0].startswith('folder-test-')
  metadata = input_pipeline.read_metadata(
      os.path.join(trained, auto.EVAL_CACHE_SUBDIR, caches[0]))
  assert metadata['splits']['test']['num_examples'] == 3
  assert 'test at step 4' in capsys.readouterr().out


def test_eval_cache_follows_the_folder_contents(tmp_path):
  root, truth = fixtures.make_folder_root(tmp_path, split_sizes={'val': 2})
  config = tiny_config()
  config.mode = 'eval'
  config.eval.data_dir = root
  first = auto.resolved_paths(config, str(tmp_path / 'w')).data.dir
  assert auto.resolved_paths(config, str(tmp_path / 'w')).data.dir == first
  assert first.startswith(str(tmp_path / 'w' / auto.EVAL_CACHE_SUBDIR))
  label_path = os.path.join(root, 'val', 'labels',
                            sorted(truth['val'])[0] + '.png')
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(label_path)
  assert auto.resolved_paths(config, str(tmp_path / 'w')).data.dir != first
  # A prepared dataset is used where it is.
  config.eval.data_dir = str(tmp_path / 'prepared')
  os.makedirs(config.eval.data_dir)
  with open(os.path.join(config.eval.data_dir, 'metadata.json'), 'w') as f:
    json.dump({}, f)
  assert auto.resolved_paths(config, str(tmp_path)).data.dir == (
      config.eval.data_dir)


def test_predict_skips_unreadable_images_or_fails_by_choice(trained, tmp_path):
  input_dir = tmp_path / 'images'
  input_dir.mkdir()
  rng = np.random.default_rng(0)
  for name in ('a.png', 'c.jpg'):
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(
        input_dir / name)
  (input_dir / 'b.png').write_bytes(b'not a png')
  config = tiny_config()
  config.mode = 'predict'
  config.predict.input_dir = str(input_dir)
  config.predict.output_dir = str(tmp_path / 'failed')
  config.predict.on_unreadable = 'fail'
  with pytest.raises(ValueError, match=r'^1 unreadable image\(s\) in .*b.png'):
    main.run(config, trained)
  assert not (tmp_path / 'failed').exists()

  config.predict.on_unreadable = 'skip'
  config.predict.output_dir = str(tmp_path / 'out')
  written = main.run(config, trained)
  assert sorted(os.path.basename(p) for p in written) == ['a.png', 'c.png']
  assert sorted(os.listdir(tmp_path / 'out')) == [
      'a.png', 'a_overlay.jpg', 'c.png', 'c_overlay.jpg', 'unreadable.txt']
  with open(tmp_path / 'out' / 'unreadable.txt') as f:
    assert f.read().splitlines() == [str(input_dir / 'b.png')]
  # Nothing readable at all is an error, whatever the choice.
  for name in ('a.png', 'c.jpg'):
    os.remove(input_dir / name)
  with pytest.raises(ValueError, match='none of its 1 image file'):
    main.run(config, trained)


def test_flag_errors_become_the_flag_and_the_reason():
  config = tiny_config()
  with pytest.raises(AttributeError) as unknown:
    config.num_train_step  # pylint: disable=pointless-statement
  assert errors.flag_error_line(
      unknown.value, ['main.py', '--config=configs/tiny.py',
                      '--config.num_train_step=3']) == (
          "--config.num_train_step: the config has no field 'num_train_step' "
          '(Did you mean "num_train_steps" instead of "num_train_step"?); the '
          'fields are those of configs/common.py (docs/design.md, "Config '
          'schema")')
  # A config file whose get_config() raises: absl wraps it with a traceback.
  try:
    try:
      raise ValueError("config argument method='x': expected one of (...)")
    except ValueError as cause:
      raise flags.IllegalFlagValueError(
          'flag --config=configs/demo.py:method=x: Error whilst parsing config '
          'file:\n\nTraceback (most recent call last):\n  File ...') from cause
  except flags.IllegalFlagValueError as wrapped:
    line = errors.flag_error_line(wrapped, ['main.py'])
  assert line == ("--config=configs/demo.py:method=x: config argument "
                  "method='x': expected one of (...)")
