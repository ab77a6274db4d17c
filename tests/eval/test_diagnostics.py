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
from loopcoder_jax.model.transformer import init_params
from tests.helpers import SCRIPTS

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


def masked_mean(x, m):
  return float((x * m).sum() / m.sum())


def test_effective_rank_of_rank_one_and_orthogonal_states():
  rank_one = np.outer(np.arange(1.0, 9.0), np.ones(16))
  np.testing.assert_allclose(_effective_rank(rank_one), 1.0, atol=1e-6)
  np.testing.assert_allclose(_effective_rank(np.eye(8, 16)), 8.0, rtol=1e-6)


def test_loop_statistics_match_their_definitions():
  cfg = PLTConfig.tiny(loops=2)
  params = init_params(cfg, jax.random.key(0))
  b = batch(cfg)
  res = loop_diagnostics(cfg, params, [b])
  per_loop = {k: v for k, v in res.items() if k != "per_head"}
  assert set(per_loop) >= {
      "step_size",
      "update_cos",
      "effective_rank",
      "fixed_point_gap",
      "clp_mismatch",
      "clp_state_ratio",
      "mean_gate",
      "gate_std",
      "median_rank",
      "kl_prev",
      "entropy",
      "argmax_changes",
      "most_changed",
      "attn_entropy_global",
      "attn_entropy_local",
      "attn_kl_global",
      "attn_kl_local",
      "head_similarity",
  }
  assert all(len(v) == 2 for v in per_loop.values())
  h, heads = cfg.num_hidden_layers, cfg.num_attention_heads
  assert np.shape(res["per_head"]["attn_kl_global"]) == (2, h, heads)
  assert np.shape(res["per_head"]["head_similarity"]) == (2, h, heads, heads)

  model = PLTForCausalLM(cfg)
  _, aux = model.apply(
      {"params": params}, b["inputs"], return_intermediates=True
  )
  h1, h2 = np.asarray(aux["hidden"][0]), np.asarray(aux["hidden"][1])
  e = np.asarray(params["embed_tokens"]["embedding"])[b["inputs"]]
  m = b["loss_mask"]
  # f32 states of norm ~1: relative error well under 1e-5
  np.testing.assert_allclose(
      res["step_size"][0],
      masked_mean(np.linalg.norm(h1 - e, axis=-1), m),
      rtol=1e-5,
  )
  np.testing.assert_allclose(
      res["step_size"][1],
      masked_mean(np.linalg.norm(h2 - h1, axis=-1), m),
      rtol=1e-5,
  )
  np.testing.assert_allclose(
      res["fixed_point_gap"][0], res["step_size"][1], rtol=1e-5
  )
  pair = m[:, 1:] * m[:, :-1]
  omega = masked_mean(np.linalg.norm(h1[:, 1:] - h1[:, :-1], axis=-1), pair)
  np.testing.assert_allclose(res["clp_mismatch"][1], omega, rtol=1e-5)
  # P(1) = N(h(1)) (plt_normalize_per_loop), a = b = 1
  scale = np.asarray(params["norm"]["scale"])
  p1 = (
      h1 / np.sqrt((h1 * h1).mean(-1, keepdims=True) + cfg.rms_norm_eps) * scale
  )
  ratio = np.linalg.norm(p1[:, :-1], axis=-1) / np.linalg.norm(
      e[:, 1:], axis=-1
  )
  np.testing.assert_allclose(
      res["clp_state_ratio"][1], masked_mean(ratio, pair), rtol=1e-5
  )
  # the gate is zero-initialised: 0.5 everywhere, no spread
  np.testing.assert_allclose(res["mean_gate"][1], 0.5, atol=1e-7)
  np.testing.assert_allclose(res["gate_std"][1], 0.0, atol=1e-7)
  assert 0 <= res["median_rank"][1] < cfg.vocab_size
  assert np.isnan(res["kl_prev"][0]) and res["kl_prev"][1] >= 0
  assert np.isnan(res["attn_kl_local"][1])  # needs two local branches
  # with two loops, loop 2 always "wins"
  np.testing.assert_allclose(res["most_changed"][1], 1.0)
  table = format_table(res)
  assert "loop 2" in table and "per_head" not in table


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
  # the dense local branch against the blocked one: f32 rounding of O(1) logits
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  loop1, loop2 = aux["kv"].maps
  assert set(loop1) == {"global"} and set(loop2) == {"global", "local"}
  t = np.arange(S)
  same = b["segment_ids"][:, :, None] == b["segment_ids"][:, None, :]
  causal = same & (t[None, :] <= t[:, None])[None]
  window = causal & (t[None, :] >= t[:, None] - cfg.window_left)[None]
  for probs, visible in (
      (loop1["global"], causal),
      (loop2["global"], causal),
      (loop2["local"], window),
  ):
    p = np.asarray(probs)  # [L, B, H, S, S]
    assert p.shape == (cfg.num_hidden_layers, B, cfg.num_attention_heads, S, S)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-6)
    assert np.all(p[:, ~np.broadcast_to(visible[:, None], p.shape[1:])] == 0)


