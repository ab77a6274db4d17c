"""When does another loop pay? Train R = 1..4 alike, plus an R = 1 control at matched FLOPs.

`run_study` trains one run per (variant, seed) with the library trainer, from one base training
config that only the loop count (and, for the control, the layer count) changes:
  same parameters  every R has the same L-layer weight shapes, initialised from the same seed (the
                   gate of R >= 2 is the only extra parameter; Flax names each parameter's random
                   stream, so the shared weights start identical)
  same tokens      the same data config, seed, batch, sequence length and step count: every
                   variant of a seed sees the same batches in the same order
  the control      R = 1 with the layer count whose training FLOPs per token
                   (`model.flops.train_flops_per_token`) are closest to those of R =
                   `control_matches`
The seed sets both the initialisation and the data order. Each run is evaluated on the built-in
held-out split: bits per byte (the trainer's), `diagnostics.loop_diagnostics`, and the code
evaluation when a `code_eval` callable is given (scripts/loop_study.py builds one on HumanEval).

Study directory (rerunning the same command resumes: finished stages are skipped, an interrupted
training run resumes from its last checkpoint):
  study.json                 the plan (variants, seeds, the control's FLOP match)
  sessions.jsonl             wall and CPU seconds of every invocation
  tokenizer/                 trained once on the training source, shared by every run
  <variant>-s<seed>/         the run's training workdir (a checkpoint for scripts/diagnose.py and
                             generate.py once trained, with a copy of the tokenizer), plus
                             run_config.json (a rerun with another config is refused), train.json
                             (the trainer's summary), eval.json and timing.jsonl (wall and CPU
                             seconds per stage)
`write_report` turns the results into a report (a markdown file) with its plots.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import json
import math
import os
import platform
import time
from typing import Any

import ml_collections
import numpy as np

from loopcoder_jax.model.config import PLTConfig
from loopcoder_jax.train import config as train_config

CodeEval = Callable[[PLTConfig, Any, Any], dict[str, float]]


class Interrupted(RuntimeError):
  """A training run stopped on SIGTERM (its checkpoint is saved); rerun to resume."""


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  loops: int
  layers: int
  control: int = 0  # a control: the loop count whose training FLOPs it matches


def _model(base: ml_collections.ConfigDict, loops: int, layers: int):
  c = run_config(base, Variant("", loops, layers), 0, "")
  return train_config.model_config_from(c)


def matched_layers(
    base: ml_collections.ConfigDict, loops: int
) -> tuple[int, float]:
  """(layers, ratio): the R = 1 layer count whose training FLOPs per token come closest to the base
  model's with `loops` loops, and its FLOPs over theirs."""
  from loopcoder_jax.model import flops

  seq = base.data.seq_len
  target = flops.train_flops_per_token(_model(base, loops, _layers(base)), seq)
  best = min(
      range(1, 4 * loops * _layers(base) + 1),
      key=lambda n: abs(
          flops.train_flops_per_token(_model(base, 1, n), seq) - target
      ),
  )
  return best, flops.train_flops_per_token(_model(base, 1, best), seq) / target


def _layers(base) -> int:
  return train_config.model_config_from(base).num_hidden_layers


def plan(
    base: ml_collections.ConfigDict,
    loops: Sequence[int] = (1, 2, 3, 4),
    control_matches: int = 2,
) -> tuple[list[Variant], dict[str, Any]]:
  """The study's variants and the control's FLOP match (`control_matches` = 0: no control)."""
  if not loops or len(set(loops)) != len(loops) or min(loops) < 1:
    raise ValueError(f"loops must be distinct integers >= 1, got {list(loops)}")
  if base.model.get("loops") is not None or "plt_num_loops" in dict(
      base.model.overrides
  ):
    raise ValueError(
        "the base config sets the loop count; the study sets it per run"
    )
  n = _layers(base)
  variants = [Variant(f"R{r}", r, n) for r in sorted(loops)]
  match: dict[str, Any] = {}
  if control_matches:
    if control_matches < 2:
      raise ValueError(
          f"control_matches={control_matches}: the control matches a looped model (R >= 2)"
      )
    layers, ratio = matched_layers(base, control_matches)
    variants.append(Variant(f"R1-L{layers}", 1, layers, control_matches))
    match = dict(matches=f"R{control_matches}", layers=layers, ratio=ratio)
  return variants, match


