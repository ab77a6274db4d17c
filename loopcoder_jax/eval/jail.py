"""The sandbox process: runs a program and its tests inside fresh namespaces; reports the verdict.

Started by `sandbox.py` as `python -I -S jail.py` (standard library only: it never imports this
package; `memory_cgroup.py`, `syscall_filter.py` and `exchange.py` beside it are standard library
only too). Reads one JSON request on stdin, `{"program", "tests", "prelude", "entry_point", "root",
"limits": {...}}`, and writes one JSON line on stdout: `{"result": "passed" | "timed out" |
"failed: ...", "missing": [...]}`, or `{"error": ...}` when the sandbox cannot be built or lacks a
protection the request did not waive (the caller then runs nothing: fail closed).

Process tree (each protection names its mechanism; see docs/evaluation.md):
  P  this script as started, in the caller's namespaces and its own session: makes the sample's
     memory cgroup and moves A into it, writes A's uid/gid maps (as root: three fresh unprivileged
     uids, 0, 1 and 2 inside), reaps every descendant (child subreaper), then removes the cgroup.
  A  fork of P: unshare(user, mount, pid, network, IPC, UTS namespaces); sets every
     max_*_namespaces of its user namespace to 0; builds the new root (a read-only, noexec tmpfs
     holding read-only binds of the system and Python directories, a few /dev nodes and
     size-limited noexec tmpfs /tmp and /dev/shm), pivots into it, detaches the old root, forks B
     and holds B to the wall-clock limit (SIGKILL at the deadline).
  B  pid 1 of the new pid namespace: forks C and T, hands T the tests, waits for T's verdict,
     passes it to A and exits; the kernel then kills every process left in the namespace.
  C  the candidate (uid 1 where three uids are mapped), T the tests (uid 2): each in a new session
     with resource limits, an empty capability bounding set, no_new_privs and the seccomp filter;
     C then execs `python -I -S -B /exchange.py`, T (a fork of B, no new interpreter) runs the
     tests. They share two pipes (calls, answers) that carry plain data only; the tests' source
     stays in T's memory and T alone holds the verdict pipe, so nothing C does can make a pass
     but right answers.
"""

import ctypes
import fcntl
import json
import math
import os
import resource
import signal
import sys
import time

# stdlib-only helpers beside this file (-I keeps the script's directory off sys.path)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import exchange  # noqa: E402
import memory_cgroup  # noqa: E402
import syscall_filter  # noqa: E402

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME = 32, 1024, 2048
MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 4096, 16384, 1 << 18, 1 << 21
_NO_EXEC_DEV_SUID = MS_NOSUID | MS_NODEV | MS_NOEXEC
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
_EXCHANGE = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "exchange.py"
)
_VERDICT_BYTES = 4096
_WEAKER = ("memory_cgroup", "seccomp")

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
  """Directories the interpreter needs: its installation and its binary's directory."""
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
  _mount("tmpfs", root, "tmpfs", _NO_EXEC_DEV_SUID, "size=16m,mode=755")
  for path in links:
    os.symlink(os.readlink(path), root + path)
  for path in binds:
    _bind(path, fds[path], root)
  # character devices: a read-only mount would not stop writes to them anyway
  for dev in devices:
    _bind(dev, fds[dev], root, read_only=False)
  for fd in fds.values():
    os.close(fd)
  with open(_EXCHANGE, encoding="utf-8") as f:
    exchange = f.read()
  # the tests are not among them: they reach their own process through a pipe
  for name, text in (
      ("program.py", request["program"]),
      ("exchange.py", exchange),
  ):
    with open(os.path.join(root, name), "w", encoding="utf-8") as f:
      f.write(text)
  # /tmp and /dev/shm (POSIX semaphores, multiprocessing): each holds at most tmp_mb, and all
  # their pages count against the sample's memory cgroup
  for tmp in ("/tmp", "/dev/shm"):
    os.makedirs(root + tmp)
    _mount(
        "tmpfs",
        root + tmp,
        "tmpfs",
        _NO_EXEC_DEV_SUID,
        f"size={request['limits']['tmp_mb']}m,mode=1777",
    )
  _mount(None, root, None, MS_BIND | MS_REMOUNT | MS_RDONLY | _NO_EXEC_DEV_SUID)
  machine = os.uname().machine
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


