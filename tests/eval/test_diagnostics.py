"""Loop diagnostics against their definitions (float64, spec section 6) and on
models of known structure."""

import functools
import json
import os
import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopcoder_jax import PLTConfig, PLTForCausalLM
from loopcoder_jax.eval.diagnostics import (
    MapsKV,
    _effective_rank,
    format_table,
    loop_diagnostics,
)
from loopcoder_jax.model.transformer import head_weight, init_params
from tests import helpers

B, S = 2, 12
# Loops >= 2 whose input is E alone: loop r's layers see what loop 1's saw (known structure).
E_ONLY = dict(plt_emb_scale=1.0, plt_hidden_scale=0.0)


def batch(cfg, seed=0, b=B, s=S):
  toks = np.asarray(
      jax.random.randint(jax.random.key(seed), (b, s + 1), 0, cfg.vocab_size)
  )
  mask = np.ones((b, s), np.float32)
  mask[1, -3:] = 0  # padding must not count
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "loss_mask": mask}


def doc_batch(seed=0):
  """Two packed rows: documents of one repeated token each; row 1 ends in padding."""
  inputs = np.array(
      [
          [5, 5, 5, 5, 9, 9, 9, 9, 9, 3, 3, 3],
          [7, 7, 7, 7, 7, 7, 2, 2, 2, 0, 0, 0],
      ]
  )
  seg = np.array(
      [
          [1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3],
          [1, 1, 1, 1, 1, 1, 2, 2, 2, 0, 0, 0],
      ]
  )
  targets = np.asarray(jax.random.randint(jax.random.key(seed), (B, S), 0, 64))
  return {
      "inputs": inputs,
      "targets": targets,
      "segment_ids": seg,
      "loss_mask": (seg > 0).astype(np.float32),
  }


def set_leaf(params, path, fn):
  """A copy of params with the leaf at `path` (keys) replaced by fn(leaf)."""
  if not path:
    return fn(params)
  return {**params, path[0]: set_leaf(params[path[0]], path[1:], fn)}


def identity_layers(params):
  """Every layer returns its input: zero attention output and MLP down projections."""
  for path in (("self_attn", "o_proj"), ("mlp", "down_proj")):
    params = set_leaf(params, ("layers", *path, "kernel"), jnp.zeros_like)
  return params


def perturbed(params, scale=0.2):
  """Random gates (zero at init) and less uniform weights, so the loops differ
  visibly.
  """
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  return jax.tree.unflatten(
      tree,
      [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)],
  )


def masked_mean(x, m):
  """The mean over the last two axes [B, S] where m is 1."""
  return (x * m).sum(axis=(-2, -1)) / m.sum()


def nan_first(x):
  return np.concatenate([[np.nan], x])


def rms_norm(h, scale, eps):
  return h / np.sqrt((h * h).mean(-1, keepdims=True) + eps) * scale


def erank(h_NxD):
  """exp(entropy) of the normalised singular values of RMSNorm(h), float64."""
  x = np.asarray(h_NxD, np.float64)
  x = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6)
  s = np.linalg.svd(x, compute_uv=False)
  p = s[s > 0] / s.sum()
  return float(np.exp(-np.sum(p * np.log(p))))


def erank_scale(rows: int) -> float:
  """The effective rank's error scale: singular values that are zero come out at
  rounding level, where -p log p has slope |log p| ~ log(1 / eps); up to one
  such term per row.
  """
  return rows * np.log(2.0**23)


def document_pieces(mask_BxS, seg_BxS):
  """(row, [S] bool) of each document's real tokens."""
  return [
      (b, (seg_BxS[b] == d) & (mask_BxS[b] > 0))
      for b in range(mask_BxS.shape[0])
      for d in np.unique(seg_BxS[b][mask_BxS[b] > 0])
  ]


def document_erank(h_BxSxD, mask_BxS, seg_BxS):
  """Effective ranks of the document pieces, weighted by their real tokens."""
  pieces = document_pieces(mask_BxS, seg_BxS)
  total = sum(erank(h_BxSxD[b][i]) * i.sum() for b, i in pieces)
  return total / sum(i.sum() for _, i in pieces)