def run_config(
    base: ml_collections.ConfigDict,
    variant: Variant,
    seed: int,
    tokenizer_path: str,
) -> ml_collections.ConfigDict:
  """The training config of one run: the base with the variant's loops and layers, the seed (init
  and data order) and the study's tokenizer."""
  c = ml_collections.ConfigDict(base.to_dict())
  c.seed = seed
  c.data.seed = seed
  c.model.loops = variant.loops
  c.model.overrides.num_hidden_layers = variant.layers
  c.tokenizer.path = tokenizer_path
  return c


def _write_json(path: str, value) -> None:
  tmp = f"{path}.{os.getpid()}.tmp"  # trace-study invocations may share a directory
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


class _Timer:
  """Wall and process CPU seconds of a block, appended to a JSON-lines file when it ends."""

  def __init__(self, path: str, **fields):
    self.path, self.fields = path, fields

  def __enter__(self):
    self.t0, self.c0 = time.time(), time.process_time()
    return self

  def __exit__(self, *exc):
    entry = dict(
        self.fields,
        wall_s=time.time() - self.t0,
        cpu_s=time.process_time() - self.c0,
        finished=exc[0] is None,
    )
    with open(self.path, "a") as f:
      f.write(json.dumps(entry) + "\n")


def _timing(path: str) -> dict[str, float]:
  if not os.path.exists(path):
    return {"wall_s": 0.0, "cpu_s": 0.0}
  with open(path) as f:
    entries = [json.loads(line) for line in f if line.strip()]
  return {k: sum(e[k] for e in entries) for k in ("wall_s", "cpu_s")}


def run_study(
    base: ml_collections.ConfigDict,
    study_dir: str,
    *,
    loops: Sequence[int] = (1, 2, 3, 4),
    seeds: Sequence[int] = (0, 1),
    control_matches: int = 2,
    diag_tokens: int = 4096,
    diag_batch: int = 8,
    code_eval: CodeEval | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
  """Trains and evaluates every (variant, seed) not done yet; returns every run's result."""
  from loopcoder_jax.data import pipeline as data
  from loopcoder_jax.data import tokenizer as tok_lib

  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f"seeds must be distinct, got {list(seeds)}")
  if diag_tokens < 1 or diag_batch < 1:
    raise ValueError(
        f"diag_tokens ({diag_tokens}) and diag_batch ({diag_batch}) must be >= 1"
    )
  if base.eval.max_tokens < 1:
    raise ValueError(
        f"eval.max_tokens={base.eval.max_tokens}: the study compares held-out "
        "bits per byte, so it needs held-out tokens (> 0)"
    )
  variants, match = plan(base, loops, control_matches)
  study_dir = os.path.abspath(study_dir)
  os.makedirs(study_dir, exist_ok=True)
  # every run's config is checked before anything is trained
  tok_path = base.tokenizer.path or os.path.join(study_dir, "tokenizer")
  runs = [
      (v, s, run_config(base, v, s, tok_path)) for v in variants for s in seeds
  ]
  for v, s, c in runs:
    _check_run_dir(os.path.join(study_dir, f"{v.name}-s{s}"), c)
    # as given: the study's own tokenizer does not exist before the first run
    train_config.validate(run_config(base, v, s, base.tokenizer.path))
  _write_json(
      os.path.join(study_dir, "study.json"),
      dict(
          variants=[dataclasses.asdict(v) for v in variants],
          seeds=list(seeds),
          control=match,
          diag_tokens=diag_tokens,
          python=platform.python_version(),
      ),
  )
  with _Timer(os.path.join(study_dir, "sessions.jsonl")):
    if not base.tokenizer.path:
      d = base.data
      tok = tok_lib.get_or_train_tokenizer(
          study_dir,
          base.tokenizer.vocab_size,
          lambda: data.document_texts(d.source, d.text_key),
      )
    else:
      tok = tok_lib.load_tokenizer(tok_path)
    diag_batches, _ = data.make_eval_batches(
        base.data,
        tok,
        seq_len=base.data.seq_len,
        batch_size=diag_batch,
        max_tokens=diag_tokens,
    )
    results = []
    for i, (v, s, c) in enumerate(runs):
      log(f"[{i + 1}/{len(runs)}] {v.name} seed {s}")
      results.append(
          _run(
              v,
              s,
              c,
              os.path.join(study_dir, f"{v.name}-s{s}"),
              tok,
              diag_batches,
              code_eval,
              log,
          )
      )
  return results


