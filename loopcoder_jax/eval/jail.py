"""The sandbox process: runs one Python program inside fresh namespaces and reports how it ended.

Started by `sandbox.py` as `python -I -S jail.py` (standard library only: it never imports this
package). Reads one JSON request on stdin, `{"program", "root", "limits": {...}}`, and writes one
JSON line on stdout: `{"result": "passed" | "timed out" | "failed: ..."}`, or `{"error": ...}` when
the sandbox itself cannot be built (the caller then refuses to run anything: fail closed).

Process tree (each protection names its mechanism; see docs/evaluation.md):
  P  this script as started, in the caller's namespaces and its own session: writes A's uid/gid
     maps (as root: the sandbox uid is a fresh unprivileged one, not root), then reaps every
     descendant before it exits (child subreaper).
  A  fork of P: unshare(user, mount, pid, network, IPC, UTS namespaces); builds the new root (a
     read-only tmpfs holding read-only binds of the system and Python directories, a few /dev
     nodes and a size-limited tmpfs /tmp), pivots into it, detaches the old root, becomes the
     sandbox uid, forks B and holds B to the wall-clock limit (SIGKILL at the deadline).
  B  pid 1 of the new pid namespace: forks C, waits for it, passes C's report to A and exits; the
     kernel then kills every process left in the namespace (forked, `setsid`, daemonised) and A's
     wait returns only once they are all gone.
  C  new session; resource limits (address space, CPU time, file size, open files, processes);
     empty capability bounding set and no_new_privs (exec leaves it no capabilities, even as the
     namespace's uid 0); execs `python -I -S -B` on the driver, which runs the program and writes
     "passed" to fd 3 only after the program's last line ran.
"""

import ctypes
import fcntl
import json
import math
import os
import platform
import resource
import signal
import sys
import time

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME = 32, 1024, 2048
MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 4096, 16384, 1 << 18, 1 << 21
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP = 1, 4, 24
PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 36, 38
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217}
# statvfs flag -> mount flag: a remount in a user namespace must keep the locked ones
_KEEP = (
    (os.ST_NOSUID, MS_NOSUID),
    (os.ST_NODEV, MS_NODEV),
    (os.ST_NOEXEC, MS_NOEXEC),
    (os.ST_NOATIME, MS_NOATIME),
    (os.ST_NODIRATIME, MS_NODIRATIME),
    (os.ST_RELATIME, MS_RELATIME),
)
# merged-/usr links are recreated as links; the rest are bound read-only when present
_SYSTEM = ("/usr", "/bin", "/lib", "/lib64", "/lib32", "/libx32", "/sbin")
_FILES = ("/etc/ld.so.cache",)
_DEVICES = (
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
)
_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
}
_REPORT_FD = 3
_REPORT_BYTES = 4096
# Runs the program in the sandbox; "passed" only once its last line (the tests) has run.
_DRIVER = f"""\
import os
def report(text):
  os.write({_REPORT_FD}, text.encode("utf-8", "replace")[:{_REPORT_BYTES}])
try:
  with open("/program.py", encoding="utf-8") as f:
    code = compile(f.read(), "/program.py", "exec")
  exec(code, {{"__name__": "__sandbox__"}})
except SystemExit as e:
  report(f"failed: the program exited (code {{e.code!r}}) before its tests finished")
except BaseException as e:
  try:
    report(f"failed: {{type(e).__name__}}: {{e}}")
  except BaseException:
    report("failed: " + type(e).__name__)
else:
  report("passed")
os._exit(0)
"""

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4


class JailError(Exception):
  """The sandbox could not be built; never run the program then."""


def _check(ret: int, what: str) -> None:
  if ret != 0:
    err = ctypes.get_errno()
    raise JailError(f"{what}: {os.strerror(err)}")


def _b(s):
  return None if s is None else os.fsencode(s)


def _mount(src, dst, fstype, flags, data=None):
  _check(
      _libc.mount(_b(src), _b(dst), _b(fstype), flags, _b(data)),
      f"mount {src or fstype} on {dst}",
  )


