"""Helpers of the work-directory tests: ``main.py`` in a subprocess, and what
a test compares to show that a refused run changed nothing in a work
directory (every file's path, size, modification time and content digest)."""

import hashlib
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def run_main(args: list[str]) -> subprocess.CompletedProcess:
  """``main.py ARGS`` in a subprocess (CPU), its output captured."""
  return subprocess.run(
      [sys.executable, 'main.py', *args], cwd=REPO_ROOT, check=False,
      env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True,
      text=True, timeout=300)


def snapshot(workdir: str, ignore: tuple[str, ...] = ()) -> dict[str, tuple]:
  """``{relative path: (size, mtime_ns, sha1)}`` of the files under
  ``workdir`` (folders as ``(None, None, None)``), less the relative paths
  in ``ignore``."""
  files = {}
  for directory, subdirs, names in os.walk(workdir):
    for name in subdirs + names:
      path = os.path.join(directory, name)
      relative = os.path.relpath(path, workdir)
      if relative in ignore:
        continue
      if os.path.isdir(path):
        files[relative] = (None, None, None)
        continue
      with open(path, 'rb') as f:
        digest = hashlib.sha1(f.read()).hexdigest()
      stat = os.stat(path)
      files[relative] = (stat.st_size, stat.st_mtime_ns, digest)
  return files
