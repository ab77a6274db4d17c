"""The sandbox: correct code passes; each hostile behaviour fails, is contained and leaves no trace.

"No trace" is checked from the host: no process carrying the test's marker in /proc, no file at
the paths the code wrote to, nothing received by a localhost listener, no memory cgroup left.
Attacks on the verdict (a forged report, replaced module functions, an always-equal object) and
on the kernel (shared-memory hoards, nested namespaces, mounts, exec from /tmp) each fail.
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid

import pytest

from loopcoder_jax.eval import exchange, memory_cgroup, sandbox, syscall_filter
from tests.helpers import ROOT

PROBLEM = {
    "prompt": "def double(x):\n",
    "test": "def check(candidate):\n    assert candidate(2) == 4\n",
    "entry_point": "double",
}
GOOD = "    return 2 * x\n"
# namespace setup and two interpreter starts, on a busy 2-core machine
STARTUP_S = 5.0


def body(code: str) -> str:
  """A completion of `double` that runs `code` first, then returns the right answer."""
  return textwrap.indent(textwrap.dedent(code), "    ") + GOOD


def processes_with(marker: str) -> list[int]:
  """Host pids whose command line holds `marker`."""
  found = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        if marker.encode() in f.read():
          found.append(int(pid))
    except OSError:
      continue  # exited while we looked
  return found


def test_correct_code_passes_and_wrong_code_fails():
  assert sandbox.check(PROBLEM, GOOD) == {"passed": True, "result": "passed"}
  wrong = sandbox.check(PROBLEM, "    return x + 3\n")
  assert not wrong["passed"]
  assert wrong["result"].startswith("failed: AssertionError")
  syntax = sandbox.check(PROBLEM, "    return (\n")
  assert syntax["result"].startswith("failed: SyntaxError")


def test_threads_subprocesses_and_multiprocessing_still_work():
  """What the filter and the mounts allow: threads (clone3 refused, libc falls back to clone),
  a program from /usr, a process pool (its semaphores live in /dev/shm)."""
  code = body("""
      import concurrent.futures, subprocess, threading
      out = []
      t = threading.Thread(target=out.append, args=(1,))
      t.start()
      t.join()
      assert out == [1]
      assert subprocess.run(["true"]).returncode == 0
      with concurrent.futures.ProcessPoolExecutor(2) as pool:
        assert list(pool.map(abs, [-1, -2])) == [1, 2]
      """)
  assert sandbox.check(PROBLEM, code, timeout=10.0)["result"] == "passed"


def test_infinite_loop_ends_at_the_time_limit():
  start = time.monotonic()
  out = sandbox.check(PROBLEM, body("while True:\n    pass\n"), timeout=1.0)
  elapsed = time.monotonic() - start
  assert out == {"passed": False, "result": "timed out"}
  assert 1.0 <= elapsed < 1.0 + STARTUP_S


def test_huge_allocations_hit_the_memory_limit():
  limits = sandbox.Limits(memory_mb=256)
  one = sandbox.check(
      PROBLEM, body("bytearray(1 << 40)\n"), timeout=10.0, limits=limits
  )
  assert one["result"].startswith("failed: MemoryError")
  # Growing until refused: the refusal comes from the limit, long before the clock.
  grow = body("""
      blocks = []
      try:
        while True:
          blocks.append(bytearray(16 << 20))
      except MemoryError:
        raise AssertionError(f"allocated {len(blocks)}") from None
      """)
  start = time.monotonic()
  out = sandbox.check(PROBLEM, grow, timeout=30.0, limits=limits)
  assert time.monotonic() - start < 30.0
  assert out["result"].startswith("failed: AssertionError: allocated ")
  assert int(out["result"].rsplit(" ", 1)[1]) * 16 <= 256


def _spawn_daemon(marker: str, then: str) -> str:
  """Code that forks, starts a new session, forks again and execs a sleeper carrying `marker`
  (waiting until it runs), then does `then`."""
  return body(f"""
      import os, sys
      r, w = os.pipe()
      if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
          os.set_inheritable(w, True)
          os.execv(sys.executable, [sys.executable, "-c",
              "import os, time; os.write({{w}}, b'1'); time.sleep(600)".format(w=w),
              "{marker}"])
        os._exit(0)
      assert os.read(r, 1) == b"1"
      {then}
      """)


def test_forked_and_setsid_processes_do_not_outlive_a_passing_check():
  marker = f"loopcoder-daemon-{uuid.uuid4().hex}"
  out = sandbox.check(PROBLEM, _spawn_daemon(marker, "pass"))
  assert out == {"passed": True, "result": "passed"}
  assert processes_with(marker) == []


def test_forked_and_setsid_processes_do_not_outlive_a_timeout():
  marker = f"loopcoder-daemon-{uuid.uuid4().hex}"
  code = _spawn_daemon(marker, "while True: pass")
  result = {}
  worker = threading.Thread(
      target=lambda: result.update(sandbox.check(PROBLEM, code, timeout=3.0))
  )
  worker.start()
  seen = []  # the daemon is visible from the host while the sandbox runs
  while worker.is_alive() and not seen:
    seen = processes_with(marker)
    time.sleep(0.05)
  worker.join()
  assert seen, "the daemon never started"
  assert result["result"] == "timed out"
  assert processes_with(marker) == []


def test_fork_bomb_hits_the_process_limit():
  limits = sandbox.Limits(max_processes=8)
  marker = f"loopcoder-bomb-{uuid.uuid4().hex}"
  code = body(f"""
      import os, sys
      children = 0
      try:
        while True:
          if os.fork() == 0:
            os.execv(sys.executable, [sys.executable, "-c",
                     "import time; time.sleep(600)", "{marker}"])
          children += 1
      except OSError:
        raise AssertionError(f"forked {{children}}") from None
      """)
  out = sandbox.check(PROBLEM, code, timeout=10.0, limits=limits)
  assert out["result"] == "failed: AssertionError: forked 7"
  assert processes_with(marker) == []


def test_writes_outside_its_tmp_fail_and_leave_nothing(tmp_path):
  name = f"loopcoder-escape-{uuid.uuid4().hex}"
  targets = [
      str(tmp_path / name),  # the host's temp dir: not in its view at all
      os.path.join(sys.prefix, name),  # the Python installation: read-only
      os.path.join("/usr", name),
      os.path.join(ROOT, name),  # this repository: not in its view
  ]
  # Read-only by the mount, not only by file permissions (which protect less without root).
  code = body(f"""
      import os, sys
      for path in ("/", "/usr", sys.prefix):
        assert os.statvfs(path).f_flag & os.ST_RDONLY, path
      assert not os.statvfs("/tmp").f_flag & os.ST_RDONLY
      written = []
      for path in {targets!r}:
        try:
          with open(path, "w") as f:
            f.write("x")
          written.append(path)
        except OSError:
          pass
      assert not written, written
      """)
  assert sandbox.check(PROBLEM, code)["passed"]
  for path in targets:
    assert not os.path.exists(path)


def test_writes_to_its_own_tmp_work_and_vanish():
  name = f"loopcoder-tmp-{uuid.uuid4().hex}"
  code = body(f"""
      import os
      with open("/tmp/{name}", "w") as f:
        f.write("x" * 1000)
      with open("{name}", "w") as f:  # the working directory is /tmp
        f.write("y")
      assert sorted(os.listdir("/tmp")) == ["{name}"]
      """)
  assert sandbox.check(PROBLEM, code)["passed"]
  for tmp in {tempfile.gettempdir(), "/tmp", os.getcwd()}:
    assert not os.path.exists(os.path.join(tmp, name))


def test_network_fails_and_nothing_reaches_a_localhost_listener():
  tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
  with tcp, udp:
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    udp.bind(("127.0.0.1", 0))
    ports = (tcp.getsockname()[1], udp.getsockname()[1])
    code = body(f"""
        import socket
        reached = []
        try:
          with socket.create_connection(("127.0.0.1", {ports[0]}), timeout=1) as s:
            s.sendall(b"hello")
            reached.append("tcp")
        except OSError:
          pass
        try:
          with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"hello", ("127.0.0.1", {ports[1]}))
            reached.append("udp")
        except OSError:
          pass
        assert not reached, reached
        """)
    assert sandbox.check(PROBLEM, code)["passed"]
    for sock in (tcp, udp):
      sock.setblocking(False)
    with pytest.raises(BlockingIOError):
      tcp.accept()
    with pytest.raises(BlockingIOError):
      udp.recv(16)


@pytest.mark.parametrize(
    "exit_call", ["import sys; sys.exit(0)", "import os; os._exit(0)"]
)
def test_a_clean_exit_before_the_tests_is_not_a_pass(exit_call):
  out = sandbox.check(PROBLEM, f"{GOOD}{exit_call}\n")
  assert not out["passed"]
  assert "before its tests finished" in out["result"]


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_no_namespaces_fails_closed():
  """In a user namespace that may not create more, the sandbox refuses: nothing runs."""
  code = (
      "from loopcoder_jax.eval import sandbox\n"
      "try:\n"
      '  sandbox.run(\'open("/tmp/ran", "w")\\n\')\n'
      "except sandbox.SandboxUnavailable as e:\n"
      "  print('refused:', e)\n"
  )
  out = subprocess.run(
      [
          "unshare",
          "--user",
          "--map-root-user",
          "sh",
          "-c",
          'echo 0 > /proc/sys/user/max_user_namespaces && exec "$0" -c "$1"',
          sys.executable,
          code,
      ],
      capture_output=True,
      text=True,
      timeout=120,
      env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
  )
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith("refused: cannot build the sandbox: unshare"), (
      out.stdout + out.stderr
  )


def leaked_cgroups() -> list[str]:
  """Memory cgroups of sandboxes whose jail process is gone (each names its jail's pid)."""
  try:
    group = memory_cgroup.MemoryCgroup(64 << 20)
  except memory_cgroup.Unavailable:
    return []
  group.close()
  parent = os.path.dirname(group.path)
  prefix = "loopcoder-sandbox-"
  return [
      name
      for name in os.listdir(parent)
      if name.startswith(prefix)
      and not os.path.exists(f"/proc/{name[len(prefix):]}")
  ]


@pytest.fixture(autouse=True)
def no_cgroup_left():
  """Every test leaves the host's cgroups as it found them (the caller of a killed jail may
  still be removing its cgroup, in this test or another worker's: it has a few seconds).
  """
  yield
  deadline = time.monotonic() + 5
  while leaked_cgroups() and time.monotonic() < deadline:
    time.sleep(0.05)
  assert leaked_cgroups() == []


def test_a_forged_report_is_not_a_pass():
  """Writing verdicts to every descriptor it has (and scanning for others) changes nothing."""
  code = """\
      import os
      for fd in range(1024):
        for forged in (b"passed", b'{"result": "passed"}\\n', b'{"ready": true}\\n'):
          try:
            os.write(fd, forged)
          except OSError:
            pass
      return x + 3
  """
  out = sandbox.check(PROBLEM, textwrap.indent(textwrap.dedent(code), "    "))
  assert not out["passed"]
  assert out["result"].startswith("failed: the program's answer is not JSON")


def test_the_tests_are_out_of_the_programs_reach():
  """No file in its view and no descriptor it holds carries the tests' source."""
  marker = f"loopcoder-tests-{uuid.uuid4().hex}"
  problem = {**PROBLEM, "test": f"# {marker}\n{PROBLEM['test']}"}
  # the program looks for the marker reversed, so that its own source does not hold it
  code = body(f"""
      import os
      marker = {marker[::-1]!r}[::-1].encode()
      found = []
      for top in ("/", "/tmp", "/dev/shm"):
        for name in os.listdir(top):
          path = os.path.join(top, name)
          if os.path.isfile(path) and marker in open(path, "rb").read():
            found.append(path)
      for fd in range(3, 1024):
        try:
          os.set_blocking(fd, False)
          if marker in os.read(fd, 1 << 20):
            found.append(fd)
        except OSError:
          pass
      assert not found, found
      """)
  assert sandbox.check(problem, code)["result"] == "passed"


def test_replaced_module_functions_do_not_reach_the_verdict():
  """What the program patches (os, sys, builtins, json) lives in its own process only."""
  code = """\
      import builtins, json, os, sys
      real_write = os.write
      os.write = lambda fd, data: real_write(fd, data.replace(b"raised", b"value"))
      sys.exit = os._exit = lambda *a: None
      builtins.AssertionError = type("AssertionError", (Exception,), {})
      builtins.print = builtins.exec = lambda *a, **k: None
      sys.modules["json"].loads = lambda *a, **k: {"value": 4}
  """
  out = sandbox.check(PROBLEM, "    return x + 3\n" + textwrap.dedent(code))
  assert out == {
      "passed": False,
      "result": "failed: AssertionError: ",
  }


@pytest.mark.parametrize(
    "cheat",
    [
        "class Equal:\n  def __init__(self, v):\n    pass\n"
        "  __eq__ = lambda s, o: True\n  __ne__ = lambda s, o: False\n",
        "class Equal(int):\n  __eq__ = lambda s, o: True\n",
        "class Equal(str):\n  __eq__ = lambda s, o: True\n",
    ],
    ids=["object", "int-subclass", "str-subclass"],
)
def test_an_always_equal_object_is_not_a_pass(cheat):
  problem = {**PROBLEM, "prompt": cheat + PROBLEM["prompt"]}
  out = sandbox.check(problem, "    return Equal(4)\n")
  assert out == {
      "passed": False,
      "result": "failed: the program returned a __candidate__.Equal, not plain data",
  }


def test_plain_values_cross_exactly():
  """Every plain type (nested, extreme, non-finite) returns as an equal value of its exact type."""
  values = [
      None,
      True,
      0,
      -(2**200),
      2**63,
      1.5,
      float("inf"),
      -0.0,
      1e-310,
      2 + 3j,
      "é\n\x00",
      b"\x00\xff",
      [1, (2, {3}), frozenset({4})],
      {(1, "a"): [None], "k": {}},
  ]
  for value in values:
    back = exchange.decode(exchange.encode(value))
    assert back == value and type(back) is type(value)
  problem = {
      "prompt": "def echo(x):\n",
      "test": (
          "def check(candidate):\n  inf = float('inf')\n"
          f"  for v in {values!r}:\n"
          "    back = candidate(v)\n"
          "    assert back == v and type(back) is type(v), (v, back)\n"
          "  nan = candidate(float('nan'))\n  assert nan != nan\n"
      ),
      "entry_point": "echo",
  }
  assert sandbox.check(problem, "    return x\n")["result"] == "passed"


def test_only_plain_data_is_encoded_or_decoded():
  class Int(int):
    pass

  for value in (
      Int(1),
      [Int(1)],
      {"k": object()},
      print,
      (1).__class__,
      range(3),
  ):
    with pytest.raises(TypeError, match="not plain data"):
      exchange.encode(value)
  deep: list = []
  for _ in range(exchange.MAX_DEPTH + 2):
    deep = [deep]
  with pytest.raises(TypeError, match="nested deeper"):
    exchange.encode(deep)
  for data in (
      ["x", []],
      [1, 2],
      ["l", [1], 2],
      ["d", [[1]]],
      ["c", ["a", 1.0]],
      {},
  ):
    with pytest.raises(ValueError):
      exchange.decode(data)


def test_the_syscall_filter_is_x86_64_only():
  """Elsewhere the filter is missing (and the sandbox refuses unless allowed), never wrong."""
  code = syscall_filter.program("x86_64")
  assert len(code) % 8 == 0
  with pytest.raises(syscall_filter.Unavailable, match="aarch64"):
    syscall_filter.program("aarch64")


@pytest.mark.parametrize("where", ["memfd", "tmp", "dev-shm"])
def test_a_shared_memory_hoard_stops_at_the_memory_limit(where):
  """Memory that no address-space limit sees (a memfd, tmpfs files) counts against one limit."""
  limits = sandbox.Limits(memory_mb=128, tmp_mb=4096, file_mb=4096)
  opener = {
      "memfd": 'os.memfd_create("hoard")',
      "tmp": 'os.open("/tmp/hoard", os.O_CREAT | os.O_WRONLY)',
      "dev-shm": 'os.open("/dev/shm/hoard", os.O_CREAT | os.O_WRONLY)',
  }[where]
  code = body(f"""
      import os
      fd = {opener}
      chunk = b"x" * (8 << 20)
      for _ in range(128):  # 1 GiB
        os.write(fd, chunk)
      """)
  start = time.monotonic()
  out = sandbox.check(PROBLEM, code, timeout=20.0, limits=limits)
  assert time.monotonic() - start < 20.0
  assert out["result"] == (
      "failed: out of memory (the sample's 128 MiB, shared memory included)"
  )


NAMESPACE_ATTACKS = {
    "unshare-user": "libc.unshare(0x10000000)",
    "unshare-mount": "libc.unshare(0x00020000)",
    "clone-new-user": "libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0)",
    "mount-tmpfs": 'libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)',
    "setns": 'libc.setns(os.open("/", os.O_RDONLY), 0)',
}


@pytest.mark.parametrize(
    "attack", NAMESPACE_ATTACKS, ids=list(NAMESPACE_ATTACKS)
)
def test_no_nested_namespace_and_no_mount(attack):
  """Each call is refused; were one to succeed, the program would pass."""
  code = body(f"""
      import ctypes, os
      libc = ctypes.CDLL(None, use_errno=True)
      if {NAMESPACE_ATTACKS[attack]} != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
      """)
  out = sandbox.check(PROBLEM, code)
  assert (
      out["result"]
      == "failed: PermissionError: [Errno 1] Operation not permitted"
  )


def test_no_exec_of_a_memfd():
  """A binary written to a memfd cannot be run either (execveat is refused)."""
  code = body("""
      import os, sys
      fd = os.memfd_create("run-me")
      with open(sys.executable, "rb") as f:
        os.write(fd, f.read())
      os.execve(fd, [sys.executable, "-c", "pass"], {})
      """)
  out = sandbox.check(PROBLEM, code, timeout=10.0)
  assert out["result"].startswith(
      "failed: PermissionError: [Errno 1] Operation not permitted"
  )


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_the_namespace_limits_hold_without_the_filter():
  """The second layer alone: once the jail's user namespace allows no namespace, even its root
  (with every capability there) can make neither a user nor a mount namespace.
  """
  code = f"""\
import ctypes, errno, importlib.util, os
spec = importlib.util.spec_from_file_location("jail", {sandbox.JAIL!r})
jail = importlib.util.module_from_spec(spec)
spec.loader.exec_module(jail)
jail._limit_namespaces()
libc = ctypes.CDLL(None, use_errno=True)
for flag in (jail.CLONE_NEWUSER, jail.CLONE_NEWNS):
  print(libc.unshare(flag), errno.errorcode[ctypes.get_errno()])
"""
  out = subprocess.run(
      [
          "unshare",
          "--user",
          "--map-root-user",
          sys.executable,
          "-I",
          "-c",
          code,
      ],
      capture_output=True,
      text=True,
      timeout=60,
  )
  assert out.stdout.splitlines() == ["-1 ENOSPC", "-1 ENOSPC"], out.stderr


@pytest.mark.parametrize("what", ["script", "binary"])
def test_no_exec_from_tmp(what):
  """/tmp is noexec: neither a script nor a copied binary written there can be run."""
  make = {
      "script": 'open(path, "w").write("#!/bin/sh\\nexit 0\\n")',
      "binary": "shutil.copy(sys.executable, path)",
  }[what]
  code = body(f"""
      import os, shutil, subprocess, sys
      path = "/tmp/run-me"
      {make}
      os.chmod(path, 0o755)
      subprocess.run([path], check=True)
      """)
  out = sandbox.check(PROBLEM, code, timeout=10.0)
  assert out["result"] == (
      "failed: PermissionError: [Errno 13] Permission denied: '/tmp/run-me'"
  )


# Loads sandbox.py by path (it needs only the standard library, as the jail does) and checks a
# right and a wrong completion, accepting the weaker protections named in argv.
SANDBOX_FROM_ANY_PYTHON = f"""\
import importlib.util, sys
spec = importlib.util.spec_from_file_location("sandbox", {sandbox.__file__!r})
sandbox = sys.modules["sandbox"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sandbox)
limits = sandbox.Limits(allow_weaker=frozenset(sys.argv[1:]))
try:
  print(sandbox.check({PROBLEM!r}, {GOOD!r}, limits=limits)["result"])
  print(sandbox.check({PROBLEM!r}, "    return 0\\n", limits=limits)["result"])
except sandbox.SandboxUnavailable as e:
  print("refused:", e)
"""
RIGHT_AND_WRONG = ["passed", "failed: AssertionError: "]


def sandbox_from(python: str, *allow_weaker: str, wrapper=()):
  return subprocess.run(
      [*wrapper, python, "-c", SANDBOX_FROM_ANY_PYTHON, *allow_weaker],
      capture_output=True,
      text=True,
      timeout=120,
      env={"PATH": os.environ["PATH"]},
  )


def test_starts_from_a_fresh_venv_and_a_system_python(tmp_path):
  """A venv's python is a link (here a chain into pyenv) outside the jail's root: it still runs."""
  subprocess.run(
      [sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")],
      check=True,
  )
  pythons = [str(tmp_path / "venv" / "bin" / "python")]
  pythons += [p for p in ("/usr/bin/python3",) if os.path.exists(p)]
  for python in pythons:
    out = sandbox_from(python)
    assert out.stdout.splitlines() == RIGHT_AND_WRONG, (python, out.stderr)


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_a_host_without_a_memory_cgroup_refuses_unless_allowed():
  """With the cgroup mounts hidden (a private mount namespace) it refuses, in one line."""
  hide = (
      "unshare",
      "--mount",
      "sh",
      "-c",
      'umount -l /sys/fs/cgroup && exec "$@"',
      "sh",
  )
  refused = sandbox_from(sys.executable, wrapper=hide)
  assert refused.stdout.startswith(
      "refused: cannot build the sandbox: no memory_cgroup protection on this host ("
  ), (refused.stdout + refused.stderr)
  assert refused.stdout.endswith(
      "accept the weaker sandbox with --allow_weaker_sandbox=memory_cgroup"
      " (Limits.allow_weaker)\n"
  )
  allowed = sandbox_from(sys.executable, "memory_cgroup", wrapper=hide)
  assert allowed.stdout.splitlines() == RIGHT_AND_WRONG, allowed.stderr


def test_sandbox_errors_are_retried_then_recorded_apart(monkeypatch):
  """A sandbox that fails to build is not a failing sample: retried, then recorded as such."""
  tries: dict[str, int] = {}

  def flaky_check(problem, completion, timeout, limits):
    tries[completion] = tries.get(completion, 0) + 1
    if completion == "broken" or tries[completion] == 1:
      raise sandbox.SandboxUnavailable("cannot build the sandbox: flaky")
    return {"passed": True, "result": "passed"}

  monkeypatch.setattr(sandbox, "check", flaky_check)
  jobs = [(PROBLEM, "flaky"), (PROBLEM, "broken")]
  with pytest.raises(sandbox.SandboxUnavailable, match="flaky"):
    sandbox.check_all(jobs, workers=1)
  tries.clear()
  out = sandbox.check_all(
      jobs, workers=2, retries=1, record_sandbox_errors=True
  )
  assert out == [
      {"passed": True, "result": "passed"},
      {
          "passed": False,
          "result": "sandbox error: cannot build the sandbox: flaky",
      },
  ]
  assert tries == {"flaky": 2, "broken": 2}
  assert [sandbox.is_sandbox_error(r["result"]) for r in out] == [False, True]


def test_bad_limits():
  with pytest.raises(ValueError, match="timeout"):
    sandbox.Limits(timeout=0)
  with pytest.raises(ValueError, match="memory_mb"):
    sandbox.Limits(memory_mb=0)
  with pytest.raises(ValueError, match="unknown sandbox protection"):
    sandbox.Limits(allow_weaker={"memory_cgroups"})
  with pytest.raises(ValueError, match="workers"):
    sandbox.check_all([(PROBLEM, GOOD)], workers=0)