def test_effective_rank_of_constructed_states():
  rng = np.random.default_rng(0)
  # orthogonal rows of RMS 1 (the RMSNorm's eps = 1e-6 then changes nothing in
  # float64)
  basis = 4.0 * np.linalg.qr(rng.standard_normal((16, 16)))[0]
  scales = rng.uniform(1.0, 2.0, (8, 1))  # RMSNorm removes each row's scale
  p = np.array([2**0.5, 1.0]) / (1 + 2**0.5)
  unequal_erank = float(np.exp(-np.sum(p * np.log(p))))
  cases = {
      # one direction: one non-zero singular value
      "rank one": (np.outer(np.arange(1.0, 9.0), basis[0]), 1.0),
      # 8 orthogonal rows: 8 equal singular values
      "orthogonal": (scales * basis[:8], 8.0),
      # 4 orthogonal directions, each twice: 4 equal singular values
      "repeated": (scales * np.concatenate([basis[:4], basis[:4]]), 4.0),
      # directions 0, 0, 1: singular values sqrt(2) and 1 (times the row norm)
      "unequal": (basis[[0, 0, 1]], unequal_erank),
  }
  for name, (h, want) in cases.items():
    for got, dtype in (
        (erank(h), "float64"),
        (_effective_rank(jnp.asarray(h, jnp.float32)), "float32"),
    ):
      helpers.assert_close(
          got,
          want,
          ops=h.shape[1],
          dtype=dtype,
          scale=erank_scale(h.shape[0]),
          what=f"{name} ({dtype})",
      )


def attention_statistics(maps, mask_BxS):
  """The attention statistics `[R, L, H]` (head similarity `[R, L, H, H]`) of
  float64 maps `[L, B, H, S, S]` per loop, NaN where undefined.
  """
  glob = [np.asarray(m["global"], np.float64) for m in maps]
  loc = [None] + [np.asarray(m["local"], np.float64) for m in maps[1:]]
  n_layers, _, n_heads = glob[0].shape[:3]

  def head_mean(x_LxBxHxS):
    return np.einsum("lbhs,bs->lh", x_LxBxHxS, mask_BxS) / mask_BxS.sum()

  def entropy(a):
    return head_mean(
        -np.where(a > 0, a * np.log(np.where(a > 0, a, 1)), 0).sum(-1)
    )

  def kl(p, q):
    ratio = np.where(p > 0, p / np.where(p > 0, q, 1), 1)
    return head_mean((p * np.log(ratio)).sum(-1))

  def cosine(a, b):
    dots = np.einsum("lbhst,lbgst->lbhgs", a, b)
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    cos = dots / (na[:, :, :, None] * nb[:, :, None])
    return np.einsum("lbhgs,bs->lhg", cos, mask_BxS) / mask_BxS.sum()

  nan = np.full((n_layers, n_heads), np.nan)
  r = len(maps)
  return {
      "attn_entropy_global": np.stack([entropy(g) for g in glob]),
      "attn_entropy_local": np.stack([nan] + [entropy(w) for w in loc[1:]]),
      "attn_kl_global": np.stack(
          [nan] + [kl(glob[i], glob[i - 1]) for i in range(1, r)]
      ),
      "attn_kl_local": np.stack(
          [nan, nan] + [kl(loc[i], loc[i - 1]) for i in range(2, r)]
      ),
      "head_similarity": np.stack(
          [np.full((n_layers, n_heads, n_heads), np.nan)]
          + [cosine(glob[i], glob[i - 1]) for i in range(1, r)]
      ),
  }


def map_log_scale(maps):
  """The largest |log A| of a visible key: a map's log errs relative to it."""
  return max(
      np.abs(np.log(a[a > 0])).max()
      for loop in maps
      for a in map(np.asarray, loop.values())
  )


def lens_logp(cfg, params, hs):
  """log p(r) of the logit lens, float64, from the states `[R, B, S, d]`."""
  logits = rms_norm(
      np.asarray(hs, np.float64),
      np.asarray(params["norm"]["scale"]),
      cfg.rms_norm_eps,
  ) @ np.asarray(head_weight(cfg, params), np.float64)
  return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, tokens, seg):
  return PLTForCausalLM(cfg).apply(
      {"params": params}, tokens, seg, return_intermediates=True
  )


@functools.partial(jax.jit, static_argnums=0)
def _maps(cfg, params, tokens, seg):
  _, aux = PLTForCausalLM(cfg).apply(
      {"params": params}, tokens, seg, kv=MapsKV.for_config(cfg, seg)
  )
  return aux["kv"].maps


