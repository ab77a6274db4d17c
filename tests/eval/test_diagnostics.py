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
from tests.helpers import SCRIPTS


def batch(cfg, seed=0, b=2, s=12):
  toks = np.asarray(
      jax.random.randint(jax.random.key(seed), (b, s + 1), 0, cfg.vocab_size)
  )
  mask = np.ones((b, s), np.float32)
  mask[1, -3:] = 0  # padding must not count
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "loss_mask": mask}


def test_effective_rank_of_rank_one_and_orthogonal_states():
  rank_one = jnp.outer(jnp.arange(1.0, 9.0), jnp.ones(16))
  np.testing.assert_allclose(_effective_rank(rank_one), 1.0, atol=1e-4)
  np.testing.assert_allclose(_effective_rank(jnp.eye(8, 16)), 8.0, rtol=1e-4)


def test_loop_statistics_match_their_definitions():
  cfg = PLTConfig.tiny(loops=2)
  params = init_params(cfg, jax.random.key(0))
  b = batch(cfg)
  res = loop_diagnostics(cfg, params, [b])
  assert set(res) >= {
      "step_size",
      "update_cos",
      "effective_rank",
      "fixed_point_gap",
      "clp_mismatch",
      "mean_gate",
      "median_rank",
      "kl_prev",
      "entropy",
      "argmax_changes",
      "most_changed",
  }
  assert all(len(v) == 2 for v in res.values())

  model = PLTForCausalLM(cfg)
  _, aux = model.apply(
      {"params": params}, b["inputs"], return_intermediates=True
  )
  h1, h2 = np.asarray(aux["hidden"][0]), np.asarray(aux["hidden"][1])
  e = np.asarray(params["embed_tokens"]["embedding"])[b["inputs"]]
  m = b["loss_mask"]

  def mean(x):
    return float((x * m).sum() / m.sum())

  np.testing.assert_allclose(
      res["step_size"][0], mean(np.linalg.norm(h1 - e, axis=-1)), rtol=1e-4
  )
  np.testing.assert_allclose(
      res["step_size"][1], mean(np.linalg.norm(h2 - h1, axis=-1)), rtol=1e-4
  )
  np.testing.assert_allclose(
      res["fixed_point_gap"][0], res["step_size"][1], rtol=1e-5
  )
  pair = m[:, 1:] * m[:, :-1]
  omega = float(
      (np.linalg.norm(h1[:, 1:] - h1[:, :-1], axis=-1) * pair).sum()
      / pair.sum()
  )
  np.testing.assert_allclose(res["clp_mismatch"][1], omega, rtol=1e-4)
  np.testing.assert_allclose(res["mean_gate"][1], 0.5, atol=1e-6)
  assert 0 <= res["median_rank"][1] < cfg.vocab_size
  assert np.isnan(res["kl_prev"][0]) and res["kl_prev"][1] >= 0
  # with two loops, loop 2 always "wins"
  np.testing.assert_allclose(res["most_changed"][1], 1.0)
  assert "loop 2" in format_table(res)


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
  script = os.path.join(SCRIPTS, "diagnose.py")
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
