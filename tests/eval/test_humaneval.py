"""HumanEval: problems, the canonical solutions' 164/164, pass@k, samples files, generation, the CLI."""

import fractions
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

from hypothesis import given
from hypothesis import strategies as st
import pytest

from loopcoder_jax.eval import humaneval, sandbox
from loopcoder_jax.inference import generation
from tests.helpers import SCRIPTS, subprocess_env

EVALUATE = os.path.join(SCRIPTS, "evaluate.py")
EPS = 2.0**-52


def evaluate(*flags, timeout=600):
  return subprocess.run(
      [sys.executable, EVALUATE, *flags],
      capture_output=True,
      text=True,
      env=subprocess_env(),
      timeout=timeout,
  )


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_problems_are_the_bundled_164():
  problems = humaneval.load_problems()
  assert [p["task_id"] for p in problems] == [
      f"HumanEval/{i}" for i in range(164)
  ]
  assert humaneval.load_problems(limit=3) == problems[:3]
  with pytest.raises(ValueError, match="limit"):
    humaneval.load_problems(limit=-1)


def test_canonical_solutions_score_164_of_164():
  problems = humaneval.load_problems()
  records = humaneval.score_samples(
      problems, humaneval.canonical_samples(problems), workers=2
  )
  failed = [(r["task_id"], r["result"]) for r in records if not r["passed"]]
  assert not failed
  assert humaneval.pass_at_k(records, [1]) == {"pass@1": 1.0}


def test_the_prompts_helpers_run_on_the_tests_side():
  """HumanEval/38's tests decode what the prompt's `encode_cyclic` encodes: a completion that
  redefines it as the identity (and decodes as the identity) must fail, as the prompt's own
  helper, not the program's, encodes."""
  (problem,) = [
      p for p in humaneval.load_problems() if p["task_id"] == "HumanEval/38"
  ]
  cheat = "    return s\n\n\ndef encode_cyclic(s):\n    return s\n"
  samples = [
      {"task_id": "HumanEval/38", "completion": problem["canonical_solution"]},
      {"task_id": "HumanEval/38", "completion": cheat},
  ]
  records = humaneval.score_samples([problem], samples, workers=2)
  assert [r["passed"] for r in records] == [True, False]
  assert records[1]["result"].startswith("failed: AssertionError")


def assert_pass_at_k(n, c, k, exact):
  """estimate_pass_at_k(n, c, k) within its float64 rounding of `exact`.

  c factors, each within 2 roundings of its value in [0, 1]: the product is off
  by at most 3c ulps of 1, 1 - product adds one more and the exact value's own
  rounding another.
  """
  got = humaneval.estimate_pass_at_k(n, c, k)
  assert abs(got - float(exact)) <= (3 * c + 2) * EPS, (n, c, k, got)


F = fractions.Fraction


@pytest.mark.parametrize(
    "n, c, k, want",
    [
        (1, 0, 1, F(0)),
        (1, 1, 1, F(1)),
        (5, 2, 1, F(2, 5)),
        (5, 2, 2, 1 - F(3, 10)),  # 1 - C(3,2)/C(5,2)
        (4, 1, 3, 1 - F(1, 4)),  # 1 - C(3,3)/C(4,3)
        (10, 3, 5, 1 - F(21, 252)),  # 1 - C(7,5)/C(10,5)
        (3, 1, 3, F(1)),  # every draw of 3 holds the correct one
        (200, 0, 100, F(0)),
    ],
)
def test_pass_at_k_hand_worked(n, c, k, want):
  assert_pass_at_k(n, c, k, want)


@given(st.data())
def test_pass_at_k_is_the_binomial_closed_form(data):
  n = data.draw(st.integers(1, 300))
  c = data.draw(st.integers(0, n))
  k = data.draw(st.integers(1, n))
  assert_pass_at_k(n, c, k, 1 - F(math.comb(n - c, k), math.comb(n, k)))


def test_pass_at_k_averages_problems_and_needs_k_samples():
  records = [
      {"task_id": "a", "passed": True},
      {"task_id": "a", "passed": False},
      {"task_id": "b", "passed": False},
      {"task_id": "b", "passed": False},
  ]
  assert humaneval.pass_at_k(records, [1, 2]) == {"pass@1": 0.25, "pass@2": 0.5}
  with pytest.raises(ValueError, match="pass@3 needs at least 3 samples"):
    humaneval.pass_at_k(records, [3])


