import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopcoder_jax import PLTConfig, PLTForCausalLM
from loopcoder_jax.eval.diagnostics import (
    _effective_rank,
    format_table,
    loop_diagnostics,
)
from loopcoder_jax.model.transformer import init_params
from tests import helpers


def batch(cfg, seed=0, b=2, s=12):
  toks = np.asarray(
      jax.random.randint(jax.random.key(seed), (b, s + 1), 0, cfg.vocab_size)
  )
  mask = np.ones((b, s), np.float32)
  mask[1, -3:] = 0  # padding must not count
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "loss_mask": mask}


def erank(h_SxD):
  """exp(entropy) of the normalised singular values of RMSNorm(h), float64."""
  x = np.asarray(h_SxD, np.float64)
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


def test_loop_statistics_match_their_definitions():
  cfg = PLTConfig.tiny(loops=3)
  params = perturbed(init_params(cfg, jax.random.key(0)))
  b = batch(cfg)
  # Position t is a fixed point from loop t + 2 on (its CLP input and its keys
  # come from fixed points only): its later updates are rounding noise, their
  # cosines undefined. Positions t < R - 1 are left out of every statistic here.
  b["loss_mask"][:, : cfg.plt_num_loops - 1] = 0
  res = loop_diagnostics(cfg, params, [b])
  assert set(res) == {
      "step_size",
      "update_cos",
      "effective_rank",
      "fixed_point_gap",
      "clp_mismatch",
      "mean_gate",
      "median_rank",
      "nll",
      "kl_prev",
      "entropy",
      "argmax_changes",
      "most_changed",
  }
  assert all(len(v) == 3 for v in res.values())

  # The definitions in float64 from the states h(1..R+1) of an (R+1)-loop model:
  # h(R+1) = f(h(R)), one more loop with the same params.
  model = PLTForCausalLM(cfg.replace(plt_num_loops=4))
  v = {"params": params}
  _, aux = model.apply(v, b["inputs"], return_intermediates=True)
  e = np.asarray(params["embed_tokens"]["embedding"], np.float64)[b["inputs"]]
  hs = np.asarray(aux["hidden"][:3], np.float64)  # h(1..R)
  logits = np.stack(
      [
          np.asarray(model.apply(v, h, method=PLTForCausalLM.logits))
          for h in aux["hidden"][:3]
      ]
  ).astype(np.float64)
  ops = helpers.forward_ops(cfg, b["inputs"].shape[1]) + cfg.vocab_size
  m = b["loss_mask"]

  def mean(x):
    return (x * m).sum(axis=(-2, -1)) / m.sum()

  def nan_first(x):
    return np.concatenate([[np.nan], x])

  def close(name, want, scale):
    got = np.asarray(res[name])
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), name)
    ok = ~np.isnan(want)
    helpers.assert_close(got[ok], want[ok], ops=ops, scale=scale, what=name)

  states = np.concatenate([e[None], hs])  # h(0) = E
  upd = states[1:] - states[:-1]
  norm = np.linalg.norm(upd, axis=-1)
  close("step_size", mean(norm), norm.max())
  for t in range(cfg.plt_num_loops - 1):  # the fixed points
    assert norm[t + 1 :, :, t].max() <= helpers.tolerance(hs, ops=ops), t
  cos = (upd[1:] * upd[:-1]).sum(-1) / np.maximum(norm[1:] * norm[:-1], 1e-12)
  close("update_cos", nan_first(mean(cos)), 1.0)
  gaps = np.diff(np.asarray(aux["hidden"], np.float64), axis=0)
  close("fixed_point_gap", mean(np.linalg.norm(gaps, axis=-1)), norm.max())
  pair = m[:, 1:] * m[:, :-1]
  omega = (
      np.linalg.norm(hs[:-1, :, 1:] - hs[:-1, :, :-1], axis=-1) * pair
  ).sum((-2, -1)) / pair.sum()
  close("clp_mismatch", nan_first(omega), np.abs(hs).max())
  gates = np.asarray(aux["gates"][:2], np.float64)
  close("mean_gate", nan_first(gates.mean(axis=(1, 2, 3, 4))), 1.0)
  close(
      "effective_rank",
      np.array([np.mean([erank(h_b) for h_b in h]) for h in hs]),
      erank_scale(hs.shape[2]),
  )

  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  p = np.exp(logp)
  true_lp = np.take_along_axis(logp, b["targets"][None, ..., None], -1)[..., 0]
  lp_scale = np.abs(logp).max()
  close("nll", mean(-true_lp), lp_scale)
  close("entropy", mean(-(p * logp).sum(-1)), lp_scale)
  kl = (p[1:] * (logp[1:] - logp[:-1])).sum(-1)  # [R-1, B, S]
  close("kl_prev", nan_first(mean(kl)), lp_scale)
  # The counting statistics compare values whose margins here are above rounding
  # (checked), so the float64 counts are the float32 ones.
  real = m > 0
  margin = helpers.tolerance(logp, ops=ops)
  top2 = np.sort(logp, -1)[..., -2:]
  assert (top2[..., 1] - top2[..., 0])[:, real].min() > margin
  top = logp.argmax(-1)
  close("argmax_changes", nan_first(mean(top[1:] != top[:-1])), 1.0)
  # most_changed: per token, the loop whose KL from its predecessor is largest;
  # each of loops 2 and 3 wins somewhere
  assert np.abs(kl[0] - kl[1])[real].min() > margin
  most = np.stack([mean(kl.argmax(0) == i) for i in range(2)])
  assert 0 < most[0] < 1
  close("most_changed", nan_first(most), 1.0)

  # median rank of the true next token (0 = top-1) over the real tokens: the
  # same whether the logits within rounding of the true one count as above it or
  # not
  def median_rank(offset):
    rank = (logp > true_lp[..., None] + offset).sum(-1) - (offset < 0)
    return [float(np.median(r[real])) for r in rank]

  assert res["median_rank"] == median_rank(margin) == median_rank(-margin)
  assert "loop 3" in format_table(res)


def test_single_loop_model_and_empty_input():
  cfg = PLTConfig.tiny(loops=1)
  res = loop_diagnostics(cfg, init_params(cfg, jax.random.key(0)), [batch(cfg)])
  assert len(res["step_size"]) == 1 and "fixed_point_gap" not in res
  with pytest.raises(ValueError, match="no batches"):
    loop_diagnostics(cfg, init_params(cfg, jax.random.key(0)), [])


def test_diagnose_cli(tmp_path):
  import json
  import os
  import subprocess
  import sys

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
  script = os.path.join(helpers.SCRIPTS, "diagnose.py")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
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
      ],
      capture_output=True,
      text=True,
      env=env,
      timeout=300,
  )
  assert run.returncode == 0, run.stderr
  out = json.loads(run.stdout.strip().splitlines()[-1])
  assert out["loops"] == 3 and len(out["effective_rank"]) == 3
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
