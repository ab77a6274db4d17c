"""Contained execution of untrusted Python: the programs a code model writes, and their tests.

    check(problem, completion, timeout=3.0) -> {"passed": bool, "result": "passed" | "timed out" | "failed: ..."}
    run_tests(program, tests, prelude=..., entry_point=..., limits=...) -> result string
    run(program, Limits(...)) -> result string;  check_all(jobs, workers=...) -> results in order

Generated code is hostile until proven otherwise, so each program runs in its own process tree
contained by the operating system (`jail.py` builds it; docs/evaluation.md has the threat model):

  protection                                  mechanism
  a verdict the program cannot forge          the tests run in a process of their own and call the
                                              program through pipes carrying plain data only
                                              (`exchange.py`); the tests' source and the verdict
                                              pipe are out of its reach
  ends at the time limit                      the jail's wall clock kills the namespace's pid 1
                                              (RLIMIT_CPU as a second line)
  memory                                      one memory cgroup for the sample's whole tree
                                              (shared memory and tmpfs included); RLIMIT_AS per
                                              process; RLIMIT_NPROC caps the count
  no process survives `check`                 PID namespace: when its pid 1 exits the kernel kills
                                              every process in it, forked or `setsid`
  no writes outside its temporary directory   mount namespace + pivot_root into a read-only tmpfs
                                              root of read-only binds; /tmp and /dev/shm are
                                              size-limited noexec tmpfs; RLIMIT_FSIZE
  no network                                  network namespace with no interfaces up
  no privileges, less kernel                  user namespace (as root: fresh unprivileged uids);
                                              empty capability bounding set, no_new_privs; no
                                              nested namespaces (max_*_namespaces = 0) and a
                                              seccomp filter (`syscall_filter.py`)

Fail closed: when the sandbox cannot be built (no user namespaces, pivot_root refused, ...) or a
protection is missing on this host (no memory cgroup, no seccomp) and `Limits.allow_weaker` does
not name it, `SandboxUnavailable` is raised with the cause and nothing runs. Degraded, with a
one-line warning: without root the code keeps the caller's uid outside its namespaces, and the
program and its tests share one uid. Not protected: see docs/evaluation.md.
Parallel runs are separate process trees; `check_all` drives them from threads (they only wait).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

JAIL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jail.py")
# time to build and tear down the namespaces, beyond the program's own limit
_SETUP_SLACK_S = 30.0
_warned: set[str] = set()


WEAKER_OPTIONS = ("memory_cgroup", "seccomp")
# the result of a sample whose sandbox could not be built (check_all(record_sandbox_errors=True))
SANDBOX_ERROR = "sandbox error: "


class SandboxUnavailable(RuntimeError):
  """The sandbox cannot be built on this machine; no program was run."""


@dataclasses.dataclass(frozen=True)
class Limits:
  """What one sample may use, and which protections a host may lack.

  `memory_mb` bounds each process's address space and, through a memory cgroup, everything the
  sample's processes hold together (shared memory and tmpfs files included). `allow_weaker` names
  protections (of `WEAKER_OPTIONS`) the sandbox may run without where the host cannot provide them;
  by default a missing one is a `SandboxUnavailable`.
  """

  timeout: float = 3.0  # wall-clock seconds for the whole process tree
  memory_mb: int = 1024
  max_processes: int = 16  # at once, the program's own process included
  file_mb: int = 16  # largest file it may write
  tmp_mb: int = 64  # its /tmp (RAM-backed), all files together
  open_files: int = 64
  allow_weaker: frozenset[str] = frozenset()

  def __post_init__(self):
    if not self.timeout > 0:
      raise ValueError(f"sandbox timeout must be > 0 s, got {self.timeout}")
    for name in (
        "memory_mb",
        "max_processes",
        "file_mb",
        "tmp_mb",
        "open_files",
    ):
      if getattr(self, name) < 1:
        raise ValueError(
            f"sandbox {name} must be >= 1, got {getattr(self, name)}"
        )
    object.__setattr__(self, "allow_weaker", frozenset(self.allow_weaker))
    unknown = sorted(self.allow_weaker - set(WEAKER_OPTIONS))
    if unknown:
      raise ValueError(
          f"unknown sandbox protection(s) {','.join(unknown)} in allow_weaker "
          f"(known: {','.join(WEAKER_OPTIONS)})"
      )

  def for_jail(self) -> dict:
    """The limits as `jail.py` reads them (JSON)."""
    out = dataclasses.asdict(self)
    out["allow_weaker"] = sorted(self.allow_weaker)
    return out


def _warn_once(message: str) -> None:
  if message not in _warned:
    _warned.add(message)
    logging.getLogger(__name__).warning(message)


def _remove_cgroup(out: bytes) -> None:
  """Removes the memory cgroup the jail announced, if it is still there: a jail that was killed
  (time-out, Ctrl-C) could not remove it. Whatever still runs in it is killed first.
  """
  for line in out.decode(errors="replace").splitlines():
    with contextlib.suppress(ValueError, AttributeError):
      path = json.loads(line).get("cgroup")
      if path:
        break
  else:
    return
  for _ in range(200):
    try:
      with open(os.path.join(path, "cgroup.procs")) as f:
        for pid in f.read().split():
          with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
      os.rmdir(path)
      return
    except FileNotFoundError:
      return
    except OSError:
      time.sleep(0.01)  # busy until its last process is gone


def run_tests(
    program: str,
    tests: str,
    *,
    prelude: str = "",
    entry_point: str | None = None,
    limits: Limits = Limits(),
) -> str:
  """Runs `program` and, in another process, `tests` against it; "passed", "timed out" or
  "failed: <why>".

  The tests run after `prelude` (trusted helpers), with `entry_point` bound to a proxy that calls
  the program's function of that name: arguments and results cross as plain data only, and the
  verdict is the tests' alone. With `tests` empty, "passed" means the program ran to its end.
  Raises SandboxUnavailable if the sandbox cannot be built.
  """
  if os.geteuid() != 0:
    _warn_once(
        "sandbox: not running as root, so sandboxed code keeps your uid and groups outside "
        "its namespaces (its files are still limited to a read-only view)"
    )
  request = {
      "program": program,
      "tests": tests,
      "prelude": prelude,
      "entry_point": entry_point,
      "limits": limits.for_jail(),
  }
  # the sandbox's root is mounted here in its own namespace: on the host it stays empty
  root = tempfile.mkdtemp(prefix="loopcoder-sandbox-")
  request["root"] = root
  try:
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", JAIL],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
      out, err = proc.communicate(
          json.dumps(request).encode(), timeout=limits.timeout + _SETUP_SLACK_S
      )
    except subprocess.TimeoutExpired:
      with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
      out, _ = proc.communicate()
      _remove_cgroup(out)
      raise SandboxUnavailable(
          f"the sandbox did not finish within {limits.timeout + _SETUP_SLACK_S:.0f} s"
      ) from None
    _remove_cgroup(out)  # gone already, unless the jail was killed from outside
  finally:
    os.rmdir(root)
  lines = [json.loads(line) for line in out.decode().splitlines() if line]
  errors = [m["error"] for m in lines if "error" in m]
  results = [m for m in lines if "result" in m]
  if errors or not results:
    why = errors[0] if errors else err.decode().strip()[-500:] or "no result"
    raise SandboxUnavailable(f"cannot build the sandbox: {why}")
  for name in results[0]["missing"]:
    _warn_once(
        f"sandbox: running without its {name} protection (allowed by allow_weaker)"
    )
  return results[0]["result"]


def run(program: str, limits: Limits = Limits()) -> str:
  """Runs `program` (Python source) contained: "passed" once it ran to its end, "timed out" or
  "failed: <why>". The program can claim its own end: use `run_tests` for a verdict it cannot forge.
  """
  return run_tests(program, "", limits=limits)


def prelude(prompt: str) -> str:
  """The prompt as the tests' side runs it, for its helpers (`poly`, `encode_cyclic`, ...): a
  prompt that stops at the entry point's signature gets a `pass` body."""
  try:
    compile(prompt, "<prompt>", "exec")
    return prompt
  except SyntaxError:
    last = prompt.rstrip().splitlines()[-1] if prompt.strip() else ""
    indent = last[: len(last) - len(last.lstrip())]
    body = indent + "    " if last.rstrip().endswith(":") else indent
    return f"{prompt.rstrip()}\n{body}pass\n"


