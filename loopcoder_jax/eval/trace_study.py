"""When does another loop pay, on a task that needs depth: the code-tracing loop study.

The task (`data/trace.py`): the value a snippet prints needs k chained assignments, k = 1..max_k,
among shuffled distractors. Every variant trains on the same mix of k and is scored by exact-match
accuracy per k on held-out snippets.

Variants (`plan`), all on the same L-layer weight shapes unless said:
  R1 .. R<n>      R loops of the L layers (PLT, cross-loop parallelism)
  R<r>-serial     R = r loops without cross-loop parallelism (`plt_cross_loop=False`: loop r at t
                  reads loop r-1 at t): what CLP costs in depth
  R1-L<r*L>       unlooped, r x L layers: the same FLOPs per token as R = r, r times the parameters
Each variant gets a learning-rate sweep on one seed (`sweep.seed`), the best rate on the `val` split
(mean accuracy over k, then lower answer loss), and the other seeds at that rate. A run's batches
and initial weights depend on its seed only, so the variants of a seed see the same snippets.

Study directory (rerunning resumes: a finished run is read back, an interrupted one continues from
its last saved state):
  study.json          the plan and the config
  sessions.jsonl      wall and CPU seconds of every invocation
  pool.npz            the training snippets, generated once (`train.pool` of them)
  <variant>/lr<lr>-s<seed>/  state.msgpack while training, result.json when done
`results` gathers every finished run; `eval/trace_report.py` writes the report.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import functools
import json
import os
import time
from typing import Any

import ml_collections
import numpy as np

from loopcoder_jax.data import trace
from loopcoder_jax.eval.loop_study import (  # the studies' result files
    _read_json,
    _write_json,
)
from loopcoder_jax.model.config import PLTConfig

DIAG_KEYS = (
    "step_size",
    "update_cos",
    "effective_rank",
    "clp_mismatch",
    "clp_state_ratio",
    "kl_prev",
    "attn_kl_global",
    "mean_gate",
)


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  loops: int
  layers: int
  cross_loop: bool = True
  matches: int = (
      0  # an unlooped control: the loop count whose FLOPs per token it matches
  )


def model_config(c: ml_collections.ConfigDict, v: Variant) -> PLTConfig:
  m = dict(c.model.to_dict())
  del m["num_hidden_layers"]  # the variant's
  m.update(c.runtime.to_dict() if "runtime" in c else {})
  return PLTConfig.tiny(
      loops=v.loops,
      vocab_size=len(trace.VOCAB),
      num_hidden_layers=v.layers,
      plt_cross_loop=v.cross_loop,
      max_position_embeddings=trace.seq_len(c.data.lines, c.data.queries),
      **m,
  )


def plan(c: ml_collections.ConfigDict) -> list[Variant]:
  """The variants of a study config (module docstring), checked: one ValueError per bad value."""
  s = c.study
  loops, controls, serial = list(s.loops), list(s.controls), list(s.serial)
  if not loops or len(set(loops)) != len(loops) or min(loops) < 1:
    raise ValueError(f"study.loops must be distinct integers >= 1, got {loops}")
  for name, rs in (("controls", controls), ("serial", serial)):
    if any(r < 2 for r in rs) or len(set(rs)) != len(rs):
      raise ValueError(
          f"study.{name} must be distinct loop counts >= 2, got {rs}"
      )
  n = c.model.num_hidden_layers
  out = [Variant(f"R{r}", r, n) for r in sorted(loops)]
  out += [
      Variant(f"R{r}-serial", r, n, cross_loop=False) for r in sorted(serial)
  ]
  out += [
      Variant(f"R1-L{r * n}", 1, r * n, matches=r) for r in sorted(controls)
  ]
  return out


def check(c: ml_collections.ConfigDict) -> list[Variant]:
  """Every value of a study config, before any work."""
  from loopcoder_jax.train import optim

  d, t, sw = c.data, c.train, c.sweep
  if not 1 <= d.max_k < d.lines <= 26:
    # at k = lines the snippet is the chain alone: its answer is the sum of every step on the
    # page, which needs no depth, so every snippet keeps a distractor line
    raise ValueError(
        f"data: need 1 <= max_k ({d.max_k}) < lines ({d.lines}) <= 26"
    )
  for key in ("steps", "batch", "pool", "save_every"):
    if t[key] < 1:
      raise ValueError(f"train.{key} must be >= 1, got {t[key]}")
  if not 0 <= d.drill_steps <= t.steps:
    raise ValueError(
        f"data.drill_steps must be in 0..train.steps ({t.steps}), got {d.drill_steps}"
    )
  if not 0 <= d.drill_frac < 1:
    raise ValueError(f"data.drill_frac must be in [0, 1), got {d.drill_frac}")
  if d.drill_size < 1 or d.drill_fill < 0:
    raise ValueError(
        f"data: need drill_size >= 1 and drill_fill >= 0, got {d.drill_size}, {d.drill_fill}"
    )
  if (d.drill_steps or d.drill_frac) and not 1 <= trace.drills_per_row(
      d.drill_size, d.lines, d.queries, d.drill_fill
  ):
    raise ValueError(
        f"data.drill_size={d.drill_size}, drill_fill={d.drill_fill}: a lookup drill of that "
        f"many constants and steps does not fit a row of {trace.seq_len(d.lines, d.queries)} "
        "tokens"
    )
  for key in ("val_per_k", "test_per_k", "batch", "diag_rows"):
    if c.eval[key] < 1:
      raise ValueError(f"eval.{key} must be >= 1, got {c.eval[key]}")
  lrs = list(sw.lrs)
  if not lrs or len(set(lrs)) != len(lrs) or min(lrs) <= 0:
    raise ValueError(f"sweep.lrs must be distinct rates > 0, got {lrs}")
  seeds = list(c.study.seeds)
  if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
    raise ValueError(f"study.seeds must be distinct integers >= 0, got {seeds}")
  if sw.seed not in seeds:
    raise ValueError(f"sweep.seed={sw.seed} must be one of study.seeds {seeds}")
  for lr in lrs:
    optim.validate_optim_config({**c.optim.to_dict(), "peak_lr": lr})
  variants = plan(c)
  for v in variants:
    model_config(c, v)  # PLTConfig's own one-line errors
  return variants


def run_name(v: Variant, lr: float, seed: int) -> str:
  return os.path.join(v.name, f"lr{lr:g}-s{seed}")


def _pool(c, study_dir: str) -> dict[str, np.ndarray]:
  """The training rows, generated once per study (seeded by `data.seed`): `train.pool` snippets,
  and as many lookup drills under `drill/<key>` when the curriculum has any."""
  path = os.path.join(study_dir, "pool.npz")
  if os.path.exists(path):
    with np.load(path) as z:
      return dict(z)
  ks = range(1, c.data.max_k + 1)
  d = c.data
  snippets = trace.sample(
      d.seed, 0, c.train.pool, ks, d.lines, d.queries, "train"
  )
  from loopcoder_jax.train.step import BATCH_KEYS

  rows = trace.batch(snippets, d.lines, d.queries)
  arrays: dict[str, Any] = {k: rows[k] for k in BATCH_KEYS}
  if d.drill_steps or d.drill_frac:
    per_row = trace.drills_per_row(
        d.drill_size, d.lines, d.queries, d.drill_fill
    )
    drills = trace.sample_drills(
        d.seed, c.train.pool * per_row, d.drill_size, d.drill_fill
    )
    groups = [drills[i : i + per_row] for i in range(0, len(drills), per_row)]
    drill_rows = trace.packed_batch(groups, d.lines, d.queries)
    arrays.update({f"drill/{k}": drill_rows[k] for k in BATCH_KEYS})
  # invocations with `only` may build it at once
  tmp = f"{path}.{os.getpid()}.tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)
  return arrays


def batch_rows(c, pool, seed: int, s: int) -> dict[str, np.ndarray]:
  """Training batch `s` of a run: drawn from the pool by (seed, s), so a resumed run sees the
  batches it would have seen. The curriculum: the first `data.drill_steps` batches are lookup
  drills only, later ones `data.drill_frac` drills (rounded to rows) and snippets for the rest.
  """
  from loopcoder_jax.train.step import BATCH_KEYS

  rng = np.random.default_rng([seed, s])
  b, d = c.train.batch, c.data
  drills = b if s < d.drill_steps else int(round(d.drill_frac * b))
  parts = []
  for prefix, n in (("drill/", drills), ("", b - drills)):
    if n:
      idx = rng.integers(len(pool[f"{prefix}inputs"]), size=n)
      parts.append({k: pool[prefix + k][idx] for k in BATCH_KEYS})
  return {k: np.concatenate([p[k] for p in parts]) for k in BATCH_KEYS}


def _held_out(c, split: str, per_k: int) -> dict[str, np.ndarray]:
  ks = list(range(1, c.data.max_k + 1))
  d = c.data
  snippets = trace.sample(
      d.seed, 1, per_k * len(ks), ks, d.lines, d.queries, split
  )
  return trace.batch(snippets, d.lines, d.queries)


def run_study(
    c: ml_collections.ConfigDict,
    study_dir: str,
    log: Callable[[str], None] = print,
    only: Sequence[str] = (),
) -> list[dict[str, Any]]:
  """The sweep, then the seeds at each variant's best rate; returns every finished run's result.

  `only` (variant names) runs just those variants: each variant's sweep and seeds depend on no
  other variant, so invocations with disjoint `only` can share a study directory and run at once.
  """
  variants = check(c)
  unknown = sorted(set(only) - {v.name for v in variants})
  if unknown:
    raise ValueError(
        f"unknown variants {unknown}; this study has {[v.name for v in variants]}"
    )
  study_dir = os.path.abspath(study_dir)
  os.makedirs(study_dir, exist_ok=True)
  plan_path = os.path.join(study_dir, "study.json")
  stored = (
      _read_json(plan_path)["config"] if os.path.exists(plan_path) else None
  )
  config = json.loads(c.to_json())
  if stored is not None and stored != config:
    raise ValueError(
        f"{study_dir} holds a study of another config (study.json differs); "
        "use a new study directory"
    )
  _write_json(
      plan_path,
      dict(variants=[dataclasses.asdict(v) for v in variants], config=config),
  )
  if only:
    variants = [v for v in variants if v.name in only]
  t0, c0 = time.time(), time.process_time()
  try:
    pool = _pool(c, study_dir)
    sets = {
        "val": _held_out(c, "val", c.eval.val_per_k),
        "test": _held_out(c, "test", c.eval.test_per_k),
    }
    results = []
    sweep = [(v, lr, c.sweep.seed) for v in variants for lr in c.sweep.lrs]
    for i, (v, lr, seed) in enumerate(sweep):
      log(f"[sweep {i + 1}/{len(sweep)}] {v.name} lr {lr:g} seed {seed}")
      results.append(_run(c, v, lr, seed, study_dir, pool, sets, log))
    best = best_rates(results)
    rest = [(v, best[v.name], s) for v in variants for s in c.study.seeds]
    rest = [r for r in rest if r[2] != c.sweep.seed]
    for i, (v, lr, seed) in enumerate(rest):
      log(f"[seeds {i + 1}/{len(rest)}] {v.name} lr {lr:g} seed {seed}")
      results.append(_run(c, v, lr, seed, study_dir, pool, sets, log))
  finally:
    with open(os.path.join(study_dir, "sessions.jsonl"), "a") as f:
      f.write(
          json.dumps(
              dict(
                  wall_s=time.time() - t0,
                  cpu_s=time.process_time() - c0,
                  start=t0,  # invocations may overlap (`only`): the report merges them
              )
          )
          + "\n"
      )
  return results


def best_rates(results: Sequence[dict[str, Any]]) -> dict[str, float]:
  """Per variant, the swept rate with the highest mean val accuracy (then the lower val loss)."""
  best: dict[str, tuple] = {}
  for r in results:
    key = (np.mean(r["val_acc"]), -r["val_nll"])
    if r["variant"] not in best or key > best[r["variant"]][0]:
      best[r["variant"]] = (key, r["lr"])
  return {name: lr for name, (_, lr) in best.items()}


def _run(c, v: Variant, lr: float, seed: int, study_dir, pool, sets, log):
  run_dir = os.path.join(study_dir, run_name(v, lr, seed))
  path = os.path.join(run_dir, "result.json")
  if os.path.exists(path):
    return _read_json(path)
  os.makedirs(run_dir, exist_ok=True)
  from loopcoder_jax.model import flops

  cfg = model_config(c, v)
  t0, c0 = time.time(), time.process_time()
  params, losses = train_run(c, cfg, lr, seed, pool, run_dir)
  train_s = (time.time() - t0, time.process_time() - c0)
  val = evaluate(cfg, params, sets["val"], c.eval.batch, c.data.max_k)
  test = evaluate(cfg, params, sets["test"], c.eval.batch, c.data.max_k)
  diag = _diagnostics(cfg, params, sets["test"], c.eval.diag_rows)
  seq = trace.seq_len(c.data.lines, c.data.queries) - 1
  tokens = c.train.steps * c.train.batch * seq
  result = dict(
      variant=v.name,
      **dataclasses.asdict(v),
      lr=lr,
      seed=seed,
      params=cfg.num_params(),
      steps=c.train.steps,
      tokens=tokens,
      train_flops=flops.train_flops_per_token(cfg, seq) * tokens,
      final_loss=losses[-1],
      diverged=not np.isfinite(losses[-1]),
      val_acc=val["acc"],
      val_nll=val["nll"],
      test_acc=test["acc"],
      test_nll=test["nll"],
      lens_acc=test["lens_acc"],
      diagnostics=diag,
      train_wall_s=train_s[0],
      train_cpu_s=train_s[1],
      wall_s=time.time() - t0,
      cpu_s=time.process_time() - c0,
  )
  _write_json(path, result)
  state = os.path.join(run_dir, "state.msgpack")
  if os.path.exists(state):
    os.remove(state)  # the result stands; the optimizer state is 3x the weights
  log(
      f"{v.name} lr {lr:g} seed {seed}: test accuracy by k "
      + " ".join(f"{a:.2f}" for a in test["acc"])
      + f" ({result['wall_s']:.0f}s)"
  )
  return result


def train_run(c, cfg: PLTConfig, lr: float, seed: int, pool, run_dir: str):
  """Trains one run with the library's step (`train.step`) on `batch_rows`, saving its state every
  `train.save_every` steps. Returns (params, the loss of every step run in this call).
  """
  import flax.serialization
  import jax

  from loopcoder_jax.train import step

  t = c.train
  optim_items = tuple(sorted({**c.optim.to_dict(), "peak_lr": lr}.items()))
  init_fn, step_fn, mesh = _train_fns(cfg, optim_items, t.steps)
  state = init_fn(jax.random.key(seed))
  path = os.path.join(run_dir, "state.msgpack")
  if os.path.exists(path):
    with open(path, "rb") as f:
      state = flax.serialization.from_bytes(jax.device_get(state), f.read())
  losses = [float("nan")]
  for s in range(int(state.step), t.steps):
    rows = batch_rows(c, pool, seed, s)
    state, metrics = step_fn(state, step.global_batch(rows, mesh))
    losses.append(float(metrics["loss"]))
    if (s + 1) % t.save_every == 0 and s + 1 < t.steps:
      with open(f"{path}.tmp", "wb") as f:
        f.write(flax.serialization.to_bytes(jax.device_get(state)))
      os.replace(f"{path}.tmp", path)
  return state.params, losses


@functools.cache
def _train_fns(cfg: PLTConfig, optim_items: tuple, steps: int):
  """The jitted init and step of a (model, optimizer, length): seeds of one variant and rate share
  them, so they compile once."""
  from loopcoder_jax.model import sharding
  from loopcoder_jax.train import optim, step

  tx, _ = optim.make_optimizer(dict(optim_items), steps)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  init_fn, step_fn, _ = step.make_train_fns(cfg, tx, mesh)
  return init_fn, step_fn, mesh


@functools.cache
def _eval_fn(cfg: PLTConfig):
  import jax
  import jax.numpy as jnp

  from loopcoder_jax.model.transformer import PLTForCausalLM

  model = PLTForCausalLM(cfg)

  @jax.jit
  def f(params, rows):
    v = {"params": params}
    _, aux = model.apply(
        v,
        rows["inputs"],
        rows["segment_ids"],
        rows["positions"],
        return_intermediates=True,
    )
    b = rows["inputs"].shape[0]
    at_BxQ = jnp.maximum(
        rows["answer_at"], 0
    )  # -1 (no such print) is dropped later
    h_RxBxQxd = aux["hidden"][:, jnp.arange(b)[:, None], at_BxQ]
    logp = jax.nn.log_softmax(
        model.apply(v, h_RxBxQxd, method=PLTForCausalLM.logits), -1
    )
    answer = jnp.maximum(rows["answer"], 0)
    correct = jnp.argmax(logp, -1) == answer[None]
    nll = -jnp.take_along_axis(logp[-1], answer[..., None], -1)[..., 0]
    return correct, nll

  return f


def evaluate(cfg: PLTConfig, params, rows, batch: int, max_k: int):
  """Exact-match accuracy per k (the last loop), the answer's mean NLL, and per loop r the accuracy
  of the head applied to loop r's output (`lens_acc[r][k]`, the logit lens at the answer).
  """
  f = _eval_fn(cfg)
  keys = ("inputs", "segment_ids", "positions", "answer_at", "answer")
  corrects, nlls = [], []
  for i in range(0, len(rows["inputs"]), batch):
    correct, nll = f(params, {k: rows[k][i : i + batch] for k in keys})
    corrects.append(np.asarray(correct))
    nlls.append(np.asarray(nll))
  asked = rows["k"] >= 0
  correct_RxN = np.concatenate(corrects, 1)[:, asked]
  ks = rows["k"][asked]
  per_k = [
      [float(correct_RxN[r, ks == k].mean()) for k in range(1, max_k + 1)]
      for r in range(correct_RxN.shape[0])
  ]
  return dict(
      acc=per_k[-1],
      nll=float(np.concatenate(nlls)[asked].mean()),
      lens_acc=per_k,
  )


def _diagnostics(cfg: PLTConfig, params, rows, n: int) -> dict[str, list]:
  """`eval.diagnostics` over the real tokens of `n` held-out snippets (all k)."""
  from loopcoder_jax.eval import diagnostics

  idx = np.linspace(0, len(rows["inputs"]) - 1, n).astype(int)
  b = {
      k: rows[k][idx] for k in ("inputs", "targets", "segment_ids", "positions")
  }
  b["loss_mask"] = b["segment_ids"].astype(np.float32)
  d = diagnostics.loop_diagnostics(cfg, params, [b])
  return {
      k: [None if np.isnan(x) else x for x in d[k]] for k in DIAG_KEYS if k in d
  }
