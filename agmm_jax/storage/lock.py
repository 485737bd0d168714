"""One training run per work directory: an OS file lock on ``WORKDIR/.lock``.

Two runs writing one work directory (a second ``main.py`` started by mistake,
or by a scheduler restarting a job it believes dead) break each other's
checkpoints. A training run therefore holds an exclusive ``flock`` on
``WORKDIR/.lock`` for its whole life; a second one refuses at start with one
line naming the PID and host that hold it. The kernel releases the lock when
the holder exits however it exits (SIGKILL included), so a killed run never
blocks its rerun, and nothing has to clean up a stale lock file: the file
stays, only the lock matters.

Eval and predict modes read a work directory and take no lock, so they run
beside a training of the same directory.

Multi-host runs: only process 0 locks (the others write only their share of
each checkpoint, coordinated by process 0). ``flock`` on a network file
system works where the mount supports it (NFSv4, Lustre with ``-o flock``);
where it does not, ``acquire`` fails with the mount's error in one line.
"""

import fcntl
import os
import socket
from typing import Optional, TextIO

LOCK_FILE = '.lock'


class WorkdirLocked(OSError):
  """Another live process holds the work directory's lock."""


def holder(path: str) -> str:
  """``PID N on host H`` as recorded in the lock file ``path`` by its
  holder ('an unknown process' while it is being written)."""
  try:
    with open(path, encoding='utf-8') as f:
      fields = f.read().split()
  except OSError:
    fields = []
  if len(fields) != 2:
    return 'an unknown process'
  return f'PID {fields[0]} on host {fields[1]}'


class WorkdirLock:
  """The exclusive lock of one work directory, held until ``release`` or
  the process's end. A context manager."""

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self._file: Optional[TextIO] = None

  def acquire(self) -> 'WorkdirLock':
    """Takes the lock (creating the work directory and the lock file).

    Raises:
      WorkdirLocked: another process holds it (one line naming it).
      OSError: the directory cannot be created or locked.
    """
    os.makedirs(self.workdir, exist_ok=True)
    # 'a': opening must not truncate the holder's record.
    lock_file = open(self.path, 'a+', encoding='utf-8')  # pylint: disable=consider-using-with
    try:
      fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      lock_file.close()
      raise WorkdirLocked(
          f'{self.workdir} is in use by another run ({holder(self.path)}); '
          'wait for it to end or stop it, or use another --workdir') from None
    except OSError as error:
      lock_file.close()
      raise OSError(f'cannot lock {self.path}: {error.strerror or error}; '
                    'the file system may not support file locks') from None
    lock_file.seek(0)
    lock_file.truncate()
    lock_file.write(f'{os.getpid()} {socket.gethostname()}\n')
    lock_file.flush()
    self._file = lock_file
    return self

  def release(self) -> None:
    """Releases the lock (closing the file releases it)."""
    if self._file is not None:
      self._file.close()
      self._file = None

  def __enter__(self) -> 'WorkdirLock':
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