def _clear_capabilities() -> None:
  """Effective, permitted and inheritable sets emptied (capset, version 3)."""
  header = (ctypes.c_uint32 * 2)(0x20080522, 0)
  data = (ctypes.c_uint32 * 6)()
  _check(_libc.capset(header, data), "capset")


def _drop_privileges(limits: dict, nproc: int, uid: int, seccomp: bool) -> None:
  """C or T: limits, its uid, no capabilities, no way to gain any, fewer system calls."""
  seconds = math.ceil(limits["timeout"]) + 1
  mb = 1 << 20
  for res, value in (
      (resource.RLIMIT_AS, limits["memory_mb"] * mb),
      (resource.RLIMIT_CPU, seconds),
      (resource.RLIMIT_FSIZE, limits["file_mb"] * mb),
      (resource.RLIMIT_NOFILE, limits["open_files"]),
      (resource.RLIMIT_NPROC, nproc),
      (resource.RLIMIT_CORE, 0),
  ):
    resource.setrlimit(res, (value, value))
  cap = 0
  while _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:
    cap += 1
  if cap == 0:
    raise JailError("could not empty the capability bounding set")
  os.setresgid(uid, uid, uid)
  os.setresuid(uid, uid, uid)
  _clear_capabilities()  # uid 0 of the namespace keeps them through setresuid
  _prctl(PR_SET_NO_NEW_PRIVS, 1)
  if seccomp:
    syscall_filter.install()


def _start(role: str, fds: dict[int, int], error_w: int, request: dict) -> None:
  """C ("candidate") or T ("tests"), forked by B: `fds` {target: source} in place, privileges
  dropped, then C execs the program's interpreter and T runs the tests (never returns).

  `error_w` carries setup errors only: C's closes on exec, T closes its own once set up. T is not
  a new interpreter (one start less per sample): it holds what B holds, the program and tests,
  which C, a fresh interpreter under another uid, cannot read.
  """
  try:
    moved = {
        target: fcntl.fcntl(src, fcntl.F_DUPFD_CLOEXEC, 16)
        for target, src in fds.items()
    }
    error_w = fcntl.fcntl(error_w, fcntl.F_DUPFD_CLOEXEC, 16)
    os.setsid()
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    null = fcntl.fcntl(
        os.open("/dev/null", os.O_RDWR), fcntl.F_DUPFD_CLOEXEC, 16
    )
    for fd in range(6):
      os.dup2(moved.get(fd, null), fd)
    os.closerange(6, error_w)
    os.closerange(error_w + 1, 1 << 16)
    limits = request["limits"]
    # where uids 1 and 2 are mapped C and T have their own; else A, B, T count against C's limit
    uid = {"candidate": 1, "tests": 2}[role] if request["privileged"] else 0
    nproc = limits["max_processes"] + (0 if uid else 3)
    _drop_privileges(limits, nproc, uid, request["seccomp"])
    os.chdir("/tmp")
    if role == "candidate":
      exe = request["python"]
      os.execve(exe, [exe, "-I", "-S", "-B", "/exchange.py"], _ENV)
  except Exception as e:  # noqa: BLE001 - a setup failure is reported, never run past
    os.write(error_w, f"starting the {role}: {type(e).__name__}: {e}".encode())
    os._exit(127)
  try:
    os.close(error_w)
    verdict = exchange.run_tests(request)
    verdict_bytes = verdict.encode("utf-8", "replace")[: exchange.VERDICT_BYTES]
    os.write(exchange.VERDICT_FD, verdict_bytes)
  finally:
    os._exit(0)


def _ended(status: int) -> str:
  """How a process ended, from its wait status."""
  if os.WIFSIGNALED(status):
    name = signal.Signals(os.WTERMSIG(status)).name
    why = {"SIGXCPU": " (CPU time limit)", "SIGXFSZ": " (file size limit)"}
    return f"was killed by {name}{why.get(name, '')}"
  return f"exited (status {os.WEXITSTATUS(status)})"