def test_read_samples_rejects_bad_files(tmp_path):
  problems = humaneval.load_problems(limit=2)
  good = [
      {"task_id": "HumanEval/0", "completion": "a"},
      {"task_id": "HumanEval/1", "completion": "b"},
  ]
  cases = {
      "not JSON": "{\n",
      "expected": json.dumps({"task_id": "HumanEval/0"}) + "\n",
      "not among the 2 problems": json.dumps(
          {"task_id": "X/1", "completion": ""}
      )
      + "\n",
      "no sample for 1 of the 2": json.dumps(good[0]) + "\n",
  }
  for i, (message, text) in enumerate(cases.items()):
    path = tmp_path / f"{i}.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
      humaneval.read_samples(str(path), problems)
  path = tmp_path / "good.jsonl"
  path.write_text("".join(json.dumps(s) + "\n" for s in good))
  assert humaneval.read_samples(str(path), problems) == good
  with pytest.raises(ValueError, match="does not exist"):
    humaneval.read_samples(str(tmp_path / "missing.jsonl"), problems)
  with pytest.raises(ValueError, match="not among the problems"):
    humaneval.score_samples(problems[:1], good, workers=1)


def test_generate_batches_like_complete(tiny_model):
  """Bucketed, sorted, padded batches give each prompt complete()'s stopped greedy text, and
  hand each batch's samples over as they exist."""
  _, cfg, params, tok = tiny_model
  problems = humaneval.load_problems(limit=2)
  batches = []
  samples, stats = humaneval.generate_samples(
      cfg,
      params,
      tok,
      problems,
      n_samples=2,
      max_new_tokens=24,
      batch_size=3,
      on_batch=batches.append,
  )
  # each sample handed over once, as its batch is decoded, with its place in the result
  assert [len(b) for b in batches] == [3, 1]
  assert sorted(x for b in batches for x in b) == list(enumerate(samples))
  want = generation.complete(
      cfg,
      params,
      tok,
      [p["prompt"] for p in problems],
      max_new_tokens=24,
      stop=humaneval.STOP_SEQUENCES,
  )
  assert [s["task_id"] for s in samples] == [
      p["task_id"] for p in problems for _ in range(2)
  ]
  assert [s["completion"] for s in samples] == [
      w for w in want for _ in range(2)
  ]
  assert 0 < stats["generated_tokens"] <= 4 * 24
  assert stats["tokens_per_s"] > 0


@pytest.mark.slow
def test_evaluate_cli_end_to_end(tiny_model, tmp_path):
  """Generate, execute and write results; re-scoring the written samples gives the same."""
  path = tiny_model[0]
  out = tmp_path / "results.jsonl"
  run = evaluate(
      f"--checkpoint={path}",
      "--limit=2",
      "--max_new_tokens=8",
      "--batch_size=2",
      "--workers=2",
      f"--output={out}",
  )
  assert run.returncode == 0, run.stderr
  summary = json.loads(run.stdout.strip().splitlines()[-1])
  assert summary["problems"] == summary["samples"] == 2
  assert 0 < summary["generated_tokens"] <= 16
  records = read_jsonl(out)
  assert summary["pass@1"] == humaneval.pass_at_k(records, [1])["pass@1"]
  assert [r["task_id"] for r in records] == ["HumanEval/0", "HumanEval/1"]
  for r in records:
    assert set(r) == {"task_id", "completion", "passed", "result"}
    assert generation.truncate(r["completion"], humaneval.STOP_SEQUENCES) == (
        r["completion"]
    )
  again = tmp_path / "again.jsonl"
  rerun = evaluate(
      f"--completions={out}", "--limit=2", "--workers=2", f"--output={again}"
  )
  assert rerun.returncode == 0, rerun.stderr
  assert read_jsonl(again) == records
  assert json.loads(rerun.stdout.strip().splitlines()[-1])["pass@1"] == (
      summary["pass@1"]
  )


def test_evaluate_cli_bad_input_is_one_line(tmp_path):
  existing = tmp_path / "keep.jsonl"
  existing.write_text("precious\n")
  cases = {
      "--k=2": ["--completions=canonical", "--k=2"],
      "exists": ["--completions=canonical", f"--output={existing}"],
      "needs --checkpoint": ["--limit=1"],
      "identical samples": ["--n_samples=2", "--checkpoint=x"],
      "does not exist": [f"--completions={tmp_path / 'nope.jsonl'}"],
      "is for --task=humaneval": ["--task=perplexity", "--output=x.jsonl"],
  }
  for message, flags in cases.items():
    run = evaluate(*flags)
    assert run.returncode == 2, (flags, run.stderr)
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, (flags, last)
  assert existing.read_text() == "precious\n"