def _prctl(option: int, arg: int = 0) -> None:
  _check(_libc.prctl(option, arg, 0, 0, 0), f"prctl({option})")


def _write(path: str, text: str) -> None:
  fd = os.open(path, os.O_WRONLY)
  try:
    os.write(fd, text.encode())
  finally:
    os.close(fd)


def _unescape(field: str) -> str:
  """mountinfo writes space, tab, newline and backslash as octal escapes."""
  for code in ("040", "011", "012", "134"):
    field = field.replace("\\" + code, chr(int(code, 8)))
  return field


def _mounts_under(path: str) -> list[str]:
  """Mount points at or below `path` in this mount namespace, parents first."""
  out = []
  with open("/proc/self/mountinfo", "rb") as f:
    for line in f:
      point = _unescape(line.split()[4].decode())
      if point == path or point.startswith(path.rstrip("/") + "/"):
        out.append(point)
  return sorted(set(out), key=len)


def _make_read_only(path: str) -> None:
  """Every mount at or below `path` read-only, keeping the flags a user namespace locks."""
  for point in _mounts_under(path):
    flags = os.statvfs(point).f_flag
    keep = 0
    for st, ms in _KEEP:
      if flags & st:
        keep |= ms
    _mount(None, point, None, MS_BIND | MS_REMOUNT | MS_RDONLY | keep)


def _bind(src: str, fd: int, root: str, read_only: bool = True) -> None:
  """Bind `src` (opened as `fd` while its path was still reachable) at `root + src`."""
  dst = root + src
  if os.path.isdir(f"/proc/self/fd/{fd}"):
    os.makedirs(dst, exist_ok=True)
  else:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(dst, "wb"):
      pass
  _mount(f"/proc/self/fd/{fd}", dst, None, MS_BIND | MS_REC)
  if read_only:
    _make_read_only(dst)


def _python_dirs() -> list[str]:
  """Directories the interpreter needs: its prefix (a venv's too) and its binary's directory."""
  exe = os.path.realpath(sys.executable)
  return [
      os.path.realpath(d)
      for d in (sys.base_prefix, sys.prefix, os.path.dirname(exe))
  ]


def _sources() -> tuple[list[str], list[str], list[str]]:
  """(merged-/usr links, directories and files to bind read-only, device nodes)."""
  links, binds = [], []
  for path in _SYSTEM:
    if os.path.islink(path):
      links.append(path)
    elif os.path.isdir(path):
      binds.append(path)
  binds += [p for p in _python_dirs() if os.path.isdir(p)]
  binds += [p for p in _FILES if os.path.isfile(p)]
  kept: list[str] = []
  for path in sorted(set(binds), key=len):  # skip what a bound parent covers
    if not any(path == k or path.startswith(k.rstrip("/") + "/") for k in kept):
      kept.append(path)
  return links, kept, [d for d in _DEVICES if os.path.exists(d)]


def _build_root(request: dict) -> None:
  """The sandbox's whole file system, mounted at `root`, then made the root (pivot_root).

  The sources are opened first, as the caller's uid (a Python under /root stays reachable);
  files in the new root are created as the sandbox uid, the only owner its tmpfs accepts.
  """
  root = request["root"]
  _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing propagates back
  links, binds, devices = _sources()
  fds = {p: os.open(p, os.O_PATH | os.O_CLOEXEC) for p in binds + devices}
  _become_sandbox_uid(request["setgroups"])
  _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,mode=755")
  for path in links:
    os.symlink(os.readlink(path), root + path)
  for path in binds:
    _bind(path, fds[path], root)
  # character devices: a read-only mount would not stop writes to them anyway
  for dev in devices:
    _bind(dev, fds[dev], root, read_only=False)
  for fd in fds.values():
    os.close(fd)
  for name, text in (("program.py", request["program"]), ("run.py", _DRIVER)):
    with open(os.path.join(root, name), "w", encoding="utf-8") as f:
      f.write(text)
  os.makedirs(root + "/tmp")
  _mount(
      "tmpfs",
      root + "/tmp",
      "tmpfs",
      MS_NOSUID | MS_NODEV,
      f"size={request['limits']['tmp_mb']}m,mode=1777",
  )
  _mount(
      None, root, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV
  )
  machine = platform.machine()
  if machine not in SYS_PIVOT_ROOT:
    raise JailError(f"pivot_root: unsupported architecture {machine}")
  os.chdir(root)
  # the old root ends up under the new one; detach it
  _check(_libc.syscall(SYS_PIVOT_ROOT[machine], b".", b"."), "pivot_root")
  _check(_libc.umount2(b".", MNT_DETACH), "detach the old root")
  os.chdir("/")


