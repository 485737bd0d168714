"""Pytest setup shared by all tests: the repo root on sys.path, CPU only, a
temporary user cache folder, and the tiny prepared dataset the training
tests share."""

import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

os.environ.setdefault('JAX_PLATFORMS', 'cpu')


@pytest.fixture(scope='session', autouse=True)
def temporary_user_cache(tmp_path_factory):
  """XDG_CACHE_HOME in a temporary folder: the runs' persistent compilation
  cache (config.compilation_cache_dir = 'user') stays out of the home folder
  and starts empty; subprocesses inherit it. Under pytest-xdist (the README's
  ``-n 2``) the workers share one folder, beside their own temporary ones, so
  that a program one worker compiled is not compiled again by the other
  (jax writes each entry once; a read of an entry being written fails over to
  compiling, with a warning)."""
  if os.environ.get('PYTEST_XDIST_WORKER'):
    folder = tmp_path_factory.getbasetemp().parent / 'user_cache'
    folder.mkdir(exist_ok=True)
  else:
    folder = tmp_path_factory.mktemp('user_cache')
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv('XDG_CACHE_HOME', str(folder))
    yield


@pytest.fixture(scope='session')
def session_compilation_cache(temporary_user_cache) -> str:
  """The session's user compilation cache folder, for the modules that pass a
  cache to their subprocess runs: the tiny config's programs, the same in
  every module, compile once per session instead of once per module."""
  del temporary_user_cache
  from agmm_jax.runtime import compilation_cache  # pylint: disable=g-import-not-at-top
  return compilation_cache.user_cache_dir()


# Classes of the shared tiny dataset (tiny_data_dir).
TINY_NUM_CLASSES = 4


@pytest.fixture(scope='session')
def tiny_data_dir(tmp_path_factory) -> str:
  """A converted folder dataset (6 train, 3 val images, 4 classes), read only."""
  from tests import fixtures  # pylint: disable=g-import-not-at-top
  return fixtures.make_folder_dataset_tfrecords(
      tmp_path_factory.mktemp('tiny_data'), num_train=6, num_val=3,
      num_classes=TINY_NUM_CLASSES)


@pytest.fixture(scope='session')
def tiny_trained_run(tiny_data_dir, tmp_path_factory) -> tuple[str, dict]:
  """``(workdir, scores)`` of configs/tiny.py trained on ``tiny_data_dir``
  through ``main.run`` (4 steps, evaluations and checkpoints at 2 and 4).

  Shared by the modules that test eval and predict modes: they may add
  folders (eval caches) but never change its checkpoints.
  """
  import main  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.data.dir = tiny_data_dir
  workdir = str(tmp_path_factory.mktemp('tiny_run'))
  return workdir, main.run(config, workdir)