# ------------------------------------------------------------------ faults: nothing is lost
SLOW = "    import time\n    time.sleep(60)\n"  # a completion the tests outlive


def write_samples(path, completions):
  """A samples file: completion i for HumanEval/i."""
  path.write_text(
      "".join(
          json.dumps({"task_id": f"HumanEval/{i}", "completion": c}) + "\n"
          for i, c in enumerate(completions)
      )
  )
  return path


def jail_children():
  """Pids of this process's children running the sandbox."""
  return [
      pid
      for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
      if _is_jail_child(pid)
  ]


def _is_jail_child(pid):
  try:
    with open(f"/proc/{pid}/stat", "rb") as f:
      ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
    with open(f"/proc/{pid}/cmdline", "rb") as f:
      cmdline = f.read().split(b"\0")
  except OSError:
    return False
  return ppid == os.getpid() and os.fsencode(sandbox.JAIL) in cmdline


def test_score_samples_retries_a_sandbox_that_could_not_be_built(
    monkeypatch,
):
  """Built on the second try: a verdict; failed twice: a "sandbox error" record."""
  problems = humaneval.load_problems(limit=3)
  tries = {}

  def check(problem, completion, timeout, limits):
    del problem, timeout, limits
    tries[completion] = tries.get(completion, 0) + 1
    if completion == "never" or (
        completion == "once" and tries[completion] == 1
    ):
      raise sandbox.SandboxUnavailable("cannot build the sandbox: injected")
    return {"passed": True, "result": "passed"}

  monkeypatch.setattr(sandbox, "check", check)
  samples = [
      {"task_id": p["task_id"], "completion": c}
      for p, c in zip(problems, ["fine", "once", "never"])
  ]
  seen = []
  records = humaneval.score_samples(
      problems, samples, workers=2, on_record=lambda i, r: seen.append(i)
  )
  assert tries == {"fine": 1, "once": 2, "never": 2}
  assert [r["result"] for r in records] == [
      "passed",
      "passed",
      "sandbox error: cannot build the sandbox: injected",
  ]
  assert [r["passed"] for r in records] == [True, True, False]
  assert humaneval.sandbox_errors(records) == 1
  assert sorted(seen) == [0, 1, 2]


def test_score_samples_interrupted_kills_its_sandboxes():
  """An exception while scoring (Ctrl-C's KeyboardInterrupt) cancels the queued samples and
  kills the running ones: no sandbox outlives the call, and none waits for a slow program.
  """
  problems = humaneval.load_problems(limit=6)
  samples = [
      {
          "task_id": p["task_id"],
          "completion": p["canonical_solution"] if i == 0 else SLOW,
      }
      for i, p in enumerate(problems)
  ]

  def stop(i, record):
    assert i == 0 and record["passed"]
    raise KeyboardInterrupt

  t = time.monotonic()
  with pytest.raises(KeyboardInterrupt):
    humaneval.score_samples(
        problems,
        samples,
        workers=2,
        limits=sandbox.Limits(timeout=120),
        on_record=stop,
    )
  # a slow sample left running would take its 60 s (the queued four, 4 x 60 s more)
  assert time.monotonic() - t < 30
  assert not jail_children()


def test_evaluate_refuses_flags_of_another_mode():
  cases = {
      "--temperature is for generating": [
          "--completions=canonical",
          "--temperature=0.5",
      ],
      "--checkpoint is for generating": [
          "--completions=canonical",
          "--checkpoint=x",
      ],
      "--data is for --task=perplexity": [
          "--completions=canonical",
          "--data=x.py",
      ],
      "--n_samples is for --task=humaneval": [
          "--task=perplexity",
          "--n_samples=2",
      ],
  }
  for message, flags in cases.items():
    run = evaluate(*flags, "--noprogress")
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1, (flags, run.stderr)
    assert lines[0].startswith("error: ") and message in lines[0], flags


def test_evaluate_names_limits_too_small_for_the_self_test():
  run = evaluate("--completions=canonical", "--limit=1", "--memory_mb=1")
  assert run.returncode == 2, run.stderr
  line = run.stderr.strip().splitlines()[-1]
  assert line.startswith(
      "error: --memory_mb=1: too small for the sandbox"
  ), line