def test_loop_statistics_match_their_definitions():
  cfg = PLTConfig.tiny(loops=3)
  r = cfg.plt_num_loops
  params = perturbed(init_params(cfg, jax.random.key(0)))
  b = batch(cfg)
  seg = np.array([[1] * 7 + [2] * 5, [1] * 9 + [0] * 3])
  b["segment_ids"] = seg
  # Position t of a document is a fixed point from loop t + 2 on (its CLP input
  # and its keys come from fixed points only): its later updates are rounding
  # noise, their cosines undefined. The first R - 1 positions of each document
  # are left out of every statistic here.
  starts = [(0, 0), (0, 7), (1, 0)]
  for row, t0 in starts:
    b["loss_mask"][row, t0 : t0 + r - 1] = 0
  res = loop_diagnostics(cfg, params, [b])
  stats = {
      "step_size",
      "update_cos",
      "effective_rank",
      "fixed_point_gap",
      "clp_mismatch",
      "clp_state_ratio",
      "mean_gate",
      "gate_std",
      "median_rank",
      "nll",
      "kl_prev",
      "entropy",
      "argmax_changes",
      "most_changed",
  }
  map_stats = {
      "attn_entropy_global",
      "attn_entropy_local",
      "attn_kl_global",
      "attn_kl_local",
      "head_similarity",
  }
  assert set(res) == stats | map_stats | {"per_head"}
  assert all(len(res[k]) == r for k in stats | map_stats)
  assert set(res["per_head"]) == map_stats | {"mean_gate", "gate_std"}

  # The definitions in float64 from the states h(1..R+1) of an (R+1)-loop model:
  # h(R+1) = f(h(R)), one more loop with the same params.
  big = cfg.replace(plt_num_loops=r + 1)
  seg_j = jnp.asarray(seg)
  _, aux = _forward(big, params, b["inputs"], seg_j)
  hidden = np.asarray(aux["hidden"], np.float64)  # h(1..R+1)
  hs = hidden[:r]
  e = np.asarray(params["embed_tokens"]["embedding"], np.float64)[b["inputs"]]
  m = b["loss_mask"].astype(np.float64)
  real = m > 0
  # adjacent real pairs (t-1, t) of one document
  pair = m[:, 1:] * m[:, :-1] * (seg[:, 1:] == seg[:, :-1])
  ops = helpers.forward_ops(cfg, S) + cfg.vocab_size

  def close(name, want, scale, got=None):
    got = np.asarray(res[name] if got is None else got, np.float64)
    want = np.asarray(want, np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), name)
    ok = ~np.isnan(want)
    helpers.assert_close(got[ok], want[ok], ops=ops, scale=scale, what=name)

  states = np.concatenate([e[None], hs])  # h(0) = E
  upd = states[1:] - states[:-1]
  norm = np.linalg.norm(upd, axis=-1)
  # a state's rounding errs relative to its norm, and so do its differences
  h_scale = np.linalg.norm(states, axis=-1).max()
  close("step_size", masked_mean(norm, m), h_scale)
  for row, t0 in starts:  # the fixed points
    for t in range(r - 1):
      assert norm[t + 1 :, row, t0 + t].max() <= helpers.tolerance(
          0, ops=ops, scale=h_scale
      ), (row, t0 + t)
  cos = np.divide(  # the fixed points' updates may be exactly 0
      (upd[1:] * upd[:-1]).sum(-1),
      norm[1:] * norm[:-1],
      out=np.zeros_like(norm[1:]),
      where=real,
  )
  # an update's error (h_scale) relative to the update itself
  close(
      "update_cos",
      nan_first(masked_mean(cos, m)),
      h_scale / norm[:, real].min(),
  )
  gaps = np.linalg.norm(np.diff(hidden, axis=0), axis=-1)
  close("fixed_point_gap", masked_mean(gaps, m), h_scale)
  jumps = np.linalg.norm(hs[:-1, :, 1:] - hs[:-1, :, :-1], axis=-1)
  close("clp_mismatch", nan_first(masked_mean(jumps, pair)), h_scale)
  # loop r's input a E_t + b P(r-1)_{t-1}, P = N(h) (plt_normalize_per_loop)
  p = rms_norm(hs[:-1], np.asarray(params["norm"]["scale"]), cfg.rms_norm_eps)
  ratio = np.linalg.norm(cfg.hidden_scale * p[:, :, :-1], axis=-1) / (
      np.linalg.norm(cfg.emb_scale * e[:, 1:], axis=-1)
  )
  close(
      "clp_state_ratio",
      nan_first(masked_mean(ratio, pair)),
      ratio[:, pair > 0].max(),
  )

  gates = np.asarray(aux["gates"][: r - 1], np.float64)  # [R-1, L, B, S, H]
  gate_mean = np.einsum("rlbsh,bs->rlh", gates, m) / m.sum()
  gate_std = np.sqrt(
      np.einsum("rlbsh,bs->rlh", (gates - gate_mean[:, :, None, None]) ** 2, m)
      / m.sum()
  )
  assert gate_std.min() > 0.01  # the perturbed gate varies over tokens
  for name, want in (("mean_gate", gate_mean), ("gate_std", gate_std)):
    want = np.concatenate([np.full((1,) + want.shape[1:], np.nan), want])
    close(name, want, 1.0, got=res["per_head"][name])
    close(name, want.mean(axis=(1, 2)), 1.0)

  pieces = document_pieces(m, seg)
  close(
      "effective_rank",
      [document_erank(h, m, seg) for h in hs],
      erank_scale(max(i.sum() for _, i in pieces)),
  )

  logp = lens_logp(cfg, params, hs)
  prob = np.exp(logp)
  true_lp = np.take_along_axis(logp, b["targets"][None, ..., None], -1)[..., 0]
  lp_scale = np.abs(logp).max()
  close("nll", masked_mean(-true_lp, m), lp_scale)
  close("entropy", masked_mean(-(prob * logp).sum(-1), m), lp_scale)
  kl = (prob[1:] * (logp[1:] - logp[:-1])).sum(-1)  # [R-1, B, S]
  close("kl_prev", nan_first(masked_mean(kl, m)), lp_scale)
  # The counting statistics compare values whose margins here are above rounding
  # (checked), so the float64 counts are the float32 ones.
  margin = helpers.tolerance(0, ops=ops, scale=lp_scale)
  top2 = np.sort(logp, -1)[..., -2:]
  assert (top2[..., 1] - top2[..., 0])[:, real].min() > margin
  top = logp.argmax(-1)
  close("argmax_changes", nan_first(masked_mean(top[1:] != top[:-1], m)), 1.0)
  # most_changed: per token, the loop whose KL from its predecessor is largest;
  # each of loops 2 and 3 wins somewhere
  assert np.abs(kl[0] - kl[1])[real].min() > margin
  most = np.stack([masked_mean(kl.argmax(0) == i, m) for i in range(r - 1)])
  assert 0 < most[0] < 1
  close("most_changed", nan_first(most), 1.0)

  # median rank of the true next token (0 = top-1) over the real tokens: the
  # same whether the logits within rounding of the true one count as above it or
  # not
  def median_rank(offset):
    # the true token itself is above true_lp - margin: not counted
    rank = (logp > true_lp[..., None] + offset).sum(-1) - (offset < 0)
    return [float(np.median(x[real])) for x in rank]

  assert res["median_rank"] == median_rank(margin) == median_rank(-margin)

  # The attention maps' statistics from the maps of a separate forward (its own
  # rounding); a map's log errs relative to the largest |log A| of a visible key.
  maps = _maps(big, params, b["inputs"], seg_j)[:r]
  heads = attention_statistics(maps, m)
  log_scale = map_log_scale(maps)
  for name, want in heads.items():
    scale = 1.0 if name == "head_similarity" else log_scale
    close(name, want, scale, got=res["per_head"][name])
    if name == "head_similarity":  # per loop: each head against itself
      want = np.diagonal(want, axis1=2, axis2=3)
    close(name, want.mean(axis=(1, 2)), scale)

  table = format_table(res).splitlines()
  assert table[0].split() == ["metric"] + [
      "loop",
      "1",
      "loop",
      "2",
      "loop",
      "3",
  ]
  assert [line.split()[0] for line in table[1:]] == sorted(stats | map_stats)
  kl_row = next(line.split() for line in table if line.startswith("kl_prev "))
  assert kl_row == ["kl_prev", "-"] + [f"{x:.4g}" for x in res["kl_prev"][1:]]


