"""One memory limit for a whole process tree: a memory cgroup (standard library only).

Everything the tree's processes hold is charged to it: anonymous memory, page cache, shared memory
(memfd, tmpfs files) and kernel memory; past the limit the kernel reclaims, then kills inside the
group only. The group is made under the caller's own cgroup: cgroup v2 (`memory.max`,
`memory.swap.max` = 0) where the memory controller is delegated there, else the v1 memory
hierarchy (`memory.limit_in_bytes`, and `memory.memsw.limit_in_bytes` so swap does not extend it).
"""

import errno
import os
import time

_PREFIX = "loopcoder-sandbox-"


class Unavailable(Exception):
  """No memory cgroup can be made here; the message says why."""


def _mounts() -> list[tuple[str, str, set[str]]]:
  """(mount point, file system type, super options) of every cgroup mount."""
  out = []
  with open("/proc/self/mountinfo", encoding="utf-8") as f:
    for line in f:
      fields = line.split()
      sep = fields.index("-")
      fstype, options = fields[sep + 1], set(fields[sep + 3].split(","))
      if fstype in ("cgroup", "cgroup2"):
        out.append((fields[4], fstype, options))
  return out


def _own_paths() -> dict[str, str]:
  """This process's cgroup per hierarchy: "" for v2, the controller names for v1."""
  out = {}
  with open("/proc/self/cgroup", encoding="utf-8") as f:
    for line in f:
      _, controllers, path = line.rstrip("\n").split(":", 2)
      for name in controllers.split(",") if controllers else [""]:
        out[name] = path
  return out


def _read(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


def _write(path: str, text: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


def _v2_parent(mounts, own) -> str:
  for point, fstype, _ in mounts:
    if fstype == "cgroup2" and "" in own:
      parent = point + own[""].rstrip("/")
      if "memory" not in _read(parent + "/cgroup.controllers").split():
        raise Unavailable(f"cgroup v2: no memory controller in {parent}")
      if "memory" not in _read(parent + "/cgroup.subtree_control").split():
        try:  # allowed only where the parent holds no process itself (or is the root)
          _write(parent + "/cgroup.subtree_control", "+memory")
        except OSError as e:
          raise Unavailable(
              f"cgroup v2: cannot delegate memory below {parent}: {e.strerror}"
          ) from None
      return parent
  raise Unavailable("no cgroup v2 hierarchy mounted")


def _v1_parent(mounts, own) -> str:
  for point, fstype, options in mounts:
    if fstype == "cgroup" and "memory" in options and "memory" in own:
      return point + own["memory"].rstrip("/")
  raise Unavailable("no cgroup v1 memory hierarchy mounted")


class MemoryCgroup:
  """A fresh memory cgroup limited to `limit_bytes`; `add(pid)`, then `close()` once it is empty."""

  def __init__(self, limit_bytes: int):
    mounts, own = _mounts(), _own_paths()
    reasons = []
    for version, find in (("v2", _v2_parent), ("v1", _v1_parent)):
      try:
        parent = find(mounts, own)
      except (Unavailable, OSError) as e:
        reasons.append(str(e))
        continue
      self.path = os.path.join(parent, f"{_PREFIX}{os.getpid()}")
      self.version = version
      try:
        os.mkdir(self.path)
        self._limit(limit_bytes)
      except OSError as e:
        self.close()
        reasons.append(f"cgroup {version}: {self.path}: {e.strerror}")
        continue
      return
    raise Unavailable("; ".join(reasons))

  def _limit(self, limit_bytes: int) -> None:
    if self.version == "v2":
      _write(self.path + "/memory.max", str(limit_bytes))
      if os.path.exists(self.path + "/memory.swap.max"):
        _write(self.path + "/memory.swap.max", "0")
    else:
      _write(self.path + "/memory.limit_in_bytes", str(limit_bytes))
      memsw = self.path + "/memory.memsw.limit_in_bytes"
      if os.path.exists(memsw):  # memory + swap: the same, so no swap
        _write(memsw, str(limit_bytes))

  def add(self, pid: int) -> None:
    """Moves `pid` into the group; its children are born there."""
    _write(self.path + "/cgroup.procs", str(pid))

  def oom_kills(self) -> int:
    """How many processes the kernel killed in the group for want of memory."""
    name = "memory.events" if self.version == "v2" else "memory.oom_control"
    for line in _read(os.path.join(self.path, name)).splitlines():
      key, _, value = line.partition(" ")
      if key == "oom_kill":
        return int(value)
    return 0

  def close(self) -> None:
    """Removes the group (its processes must have exited; charges move to the parent)."""
    for _ in range(100):  # an exiting task may hold it for a moment
      try:
        os.rmdir(self.path)
        return
      except FileNotFoundError:
        return
      except OSError as e:
        if e.errno != errno.EBUSY:
          raise
        time.sleep(0.01)