def test_evaluate_unwritable_output_fails_before_any_work(tmp_path):
  """/proc, a path under a file, a full disk: one line, before the checkpoint is even read."""
  a_file = tmp_path / "file"
  a_file.write_text("x")
  missing = f"--checkpoint={tmp_path / 'no_checkpoint'}"  # read after --output is made
  for output, message in [
      ("/proc/results.jsonl", "cannot write in /proc ("),
      (f"{a_file}/results.jsonl", f"{a_file} is not a directory"),
  ]:
    run = evaluate(missing, "--limit=1", f"--output={output}")
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"error: --output {output}: {message}"
    ), run.stderr
  full = tmp_path / "full"
  full.mkdir()
  # a 16 KiB tmpfs, filled, in a user and mount namespace of its own
  script = (
      f"mount -t tmpfs -o size=16k tmpfs {full} && head -c 16384 /dev/zero > {full}/fill; "
      f'exec "$@"'
  )
  run = subprocess.run(
      [
          "unshare",
          "--user",
          "--map-root-user",
          "--mount",
          "sh",
          "-c",
          script,
          "sh",
          sys.executable,
          EVALUATE,
          missing,
          "--limit=1",
          f"--output={full}/r.jsonl",
      ],
      capture_output=True,
      text=True,
      env=subprocess_env(),
      timeout=600,
  )
  if "mount" in run.stderr and "error:" not in run.stderr:
    pytest.skip(f"no tmpfs in a user namespace here: {run.stderr.strip()}")
  assert run.returncode == 2, run.stderr
  assert run.stderr.strip().splitlines() == [
      f"error: --output {full}/r.jsonl: cannot write in {full} (No space left on device)"
  ]


def test_full_disk_at_the_end_is_one_line_and_leaves_nothing(tmp_path):
  """Results that do not fit (a 68 KiB tmpfs, 80 KB of completions): the table and the JSON
  line, then one error line; no temporary file is left to block the next run."""
  full = tmp_path / "full"
  full.mkdir()
  big = "    # " + "x" * 40_000 + "\n    return None\n"
  samples = write_samples(tmp_path / "samples.jsonl", [big, big])
  run = subprocess.run(
      [
          "unshare",
          "--mount",
          "sh",
          "-c",
          f'mount -t tmpfs -o size=68k tmpfs {full} || exit 99; "$@"; rc=$?; '
          f"ls -A {full} > {tmp_path / 'left'}; exit $rc",
          "sh",
          sys.executable,
          EVALUATE,
          f"--completions={samples}",
          "--limit=2",
          "--noprogress",
          f"--output={full}/r.jsonl",
      ],
      capture_output=True,
      text=True,
      env=subprocess_env(),
      timeout=600,
  )
  if run.returncode == 99:
    pytest.skip(f"no tmpfs mount here: {run.stderr.strip()[-300:]}")
  assert run.returncode == 1, run.stderr
  assert run.stderr.strip().splitlines() == [
      f"error: --output {full}/r.jsonl was not written (No space left on device)"
  ]
  assert json.loads(run.stdout.strip().splitlines()[-1])["failed"] == 2
  # listed before the mount went with its namespace
  assert (tmp_path / "left").read_text() == ""


def run_until(flags, marker, tmp_path, wait=0.0, **env):
  """evaluate.py with `flags`, sent SIGINT `wait` s after `marker` is on its stderr: (exit
  code, stderr, seconds the exit took)."""
  err = tmp_path / "stderr"
  with open(err, "w") as f:
    proc = subprocess.Popen(
        [sys.executable, EVALUATE, *flags],
        stdout=subprocess.DEVNULL,
        stderr=f,
        env={**subprocess_env(), **env},
    )
  deadline = time.monotonic() + 300
  while marker not in err.read_text():
    assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
    time.sleep(0.05)
  time.sleep(wait)
  proc.send_signal(signal.SIGINT)
  t = time.monotonic()
  rc = proc.wait(timeout=300)
  return rc, err.read_text(), time.monotonic() - t


def test_ctrl_c_during_compilation_keeps_whole_batches(tiny_model, tmp_path):
  """Ctrl-C as the first batch compiles (no compilation cache): no segfault or traceback; once
  the batch is done, exit 130 with the samples generated in --output, ready for --completions.
  An old version's temporary file does not block the run."""
  out = tmp_path / "r.jsonl"
  (tmp_path / "r.jsonl.partial").write_text("left by an old version\n")
  rc, err, _ = run_until(
      [
          f"--checkpoint={tiny_model[0]}",
          "--limit=20",
          "--batch_size=2",
          "--max_new_tokens=8",
          f"--output={out}",
      ],
      "generating:",
      tmp_path,
      JAX_ENABLE_COMPILATION_CACHE="false",
  )
  assert rc == 130, err[-3000:]
  assert "Traceback" not in err
  last = err.strip().splitlines()[-1]
  done = re.fullmatch(
      rf"error: interrupted; wrote (\d+) samples \(0 scored\) to {out}", last
  )
  assert done, err[-3000:]
  records = read_jsonl(out)
  assert len(records) == int(done[1]) and len(records) in range(2, 20, 2)
  assert all(set(r) == {"task_id", "completion"} for r in records)
  assert sorted(os.listdir(tmp_path)) == [
      "r.jsonl",
      "r.jsonl.partial",
      "stderr",
  ]


