"""Loop-count diagnostics (LoopCoder-v2 section 4; spec section 6) from one forward pass.

Every statistic runs over the real tokens of a batch (`loss_mask` 1) and never across a packed
document boundary (`segment_ids`). Per loop r = 1..R, h(0) = E (loop 1's input):
  step_size[r]      mean_t ||h(r)_t - h(r-1)_t||
  update_cos[r]     mean_t cos(h(r) - h(r-1), h(r-1) - h(r-2)) for r >= 2 (< 0: oscillation)
  effective_rank[r] exp(entropy of the normalised singular values) of RMSNorm(h(r)) over the real
                    tokens of one document piece, averaged over pieces weighted by their tokens
  fixed_point_gap[r] mean_t ||h(r)_t - f(h(r))_t||, f = one more loop (needs gate params: R >= 2)
  clp_mismatch[r]   Omega(r) = mean ||h(r-1)_t - h(r-1)_{t-1}|| over adjacent real pairs of one
                    document, r >= 2 (the CLP offset cost)
  clp_state_ratio[r] mean ||b P(r-1)_{t-1}|| / ||a E_t|| over the same pairs, r >= 2 (how much the
                    carried state outweighs the token's own embedding in loop r's input; P(r-1)_t
                    without cross-loop parallelism)
  mean_gate[r], gate_std[r]  per head: mean and standard deviation over tokens of the weight on the
                    global branch; per loop: their mean over layers and heads (r >= 2)
  logit lens (p(r) = softmax(head(N(h(r))))): median_rank[r] of the true next token,
  kl_prev[r] = KL(p(r) || p(r-1)), entropy[r], nll[r], argmax_changes[r] (fraction of tokens whose
  top-1 prediction changes from loop r-1 to r), and most_changed[r]: the fraction of tokens for which
  loop r moves the distribution most (largest KL from its predecessor).
Attention maps (`MapsKV`): A(r) is a head's softmax over key positions for query t.
  G(1) is loop 1's causal map over its own K/V; G(r >= 2) the global branch's map over loop 1's
  K/V (the same keys as G(1), other queries); W(r >= 2) the local branch's map over loop r's own
  K/V in the window (the same positions as W(r-1), other keys).
  attn_entropy_global[r], attn_entropy_local[r]  mean_t of -sum_s A_ts log A_ts
  attn_kl_global[r] = mean_t KL(G(r)_t || G(r-1)_t), r >= 2 (same keys; r = 2 compares with loop 1)
  attn_kl_local[r]  = mean_t KL(W(r)_t || W(r-1)_t), r >= 3 (same positions, each loop's own keys)
  head_similarity[r] per layer `[H, H]`: mean_t cos(G(r)_t of head i, G(r-1)_t of head j), r >= 2;
                    per loop: the mean of the diagonal (heads keeping their pattern)
Per-loop figures of the attention maps and the gate are means over layers and heads;
`result["per_head"]` holds them per loop, layer and head (`[R][L][H]`, head similarity
`[R][L][H][H]`).

A loop before the first where a statistic is defined (`DEFINED_FROM`; `fixed_point_gap` needs
R >= 2) holds NaN in the result, "-" in the table and null in `for_json`. Any other NaN is a real
one (non-finite activations) and shows as "nan".
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from loopcoder_jax.model.config import PLTConfig
from loopcoder_jax.model.kv import SequenceKV
from loopcoder_jax.model.transformer import PLTForCausalLM
from pallas_kernels.reference import (
    attention_output,
    attention_probs,
    blend,
    dense_mask,
)


@flax.struct.dataclass
class MapsKV(SequenceKV):
  """`SequenceKV` that also hands out each layer's attention probabilities.

  Both branches are computed densely with the reference math, so the forward is the training
  forward (up to the float rounding of the blocked local branch). After the forward, `maps` holds
  one dict per loop of `[L, B, H, S, S]` f32 arrays: "global" (G(r) of the module docstring) and,
  for loops >= 2, "local" (W(r)). Memory: O(R L B H S^2).
  """

  maps: tuple = ()

  def for_pass(self, loops):
    return super().for_pass(loops).replace(maps=())

  def attend(self, xs_i, q, k, v, gate):
    b, s = q.shape[:2]
    seg = (
        jnp.zeros((b, s), jnp.int32)
        if self.segment_ids is None
        else self.segment_ids.astype(jnp.int32)
    )
    causal = dense_mask(seg, s, None)
    if self.loops == (0,):
      y, p = _attend(q, k, v, causal)
      return y, ({}, {"k": k, "v": v, "global": p})
    yg, pg = _attend(q, xs_i["k1"], xs_i["v1"], causal)
    yl, pl = _attend(q, k, v, dense_mask(seg, s, self.left))
    return blend(gate, yg, yl), ({}, {"global": pg, "local": pl})

  def after_pass(self, loops, listed, stacked, clp=None):
    out = super().after_pass(loops, listed, stacked, clp)
    maps = {n: stacked[n] for n in ("global", "local") if n in stacked}
    return out.replace(maps=out.maps + (maps,))


def _attend(q, k, v, mask):
  probs = attention_probs(q, k, mask)  # [B, K, G, S, T]
  b, kv_heads, g, s, t = probs.shape
  out = attention_output(probs, v).astype(q.dtype)
  return out, probs.reshape(b, kv_heads * g, s, t)


# The first loop (1-based) at which a statistic is defined; the others are defined from loop 1.
DEFINED_FROM = {
    "update_cos": 2,
    "clp_mismatch": 2,
    "clp_state_ratio": 2,
    "mean_gate": 2,
    "gate_std": 2,
    "kl_prev": 2,
    "argmax_changes": 2,
    "most_changed": 2,
    "attn_entropy_local": 2,
    "attn_kl_global": 2,
    "attn_kl_local": 3,
    "head_similarity": 2,
}


def _masked_mean(x, mask):
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _head_mean(x_LxBxHxS, mask_BxS):
  """`[L, H]` means over the real query tokens."""
  n = jnp.maximum(jnp.sum(mask_BxS), 1.0)
  return jnp.einsum("lbhs,bs->lh", x_LxBxHxS, mask_BxS) / n


def _entropy(p):
  return -jnp.sum(jnp.where(p > 0, p * jnp.log(p), 0.0), -1)


def _kl(p, q):
  # q > 0 wherever p > 0 (both maps share their mask); the floor only guards an underflow
  log_q = jnp.log(jnp.maximum(q, 1e-30))
  return jnp.sum(jnp.where(p > 0, p * (jnp.log(p) - log_q), 0.0), -1)


def _head_similarity(a_LxBxHxSxT, b_LxBxHxSxT, mask_BxS):
  """`[L, H, H]`: mean over real queries of cos(head i of a, head j of b)."""
  dots = jnp.einsum("lbhst,lbgst->lbhgs", a_LxBxHxSxT, b_LxBxHxSxT)
  na = jnp.linalg.norm(a_LxBxHxSxT, axis=-1)  # [L, B, H, S]
  nb = jnp.linalg.norm(b_LxBxHxSxT, axis=-1)
  cos = dots / jnp.maximum(na[:, :, :, None] * nb[:, :, None], 1e-12)
  n = jnp.maximum(jnp.sum(mask_BxS), 1.0)
  return jnp.einsum("lbhgs,bs->lhg", cos, mask_BxS) / n


@functools.partial(jax.jit, static_argnums=0)
def _loop_stats(
    cfg: PLTConfig, params, tokens, targets, mask, segment_ids, positions
):
  r = cfg.plt_num_loops
  # one more loop, same params: f(h(R))
  model = PLTForCausalLM(cfg.replace(plt_num_loops=r + 1) if r > 1 else cfg)
  v = {"params": params}
  _, aux = model.apply(
      v,
      tokens,
      segment_ids,
      positions,
      kv=MapsKV.for_config(model.cfg, segment_ids),
      return_intermediates=True,
  )
  e = jnp.asarray(model.apply(v, tokens, method=PLTForCausalLM.embed))
  e = e.astype(jnp.float32)
  hs = aux["hidden"].astype(jnp.float32)  # [R(+1), B, S, d]
  states = jnp.concatenate([e[None], hs[:r]], 0)  # h(0) = E, h(1..R)
  updates = states[1:] - states[:-1]
  nan = jnp.full((1,), jnp.nan)

  def norm(x):
    return jnp.linalg.norm(x, axis=-1)

  out = {"step_size": jax.vmap(lambda u: _masked_mean(norm(u), mask))(updates)}
  cos = jnp.sum(updates[1:] * updates[:-1], -1) / jnp.maximum(
      norm(updates[1:]) * norm(updates[:-1]), 1e-12
  )
  out["update_cos"] = jnp.concatenate(
      [nan, jax.vmap(lambda c: _masked_mean(c, mask))(cos)]
  )
  if r > 1:
    # f(h(r)) = h(r+1), the last one from the extra loop
    gaps = hs[1:] - hs[:-1]
    out["fixed_point_gap"] = jax.vmap(lambda u: _masked_mean(norm(u), mask))(
        gaps
    )
  # pairs (t-1, t) of real tokens of one document
  same_doc = (
      1.0
      if segment_ids is None
      else (segment_ids[:, 1:] == segment_ids[:, :-1]).astype(jnp.float32)
  )
  pair_mask = mask[:, 1:] * mask[:, :-1] * same_doc
  omega = [
      _masked_mean(norm(h[:, 1:] - h[:, :-1]), pair_mask) for h in hs[: r - 1]
  ]
  out["clp_mismatch"] = jnp.stack([jnp.float32(jnp.nan)] + omega)
  if r > 1:
    # loop r's input a * E_t + b * P(r-1)_{t-1}: the weight of the carried state in it
    p = jax.vmap(
        lambda h: jnp.asarray(
            model.apply(v, h, method=PLTForCausalLM.clp_state)
        ).astype(jnp.float32)
    )(hs[: r - 1])
    # serial looping (no CLP) carries P(r-1) of the same position
    carried = p[:, :, :-1] if cfg.plt_cross_loop else p[:, :, 1:]
    ratio = norm(cfg.hidden_scale * carried) / jnp.maximum(
        norm(cfg.emb_scale * e[:, 1:]), 1e-12
    )
    out["clp_state_ratio"] = jnp.concatenate(
        [nan, jax.vmap(lambda x: _masked_mean(x, pair_mask))(ratio)]
    )

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
      [nan, jax.vmap(lambda k: _masked_mean(k, mask))(kl)]
  )
  top = jnp.argmax(logp, -1)
  changes = jax.vmap(
      lambda a, b: _masked_mean((a != b).astype(jnp.float32), mask)
  )(top[1:], top[:-1])
  out["argmax_changes"] = jnp.concatenate([nan, changes])
  if r > 1:
    winner = jax.nn.one_hot(jnp.argmax(kl, 0), r - 1)  # [B, S, R-1]
    most = jnp.sum(winner * mask[..., None], (0, 1)) / jnp.maximum(
        jnp.sum(mask), 1.0
    )
    out["most_changed"] = jnp.concatenate([nan, most])
  per_head = _map_stats(aux["kv"].maps[:r], aux["gates"], mask)
  return out, per_head, rank, hs[:r]


def _map_stats(maps, gates, mask):
  """Per-head statistics `[R, L, H]` (head similarity `[R, L, H, H]`), NaN where undefined."""
  r = len(maps)
  glob = [m["global"] for m in maps]  # each [L, B, H, S, S]
  n_layers, _, n_heads = glob[0].shape[:3]
  undefined = jnp.full((n_layers, n_heads), jnp.nan)

  def per_loop(fn, first):
    return jnp.stack([undefined] * first + [fn(i) for i in range(first, r)])

  out = {
      "attn_entropy_global": per_loop(
          lambda i: _head_mean(_entropy(glob[i]), mask), 0
      )
  }
  if r == 1:
    return out
  loc = [None] + [m["local"] for m in maps[1:]]
  out["attn_entropy_local"] = per_loop(
      lambda i: _head_mean(_entropy(loc[i]), mask), 1
  )
  out["attn_kl_global"] = per_loop(
      lambda i: _head_mean(_kl(glob[i], glob[i - 1]), mask), 1
  )
  out["attn_kl_local"] = per_loop(
      lambda i: _head_mean(_kl(loc[i], loc[i - 1]), mask), 2
  )
  out["head_similarity"] = jnp.stack(
      [jnp.full((n_layers, n_heads, n_heads), jnp.nan)]
      + [_head_similarity(glob[i], glob[i - 1], mask) for i in range(1, r)]
  )
  # [R-1, L, B, S, H] -> [R-1, L, B, H, S]
  g = jnp.moveaxis(gates[: r - 1], -1, 3)
  mean = jax.vmap(lambda x: _head_mean(x, mask))(g)  # [R-1, L, H]
  var = jax.vmap(_head_mean, (0, None))(
      (g - mean[:, :, None, :, None]) ** 2, mask
  )
  nan = undefined[None]
  out["mean_gate"] = jnp.concatenate([nan, mean])
  out["gate_std"] = jnp.concatenate([nan, jnp.sqrt(var)])
  return out


def _effective_rank(h_NxD) -> float:
  """exp(entropy of the normalised singular values) of `h` with rows scaled to unit RMS."""
  x = np.asarray(h_NxD, np.float64)
  x = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6)
  s = np.linalg.svd(x, compute_uv=False)
  p = s / max(float(np.sum(s)), 1e-12)
  p = p[p > 0]
  return float(np.exp(-np.sum(p * np.log(p))))


def _document_ranks(hs_RxBxSxD, mask_BxS, segment_ids_BxS):
  """(sum over document pieces of tokens x effective rank, per loop; the tokens)."""
  r = hs_RxBxSxD.shape[0]
  total, n = np.zeros(r), 0
  for b in range(mask_BxS.shape[0]):
    real = mask_BxS[b] > 0
    seg = (
        np.zeros_like(real, np.int64)
        if segment_ids_BxS is None
        else segment_ids_BxS[b]
    )
    for doc in np.unique(seg[real]):
      idx = real & (seg == doc)
      k = int(idx.sum())
      total += k * np.array([_effective_rank(h[b, idx]) for h in hs_RxBxSxD])
      n += k
  return total, n


def loop_diagnostics(cfg: PLTConfig, params, batches) -> dict[str, Any]:
  """Per-loop statistics averaged over `batches` (dicts with inputs, targets, loss_mask and
  optionally segment_ids and positions, as the data pipeline yields).

  Returns {name: [value for loop 1..R]} and "per_head": {name: nested lists `[R][L][H]`} (module
  docstring). Effective ranks are weighted by tokens over all batches; the other figures are
  means of the batches' masked means.
  """
  sums: dict[str, np.ndarray] = {}
  heads: dict[str, np.ndarray] = {}
  ranks, n = [], 0
  rank_sum, rank_tokens = 0.0, 0
  for batch in batches:
    mask = jnp.asarray(batch["loss_mask"], jnp.float32)
    seg, pos = (
        None if batch.get(k) is None else jnp.asarray(batch[k])
        for k in ("segment_ids", "positions")
    )
    stats, per_head, rank, hs = _loop_stats(
        cfg,
        params,
        jnp.asarray(batch["inputs"]),
        jnp.asarray(batch["targets"]),
        mask,
        seg,
        pos,
    )
    for k, val in stats.items():
      sums[k] = sums.get(k, 0) + np.asarray(val, np.float64)
    for k, val in per_head.items():
      heads[k] = heads.get(k, 0) + np.asarray(val, np.float64)
    keep = np.asarray(mask) > 0
    ranks.append(np.asarray(rank)[:, keep])
    s, t = _document_ranks(
        np.asarray(hs),
        np.asarray(mask),
        None if seg is None else np.asarray(seg),
    )
    rank_sum, rank_tokens = rank_sum + s, rank_tokens + t
    n += 1
  if n == 0:
    raise ValueError("loop_diagnostics: no batches given")
  result: dict[str, Any] = {
      k: [float(x) for x in v / n] for k, v in sums.items()
  }
  result["median_rank"] = [
      float(x) for x in np.median(np.concatenate(ranks, axis=1), axis=1)
  ]
  result["effective_rank"] = [
      float(x) for x in np.asarray(rank_sum) / max(rank_tokens, 1)
  ]
  per_head = {k: v / n for k, v in heads.items()}
  for k, v in per_head.items():
    if k == "head_similarity":  # the diagonal: each head against itself
      v = np.diagonal(v, axis1=2, axis2=3)
    result[k] = [float(x) for x in v.mean(axis=(1, 2))]
  result["per_head"] = {k: v.tolist() for k, v in per_head.items()}
  return result


def for_json(result: dict[str, Any]) -> dict[str, Any]:
  """`result` with the entries of loops where a statistic is not defined as None (in
  `per_head` too, each per-layer, per-head entry); a NaN left is a real one."""
  loops = len(result["step_size"])

  def blank(name, values):
    first = DEFINED_FROM.get(name, 1)
    if name == "fixed_point_gap" and loops == 1:
      first = 2  # one more loop needs the gate params of loops >= 2
    return [none_like(v) if r + 1 < first else v for r, v in enumerate(values)]

  def none_like(v):  # per-head entries keep their nested shape
    return [none_like(x) for x in v] if isinstance(v, list) else None

  out = {k: blank(k, v) for k, v in result.items() if k != "per_head"}
  if "per_head" in result:
    out["per_head"] = {k: blank(k, v) for k, v in result["per_head"].items()}
  return out


def format_table(result: dict[str, Any]) -> str:
  """The per-loop figures as a text table (the per-head ones are left to the JSON and plots)."""
  loops = len(result["step_size"])
  names = sorted(k for k in result if k != "per_head")
  width = max(len(n) for n in names)
  lines = [
      f"{'metric':<{width}} "
      + " ".join(f"{f'loop {r + 1}':>10}" for r in range(loops))
  ]
  shown = for_json(result)
  for name in names:
    cells = " ".join(
        f"{'-' if x is None else f'{x:.4g}':>10}" for x in shown[name]
    )
    lines.append(f"{name:<{width}} {cells}")
  return "\n".join(lines)
