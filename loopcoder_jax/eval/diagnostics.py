"""Loop-count diagnostics (LoopCoder-v2 section 4; spec section 6) from one forward pass.

All statistics are over the real tokens of a batch (`mask`), per loop r = 1..R:
  step_size[r]      mean_t ||h(r)_t - h(r-1)_t||, with h(0) = E (loop 1's input)
  update_cos[r]     mean_t cos(h(r) - h(r-1), h(r-1) - h(r-2)) for r >= 2 (< 0: oscillation)
  effective_rank[r] exp(entropy of the normalised singular values) of RMSNorm(h(r)) per sequence
  fixed_point_gap[r] mean_t ||h(r)_t - f(h(r))_t||, f = one more loop (needs gate params: R >= 2)
  clp_mismatch[r]   Omega(r) = mean_t ||h(r-1)_t - h(r-1)_{t-1}|| for r >= 2 (the CLP offset cost)
  mean_gate[r]      mean weight on the global branch for r >= 2
  logit lens (p(r) = softmax(head(N(h(r))))): median_rank[r] of the true next token,
  kl_prev[r] = KL(p(r) || p(r-1)), entropy[r], argmax_changes[r] (fraction of tokens whose top-1
  prediction changes from loop r-1 to r), and most_changed[r]: the fraction of tokens for which
  loop r moves the distribution most (largest KL from its predecessor).
Attention-map statistics (per-head entropy, inter-loop KL) need per-layer attention maps, which
the model does not materialise; they are not computed here.

The statistics that compare a loop with the one before it (`FROM_LOOP_2`) are not applicable to
loop 1: NaN there in the result, "-" in the table and null in `for_json`. Any other NaN is a
real one (non-finite activations) and shows as "nan".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from loopcoder_jax.model.config import PLTConfig
from loopcoder_jax.model.transformer import PLTForCausalLM

FROM_LOOP_2 = (
    "update_cos",
    "mean_gate",
    "clp_mismatch",
    "kl_prev",
    "argmax_changes",
    "most_changed",
)


def _masked_mean(x, mask):
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _effective_rank(h_SxD):
  x = h_SxD.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)
  s = jnp.linalg.svd(x, compute_uv=False)
  p = s / jnp.maximum(jnp.sum(s), 1e-12)
  return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(p), 0.0)))


@functools.partial(jax.jit, static_argnums=0)
def _loop_stats(cfg: PLTConfig, params, tokens, targets, mask, segment_ids):
  r = cfg.plt_num_loops
  # one more loop, same params: f(h(R))
  deeper = cfg.replace(plt_num_loops=r + 1)
  model = PLTForCausalLM(deeper if r > 1 else cfg)
  _, aux = model.apply(
      {"params": params}, tokens, segment_ids, return_intermediates=True
  )
  v = {"params": params}
  e = jnp.asarray(model.apply(v, tokens, method=PLTForCausalLM.embed))
  e = e.astype(jnp.float32)
  hs = aux["hidden"].astype(jnp.float32)  # [R(+1), B, S, d]
  states = jnp.concatenate([e[None], hs[:r]], 0)  # h(0) = E, h(1..R)
  updates = states[1:] - states[:-1]

  def norm(x):
    return jnp.linalg.norm(x, axis=-1)

  out = {"step_size": jax.vmap(lambda u: _masked_mean(norm(u), mask))(updates)}
  cos = jnp.sum(updates[1:] * updates[:-1], -1) / jnp.maximum(
      norm(updates[1:]) * norm(updates[:-1]), 1e-12
  )
  out["update_cos"] = jnp.concatenate(
      [jnp.full((1,), jnp.nan), jax.vmap(lambda c: _masked_mean(c, mask))(cos)]
  )
  out["effective_rank"] = jax.vmap(
      lambda h: jnp.mean(jax.vmap(_effective_rank)(h))
  )(hs[:r])
  if r > 1:
    # f(h(r)) = h(r+1), the last one from the extra loop
    gaps = hs[1:] - hs[:-1]
    out["fixed_point_gap"] = jax.vmap(lambda u: _masked_mean(norm(u), mask))(
        gaps
    )
    out["mean_gate"] = jnp.concatenate(
        [
            jnp.full((1,), jnp.nan),
            jnp.mean(aux["gates"][: r - 1], axis=(1, 2, 3, 4)),
        ]
    )
  pair_mask = mask[:, 1:] * mask[:, :-1]
  omega = [
      _masked_mean(norm(h[:, 1:] - h[:, :-1]), pair_mask) for h in hs[: r - 1]
  ]
  out["clp_mismatch"] = jnp.stack([jnp.float32(jnp.nan)] + omega)

  logp = jax.vmap(
      lambda h: jax.nn.log_softmax(
          jnp.asarray(model.apply(v, h, method=PLTForCausalLM.logits))
      )
  )(hs[:r])
  true_lp = jnp.take_along_axis(logp, targets[None, ..., None], -1)[..., 0]
  rank = jnp.sum(logp > true_lp[..., None], -1)  # 0 = top-1
  out["entropy"] = jax.vmap(
      lambda lp: _masked_mean(-jnp.sum(jnp.exp(lp) * lp, -1), mask)
  )(logp)
  out["nll"] = jax.vmap(lambda t: _masked_mean(-t, mask))(true_lp)
  kl = jnp.sum(jnp.exp(logp[1:]) * (logp[1:] - logp[:-1]), -1)  # [R-1, B, S]
  out["kl_prev"] = jnp.concatenate(
      [jnp.full((1,), jnp.nan), jax.vmap(lambda k: _masked_mean(k, mask))(kl)]
  )
  top = jnp.argmax(logp, -1)
  changes = jax.vmap(
      lambda a, b: _masked_mean((a != b).astype(jnp.float32), mask)
  )(top[1:], top[:-1])
  out["argmax_changes"] = jnp.concatenate([jnp.full((1,), jnp.nan), changes])
  if r > 1:
    winner = jax.nn.one_hot(jnp.argmax(kl, 0), r - 1)  # [B, S, R-1]
    most = jnp.sum(winner * mask[..., None], (0, 1)) / jnp.maximum(
        jnp.sum(mask), 1.0
    )
    out["most_changed"] = jnp.concatenate([jnp.full((1,), jnp.nan), most])
  return out, rank


def loop_diagnostics(cfg: PLTConfig, params, batches) -> dict[str, list[float]]:
  """Per-loop statistics averaged over `batches` (dicts with inputs, targets, loss_mask and
  optionally segment_ids, as the data pipeline yields). Returns {name: [value for loop 1..R]}.
  """
  sums: dict[str, np.ndarray] = {}
  ranks, n = [], 0
  for batch in batches:
    mask = jnp.asarray(batch["loss_mask"], jnp.float32)
    stats, rank = _loop_stats(
        cfg,
        params,
        jnp.asarray(batch["inputs"]),
        jnp.asarray(batch["targets"]),
        mask,
        None
        if batch.get("segment_ids") is None
        else jnp.asarray(batch["segment_ids"]),
    )
    for k, val in stats.items():
      sums[k] = sums.get(k, 0) + np.asarray(val, np.float64)
    keep = np.asarray(mask) > 0
    ranks.append(np.asarray(rank)[:, keep])
    n += 1
  if n == 0:
    raise ValueError("loop_diagnostics: no batches given")
  result = {k: [float(x) for x in v / n] for k, v in sums.items()}
  result["median_rank"] = [
      float(x) for x in np.median(np.concatenate(ranks, axis=1), axis=1)
  ]
  return result


def for_json(result: dict[str, list[float]]) -> dict[str, list[float | None]]:
  """`result` with the not-applicable entries (loop 1 of `FROM_LOOP_2`) as None."""
  return {
      name: [
          None if r == 0 and name in FROM_LOOP_2 else x for r, x in enumerate(v)
      ]
      for name, v in result.items()
  }


def format_table(result: dict[str, list[float]]) -> str:
  loops = len(result["step_size"])
  names = sorted(result)
  width = max(len(n) for n in names)
  lines = [
      f"{'metric':<{width}} "
      + " ".join(f"{f'loop {r + 1}':>10}" for r in range(loops))
  ]
  for name, values in sorted(for_json(result).items()):
    cells = " ".join(f"{'-' if x is None else f'{x:.4g}':>10}" for x in values)
    lines.append(f"{name:<{width}} {cells}")
  return "\n".join(lines)