def test_maps_source_runs_the_model_and_masks_its_maps():
  cfg = PLTConfig.tiny(loops=2)
  params = init_params(cfg, jax.random.key(1))
  b = doc_batch()
  seg = jnp.asarray(b["segment_ids"])
  model = PLTForCausalLM(cfg)
  want = model.apply({"params": params}, b["inputs"], seg)
  got, aux = model.apply(
      {"params": params},
      b["inputs"],
      seg,
      kv=MapsKV.for_config(cfg, seg),
  )
  # the dense local branch against the blocked one: the same forward, other
  # rounding
  helpers.assert_close(
      got, want, ops=helpers.forward_ops(cfg, S), what="logits"
  )
  loop1, loop2 = aux["kv"].maps
  assert set(loop1) == {"global"} and set(loop2) == {"global", "local"}
  t = np.arange(S)
  same = b["segment_ids"][:, :, None] == b["segment_ids"][:, None, :]
  causal = same & (t[None, :] <= t[:, None])[None]
  window = causal & (t[None, :] >= t[:, None] - cfg.window_left)[None]
  for name, probs, visible in (
      ("G(1)", loop1["global"], causal),
      ("G(2)", loop2["global"], causal),
      ("W(2)", loop2["local"], window),
  ):
    p = np.asarray(probs)  # [L, B, H, S, S]
    assert p.shape == (cfg.num_hidden_layers, B, cfg.num_attention_heads, S, S)
    # the softmax's normalisation and this sum, each over the keys
    helpers.assert_close(
        p.sum(-1), np.ones(p.shape[:-1]), ops=2 * S, what=f"{name} sums"
    )
    assert np.all(p[:, ~np.broadcast_to(visible[:, None], p.shape[1:])] == 0)


