"""PNG plots of the loop diagnostics and of the loop study (matplotlib, Agg backend: no display).

`training_plots(workdir, directory)` draws a training run's loss and per-loop
gate means by step (from its `metrics.jsonl`). `diagnostics_plots(result, directory)` draws one `loop_diagnostics` result: per-loop step size and
update cosine, effective rank, logit-lens rank and KL, attention entropy and inter-loop KL, and the
gate by layer (R >= 2). `study_plots` draws the loop study: quality against training FLOPs and
against decode cost, and per-loop diagnostics by variant. Each returns the paths it wrote.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Sized
import itertools
import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

_DPI = 110


def _save(fig, path: str) -> str:
  fig.tight_layout()
  fig.savefig(path, dpi=_DPI)
  plt.close(fig)
  return path


def _colors():
  """The default colour cycle, endlessly: one colour per variant in every panel."""
  return itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"])


def _loops(values: Sized) -> np.ndarray:
  return np.arange(1, len(values) + 1)


def _per_loop(ax, result, names, ylabel):
  shown = [n for n in names if n in result]
  for name in shown:
    ys = np.asarray(result[name], float)
    ax.plot(_loops(ys), ys, "o-", label=name)
  ax.set_xlabel("loop r")
  ax.set_ylabel(ylabel)
  ax.set_xticks(_loops(result["step_size"]))
  ax.grid(alpha=0.3)
  if shown:
    ax.legend(fontsize=8)


def training_plots(workdir: str, directory: str) -> list[str]:
  """The loss and the mean gate of each loop r >= 2 by step, from
  `workdir/metrics.jsonl` (the last record of a step wins: a resumed run logs
  the steps after its checkpoint again)."""
  import json

  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise ValueError(f"{path} does not exist: not a training workdir")
  by_step = {}
  with open(path) as f:
    for line in f:
      record = json.loads(line)
      by_step[record["step"]] = record
  if not by_step:
    raise ValueError(f"{path} holds no steps yet")
  steps = sorted(by_step)
  records = [by_step[s] for s in steps]
  gates = sorted(k for k in records[0] if k.startswith("gate_loop"))
  os.makedirs(directory, exist_ok=True)
  fig, axes = plt.subplots(
      1, 1 + bool(gates), figsize=(4.5 + 4.5 * bool(gates), 3.5)
  )
  a = axes[0] if gates else axes
  a.plot(steps, [r["loss"] for r in records])
  a.set_xlabel("step")
  a.set_ylabel("training loss (nats per token)")
  a.grid(alpha=0.3)
  if gates:
    for key in gates:
      axes[1].plot(steps, [r[key] for r in records], label=f"loop {key[9:]}")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("mean gate (weight on the global branch)")
    axes[1].set_ylim(0, 1)
    axes[1].grid(alpha=0.3)
    axes[1].legend(fontsize=8)
  return [_save(fig, os.path.join(directory, "training.png"))]


def diagnostics_plots(result: Mapping[str, Any], directory: str) -> list[str]:
  """One `loop_diagnostics` result as PNGs in `directory` (created if missing)."""
  os.makedirs(directory, exist_ok=True)
  out = []
  fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
  _per_loop(a, result, ["step_size", "fixed_point_gap"], "||update||")
  _per_loop(b, result, ["update_cos"], "cos(update r, update r-1)")
  b.axhline(0, color="k", lw=0.5)
  out.append(_save(fig, os.path.join(directory, "step_size.png")))

  fig, a = plt.subplots(figsize=(4.5, 3.5))
  _per_loop(a, result, ["effective_rank"], "effective rank")
  out.append(_save(fig, os.path.join(directory, "effective_rank.png")))

  fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
  _per_loop(a, result, ["median_rank"], "median rank of the true token")
  _per_loop(b, result, ["kl_prev", "argmax_changes"], "vs loop r-1")
  out.append(_save(fig, os.path.join(directory, "logit_lens.png")))

  fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
  _per_loop(a, result, ["attn_entropy_global", "attn_entropy_local"], "nats")
  a.set_title("attention entropy", fontsize=9)
  _per_loop(
      b,
      result,
      ["attn_kl_global", "attn_kl_local", "head_similarity"],
      "vs loop r-1",
  )
  b.set_title("attention maps vs the previous loop", fontsize=9)
  out.append(_save(fig, os.path.join(directory, "attention.png")))

  heads = result.get("per_head", {})
  if "mean_gate" in heads:
    mean = np.asarray(heads["mean_gate"], float)  # [R, L, H]
    std = np.asarray(heads["gate_std"], float)
    r_loops, n_layers, n_heads = mean.shape
    fig, (a, b) = plt.subplots(
        1, 2, figsize=(9, 3.5), gridspec_kw={"width_ratios": [1, 1.3]}
    )
    layers = np.arange(n_layers)
    for r in range(1, r_loops):
      a.errorbar(
          layers,
          mean[r].mean(-1),
          yerr=std[r].mean(-1),
          fmt="o-",
          capsize=3,
          label=f"loop {r + 1}",
      )
    a.set_xlabel("layer")
    a.set_ylabel("gate (weight on the global branch)")
    a.set_xticks(layers)
    a.set_ylim(0, 1)
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
    a.set_title("mean over heads; bars: mean per-head std", fontsize=9)
    grid = mean[1:].reshape((r_loops - 1) * n_layers, n_heads)
    im = b.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    b.set_yticks(
        range(grid.shape[0]),
        [f"r{r + 2} L{i}" for r in range(r_loops - 1) for i in range(n_layers)],
        fontsize=7,
    )
    b.set_xticks(range(n_heads))
    b.set_xlabel("head")
    b.set_title("mean gate per loop, layer and head", fontsize=9)
    fig.colorbar(im, ax=b)
    out.append(_save(fig, os.path.join(directory, "gate.png")))
  return out


def study_plots(
    rows: Sequence[Mapping[str, Any]], prefix: str
) -> dict[str, str]:
  """The loop study's figures, `<prefix>_quality.png` and `<prefix>_loops.png`.

  `rows`: one per variant with `name`, `loops`, `train_flops`, `decode_flops`, `bpb` (per-seed
  list) and `diagnostics` (per-loop means over seeds: step_size, effective_rank, kl_prev).
  """
  os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
  paths = {}
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  for x_key, ax, label in (
      ("train_flops", axes[0], "training FLOPs (whole run)"),
      ("decode_flops", axes[1], "decode FLOPs per token (at full context)"),
  ):
    for row, color in zip(rows, _colors()):
      bpb = np.asarray(row["bpb"], float)
      x = row[x_key]
      ax.scatter(np.full(bpb.shape, x), bpb, s=12, alpha=0.5, color="gray")
      ax.errorbar(
          x,
          bpb.mean(),
          yerr=bpb.std(ddof=1) if bpb.size > 1 else None,
          fmt="o",
          color=color,
          capsize=4,
          label=row["name"],
      )
      ax.annotate(
          row["name"],
          (x, bpb.mean()),
          textcoords="offset points",
          xytext=(6, 4),
          fontsize=8,
      )
    ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.grid(alpha=0.3, which="both")
  axes[0].set_ylabel("held-out bits per byte (lower is better)")
  axes[0].set_title("quality vs training compute", fontsize=9)
  axes[1].set_title("quality vs decode cost", fontsize=9)
  paths["quality"] = _save(fig, f"{prefix}_quality.png")

  names = ("step_size", "effective_rank", "kl_prev")
  fig, axes = plt.subplots(1, len(names), figsize=(12, 3.5))
  for ax, name in zip(axes, names):
    # markers too: two variants' means can coincide
    for row, color, marker in zip(rows, _colors(), itertools.cycle("osD^v")):
      ys = np.asarray(row["diagnostics"].get(name, []), float)
      if ys.size and not np.all(np.isnan(ys)):
        ax.plot(
            _loops(ys),
            ys,
            f"{marker}-",
            color=color,
            alpha=0.8,
            mfc="none",
            label=row["name"],
        )
    ax.set_xlabel("loop r")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(name, fontsize=9)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  paths["loops"] = _save(fig, f"{prefix}_loops.png")
  return paths


def trace_plots(
    rows: Sequence[Mapping[str, Any]],
    prefix: str,
    baselines: Mapping[str, float] | None = None,
) -> dict[str, str]:
  """The code-tracing study's figures, `<prefix>_accuracy.png` and `<prefix>_loops.png`.

  `rows`: one per variant with `name`, `mean`, `sd` (accuracy per k over seeds), `acc` (per seed
  and k), `train_flops` and `lens` (per loop r and k, the head applied to loop r's state);
  `baselines`: label -> accuracy, drawn as grey lines.
  """
  os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
  paths = {}
  fig, ax = plt.subplots(figsize=(7, 4))
  for row, color, marker in zip(rows, _colors(), itertools.cycle("osD^v")):
    mean, sd = np.asarray(row["mean"]), np.asarray(row["sd"])
    ks = np.arange(1, mean.size + 1)
    ax.plot(ks, mean, f"{marker}-", color=color, mfc="none", label=row["name"])
    ax.fill_between(ks, mean - sd, mean + sd, color=color, alpha=0.15)
  for (label, y), style in zip((baselines or {}).items(), (":", "--", "-.")):
    ax.axhline(y, color="gray", linestyle=style, linewidth=1, label=label)
  ax.set_xlabel("k (chained assignments the answer needs)")
  ax.set_ylabel("held-out exact-match accuracy")
  ax.set_ylim(0, 1.02)
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title("accuracy by k (mean ± sd over seeds)", fontsize=9)
  paths["accuracy"] = _save(fig, f"{prefix}_accuracy.png")

  looped = [r for r in rows if len(r["lens"]) > 1]
  colors = dict(
      zip((r["name"] for r in rows), _colors())
  )  # one colour per variant
  fig, axes = plt.subplots(1, 2, figsize=(12, 4))
  for row, color in zip(rows, colors.values()):
    acc = np.asarray(row["acc"], float).mean(1)  # per seed, over k
    axes[0].scatter(
        np.full(acc.shape, row["train_flops"]),
        acc,
        color=color,
        s=14,
        alpha=0.6,
    )
    axes[0].annotate(
        row["name"],
        (row["train_flops"], acc.mean()),
        textcoords="offset points",
        xytext=(6, 4),
        fontsize=8,
    )
  axes[0].set_xscale("log")
  axes[0].set_xlabel("training FLOPs (whole run)")
  axes[0].set_ylabel("accuracy, mean over k (one point per seed)")
  axes[0].grid(alpha=0.3, which="both")
  axes[0].set_title("accuracy against training compute", fontsize=9)
  for row in looped:
    color = colors[row["name"]]
    lens = np.asarray(row["lens"], float).mean(1)
    axes[1].plot(
        _loops(lens), lens, "o-", color=color, mfc="none", label=row["name"]
    )
  axes[1].set_xlabel("loop r (head applied to loop r's state)")
  axes[1].set_ylabel("accuracy, mean over k")
  axes[1].xaxis.set_major_locator(MaxNLocator(integer=True))
  axes[1].grid(alpha=0.3)
  if looped:
    axes[1].legend(fontsize=8)
  axes[1].set_title("where the answer appears, loop by loop", fontsize=9)
  paths["loops"] = _save(fig, f"{prefix}_loops.png")
  return paths