def _check_run_dir(workdir: str, config) -> None:
  path = os.path.join(workdir, "run_config.json")
  if os.path.exists(path) and not _same_run(
      _read_json(path), json.loads(config.to_json())
  ):
    raise ValueError(
        f"{workdir} holds a run with another config (run_config.json differs); "
        "use a new study directory"
    )


def _same_run(stored: dict, current: dict) -> bool:
  """Whether a stored run config is the current one.

  Keys the stored config lacks were added to the training config after that run; they are not
  compared (the trainer's own resume checks cover the model, batch and tokenizer). The tokenizer
  path is the study's own tokenizer, which moves with the study directory.
  """

  def restrict(current, stored):  # current's values at stored's keys
    return {
        k: restrict(current[k], v)
        if isinstance(v, dict) and isinstance(current.get(k), dict)
        else current.get(k)
        for k, v in stored.items()
    }

  a, b = dict(stored), restrict(current, stored)
  for c in (a, b):
    c["tokenizer"] = {**c.get("tokenizer", {}), "path": None}
  return a == b


def _run(v, seed, config, workdir, tok, diag_batches, code_eval, log):
  from loopcoder_jax import checkpoints
  from loopcoder_jax.eval import diagnostics
  from loopcoder_jax.inference import cache
  from loopcoder_jax.model import flops
  from loopcoder_jax.train import trainer

  os.makedirs(workdir, exist_ok=True)
  if not os.path.isdir(os.path.join(workdir, "tokenizer")):
    # beside the weights, where diagnose.py and generate.py look for it
    tok.save(os.path.join(workdir, "tokenizer"))
  _write_json(
      os.path.join(workdir, "run_config.json"), json.loads(config.to_json())
  )
  timing = os.path.join(workdir, "timing.jsonl")
  train_json = os.path.join(workdir, "train.json")
  if not os.path.exists(train_json):
    with _Timer(timing, stage="train"):
      summary = trainer.train(config, workdir)
    if summary.get("preempted"):
      raise Interrupted(
          f"{workdir}: stopped at step {summary['end_step']}; rerun to resume"
      )
    _write_json(train_json, summary)
  summary = _read_json(train_json)

  eval_json = os.path.join(workdir, "eval.json")
  evaluated = _read_json(eval_json) if os.path.exists(eval_json) else {}
  if "diagnostics" not in evaluated or (
      code_eval is not None and "code_eval" not in evaluated
  ):
    with _Timer(timing, stage="eval"):
      cfg, params, _ = checkpoints.load(workdir)
      if "diagnostics" not in evaluated:
        evaluated["diagnostics"] = diagnostics.loop_diagnostics(
            cfg, params, diag_batches
        )
      if code_eval is not None:
        evaluated["code_eval"] = code_eval(cfg, params, tok)
    _write_json(eval_json, evaluated)

  cfg = train_config.model_config_from(config)
  seq, t = config.data.seq_len, config.train
  tokens = t.total_steps * t.global_batch_size * seq
  result = dict(
      variant=v.name,
      control=v.control,
      seed=seed,
      loops=v.loops,
      layers=v.layers,
      params=cfg.num_params(),
      tokens=tokens,
      train_flops=flops.train_flops_per_token(cfg, seq) * tokens,
      decode_flops=flops.decode_flops_per_token(cfg, seq),
      kv_bytes=cache.cache_bytes(cache.cache_shapes(cfg, 1, seq)),
      bpb_before=summary.get("bpb_before"),
      bpb=summary.get("bpb_after"),
      **_timing(timing),
      **evaluated,
  )
  log(
      f"{v.name} seed {seed}: held-out bpb {result['bpb']:.4f} "
      f"({result['wall_s']:.0f}s wall)"
  )
  return result


# ------------------------------------------------------------------------------------- report
_DIAG_ROWS = (
    "step_size",
    "update_cos",
    "effective_rank",
    "clp_mismatch",
    "clp_state_ratio",
    "kl_prev",
    "attn_kl_global",
    "mean_gate",
)