def test_uniform_attention_has_the_entropy_of_its_visible_keys():
  cfg = PLTConfig.tiny(loops=3, **E_ONLY)
  # zero queries: every score is 0, so each head spreads evenly over the keys it
  # may see
  params = set_leaf(
      init_params(cfg, jax.random.key(2)),
      ("layers", "self_attn", "q_proj", "kernel"),
      jnp.zeros_like,
  )
  b = doc_batch()
  res = loop_diagnostics(cfg, params, [b])
  seg, m = b["segment_ids"], b["loss_mask"]
  start = np.array(
      [[np.argmax(row == row[t]) for t in range(S)] for row in seg]
  )
  seen = np.arange(S)[None] - start + 1  # keys of the document up to t
  ent_global = masked_mean(np.log(seen), m)
  ent_local = masked_mean(np.log(np.minimum(seen, cfg.window_left + 1)), m)
  assert ent_local < ent_global  # the window cuts some documents short
  heads = res["per_head"]
  shape = (cfg.num_hidden_layers, cfg.num_attention_heads)
  # exact scores: the softmax and the entropy over the keys, the mean over the
  # tokens
  ops = 2 * S + B * S
  for r in range(3):
    helpers.assert_close(
        heads["attn_entropy_global"][r],
        np.full(shape, ent_global),
        ops=ops,
        what=f"global, loop {r + 1}",
    )
  for r in (1, 2):
    helpers.assert_close(
        heads["attn_entropy_local"][r],
        np.full(shape, ent_local),
        ops=ops,
        what=f"local, loop {r + 1}",
    )


def test_identity_loops_take_no_step_and_have_no_mismatch_within_documents():
  cfg = PLTConfig.tiny(loops=3, **E_ONLY)
  params = identity_layers(init_params(cfg, jax.random.key(3)))
  b = doc_batch()
  res = loop_diagnostics(cfg, params, [b])
  # Every loop returns E exactly (its layers add exact zeros, its input is
  # 1 * E + 0 * P), and within a document of one repeated token every state is
  # the same.
  assert res["step_size"] == [0.0] * 3
  assert res["fixed_point_gap"] == [0.0] * 3
  assert res["clp_mismatch"][1:] == [0.0] * 2
  # across the boundaries (one document per row) the same states do differ
  joined = loop_diagnostics(
      cfg, params, [{k: v for k, v in b.items() if k != "segment_ids"}]
  )
  e = np.asarray(params["embed_tokens"]["embedding"], np.float64)
  jumps = [(5, 9), (9, 3), (7, 2)]
  pairs = 11 + 8  # adjacent real pairs of the two rows
  want = sum(np.linalg.norm(e[a] - e[c]) for a, c in jumps) / pairs
  # the norms over d, the mean over the pairs
  helpers.assert_close(
      joined["clp_mismatch"][1:],
      [want] * 2,
      ops=cfg.hidden_size + pairs,
      what="clp_mismatch",
  )


