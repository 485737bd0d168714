"""agmm_jax.runtime.compilation_cache: a second process loads what the first compiled."""

import json
import os
import subprocess
import sys

import pytest

from agmm_jax.runtime import compilation_cache

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Enables the cache as main.py does, compiles one small program and prints
# jax's own count of persistent-cache hits (its monitoring events).
_PROGRAM = '''
import json, sys
import jax, jax.numpy as jnp
from agmm_jax.runtime import compilation_cache
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
folder = compilation_cache.enable(sys.argv[1])
x = jnp.arange(64.0).reshape(8, 8)
value = jax.jit(lambda a: jnp.tanh(a @ a.T).sum())(x)
print(json.dumps({'folder': folder, 'value': float(value),
                  'hits': events.count('/jax/compilation_cache/cache_hits')}))
'''


def _run(setting: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO_ROOT,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  result = subprocess.run([sys.executable, '-c', _PROGRAM, setting], env=env,
                          capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def _entries(folder: str) -> list[str]:
  return sorted(name for name in os.listdir(folder)
                if os.path.isfile(os.path.join(folder, name)))


def test_second_process_hits_the_cache(tmp_path):
  folder = str(tmp_path / 'cache')
  first = _run(folder)
  assert first['folder'] == folder and first['hits'] == 0
  written = _entries(folder)
  assert written
  second = _run(folder)
  assert second['hits'] >= 1
  assert second['value'] == first['value']
  assert _entries(folder) == written  # Nothing compiled, nothing new written.


def test_settings_resolve(tmp_path, monkeypatch):
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path / 'jax_env'))
  assert compilation_cache.resolve('user') == str(tmp_path / 'jax_env')
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR')
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  assert (compilation_cache.resolve(compilation_cache.USER_CACHE)
          == os.path.join(str(tmp_path), 'agmm_jax', 'jax'))
  monkeypatch.delenv('XDG_CACHE_HOME')
  assert compilation_cache.resolve('user') == os.path.join(
      os.path.expanduser('~'), '.cache', 'agmm_jax', 'jax')
  assert compilation_cache.resolve('') == ''
  assert compilation_cache.enable('') == ''
  blocker = tmp_path / 'file'
  blocker.write_text('')
  with pytest.raises(OSError, match='config.compilation_cache_dir'):
    compilation_cache.enable(str(blocker / 'cache'))