def test_ctrl_c_while_scoring_stops_within_seconds(tmp_path):
  """Ctrl-C with slow samples running and queued: they are killed and cancelled, the samples
  are written with the verdicts reached, exit 130."""
  completions = ["    return False\n"] + [SLOW] * 5
  samples = write_samples(tmp_path / "samples.jsonl", completions)
  out = tmp_path / "r.jsonl"
  rc, err, took = run_until(
      [
          f"--completions={samples}",
          "--limit=6",
          "--workers=2",
          "--timeout=120",
          f"--output={out}",
      ],
      "executing:",
      tmp_path,
      wait=3.0,  # the quick sample is scored; two slow ones run, three wait
      LOOPCODER_TEST_RUN=str(tmp_path),  # marks this run's processes
  )
  assert rc == 130, err[-3000:]
  assert "Traceback" not in err
  done = re.fullmatch(
      rf"error: interrupted; wrote 6 samples \(([01]) scored\) to {out}",
      err.strip().splitlines()[-1],
  )
  assert done, err[-3000:]
  assert (
      took < 30
  )  # the running ones would take 60 s, the queued ones 3 x 60 s more
  records = read_jsonl(out)
  assert [r["completion"] for r in records] == completions
  assert [("result" in r) for r in records] == [done[1] == "1"] + [False] * 5
  assert sorted(os.listdir(tmp_path)) == ["r.jsonl", "samples.jsonl", "stderr"]
  assert not processes_marked(f"LOOPCODER_TEST_RUN={tmp_path}")


def processes_marked(variable: str) -> list[int]:
  """Pids of the processes whose environment holds `variable` (NAME=value): those of one run,
  not the sandboxes other tests start meanwhile."""
  marked = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/environ", "rb") as f:
        if os.fsencode(variable) in f.read().split(b"\0"):
          marked.append(int(pid))
    except OSError:
      continue  # gone, or not ours to read
  return marked


SANDBOX_FAILS = '''\
"""Fault injection: the sandbox cannot be built for a program holding "# no sandbox"."""
from loopcoder_jax.eval import sandbox

_run_tests = sandbox.run_tests


def run_tests(program, tests, **kwargs):
  if "# no sandbox" in program:
    raise sandbox.SandboxUnavailable("cannot build the sandbox: injected")
  return _run_tests(program, tests, **kwargs)


sandbox.run_tests = run_tests
'''


def test_sandbox_errors_are_counted_apart_and_exit_1(tmp_path):
  """A sample whose sandbox cannot be built (twice) is recorded as such, the rest is scored
  and written, and the run ends in one error line naming how many."""
  shim = tmp_path / "shim"
  shim.mkdir()
  (shim / "sitecustomize.py").write_text(SANDBOX_FAILS)
  samples = write_samples(
      tmp_path / "samples.jsonl",
      ["    return True  # no sandbox\n", "    pass\n"],
  )
  out = tmp_path / "r.jsonl"
  env = subprocess_env()
  env["PYTHONPATH"] = os.pathsep.join([str(shim), env.get("PYTHONPATH", "")])
  run = subprocess.run(
      [
          sys.executable,
          EVALUATE,
          f"--completions={samples}",
          "--limit=2",
          "--noprogress",
          f"--output={out}",
      ],
      capture_output=True,
      text=True,
      env=env,
      timeout=600,
  )
  assert run.returncode == 1, run.stderr
  assert run.stderr.strip().splitlines() == [
      "error: 1 of 2 samples have no verdict: their sandbox could not be built twice "
      "(sandbox error: cannot build the sandbox: injected); pass@k counts them as failed; "
      f"score {out} again with --completions"
  ]
  summary = json.loads(run.stdout.strip().splitlines()[-1])
  assert (summary["sandbox_errors"], summary["failed"], summary["passed"]) == (
      1,
      1,
      0,
  )
  records = read_jsonl(out)
  assert (
      records[0]["result"]
      == "sandbox error: cannot build the sandbox: injected"
  )
  assert records[1]["result"].startswith("failed")