def _run_b(to_a: int, request: dict) -> None:
  """B, pid 1 of the namespace: runs C and T, hands T's verdict to A (never returns)."""
  try:
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    _prctl(PR_SET_DUMPABLE, 0)  # C and T cannot ptrace it
    # as pid 1 it then ignores SIGINT from inside (Python would raise KeyboardInterrupt)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    calls_r, calls_w = os.pipe()
    answers_r, answers_w = os.pipe()
    verdict_r, verdict_w = os.pipe()
    errors = [os.pipe(), os.pipe()]  # close-on-exec
    sides = (
        ("candidate", {3: calls_r, 4: answers_w}),
        ("tests", {3: answers_r, 4: calls_w, 5: verdict_w}),
    )
    pids = []
    for (role, fds), (_, error_w) in zip(sides, errors):
      pid = os.fork()
      if pid == 0:
        _start(role, fds, error_w, request)
      pids.append(pid)
    for fd in (calls_r, calls_w, answers_r, answers_w, verdict_w):
      os.close(fd)
    error = b""
    for error_r, error_w in errors:
      os.close(error_w)
      error = error or os.read(error_r, _VERDICT_BYTES)  # EOF once set up
    candidate, tests = pids
    _, status = os.waitpid(tests, 0)
    os.set_blocking(verdict_r, False)
    try:
      verdict = os.read(verdict_r, _VERDICT_BYTES).decode("utf-8", "replace")
    except BlockingIOError:
      verdict = ""
    if verdict == f"failed: {exchange.ENDED}":  # say how
      how = _ended(os.waitpid(candidate, 0)[1])
      verdict = f"failed: the program {how} before its tests finished"
    elif not verdict:
      verdict = f"failed: the tests' process {_ended(status)}"
    message = {"error": error.decode("utf-8", "replace"), "result": verdict}
    os.write(to_a, json.dumps(message).encode())
  finally:
    os._exit(0)


def _limit_namespaces() -> None:
  """No namespace of any kind can be made inside the jail's user namespace (nor mounts)."""
  sysctls = "/proc/sys/user"
  for name in sorted(os.listdir(sysctls)):
    if name.startswith("max_") and name.endswith("_namespaces"):
      _write(os.path.join(sysctls, name), "0")


def _run_a(request: dict, ready_w: int, go_r: int, out_w: int) -> None:
  """A: namespaces, file system, then B under the wall-clock limit; writes the result line."""
  limits = request["limits"]

  def send(message: dict) -> None:
    os.write(out_w, json.dumps(message).encode())

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
    _limit_namespaces()
    _build_root(request)
    to_a_r, to_a_w = os.pipe()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    b = os.fork()
    if b == 0:
      signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
      os.close(to_a_r)
      os.close(out_w)
      _run_b(to_a_w, request)
    os.close(to_a_w)
    deadline = time.monotonic() + limits["timeout"]
    while os.waitpid(b, os.WNOHANG) == (0, 0):
      left = deadline - time.monotonic()
      if left <= 0:
        os.kill(b, signal.SIGKILL)  # the namespace goes with its pid 1
        os.waitpid(b, 0)
        send({"result": "timed out"})
        return
      signal.sigtimedwait({signal.SIGCHLD}, left)
    raw = os.read(to_a_r, 1 << 16)
    if not raw:
      raise JailError("the sandbox's init process died without a report")
    message = json.loads(raw)
    if message["error"]:
      raise JailError(message["error"])
    send({"result": message["result"]})
  except JailError as e:
    send({"error": str(e)})
  except Exception as e:  # noqa: BLE001 - any failure to build the sandbox is reported, never run past
    send({"error": f"{type(e).__name__}: {e}"})


def _maps(pid: int, privileged: bool) -> None:
  """uid/gid maps of A's user namespace: uids 0 (A, B), 1 (C) and 2 (T) are fresh unprivileged
  uids outside. Without root only one can be mapped, the caller's own: 0, for every process.
  """
  if privileged:  # unique while P lives: no other process shares them
    first = (1 << 29) + 3 * os.getpid()
    uid_map = gid_map = f"0 {first} 3\n"
  else:
    uid_map, gid_map = f"0 {os.geteuid()} 1\n", f"0 {os.getegid()} 1\n"
    _write(f"/proc/{pid}/setgroups", "deny")
  _write(f"/proc/{pid}/uid_map", uid_map)
  _write(f"/proc/{pid}/gid_map", gid_map)