def test_uniform_attention_has_the_entropy_of_its_visible_keys():
  cfg = PLTConfig.tiny(loops=3, **E_ONLY)
  # zero queries: every score is 0, so each head spreads evenly over the keys it may see
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
  heads = res["per_head"]
  shape = (cfg.num_hidden_layers, cfg.num_attention_heads)
  for r in range(3):
    np.testing.assert_allclose(
        heads["attn_entropy_global"][r], np.full(shape, ent_global), rtol=1e-5
    )
  for r in (1, 2):
    np.testing.assert_allclose(
        heads["attn_entropy_local"][r], np.full(shape, ent_local), rtol=1e-5
    )
  assert ent_local < ent_global  # the window cuts some documents short


def test_identity_loops_take_no_step_and_have_no_mismatch_within_documents():
  cfg = PLTConfig.tiny(loops=3, **E_ONLY)
  params = identity_layers(init_params(cfg, jax.random.key(3)))
  b = doc_batch()
  res = loop_diagnostics(cfg, params, [b])
  # every loop returns E
  np.testing.assert_allclose(res["step_size"], 0.0, atol=1e-7)
  np.testing.assert_allclose(res["fixed_point_gap"], 0.0, atol=1e-7)
  # states differ only between documents, never within one
  np.testing.assert_allclose(res["clp_mismatch"][1:], 0.0, atol=1e-7)
  # across the boundaries (one document per row) the same states do differ
  joined = loop_diagnostics(
      cfg, params, [{k: v for k, v in b.items() if k != "segment_ids"}]
  )
  e = np.asarray(params["embed_tokens"]["embedding"])
  jumps = [(5, 9), (9, 3), (7, 2)]
  pairs = 11 + 8  # adjacent real pairs of the two rows
  want = sum(np.linalg.norm(e[a] - e[c]) for a, c in jumps) / pairs
  np.testing.assert_allclose(joined["clp_mismatch"][1:], want, rtol=1e-5)


