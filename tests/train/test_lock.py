"""The workdir lock: a live holder refuses a second one by name; a crashed one's is taken over."""

import json
import os
import socket
import subprocess
import sys

import pytest

from loopcoder_jax.train import lock


def test_second_holder_is_refused_naming_the_first(tmp_path):
  first = lock.WorkdirLock(str(tmp_path))
  assert first.acquire() is None  # nothing stale
  # flock locks belong to open files: a second open in this process conflicts too
  with pytest.raises(lock.WorkdirBusy) as e:
    lock.WorkdirLock(str(tmp_path)).acquire()
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith(f"workdir {tmp_path} is in use")
  assert f"pid {os.getpid()} on host {socket.gethostname()}" in msg
  first.release()
  again = lock.WorkdirLock(str(tmp_path))
  assert again.acquire() is None  # a clean release leaves no record
  again.release()
  assert os.path.getsize(tmp_path / "trainer.0.lock") == 0


def test_lock_of_a_killed_holder_is_taken_over(tmp_path):
  # a holder killed with -9: the kernel drops its flock, its record stays
  code = (
      "import importlib.util, os, sys\n"
      f"spec = importlib.util.spec_from_file_location('lock', {lock.__file__!r})\n"
      "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
      "m.WorkdirLock(sys.argv[1]).acquire()\n"
      "os.kill(os.getpid(), 9)\n"
  )
  proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)])
  assert proc.wait() == -9
  record = json.loads((tmp_path / "trainer.0.lock").read_text())
  assert record["pid"] == proc.pid
  held = lock.WorkdirLock(str(tmp_path))
  note = held.acquire()
  assert note.startswith(f"took over the lock on {tmp_path}")
  assert f"pid {record['pid']}" in note and "\n" not in note
  assert json.loads((tmp_path / "trainer.0.lock").read_text())["pid"] == (
      os.getpid()
  )
  held.release()


def test_processes_of_one_run_lock_their_own_files(tmp_path):
  locks = [lock.WorkdirLock(str(tmp_path), i) for i in range(2)]
  assert [lk.acquire() for lk in locks] == [None, None]
  for lk in locks:
    lk.release()