def _seccomp_missing() -> str:
  """Why no seccomp filter can be installed here ("" when one can): tried in a child process."""
  r, w = os.pipe()
  pid = os.fork()
  if pid == 0:
    try:
      _prctl(PR_SET_NO_NEW_PRIVS, 1)
      syscall_filter.install()
    except Exception as e:  # noqa: BLE001 - reported
      os.write(w, (str(e) or type(e).__name__).encode())
    finally:
      os._exit(0)
  os.close(w)
  why = os.read(r, _VERDICT_BYTES).decode()
  os.close(r)
  os.waitpid(pid, 0)
  return why


def _protections(request: dict):
  """The memory cgroup (None if missing and allowed) and whether to filter system calls.

  A protection this host lacks is an error unless the request accepts running without it.
  """
  allowed = set(request["limits"]["allow_weaker"])
  missing = []
  cgroup = None
  try:
    cgroup = memory_cgroup.MemoryCgroup(request["limits"]["memory_mb"] << 20)
    # announced at once, for the caller to remove should this process be killed
    print(json.dumps({"cgroup": cgroup.path}), flush=True)
  except memory_cgroup.Unavailable as e:
    missing.append(("memory_cgroup", str(e)))
  why = _seccomp_missing()
  if why:
    missing.append(("seccomp", why))
  refused = [(name, why) for name, why in missing if name not in allowed]
  if refused:
    if cgroup is not None:
      cgroup.close()
    name, why = refused[0]
    raise JailError(
        f"no {name} protection on this host ({why}); accept the weaker sandbox "
        f"with --allow_weaker_sandbox={','.join(n for n, _ in refused)} "
        "(Limits.allow_weaker)"
    )
  return cgroup, [name for name, _ in missing]


def _reap_all() -> None:
  while True:  # A, then anything reparented to us
    try:
      os.wait()
    except ChildProcessError:
      return


def main() -> int:
  request = json.loads(sys.stdin.read())
  os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
  _prctl(PR_SET_CHILD_SUBREAPER, 1)
  privileged = os.geteuid() == 0
  request["setgroups"] = request["privileged"] = privileged
  # the interpreter itself, not a venv's link to it: links outside the new root dangle there
  request["python"] = os.path.realpath(sys.executable)
  try:
    cgroup, missing = _protections(request)
  except JailError as e:
    print(json.dumps({"error": str(e)}), flush=True)
    return 0
  request["seccomp"] = "seccomp" not in missing
  ready_r, ready_w = os.pipe()
  go_r, go_w = os.pipe()
  out_r, out_w = os.pipe()
  a = os.fork()
  if a == 0:
    for fd in (ready_r, go_w, out_r):
      os.close(fd)
    try:
      _run_a(request, ready_w, go_r, out_w)
    finally:
      os._exit(0)
  for fd in (ready_w, go_r, out_w):
    os.close(fd)
  message = {}
  if os.read(ready_r, 1) == b"1":
    try:
      if cgroup is not None:
        cgroup.add(a)  # before A builds anything: all it makes is charged there
      _maps(a, privileged)
      os.write(go_w, b"1")
    except OSError as e:
      message = {"error": f"writing the uid/gid maps or the cgroup: {e}"}
  os.close(go_w)
  raw = os.read(out_r, 1 << 16)
  _reap_all()
  if not message:
    message = (
        json.loads(raw) if raw else {"error": "the jail died without a result"}
    )
  if cgroup is not None:
    if cgroup.oom_kills() and message.get("result", "passed") != "passed":
      mb = request["limits"]["memory_mb"]
      message["result"] = (
          f"failed: out of memory (the sample's {mb} MiB, shared memory included)"
      )
    cgroup.close()
  message["missing"] = missing
  print(json.dumps(message), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