@pytest.mark.parametrize("copy", [True, False])
def test_a_loop_that_copies_the_previous_one_has_kl_zero(copy):
  cfg = PLTConfig.tiny(loops=3, **E_ONLY)
  # weights x 4: O(1) logits and attention scores, so that differences show
  params = jax.tree.map(lambda x: 4 * x, init_params(cfg, jax.random.key(4)))
  # gate 1: loop 2 takes only the global branch, i.e. loop 1's attention, so h(2) = h(1).
  # Either way loop 3 copies loop 2: with E alone as input, loops >= 2 see the same inputs.
  bias = 40.0 if copy else 0.0  # sigmoid(40) is 1 in float32
  params = set_leaf(
      params,
      ("layers", "self_attn", "plt_gate", "bias"),
      lambda x: jnp.full_like(x, bias),
  )
  res = loop_diagnostics(cfg, params, [batch(cfg)])
  # Copies agree up to f32 rounding (relative 1e-6): KL ~ 1e-12, steps ~ 1e-6 x the states'
  # scale (loop 1's step from E). Loops that differ are far above that.
  scale = {
      "kl_prev": 1.0,
      "attn_kl_global": 1.0,
      "step_size": res["step_size"][0],
  }
  for name, s in scale.items():
    assert abs(res[name][2]) <= 1e-6 * s, (name, res[name])
    if copy:
      assert abs(res[name][1]) <= 1e-6 * s, (name, res[name])
    else:
      assert res[name][1] > 1e-3 * s, (name, res[name])
  assert res["argmax_changes"][2] == 0
  assert (res["argmax_changes"][1] == 0) == copy
  assert abs(res["attn_kl_local"][2]) <= 1e-6
  np.testing.assert_allclose(res["head_similarity"][2], 1.0, rtol=1e-6)
  # layer 0 of every loop sees E: the same queries over the same keys
  np.testing.assert_allclose(
      np.asarray(res["per_head"]["attn_kl_global"])[1:, 0], 0.0, atol=1e-6
  )
  np.testing.assert_allclose(res["mean_gate"][1:], 1.0 if copy else 0.5)


@settings(max_examples=8, deadline=None)
@given(cuts=st.lists(st.integers(1, S - 1), max_size=4, unique=True))
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
  h1 = np.asarray(aux["hidden"][0])
  m = b["loss_mask"]
  gaps = np.linalg.norm(h1[:, 1:] - h1[:, :-1], axis=-1)
  pairs = m[:, 1:] * m[:, :-1]
  inside = pairs * (seg[:, 1:] == seg[:, :-1])
  np.testing.assert_allclose(
      res["clp_mismatch"][1], masked_mean(gaps, inside), rtol=1e-5
  )
  # it differs from the all-pairs mean by the boundary pairs only
  boundary = pairs - inside
  assert boundary.sum() == len(cuts)
  all_pairs = (gaps * pairs).sum() / pairs.sum()
  np.testing.assert_allclose(
      res["clp_mismatch"][1] * inside.sum() + (gaps * boundary).sum(),
      all_pairs * pairs.sum(),
      rtol=1e-5,
  )
  g = np.asarray(aux["gates"][0])  # [L, B, S, H]
  np.testing.assert_allclose(
      res["mean_gate"][1],
      (g * m[None, :, :, None]).sum() / (m.sum() * g.shape[0] * g.shape[-1]),
      rtol=1e-5,
  )
  assert abs(g.mean() - res["mean_gate"][1]) > 1e-4  # the padding would move it
  pieces = [
      (bi, (seg[bi] == d) & (m[bi] > 0))
      for bi in range(B)
      for d in np.unique(seg[bi][m[bi] > 0])
  ]
  weighted = sum(_effective_rank(h1[bi][i]) * i.sum() for bi, i in pieces)
  np.testing.assert_allclose(
      res["effective_rank"][0],
      weighted / sum(i.sum() for _, i in pieces),
      rtol=1e-5,
  )


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, tokens, seg):
  return PLTForCausalLM(cfg).apply(
      {"params": params}, tokens, seg, return_intermediates=True
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
  from loopcoder_jax.data import tokenizer
  from loopcoder_jax.train import checkpoint

  texts = [
      "def add(a, b):\n    return a + b\n",
      "for i in range(10):\n    print(i)\n",
  ] * 40
  tok = tokenizer.train_bpe(texts, 272, str(tmp_path / "params" / "tok"))
  cfg = PLTConfig.tiny(loops=2, vocab_size=tok.vocab_size)
  checkpoint.save_params(
      str(tmp_path / "params"), cfg, init_params(cfg, jax.random.key(0))
  )
  tok.save(str(tmp_path / "params"))
  (tmp_path / "held.py").write_text("".join(texts[:6]))
  script = os.path.join(SCRIPTS, "diagnose.py")
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
  assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith(
      "error:"
  )