@pytest.mark.parametrize("copy", [True, False])
def test_a_loop_that_copies_the_previous_one_has_kl_zero(copy):
  cfg = PLTConfig.tiny(loops=3, **E_ONLY)
  # weights x 4: O(1) logits and attention scores, so that differences show
  params = jax.tree.map(lambda x: 4 * x, init_params(cfg, jax.random.key(4)))
  # gate 1: loop 2 takes only the global branch, i.e. loop 1's attention, so
  # h(2) = h(1). Either way loop 3 copies loop 2: with E alone as input, loops
  # >= 2 see the same inputs.
  gate = 1.0 if copy else 0.5
  bias = 40.0 if copy else 0.0  # sigmoid(40) is 1 in float32
  params = set_leaf(
      params,
      ("layers", "self_attn", "plt_gate", "bias"),
      lambda x: jnp.full_like(x, bias),
  )
  b = batch(cfg)
  res = loop_diagnostics(cfg, params, [b])
  # Copies agree up to the rounding of separate forwards; loops that differ
  # exceed it.
  _, aux = _forward(cfg, params, b["inputs"], None)
  hs = np.asarray(aux["hidden"], np.float64)
  e = np.asarray(params["embed_tokens"]["embedding"], np.float64)[b["inputs"]]
  logp = lens_logp(cfg, params, hs)
  maps = _maps(cfg, params, b["inputs"], None)
  scales = {
      "step_size": np.linalg.norm(np.concatenate([e[None], hs]), axis=-1).max(),
      "kl_prev": np.abs(logp).max(),
      "attn_kl_global": map_log_scale(maps),
      "attn_kl_local": map_log_scale(maps),
  }
  ops = helpers.forward_ops(cfg, S) + cfg.vocab_size

  def zero(x, name):
    return np.abs(x).max() <= helpers.tolerance(0, ops=ops, scale=scales[name])

  for name in scales:
    assert zero(res[name][2], name), (name, res[name])
    if name != "attn_kl_local":  # from loop 3 on
      assert zero(res[name][1], name) == copy, (name, res[name])
  # layer 0 of every loop sees E: the same queries over the same keys
  assert zero(
      np.asarray(res["per_head"]["attn_kl_global"])[1:, 0], "attn_kl_global"
  )
  # The top-1 margins exceed rounding (checked): loop 3's argmax is loop 2's.
  m = b["loss_mask"] > 0
  top2 = np.sort(logp, -1)[..., -2:]
  margin = helpers.tolerance(0, ops=ops, scale=scales["kl_prev"])
  assert (top2[..., 1] - top2[..., 0])[:, m].min() > margin
  assert res["argmax_changes"][2] == 0
  assert (res["argmax_changes"][1] == 0) == copy
  helpers.assert_close(
      res["head_similarity"][2], 1.0, ops=ops + S, what="head_similarity"
  )
  # the gate is sigmoid(bias) exactly (its kernel is zero at init): every mean
  # of it is exact
  assert res["mean_gate"][1:] == [gate] * 2
  assert res["gate_std"][1:] == [0.0] * 2


