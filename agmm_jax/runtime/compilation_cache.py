"""JAX's persistent compilation cache, so that a rerun does not compile again.

``config.compilation_cache_dir`` (``main.py`` enables it before any
compilation, in every mode):

* ``USER_CACHE`` (``'user'``, the default): jax's own
  ``$JAX_COMPILATION_CACHE_DIR`` when set (the study script sets it for its
  runs), else ``$XDG_CACHE_HOME/agmm_jax/jax`` (``~/.cache/agmm_jax/jax`` when
  unset), resolved on each host;
* ``''``: no persistent cache;
* anything else: that folder (``~`` expanded).

Why a user cache dir and not the workdir: a compiled program depends on the
program, the jax/XLA version, the device and the flags (jax's cache key
hashes all of them, so sharing is safe), not on the run. One cache per user
serves a resumed run, a rerun with another seed or workdir, and the next run
of a study alike; the workdir keeps only the run's results and stays small
and portable (compiled programs are machine-specific and take hundreds of
MB). jax writes an entry for programs that took at least
``jax_persistent_cache_min_compile_time_secs`` (1 s) to compile: the train and
eval steps, not the small eager ops; on GPU it also keeps XLA's autotuning
results there.
"""

import os

import jax

USER_CACHE = 'user'


def user_cache_dir() -> str:
  """``$JAX_COMPILATION_CACHE_DIR``, ``$XDG_CACHE_HOME/agmm_jax/jax``, or
  ``~/.cache/agmm_jax/jax``, the first that is set."""
  if os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    return os.environ['JAX_COMPILATION_CACHE_DIR']
  root = os.environ.get('XDG_CACHE_HOME') or os.path.join(
      os.path.expanduser('~'), '.cache')
  return os.path.join(root, 'agmm_jax', 'jax')


def resolve(setting: str) -> str:
  """The folder of ``config.compilation_cache_dir``, or '' for no cache."""
  if setting == USER_CACHE:
    return user_cache_dir()
  return os.path.expanduser(setting) if setting else ''


def enable(setting: str) -> str:
  """Points jax's persistent compilation cache at ``resolve(setting)``.

  Call before the first compilation of the process. Returns the folder ('' when
  ``setting`` is '' and the cache stays off).

  Raises:
    OSError: naming ``config.compilation_cache_dir`` when the folder cannot be
      created.
  """
  folder = resolve(setting)
  if not folder:
    return ''
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as error:
    raise OSError(f'config.compilation_cache_dir={setting!r}: cannot create '
                  f'{folder} ({error.strerror}); set another folder or \'\' '
                  'to compile without a cache') from error
  jax.config.update('jax_compilation_cache_dir', folder)
  return folder