def _become_sandbox_uid(setgroups: bool) -> None:
  """uid/gid 0 of the namespace: the sandbox uid outside (capabilities kept inside, for now)."""
  os.setresgid(0, 0, 0)
  if setgroups:
    os.setgroups([])  # no supplementary group of the caller (root's) survives
  os.setresuid(0, 0, 0)
  # the uid change cleared it, and /proc/self/fd must stay readable to us
  _prctl(PR_SET_DUMPABLE, 1)


def _drop_privileges(limits: dict) -> None:
  """C, before exec: limits, no capabilities after exec, no way to gain any."""
  seconds = math.ceil(limits["timeout"]) + 1
  mb = 1 << 20
  for res, value in (
      (resource.RLIMIT_AS, limits["memory_mb"] * mb),
      (resource.RLIMIT_CPU, seconds),
      (resource.RLIMIT_FSIZE, limits["file_mb"] * mb),
      (resource.RLIMIT_NOFILE, limits["open_files"]),
      # A and B are counted too (same uid in this user namespace)
      (resource.RLIMIT_NPROC, limits["max_processes"] + 2),
      (resource.RLIMIT_CORE, 0),
  ):
    resource.setrlimit(res, (value, value))
  cap = 0
  while _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:
    cap += 1
  if cap == 0:
    raise JailError("could not empty the capability bounding set")
  _prctl(PR_SET_NO_NEW_PRIVS, 1)


def _run_c(report_w: int, error_w: int, limits: dict) -> None:
  """C: the program's process (never returns). `error_w` closes on exec: only setup errors."""
  try:
    # above the fds about to be set up
    error_w = fcntl.fcntl(error_w, fcntl.F_DUPFD_CLOEXEC, 10)
    report_w = fcntl.fcntl(report_w, fcntl.F_DUPFD_CLOEXEC, 10)
    os.setsid()
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
      os.dup2(null, fd)
    os.dup2(report_w, _REPORT_FD)
    os.closerange(_REPORT_FD + 1, error_w)
    os.closerange(error_w + 1, 1 << 16)
    _drop_privileges(limits)
    os.chdir("/tmp")
    os.execve(
        sys.executable,
        [sys.executable, "-I", "-S", "-B", "/run.py"],
        _ENV,
    )
  except Exception as e:  # noqa: BLE001 - a setup failure is reported, never run past
    os.write(error_w, f"starting the program: {type(e).__name__}: {e}".encode())
  finally:
    os._exit(127)


def _run_b(to_a: int, limits: dict) -> None:
  """B, pid 1 of the namespace: runs C, hands its report and exit status to A (never returns)."""
  try:
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    _prctl(PR_SET_DUMPABLE, 0)  # C (same uid) cannot ptrace it
    # as pid 1 it then ignores SIGINT from inside (Python would raise KeyboardInterrupt)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    report_r, report_w = os.pipe()
    error_r, error_w = os.pipe()  # close-on-exec
    c = os.fork()
    if c == 0:
      os.close(report_r)
      os.close(error_r)
      os.close(to_a)
      _run_c(report_w, error_w, limits)
    os.close(report_w)
    os.close(error_w)
    error = os.read(error_r, _REPORT_BYTES)  # EOF at C's exec
    _, status = os.waitpid(c, 0)
    os.set_blocking(report_r, False)
    try:
      report = os.read(report_r, _REPORT_BYTES)
    except BlockingIOError:
      report = b""
    os.write(
        to_a,
        json.dumps(
            {
                "error": error.decode("utf-8", "replace"),
                "report": report.decode("utf-8", "replace"),
                "signal": (
                    os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
                ),
                "exit": os.WEXITSTATUS(status)
                if os.WIFEXITED(status)
                else None,
            }
        ).encode(),
    )
  finally:
    os._exit(0)