@settings(max_examples=8, deadline=None)
@given(
    cuts=st.lists(st.integers(1, S - 1), min_size=1, max_size=4, unique=True)
)
def test_document_masking_changes_the_mismatch_exactly_at_boundaries(cuts):
  cfg = PLTConfig.tiny(loops=2)
  params = init_params(cfg, jax.random.key(5))
  # a random gate, so masking the gate's mean matters
  params = set_leaf(
      params,
      ("layers", "self_attn", "plt_gate", "kernel"),
      lambda x: jax.random.normal(jax.random.key(6), x.shape),
  )
  b = batch(cfg)
  seg = np.ones((B, S), np.int64)
  for c in cuts:
    seg[0, c:] += 1  # row 0: documents start at the cuts
  seg[1, -3:] = 0
  b["segment_ids"] = seg
  res = loop_diagnostics(cfg, params, [b])

  _, aux = _forward(cfg, params, b["inputs"], jnp.asarray(seg))
  h1 = np.asarray(aux["hidden"][0], np.float64)
  m = b["loss_mask"]
  ops = helpers.forward_ops(cfg, S)
  h_scale = np.linalg.norm(h1, axis=-1).max()

  def tol(scale):
    return helpers.tolerance(0, ops=ops, scale=scale)

  gaps = np.linalg.norm(h1[:, 1:] - h1[:, :-1], axis=-1)
  pairs = m[:, 1:] * m[:, :-1]
  inside = pairs * (seg[:, 1:] == seg[:, :-1])
  # Omega over the pairs inside documents; the boundary pairs would move it
  want = masked_mean(gaps, inside)
  assert abs(masked_mean(gaps, pairs) - want) > tol(h_scale)
  helpers.assert_close(
      res["clp_mismatch"][1], want, ops=ops, scale=h_scale, what="Omega"
  )
  # the gate's mean over the real tokens; the padding would move it
  g = np.asarray(aux["gates"][0], np.float64)  # [L, B, S, H]
  want = (g * m[None, :, :, None]).sum() / (m.sum() * g.shape[0] * g.shape[-1])
  assert abs(g.mean() - want) > tol(1.0)
  helpers.assert_close(
      res["mean_gate"][1], want, ops=ops, scale=1.0, what="mean_gate"
  )
  # the effective rank per document, weighted by its tokens; one rank over each
  # row would differ
  pieces = document_pieces(m, seg)
  want = document_erank(h1, m, seg)
  rows = [(bi, m[bi] > 0) for bi in range(B)]
  whole = sum(erank(h1[bi][i]) * i.sum() for bi, i in rows) / m.sum()
  scale = erank_scale(max(i.sum() for _, i in pieces))
  assert abs(whole - want) > tol(scale)
  helpers.assert_close(
      res["effective_rank"][0], want, ops=ops, scale=scale, what="erank"
  )


def test_single_loop_model_and_empty_input():
  cfg = PLTConfig.tiny(loops=1)
  res = loop_diagnostics(cfg, init_params(cfg, jax.random.key(0)), [batch(cfg)])
  assert len(res["step_size"]) == 1 and "fixed_point_gap" not in res
  assert set(res["per_head"]) == {"attn_entropy_global"}
  assert "mean_gate" not in res
  with pytest.raises(ValueError, match="no batches"):
    loop_diagnostics(cfg, init_params(cfg, jax.random.key(0)), [])


def test_diagnose_cli(tmp_path):
  from loopcoder_jax.checkpoints import params_io
  from loopcoder_jax.data import tokenizer

  texts = [
      "def add(a, b):\n    return a + b\n",
      "for i in range(10):\n    print(i)\n",
  ] * 40
  tok = tokenizer.train_bpe(texts, 272, str(tmp_path / "params" / "tok"))
  cfg = PLTConfig.tiny(loops=2, vocab_size=tok.vocab_size)
  params_io.save_params(
      str(tmp_path / "params"), cfg, init_params(cfg, jax.random.key(0))
  )
  tok.save(str(tmp_path / "params"))
  (tmp_path / "held.py").write_text("".join(texts[:6]))
  script = os.path.join(helpers.SCRIPTS, "diagnose.py")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  plots = tmp_path / "plots"
  run = subprocess.run(
      [
          sys.executable,
          script,
          f"--checkpoint={tmp_path / 'params'}",
          f"--data={tmp_path / 'held.py'}",
          "--seq_len=16",
          "--batch_size=2",
          "--max_tokens=64",
          "--loops=3",
          f"--plots={plots}",
      ],
      capture_output=True,
      text=True,
      env=env,
      timeout=300,
  )
  assert run.returncode == 0, run.stderr
  out = json.loads(run.stdout.strip().splitlines()[-1])
  assert out["loops"] == 3 and len(out["effective_rank"]) == 3
  assert np.shape(out["per_head"]["mean_gate"]) == (3, 2, 4)
  last = run.stdout.strip().splitlines()[-1]
  assert (plots / "diagnostics.json").read_text().strip() == last
  names = sorted(p.name for p in plots.glob("*.png"))
  assert names == [
      "attention.png",
      "effective_rank.png",
      "gate.png",
      "logit_lens.png",
      "step_size.png",
  ]
  assert all(
      (plots / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names
  )
  bad = subprocess.run(
      [
          sys.executable,
          script,
          f"--checkpoint={tmp_path / 'params'}",
          "--data=/nonexistent/*.py",
      ],
      capture_output=True,
      text=True,
      env=env,
      timeout=300,
  )
  # bad input: one error line, exit 2
  assert bad.returncode == 2, bad.stderr
  assert bad.stderr.strip().splitlines()[-1].startswith("error:")