def summarize(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per variant (in the order first seen): per-seed bpb and means over seeds."""
  rows: dict[str, dict[str, Any]] = {}
  for res in results:
    row = rows.setdefault(
        res["variant"],
        {
            k: res[k]
            for k in (
                "loops",
                "layers",
                "control",
                "params",
                "tokens",
                "train_flops",
                "decode_flops",
                "kv_bytes",
            )
        }
        | {"name": res["variant"], "runs": []},
    )
    row["runs"].append(res)
  out = []
  for row in rows.values():
    runs = row.pop("runs")
    row["seeds"] = [r["seed"] for r in runs]
    row["bpb"] = [r["bpb"] for r in runs]
    row["wall_s"] = sum(r["wall_s"] for r in runs)
    row["cpu_s"] = sum(r["cpu_s"] for r in runs)
    diags = [r["diagnostics"] for r in runs]
    row["diagnostics"] = {
        k: np.mean([d[k] for d in diags], axis=0).tolist()
        for k in diags[0]
        if k != "per_head"
    }
    if all("code_eval" in r for r in runs):
      row["code_eval"] = {
          k: float(np.mean([r["code_eval"][k] for r in runs]))
          for k in runs[0]["code_eval"]
      }
    out.append(row)
  return out


def _mean_sd(xs) -> tuple[float, float]:
  xs = np.asarray(xs, float)
  return float(xs.mean()), float(xs.std(ddof=1)) if xs.size > 1 else math.nan


def _paired(a, b) -> list[float]:
  """b's bpb minus a's, seed by seed (positive: a is better), over the seeds both ran."""
  bpb_a, bpb_b = dict(zip(a["seeds"], a["bpb"])), dict(
      zip(b["seeds"], b["bpb"])
  )
  return [bpb_b[s] - bpb_a[s] for s in sorted(set(bpb_a) & set(bpb_b))]


def _compare(a, b) -> str:
  """How row a compares with row b, seed by seed: better or worse when it is so in every seed
  (a seed gives both the same initial weights and batches), else mixed."""
  gains = _paired(a, b)
  if gains and all(g > 0 for g in gains):
    return "better than"
  if gains and all(g < 0 for g in gains):
    return "worse than"
  return "mixed against"


def _gains(a, b) -> str:
  return ", ".join(f"{g:+.4f}" for g in _paired(a, b))


def verdict(rows: Sequence[dict[str, Any]]) -> list[str]:
  """Statements read off the results by fixed rules (no judgement added). Comparisons are paired:
  two variants of one seed start from the same weights and see the same batches.
  """
  main = sorted((r for r in rows if not r["control"]), key=lambda r: r["loops"])
  by_r = {r["loops"]: r for r in main}
  means = {r["loops"]: _mean_sd(r["bpb"])[0] for r in main}
  n_seeds = len(main[0]["seeds"])
  out = [
      f"Lowest mean held-out bits per byte: R = {min(means, key=lambda r: means[r])} "
      f"({min(means.values()):.4f}). Comparisons below are seed by seed ({n_seeds} "
      "seed(s)); 'better' or 'worse' means in every seed, which two seeds show only weakly."
  ]
  if 1 in by_r:
    for r in sorted(by_r):
      if r > 1:
        out.append(
            f"R = {r} is {_compare(by_r[r], by_r[1])} R = 1 (bits per byte saved per seed: "
            f"{_gains(by_r[r], by_r[1])})."
        )
  out += _trend(by_r, means)
  out += _controls(rows, by_r)
  out += _mechanism(main[-1])
  out.append(
      f"Scale: {main[0]['params'] / 1e6:.2f}M parameters trained on "
      f"{main[0]['tokens'] / 1e6:.2f}M tokens, judged by held-out bits per byte, against the "
      "paper's 7B parameters, 18T tokens and code benchmarks after instruction tuning. "
      "What shows here (or does not) is how loops behave early in the training of a tiny "
      "model, not a test of the paper's result at its scale."
  )
  return out


def _trend(by_r: dict[int, dict], means: dict[int, float]) -> list[str]:
  """How the bits per byte move from one loop count to the next (three loop counts or more)."""
  loop_counts = sorted(by_r)
  if len(loop_counts) < 3:
    return []
  out: list[str] = []
  steps = [
      _compare(by_r[b], by_r[a]) for a, b in zip(loop_counts, loop_counts[1:])
  ]
  best = min(means, key=lambda r: means[r])
  if all(s == "better than" for s in steps):
    out.append(
        "Every extra loop lowered the bits per byte in every seed: the gain grows "
        "monotonically with the loop count, so the paper's non-monotonic finding does not "
        "appear at this scale."
    )
  elif all(s == "worse than" for s in steps):
    out.append(
        "Every extra loop raised the bits per byte in every seed: at this scale looping "
        "does not pay at any loop count, so neither the paper's gain at R = 2 nor its "
        "non-monotonic shape appears."
    )
  elif (
      best not in (loop_counts[0], loop_counts[-1])
      and _compare(by_r[best], by_r[loop_counts[0]]) == "better than"
      and any(
          _compare(by_r[r], by_r[best]) == "worse than"
          for r in loop_counts
          if r > best
      )
  ):
    out.append(
        f"The gain is non-monotonic: R = {best} beats both R = {loop_counts[0]} and a "
        "larger loop count in every seed, the shape of the paper's finding."
    )
  else:
    out.append(
        "Neither a monotonic trend nor the paper's peak at an intermediate loop count "
        "holds in every seed; consecutive loop counts save "
        + "; ".join(
            f"R {a}->{b}: {_gains(by_r[b], by_r[a])}"
            for a, b in zip(loop_counts, loop_counts[1:])
        )
        + " bits per byte per seed (positive: the larger R is better)."
    )
  return out


def _controls(rows, by_r: dict[int, dict]) -> list[str]:
  """Each looped model against its unlooped control of matched training FLOPs."""
  out: list[str] = []
  for c in (r for r in rows if r["control"]):
    ref = by_r.get(c["control"])
    if ref is not None:
      out.append(
          f"At matched training FLOPs, R = {ref['loops']} with {ref['layers']} layers is "
          f"{_compare(ref, c)} the unlooped {c['layers']}-layer control (bits per byte "
          f"saved per seed: {_gains(ref, c)}); it decodes at "
          f"{ref['decode_flops'] / c['decode_flops']:.2f}x the control's FLOPs per token and "
          f"{ref['kv_bytes'] / c['kv_bytes']:.2f}x its KV-cache bytes."
      )
    if 1 in by_r and _compare(c, by_r[1]) == "worse than":
      out.append(
          f"The {c['layers']}-layer control is itself worse than R = 1 with "
          f"{by_r[1]['layers']} layers in every seed (bits per byte saved per seed: "
          f"{_gains(c, by_r[1])}): at this training length, more compute per token does "
          "not pay, whether spent on loops or on layers."
      )
  return out


def _mechanism(deepest: dict) -> list[str]:
  """What the diagnostics of the deepest loop count (R >= 3) show about the loops."""
  d = deepest["diagnostics"]
  if deepest["loops"] < 3:
    return []
  er = d["effective_rank"]
  cos = d["update_cos"][2:]
  line = (
      f"Mechanism (R = {deepest['loops']}, means over seeds): the effective rank peaks "
      f"after loop {int(np.argmax(er)) + 1} ({', '.join(f'{x:.1f}' for x in er)} by loop); "
      "the update cosine of loops 3 and on is "
      + ", ".join(f"{x:+.2f}" for x in cos)
      + (
          " (negative: later loops partly undo the previous update)"
          if all(x < 0 for x in cos)
          else ""
      )
      + f"; step sizes {', '.join(f'{x:.2f}' for x in d['step_size'])}"
  )
  ratio = d.get("clp_state_ratio")
  if ratio is not None:
    line += (
        "; the previous loop's state outweighs the token's own embedding in the input of "
        "loops 2 and on by " + ", ".join(f"{x:.1f}x" for x in ratio[1:])
    )
  return [line + "."]


def _fmt_flops(x: float) -> str:
  return f"{x / 1e12:.3g}"


def _code_summary(rows) -> str:
  passes = [r["code_eval"].get("pass@1", math.nan) for r in rows]
  text = "pass@1 per run is in the table above (means over seeds)."
  if all(p == 0 for p in passes):
    text += (
        " No run solves any problem: at this scale pass@1 cannot tell the variants apart, and "
        "held-out bits per byte is the measure the verdict rests on."
    )
  return text


def report_markdown(
    rows: Sequence[dict[str, Any]],
    *,
    base: ml_collections.ConfigDict,
    study: dict[str, Any],
    command: str,
    sessions: dict[str, Any],
    plots: dict[str, str],
    conclusion: Sequence[str],
) -> str:
  """docs/loop_study.md from the summarised rows."""
  has_code = all("code_eval" in r for r in rows)
  lines = _setup_section(rows, base, study, command, has_code)
  lines += _results_rows(rows, has_code)
  lines += _diagnostics_section(rows, study, plots)
  lines += _closing_sections(rows, has_code, conclusion, sessions, plots)
  return "\n".join(lines)


def _setup_section(
    rows, base, study, command: str, has_code: bool
) -> list[str]:
  """The command, the model, training and control, what is measured, the results table's head."""
  cfg = train_config.model_config_from(base)
  t, d = base.train, base.data
  seeds = study["seeds"]
  lines = [
      "## Held-out text: the R = 1..4 study on the standard library",
      "",
      "Generated by `scripts/loop_study.py` (`loopcoder_jax/eval/loop_study.py`) from the runs "
      "of this command:",
      "",
      f"    {command}",
      "",
      f"Model (`configs/loop_study.py`): d = {cfg.hidden_size}, {cfg.num_hidden_layers} "
      f"shared layers, {cfg.num_attention_heads} heads ({cfg.num_key_value_heads} KV), MLP "
      f"{cfg.intermediate_size}, vocabulary {cfg.vocab_size}, window left {cfg.window_left}. "
      f"Training: {t.total_steps} steps of {t.global_batch_size} x {d.seq_len} tokens "
      f"({rows[0]['tokens']:,} tokens) on the built-in corpus (the standard library of "
      f"Python {study['python']}), peak lr "
      f"{base.optim.peak_lr:g}; seeds {', '.join(map(str, seeds))} (a seed sets the "
      "initialisation and the data order). Every R has the same layer shapes and initial "
      "weights for a seed and sees the same batches; only the loop count differs.",
  ]
  ctrl = study.get("control") or {}
  if ctrl:
    lines += [
        "",
        f"Control: R = 1 with {ctrl['layers']} layers, the layer count whose training FLOPs "
        f"per token come closest to {ctrl['matches']}'s ({ctrl['ratio']:.3f}x them).",
    ]
  lines += [
      "",
      "Quality is held-out bits per byte on the corpus' held-out split "
      f"({base.eval.max_tokens:,} tokens; lower is better): mean ± standard deviation over "
      "seeds, each seed's value, and the bits per byte it saves against R = 1 of the same "
      "seed (same initial weights, same batches). Training FLOPs count the whole run "
      "(`model.flops.train_flops_per_token` x tokens); decode cost is "
      f"`flops.decode_flops_per_token` at context {d.seq_len} and the KV cache of one "
      f"{d.seq_len}-token sequence (float32). Wall time is summed over the variant's runs.",
      "",
      "| variant | R | layers | params | train TFLOPs | decode MFLOP/token | KV cache KiB "
      "| bpb mean ± sd | bpb per seed | saved vs R1 per seed | "
      + ("pass@1 | " if has_code else "")
      + "wall min |",
      "|---|---|---|---|---|---|---|---|---|---|"
      + ("---|" if has_code else "")
      + "---|",
  ]
  return lines


def _results_rows(rows, has_code: bool) -> list[str]:
  """A row per variant: cost, bits per byte and its gain over R = 1 per seed, pass@1, time."""
  lines = []
  r1 = next((r for r in rows if r["loops"] == 1 and not r["control"]), None)
  for r in rows:
    mean, sd = _mean_sd(r["bpb"])
    saved = "-" if r1 is None or r is r1 else _gains(r, r1)
    code = (
        f" {r['code_eval'].get('pass@1', math.nan):.3f} |" if has_code else ""
    )
    lines.append(
        f"| {r['name']} | {r['loops']} | {r['layers']} | {r['params']:,} | "
        f"{_fmt_flops(r['train_flops'])} | {r['decode_flops'] / 1e6:.2f} | "
        f"{r['kv_bytes'] / 1024:.0f} | {mean:.4f} ± "
        f"{'-' if math.isnan(sd) else f'{sd:.4f}'} | "
        f"{', '.join(f'{x:.4f}' for x in r['bpb'])} | {saved} |{code} "
        f"{r['wall_s'] / 60:.1f} |"
    )
  return lines


def _diagnostics_section(rows, study, plots) -> list[str]:
  """The quality plot, then the per-loop diagnostics of each variant."""
  lines: list[str] = []
  lines += [
      "",
      f"![quality against training FLOPs and decode cost]({os.path.basename(plots['quality'])})",
      "",
      "Per-loop diagnostics on held-out text (`eval/diagnostics.py`, spec section 6; "
      f"{study['diag_tokens']:,} tokens, means over seeds; loop r = 1..R):",
      "",
      "| variant | " + " | ".join(_DIAG_ROWS) + " |",
      "|---|" + "---|" * len(_DIAG_ROWS),
  ]
  for r in rows:
    cells = []
    for k in _DIAG_ROWS:
      vals = r["diagnostics"].get(k)
      cells.append(
          "-"
          if vals is None
          else " / ".join("-" if math.isnan(x) else f"{x:.3g}" for x in vals)
      )
    lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
  return lines


def _closing_sections(rows, has_code, conclusion, sessions, plots) -> list[str]:
  """The diagnostics plot, code evaluation, the verdict and the time the study took."""
  return [
      "",
      f"![per-loop diagnostics by variant]({os.path.basename(plots['loops'])})",
      "",
      "### Code evaluation",
      "",
      (
          _code_summary(rows)
          if has_code
          else "Not run (`--code_eval_problems=0`). `scripts/loop_study.py "
          "--code_eval_problems=N` adds HumanEval pass@1 on the first N problems to every run; "
          "finished runs are evaluated without retraining."
      ),
      "",
      "### Verdict",
      "",
      *[f"- {s}" for s in conclusion],
      "",
      "### Time",
      "",
      f"The whole study took {sessions['wall_s'] / 60:.1f} minutes of wall time and "
      f"{sessions['cpu_s'] / 60:.1f} minutes of process CPU time over "
      f"{sessions['sessions']} invocation(s) of "
      + ", ".join(f"{w / 60:.1f}" for w in sessions["each"])
      + " minutes (`sessions.jsonl` in the study directory; the "
      "machine is a 2-core CPU shared with other jobs, so wall time runs above the compute "
      "it needed). Rerunning the command skips finished runs and resumes an interrupted one "
      "from its last checkpoint.",
      "",
  ]


def write_report(
    study_dir: str,
    results: Sequence[dict[str, Any]],
    doc_path: str,
    *,
    base: ml_collections.ConfigDict,
    command: str,
) -> list[str]:
  """Writes `doc_path` and its plots beside it (`<doc stem>_quality.png`, `_loops.png`)."""
  from loopcoder_jax.eval import plots as plots_lib

  rows = summarize(results)
  study = _read_json(os.path.join(study_dir, "study.json"))
  with open(os.path.join(study_dir, "sessions.jsonl")) as f:
    entries = [json.loads(line) for line in f if line.strip()]
  sessions = {k: sum(e[k] for e in entries) for k in ("wall_s", "cpu_s")} | {
      "sessions": len(entries),
      "each": [e["wall_s"] for e in entries],
  }
  prefix = os.path.splitext(os.path.abspath(doc_path))[0]
  plots = plots_lib.study_plots(rows, prefix)
  text = report_markdown(
      rows,
      base=base,
      study=study,
      command=command,
      sessions=sessions,
      plots=plots,
      conclusion=verdict(rows),
  )
  update_doc(doc_path, "stdlib", text)
  return [doc_path, *plots.values()]


DOC_TITLE = "# When does another loop pay? The loop studies"


def update_doc(doc_path: str, section: str, text: str) -> None:
  """Puts `text` into `doc_path` as the section `section` (between its two marker comments),
  keeping every other section: each task rewrites only its own (atomically)."""
  begin, end = (
      f"<!-- {section} study: begin -->",
      f"<!-- {section} study: end -->",
  )
  block = f"{begin}\n{text.rstrip()}\n{end}\n"
  old = ""
  if os.path.exists(doc_path):
    with open(doc_path) as f:
      old = f.read()
  if begin in old and end in old:
    head, rest = old.split(begin, 1)
    new = head + block + rest.split(end, 1)[1].lstrip("\n")
  elif old:
    new = old.rstrip("\n") + "\n\n" + block
  else:
    new = f"{DOC_TITLE}\n\n{block}"
  tmp = f"{doc_path}.tmp"
  with open(tmp, "w") as f:
    f.write(new)
  os.replace(tmp, doc_path)