def _outcome(message: dict) -> str:
  report = message["report"]
  if report == "passed" or report.startswith("failed: "):
    return report
  if message["signal"] is not None:
    name = signal.Signals(message["signal"]).name
    why = {"SIGXCPU": " (CPU time limit)", "SIGXFSZ": " (file size limit)"}
    return f"failed: killed by {name}{why.get(name, '')}"
  return (
      f"failed: the program exited (status {message['exit']}) before its "
      "tests finished"
  )


def _run_a(request: dict, ready_w: int, go_r: int) -> None:
  """A: namespaces, file system, then B under the wall-clock limit; prints the result line."""
  limits = request["limits"]
  try:
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    flags = (
        CLONE_NEWUSER
        | CLONE_NEWNS
        | CLONE_NEWPID
        | CLONE_NEWNET
        | CLONE_NEWIPC
        | CLONE_NEWUTS
    )
    _check(_libc.unshare(flags), "unshare(user, mount, pid, net, ipc, uts)")
    os.write(ready_w, b"1")
    if os.read(go_r, 1) != b"1":
      raise JailError("the uid/gid maps were not written")
    _build_root(request)
    to_a_r, to_a_w = os.pipe()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    b = os.fork()
    if b == 0:
      signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
      os.close(to_a_r)
      _run_b(to_a_w, limits)
    os.close(to_a_w)
    deadline = time.monotonic() + limits["timeout"]
    while os.waitpid(b, os.WNOHANG) == (0, 0):
      left = deadline - time.monotonic()
      if left <= 0:
        os.kill(b, signal.SIGKILL)  # the namespace goes with its pid 1
        os.waitpid(b, 0)
        print(json.dumps({"result": "timed out"}), flush=True)
        return
      signal.sigtimedwait({signal.SIGCHLD}, left)
    raw = os.read(to_a_r, 1 << 16)
    if not raw:
      raise JailError("the sandbox's init process died without a report")
    message = json.loads(raw)
    if message["error"]:
      raise JailError(message["error"])
    print(json.dumps({"result": _outcome(message)}), flush=True)
  except JailError as e:
    print(json.dumps({"error": str(e)}), flush=True)
  except Exception as e:  # noqa: BLE001 - any failure to build the sandbox is reported, never run past
    print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)


def _maps(pid: int, privileged: bool) -> None:
  """uid/gid maps of A's user namespace: its uid 0 is a fresh unprivileged uid (or the caller's)."""
  if privileged:  # unique while P lives: no other process shares its uid
    uid = gid = (1 << 29) + os.getpid()
  else:
    uid, gid = os.geteuid(), os.getegid()
    _write(f"/proc/{pid}/setgroups", "deny")
  _write(f"/proc/{pid}/uid_map", f"0 {uid} 1\n")
  _write(f"/proc/{pid}/gid_map", f"0 {gid} 1\n")


def main() -> int:
  request = json.loads(sys.stdin.read())
  os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
  _prctl(PR_SET_CHILD_SUBREAPER, 1)
  privileged = os.geteuid() == 0
  request["setgroups"] = privileged
  ready_r, ready_w = os.pipe()
  go_r, go_w = os.pipe()
  a = os.fork()
  if a == 0:
    os.close(ready_r)
    os.close(go_w)
    try:
      _run_a(request, ready_w, go_r)
    finally:
      os._exit(0)
  os.close(ready_w)
  os.close(go_r)
  if os.read(ready_r, 1) == b"1":
    try:
      _maps(a, privileged)
      os.write(go_w, b"1")
    except OSError as e:
      print(json.dumps({"error": f"writing the uid/gid maps: {e}"}), flush=True)
  os.close(go_w)
  while True:  # A, then anything reparented to us
    try:
      os.wait()
    except ChildProcessError:
      return 0


if __name__ == "__main__":
  sys.exit(main())
