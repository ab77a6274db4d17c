"""The code-tracing loop study's report: per-variant summaries, a verdict read off the numbers by
fixed rules, the markdown section and its plots (`eval/trace_study.py` makes the results).

Comparisons are paired by seed (a seed gives every variant the same batches) and use the spread
over seeds: a difference counts when it exceeds `_noise` (twice the standard error of the
difference of the means, at least `MIN_GAP`).
"""

from __future__ import annotations

from collections.abc import Sequence
import math
import os
from typing import Any

import numpy as np

from loopcoder_jax.data import trace
from loopcoder_jax.eval.trace_study import DIAG_KEYS, best_rates

BAR = 0.95  # the accuracy at k = 1 that says the easy cases are learnt
MIN_GAP = 0.02  # accuracy differences below this never count
CHANCE = 0.1  # one of ten digits


def summarize(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per variant (plan order): the sweep, and per seed at the best rate its accuracy."""
  best = best_rates([r for r in results if r["seed"] == _sweep_seed(results)])
  rows: dict[str, dict[str, Any]] = {}
  for r in results:
    row = rows.setdefault(
        r["variant"],
        {
            k: r[k]
            for k in ("loops", "layers", "cross_loop", "matches", "params")
        }
        | {
            "name": r["variant"],
            "sweep": {},
            "runs": [],
            "lr": best[r["variant"]],
        },
    )
    if r["seed"] == _sweep_seed(results):
      row["sweep"][r["lr"]] = float(np.mean(r["val_acc"]))
    if r["lr"] == row["lr"]:
      row["runs"].append(r)
  out = []
  for row in rows.values():
    runs = sorted(row.pop("runs"), key=lambda r: r["seed"])
    acc = np.array([r["test_acc"] for r in runs])  # [seeds, K]
    row.update(
        seeds=[r["seed"] for r in runs],
        acc=acc.tolist(),
        mean=acc.mean(0).tolist(),
        sd=(
            acc.std(0, ddof=1) if len(runs) > 1 else np.zeros(acc.shape[1])
        ).tolist(),
        train_flops=runs[0]["train_flops"],
        tokens=runs[0]["tokens"],
        steps=runs[0]["steps"],
        lens=np.mean([r["lens_acc"] for r in runs], 0).tolist(),
        diagnostics={
            k: _mean_none([r["diagnostics"][k] for r in runs])
            for k in DIAG_KEYS
            if k in runs[0]["diagnostics"]
        },
        diverged=sum(
            r["diverged"] for r in results if r["variant"] == row["name"]
        ),
    )
    out.append(row)
  return out


def _sweep_seed(results) -> int:
  """The seed every rate ran with (the sweep's)."""
  lrs = {r["lr"] for r in results}
  seeds = sorted({r["seed"] for r in results})
  return next(
      s for s in seeds if {r["lr"] for r in results if r["seed"] == s} == lrs
  )


def _mean_none(xs):
  """Column means over the rows that have a value; None where no row has one (a diagnostic that
  loop 1 lacks)."""
  a = np.array([[np.nan if v is None else v for v in x] for x in xs], float)
  if not a.size:
    return []
  have = ~np.isnan(a)
  total = np.where(have, a, 0.0).sum(0)
  return [float(t / n) if n else None for t, n in zip(total, have.sum(0))]


def _noise(a: dict, b: dict, k: int) -> float:
  n_a, n_b = len(a["seeds"]), len(b["seeds"])
  se = math.sqrt(a["sd"][k] ** 2 / n_a + b["sd"][k] ** 2 / n_b)
  return max(2 * se, MIN_GAP)


def matched_up_to(a: dict, ref: dict) -> int:
  """The largest k0 with a's mean accuracy at least ref's minus the noise at every k <= k0 (0:
  not even at k = 1)."""
  k0 = 0
  for k in range(len(a["mean"])):
    if a["mean"][k] < ref["mean"][k] - _noise(a, ref, k):
      break
    k0 = k + 1
  return k0


def _paired(a: dict, b: dict) -> np.ndarray:
  """a minus b per shared seed and k: `[seeds, K]`."""
  sa = dict(zip(a["seeds"], a["acc"]))
  sb = dict(zip(b["seeds"], b["acc"]))
  shared = sorted(set(sa) & set(sb))
  return np.array([np.subtract(sa[s], sb[s]) for s in shared])


def ahead_at(a: dict, b: dict) -> list[int]:
  """The k (1-based) where a beats b in every shared seed by more than the noise on the mean."""
  d = _paired(a, b)
  if not d.size:
    return []
  return [
      k + 1
      for k in range(d.shape[1])
      if (d[:, k] > 0).all() and d[:, k].mean() > _noise(a, b, k)
  ]


def _at(ks: Sequence[int]) -> str:
  """`at k = 1, 2` or `at no k`."""
  return f"at k = {', '.join(map(str, ks))}" if ks else "at no k"


def _points(x: float) -> str:
  """An accuracy difference in percentage points, signed ('+0.0' never reads '-0.0')."""
  return f"{round(100 * x, 1) + 0.0:+.1f} points"


def _who_is_ahead(
    a: str, a_ks: Sequence[int], b: str, b_ks: Sequence[int]
) -> str:
  if not a_ks and not b_ks:
    return f"neither {a} nor {b} is ahead at any k"
  return f"{a} is ahead {_at(a_ks)}, {b} {_at(b_ks)}"


def verdict(rows: Sequence[dict[str, Any]]) -> list[str]:
  """Plain statements read off the rows by the fixed rules of this module."""
  by = {r["name"]: r for r in rows}
  looped = sorted(
      (r for r in rows if r["cross_loop"] and not r["matches"]),
      key=lambda r: r["loops"],
  )
  out = []
  r1 = by.get("R1")
  kmax = len(rows[0]["mean"])
  if r1 is not None:
    a = r1["mean"][0]
    if a >= BAR:
      out.append(
          f"The easy case is learnt: R = 1 reaches {a:.1%} at k = 1 (bar {BAR:.0%}), so a "
          "variant's failure at larger k is a matter of depth, not of too short training."
      )
    else:
      per_seed = [acc[0] for acc in r1["acc"]]
      crossed = sum(x >= BAR for x in per_seed)
      out.append(
          f"The easy case is NOT learnt: R = 1 reaches only {a:.1%} at k = 1 (bar {BAR:.0%}; "
          f"chance {CHANCE:.0%}; by seed {', '.join(f'{x:.0%}' for x in per_seed)}, "
          f"{crossed} of {len(per_seed)} at the bar). The runs are too short for this task, "
          "and differences at larger k cannot be read as differences in depth."
      )
  shallow = trace.one_line_accuracy()
  deep = [
      r["name"]
      for r in rows
      if any(
          m > shallow + max(MIN_GAP, 2 * sd)
          for m, sd in zip(r["mean"][1:], r["sd"][1:])
      )
  ]
  if kmax > 1 and not deep:
    out.append(
        f"No variant beats, at any k >= 2, the {shallow:.0%} a guess from the asked "
        "variable's own line alone scores (`x=y+c` puts x in c..9) by more than its seed "
        "spread: no variant follows the chain, and the comparisons below are between "
        "guesses. They say nothing about depth."
    )
  for c in sorted(
      (r for r in rows if r["matches"]), key=lambda r: r["matches"]
  ):
    ref = by.get(f"R{c['matches']}")
    if ref is None:
      continue
    k0 = matched_up_to(ref, c)
    out.append(
        f"R = {ref['loops']} ({ref['layers']} layers looped, {ref['params']:,} parameters) "
        + (
            f"matches the unlooped {c['layers']}-layer control ({c['params']:,} parameters, "
            f"the same FLOPs per token) up to k = {k0}"
            if k0
            else f"falls short of the unlooped {c['layers']}-layer control already at k = 1"
        )
        + (" (every k measured)" if k0 == kmax else "")
        + "; "
        + _who_is_ahead(
            "the control",
            ahead_at(c, ref),
            f"R = {ref['loops']}",
            ahead_at(ref, c),
        )
        + " (in every seed, beyond the noise)."
        + _both_on_the_plateau(ref, c)
    )
  for s in (r for r in rows if not r["cross_loop"]):
    ref = by.get(f"R{s['loops']}")
    if ref is None:
      continue
    serial_ahead, clp_ahead = ahead_at(s, ref), ahead_at(ref, s)
    gap = np.mean(_paired(s, ref)) if _paired(s, ref).size else math.nan
    out.append(
        f"Cross-loop parallelism at R = {s['loops']}: "
        + _who_is_ahead("serial looping", serial_ahead, "CLP", clp_ahead)
        + " (in every seed, beyond the noise); averaged over k and seeds serial looping "
        f"scores {_points(gap)} against CLP. "
        + _clp_reading(serial_ahead, clp_ahead, follows=bool(deep))
    )
  out += _another_loop(looped)
  out += _per_flop(rows)
  return out


def _both_on_the_plateau(a: dict, b: dict) -> str:
  """A match of two models that never learnt the k = 1 lookup is no match of depth."""
  if a["mean"][0] >= BAR or b["mean"][0] >= BAR:
    return ""
  return (
      f" Neither learnt the k = 1 lookup ({a['mean'][0]:.0%} and {b['mean'][0]:.0%}; bar "
      f"{BAR:.0%}): they match on the plateau, which says nothing about depth."
  )


def _clp_reading(serial_ahead, clp_ahead, *, follows: bool) -> str:
  """What serial against CLP says about depth: only k >= 2 needs a chain followed (k = 1 is a
  lookup on the asked line), and only when some variant follows the chain at all.
  """
  deeper = [k for k in serial_ahead if k >= 2]
  if not follows:
    return (
        "With no variant following the chain, this says nothing about depth"
        + (
            "; serial looping learnt the k = 1 lookup faster."
            if 1 in serial_ahead and 1 not in clp_ahead
            else "."
        )
    )
  if deeper and not clp_ahead:
    return "CLP loses depth on this task."
  if not serial_ahead:
    return "CLP shows no loss of depth here."
  if not deeper:
    return (
        "Serial looping learnt the k = 1 lookup faster; no loss of depth shows."
    )
  return "The comparison is mixed."


def _another_loop(looped: Sequence[dict]) -> list[str]:
  """Where one more loop stops paying: paired over seeds, on the mean accuracy over k."""
  out = []
  stop = None
  for a, b in zip(looped, looped[1:]):
    ahead = ahead_at(b, a)
    behind = ahead_at(a, b)
    gain = np.mean(_paired(b, a)) if _paired(b, a).size else math.nan
    out.append(
        f"R = {a['loops']} -> {b['loops']}: {_points(gain)} of mean accuracy over k (paired "
        "by seed); "
        + (
            f"the extra loop is ahead {_at(ahead)}, behind {_at(behind)}."
            if ahead or behind
            else "the extra loop is neither ahead nor behind at any k."
        )
    )
    # a loop pays when it is ahead somewhere and behind nowhere
    if stop is None and (not ahead or behind):
      stop = (a["loops"], b["loops"], ahead, behind)
  if stop is not None:
    r, r_next, ahead, behind = stop
    out.append(
        f"Another loop stops paying after R = {r}: R = {r_next} is "
        + (
            f"ahead {_at(ahead)} but behind {_at(behind)}."
            if ahead
            else "ahead of it at no k."
        )
    )
  elif len(looped) > 1:
    out.append(
        f"Every extra loop up to R = {looped[-1]['loops']} is ahead at some k and behind "
        "at none."
    )
  return out


def _per_flop(rows) -> list[str]:
  eff = {
      r["name"]: float(np.mean(r["mean"])) / (r["train_flops"] / 1e12)
      for r in rows
  }
  best = max(eff, key=lambda n: eff[n])
  return [
      f"Accuracy per training FLOP (mean accuracy over k per training TFLOP): highest for "
      f"{best} ({eff[best]:.3g}); "
      + ", ".join(f"{n} {v:.3g}" for n, v in eff.items())
      + "."
  ]


def markdown(
    rows, *, config, command, sessions, plots, conclusion, presets_lines=()
) -> str:
  """The trace study's section of docs/loop_study.md."""
  d, t, m = config["data"], config["train"], config["model"]
  kmax = d["max_k"]
  lines = [
      "## Code tracing: a depth-bound task",
      "",
      "Generated by `scripts/loop_study.py --task=trace` (`loopcoder_jax/eval/trace_study.py`, "
      "`loopcoder_jax/eval/trace_report.py`) from the runs of this command:",
      "",
      f"    {command}",
      "",
      f"Preset `{config['preset']}` of `configs/trace_study.py`. Task (`loopcoder_jax/data/trace.py`): "
      f"snippets of {d['lines']} assignments; the asked chain has k = 1..{kmax} chained "
      "assignments (`a=3`, `b=a+4`, ...) among distractor chains, interleaved at random; up to "
      f"{d['queries']} chains are printed, and the digit each print shows is the answer "
      f"(checked by running the snippet). Baselines: a blind guess scores {CHANCE:.0%}; at "
      f"k >= 2 a guess from the asked variable's own line alone scores "
      f"{trace.one_line_accuracy():.0%} (`x=y+c` puts x in c..9), at k = 1 that line holds the "
      f"answer. Rows of {trace.seq_len(d['lines'], d['queries']) - 1} "
      "code tokens (`c=` and `print(c)` are one token each, as a code tokenizer merges them); "
      "the loss is on the answers only. Accuracy is exact match on "
      f"held-out snippets ({config['eval']['test_per_k']} per k of the asked chain, every "
      "print counted by its own chain length), mean ± standard deviation over seeds; chance "
      f"is {CHANCE:.0%}.",
      "",
      f"Model: d = {m['hidden_size']}, {m['num_hidden_layers']} layers, "
      f"{m['num_attention_heads']} heads, MLP {m['intermediate_size']}, local window left "
      f"{m['plt_window_size'][0]} (the whole row). Training: {t['steps']} steps of "
      f"{t['batch']} rows, AdamW as in `train/optim.py`, with the lookup curriculum of "
      f"`data/trace.py`: {_curriculum(d)}; learning rates "
      f"{', '.join(f'{x:g}' for x in config['sweep']['lrs'])} swept on seed "
      f"{config['sweep']['seed']}, the best on the val split kept; seeds "
      f"{', '.join(map(str, config['study']['seeds']))} at that rate.",
      "",
      "| variant | R | layers | CLP | params | train TFLOPs | best lr (val acc per lr) | "
      + " | ".join(f"k={k}" for k in range(1, kmax + 1))
      + " |",
      "|---|---|---|---|---|---|---|" + "---|" * kmax,
  ]
  for r in rows:
    sweep = ", ".join(
        f"{lr:g}: {a:.2f}" for lr, a in sorted(r["sweep"].items())
    )
    cells = [f"{mu:.2f} ± {sd:.2f}" for mu, sd in zip(r["mean"], r["sd"])]
    lines.append(
        f"| {r['name']} | {r['loops']} | {r['layers']} | "
        f"{'yes' if r['cross_loop'] else 'no'} | {r['params']:,} | "
        f"{r['train_flops'] / 1e12:.3g} | {r['lr']:g} ({sweep}) | "
        + " | ".join(cells)
        + " |"
    )
  lines += [
      "",
      f"![accuracy by k]({os.path.basename(plots['accuracy'])})",
      "",
      "Per loop r, the accuracy of the output head applied to loop r's state at the answer "
      "(logit lens; means over seeds, k = 1..K):",
      "",
      "| variant | loop | "
      + " | ".join(f"k={k}" for k in range(1, kmax + 1))
      + " |",
      "|---|---|" + "---|" * kmax,
  ]
  for r in rows:
    for i, acc in enumerate(r["lens"]):
      lines.append(
          f"| {r['name']} | {i + 1} | "
          + " | ".join(f"{a:.2f}" for a in acc)
          + " |"
      )
  lines += [
      "",
      "Per-loop diagnostics on held-out snippets (`eval/diagnostics.py`, spec section 6; over "
      f"the real tokens of {config['eval']['diag_rows']} snippets, means over seeds; loop r = 1..R):",
      "",
      "| variant | " + " | ".join(DIAG_KEYS) + " |",
      "|---|" + "---|" * len(DIAG_KEYS),
  ]
  for r in rows:
    cells = []
    for k in DIAG_KEYS:
      vals = r["diagnostics"].get(k)
      cells.append(
          "-"
          if vals is None
          else " / ".join("-" if x is None else f"{x:.3g}" for x in vals)
      )
    lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
  lines += [
      "",
      f"![per-loop accuracy and accuracy per FLOP]({os.path.basename(plots['loops'])})",
      "",
      "### Verdict (code tracing)",
      "",
      *[f"- {s}" for s in conclusion],
      "",
      "### Time (code tracing)",
      "",
      f"{sessions['elapsed_s'] / 60:.1f} minutes of wall time while any invocation ran ("
      + (
          f"{sessions['wall_s'] / 60:.1f} summed over {sessions['sessions']} invocations, "
          "some of which ran at once with `--variants`"
          if sessions["wall_s"] > sessions["elapsed_s"] + 1
          else f"{sessions['sessions']} invocation(s)"
      )
      + f") and {sessions['cpu_s'] / 60:.1f} minutes of process CPU time (`sessions.jsonl` "
      "in the study directory).",
      "",
      *presets_lines,
  ]
  return "\n".join(lines)


def write_report(
    study_dir: str,
    results: Sequence[dict[str, Any]],
    doc_path: str,
    *,
    command: str,
    presets: dict[str, Any] | None = None,
) -> list[str]:
  """Writes the trace section of `doc_path` (other sections kept) and its plots beside it
  (`<doc stem>_trace_accuracy.png`, `_trace_loops.png`); `presets` (name -> study config) get
  their estimated cost from the measured runs."""
  import json

  from loopcoder_jax.eval import plots as plots_lib
  from loopcoder_jax.eval.loop_study import update_doc

  rows = summarize(results)
  with open(os.path.join(study_dir, "study.json")) as f:
    config = json.load(f)["config"]
  with open(os.path.join(study_dir, "sessions.jsonl")) as f:
    entries = [json.loads(line) for line in f if line.strip()]
  sessions = {k: sum(e[k] for e in entries) for k in ("wall_s", "cpu_s")} | {
      "sessions": len(entries),
      "elapsed_s": elapsed(entries),
  }
  prefix = os.path.splitext(os.path.abspath(doc_path))[0] + "_trace"
  plots = plots_lib.trace_plots(
      rows,
      prefix,
      {
          "blind guess": CHANCE,
          "guess from the asked line (k >= 2)": trace.one_line_accuracy(),
      },
  )
  text = markdown(
      rows,
      config=config,
      command=command,
      sessions=sessions,
      plots=plots,
      conclusion=verdict(rows),
      presets_lines=presets_section(presets, results) if presets else (),
  )
  update_doc(doc_path, "trace", text)
  return [doc_path, *plots.values()]


def elapsed(entries: Sequence[dict[str, float]]) -> float:
  """Seconds during which at least one invocation ran (the union of their intervals); entries
  without a start (older studies) count their whole wall time."""
  spans = sorted(
      (e["start"], e["start"] + e["wall_s"]) for e in entries if "start" in e
  )
  total = sum(e["wall_s"] for e in entries if "start" not in e)
  end = -math.inf
  for a, b in spans:
    total += max(0.0, b - max(a, end))
    end = max(end, b)
  return total


# An accelerator's sustained float32 rate on these small models, for the accel preset's estimate:
# about 15% of an H100's fp32 peak (small matmuls and attention keep it far from the peak); the
# estimate scales inversely with it.
ACCEL_FLOPS = 10e12
ACCEL_COMPILE_S = 30.0  # per (variant, rate): one compile of the step, evaluation, diagnostics


def preset_cost(config, results) -> dict[str, float]:
  """What a study config costs, from the measured runs: its runs, training FLOPs, the CPU seconds
  they take at the FLOP rate each variant was measured at (process CPU time per training FLOP;
  variants not measured take the slowest measured rate) plus the measured overhead per run
  (compiles, evaluation), and the hours on an accelerator at `ACCEL_FLOPS`."""
  from loopcoder_jax.eval import trace_study
  from loopcoder_jax.model import flops

  measured: dict[str, list[float]] = {}
  for r in results:
    measured.setdefault(r["variant"], []).append(
        r["train_flops"] / r["train_cpu_s"]
    )
  rate = {k: float(np.median(v)) for k, v in measured.items()}
  slowest = min(rate.values())
  overhead = float(np.median([r["cpu_s"] - r["train_cpu_s"] for r in results]))
  seq = trace.seq_len(config.data.lines, config.data.queries) - 1
  per_variant = len(config.sweep.lrs) + len(config.study.seeds) - 1
  tokens = config.train.steps * config.train.batch * seq
  total_flops = cpu_s = 0.0
  variants = trace_study.plan(config)
  for v in variants:
    f = (
        flops.train_flops_per_token(trace_study.model_config(config, v), seq)
        * tokens
    )
    total_flops += f * per_variant
    cpu_s += per_variant * (f / rate.get(v.name, slowest) + overhead)
  compiles = len(variants) * len(config.sweep.lrs)
  return dict(
      runs=len(variants) * per_variant,
      train_tflops=total_flops / 1e12,
      cpu_hours=cpu_s / 3600,
      two_core_hours=cpu_s / 2 / 3600,
      accel_hours=(total_flops / ACCEL_FLOPS + compiles * ACCEL_COMPILE_S)
      / 3600,
  )


def _curriculum(d) -> str:
  steps, frac = d.get("drill_steps", 0), d.get("drill_frac", 0.0)
  if not (steps or frac):
    return "none, every row a snippet"
  drills = (
      f"lookup drills ({d['drill_size']} constants among {d.get('drill_fill', 0)} distractor "
      "steps, each constant printed once, packed as many as fit a row)"
  )
  return (
      f"the first {steps} steps {drills} only, then {frac:.0%} of every batch drills and the "
      "rest snippets"
  )


def presets_section(presets: dict[str, Any], results) -> list[str]:
  """The presets' measured and estimated costs, as markdown lines."""
  rates = [r["steps"] / r["train_wall_s"] for r in results]
  lines = [
      "### Presets and their cost (code tracing)",
      "",
      "Measured in this study: "
      + ", ".join(
          f"{name} {np.median([r['steps'] / r['train_wall_s'] for r in results if r['variant'] == name]):.2f}"
          for name in dict.fromkeys(r["variant"] for r in results)
      )
      + f" training steps per wall second (median over runs; all runs {min(rates):.2f} to "
      f"{max(rates):.2f}) on the loaded machine. Estimates below scale each variant's "
      "measured process CPU time per training FLOP (`model/flops.py`) to a preset's FLOPs, "
      "add the measured per-run overhead (compiles, evaluation, diagnostics), and halve it for "
      "two idle cores (two invocations with disjoint `--variants` keeping both busy); the "
      "accelerator column assumes "
      f"{ACCEL_FLOPS / 1e12:g} TFLOP/s sustained and {ACCEL_COMPILE_S:g} s of compiles per "
      "variant and rate, not measured.",
      "",
      "| preset | runs | training PFLOPs | CPU hours (process time) | hours on 2 idle cores "
      "| hours on one accelerator |",
      "|---|---|---|---|---|---|",
  ]
  for name, config in presets.items():
    c = preset_cost(config, results)
    lines.append(
        f"| {name} | {c['runs']} | {c['train_tflops'] / 1e3:.3g} | {c['cpu_hours']:.2f} | "
        f"{c['two_core_hours']:.2f} | {c['accel_hours']:.2f} |"
    )
  return lines + [""]
