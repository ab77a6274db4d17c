"""One trainer per workdir: an advisory `flock` on a file in the workdir.

The lock file records its holder (pid, host, start time). The kernel drops a
`flock` when its process dies, however it dies, so a held lock means a live
trainer; a record left in an unlocked file means the last holder ended without
releasing it (kill -9, a crash), and the next trainer takes it over and says so.

Multi-host runs lock per process (`trainer.<process index>.lock`): every
process of a second run on the same workdir stops at once, rather than
waiting on the peers of a process that stopped. `flock` needs a file system
that supports it across the hosts sharing the workdir (local disks, NFSv4).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time


class WorkdirBusy(RuntimeError):
  """Another live trainer holds the workdir."""


def _describe(record: dict) -> str:
  if not record:
    return "holder not recorded yet"
  started = time.strftime(
      "%Y-%m-%d %H:%M:%S", time.localtime(record.get("start", 0))
  )
  return (
      f"pid {record.get('pid')} on host {record.get('host')}, "
      f"started {started}"
  )


def _read(fd: int) -> dict:
  raw = os.pread(fd, 4096, 0)
  try:
    record = json.loads(raw) if raw.strip() else {}
  except (json.JSONDecodeError, UnicodeDecodeError):
    return {"pid": "?", "host": "?"}  # a foreign or torn record
  return record if isinstance(record, dict) else {"pid": "?", "host": "?"}


class WorkdirLock:
  """`acquire` takes the lock or raises WorkdirBusy naming the holder; `release`
  frees it and clears the record.
  """

  def __init__(self, workdir: str, process_index: int = 0):
    self.path = os.path.join(workdir, f"trainer.{process_index}.lock")
    self._fd: int | None = None

  def acquire(self) -> str | None:
    """Takes the lock; returns a line about the stale holder it replaced, if any."""
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except (
        OSError
    ) as e:  # a directory or an unreadable file where the lock belongs
      raise ValueError(
          f"cannot open the workdir lock {self.path} ({e.strerror}); it must be a "
          "regular file the trainer can write: remove or fix it"
      ) from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read(fd)
      os.close(fd)
      raise WorkdirBusy(
          f"workdir {os.path.dirname(self.path)} is in use by another "
          f"trainer ({_describe(holder)}); wait for it to stop or pass "
          "another --workdir"
      ) from None
    stale = _read(fd)
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "start": time.time(),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    self._fd = fd
    if not stale:
      return None
    return (
        f"took over the lock on {os.path.dirname(self.path)} left by a "
        f"trainer that did not release it ({_describe(stale)})"
    )

  def release(self) -> None:
    if self._fd is None:
      return
    os.ftruncate(self._fd, 0)  # an empty record: released cleanly
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None