def check(
    problem: Mapping[str, str],
    completion: str,
    timeout: float = 3.0,
    limits: Limits | None = None,
) -> dict:
  """{"passed", "result"} of one completion of a HumanEval-format problem (prompt, test,
  entry_point); `timeout` overrides `limits.timeout`.

  The program is prompt + completion; the tests (`check(entry_point)` after the problem's test
  code, with the prompt's helpers) run in a process of their own and call it as plain data.
  """
  limits = dataclasses.replace(limits or Limits(), timeout=timeout)
  entry = problem["entry_point"]
  result = run_tests(
      f"{problem['prompt']}{completion}\n",
      f"{problem['test']}\ncheck({entry})\n",
      prelude=prelude(problem["prompt"]),
      entry_point=entry,
      limits=limits,
  )
  return {"passed": result == "passed", "result": result}


def check_all(
    jobs: Sequence[tuple[Mapping[str, str], str]],
    *,
    workers: int,
    limits: Limits = Limits(),
    on_result: Callable[[int, dict], None] | None = None,
    retries: int = 0,
    record_sandbox_errors: bool = False,
) -> list[dict]:
  """`check` of each (problem, completion), `workers` sandboxes at a time; results in job order.

  `on_result(i, result)` is called in the calling thread as job i's result exists. A job whose
  sandbox could not be built is tried `retries` more times; then, with `record_sandbox_errors`,
  its result is `SANDBOX_ERROR + <why>` (not a failure of the sample: count it apart, see
  `is_sandbox_error`), else that SandboxUnavailable stops the rest and is raised. Whatever is
  raised while waiting (Ctrl-C's KeyboardInterrupt, or from `on_result`) cancels the queued jobs
  and kills the running sandboxes before it propagates.
  """
  if workers < 1:
    raise ValueError(f"workers must be >= 1, got {workers}")
  if retries < 0:
    raise ValueError(f"retries must be >= 0, got {retries}")
  cancelled = threading.Event()

  def one(problem: Mapping[str, str], completion: str) -> dict | None:
    for attempt in range(retries + 1):
      if cancelled.is_set():
        return None
      try:
        return check(problem, completion, limits.timeout, limits)
      except SandboxUnavailable as e:
        if attempt == retries:
          if not record_sandbox_errors:
            raise
          return {"passed": False, "result": f"{SANDBOX_ERROR}{e}"}
    raise AssertionError("unreachable")

  results: list[dict] = [{}] * len(jobs)
  pool = concurrent.futures.ThreadPoolExecutor(workers)
  futures = {pool.submit(one, *job): i for i, job in enumerate(jobs)}
  try:
    for future in concurrent.futures.as_completed(futures):
      i, result = futures[future], future.result()
      assert result is not None  # only cancelled jobs have none
      results[i] = result
      if on_result is not None:
        on_result(i, results[i])
  except BaseException:
    cancelled.set()
    pool.shutdown(wait=False, cancel_futures=True)
    # a worker may be starting a sandbox as this runs: kill until none is left
    while any(f.running() for f in futures):
      _kill_running_jails()
      concurrent.futures.wait(futures, timeout=0.05)
    raise
  finally:
    pool.shutdown()
  return results


def _kill_running_jails() -> None:
  """SIGKILLs this process's children that run `JAIL`, each the leader of its own process group
  (the program's process tree dies with it; its caller then removes its cgroup).
  """
  me, jail = os.getpid(), os.fsencode(JAIL)
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat", "rb") as f:
        ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
      if ppid != me:
        continue
      with open(f"/proc/{entry}/cmdline", "rb") as f:
        if jail in f.read().split(b"\0"):
          os.killpg(int(entry), signal.SIGKILL)
    except (OSError, ValueError, IndexError):
      continue  # it ended meanwhile


def is_sandbox_error(result: str) -> bool:
  """Whether a result says the sandbox, not the sample, failed."""
  return result.startswith(SANDBOX_ERROR)


def probe(limits: Limits = Limits()) -> None:
  """Raises SandboxUnavailable (one line, the cause) unless a trivial program passes."""
  result = run("assert True\n", limits)
  if result != "passed":
    raise SandboxUnavailable(f"the sandbox's self-test gave {result!r}")
