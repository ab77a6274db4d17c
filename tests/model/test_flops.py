"""FLOP formula: hand counts on a tiny config, and XLA's own count on an unscanned R=1 forward."""

import jax
import jax.numpy as jnp
import pytest

from loopcoder_jax.model import flops
from loopcoder_jax.model.config import PLTConfig
from loopcoder_jax.model.transformer import PLTForCausalLM, init_params


# Counts are integers or dyadic fractions far below 2**53: exact in float64,
# compared exactly.
def test_hand_count_tiny():
  # tiny: d=32, I=64, L=2, H=4, K=2, D=8, V=128, window left 4; S=8, R=2, hidden-mode gate.
  cfg = PLTConfig.tiny(loops=2)
  s = 8
  # q, k, v, o, SwiGLU = 16384
  dense = 2 * (32 * 4 * 8 + 2 * 32 * 2 * 8 + 4 * 8 * 32 + 3 * 32 * 64)
  # keys 1..8 over the 8 queries
  glob = 4 * 4 * 8 * (1 + 2 + 3 + 4 + 5 + 6 + 7 + 8) / 8
  # at most left + 1 = 5 keys
  loc = 4 * 4 * 8 * (1 + 2 + 3 + 4 + 5 + 5 + 5 + 5) / 8
  gate = 2 * 32 * 4
  fwd = 2 * (dense + glob) + 2 * (dense + glob + loc + gate) + 2 * 32 * 128
  assert flops.forward_flops_per_token(cfg, s) == fwd
  assert flops.train_flops_per_token(cfg, s) == 3 * fwd
  # R=1 has no local branch and no gate; query-mode gates cost 2*H*D.
  assert (
      flops.forward_flops_per_token(cfg.replace(plt_num_loops=1), s)
      == 2 * (dense + glob) + 2 * 32 * 128
  )
  q_gate = cfg.replace(plt_gate_use_hidden_states=False)
  assert flops.forward_flops_per_token(q_gate, s) - fwd == 2 * (
      2 * 4 * 8 - gate
  )


def test_decode_count():
  cfg = PLTConfig.tiny(loops=3)
  dense = 2 * (32 * 4 * 8 + 2 * 32 * 2 * 8 + 4 * 8 * 32 + 3 * 32 * 64)
  ctx = 100
  per_loop_r = dense + 4 * 32 * ctx + 4 * 32 * 5 + 2 * 32 * 4
  expect = 2 * (dense + 4 * 32 * ctx) + 2 * 2 * per_loop_r + 2 * 32 * 128
  assert flops.decode_flops_per_token(cfg, ctx) == expect
  with pytest.raises(ValueError, match="seq_len"):
    flops.train_flops_per_token(cfg, 0)


def test_matches_xla_cost_analysis():
  """R=1, layers unrolled: XLA sees every matmul once. Its count includes elementwise work (~1%
  here) and a dense-mask attention over all S keys, so compare with `causal=False`.
  """
  cfg = PLTConfig.tiny(
      loops=1,
      hidden_size=128,
      intermediate_size=512,
      head_dim=32,
      vocab_size=512,
      scan_layers=False,
  )
  b, s = 2, 64
  params = init_params(cfg, jax.random.key(0))
  fwd = jax.jit(lambda p, t: PLTForCausalLM(cfg).apply({"params": p}, t))
  xla = fwd.lower(params, jnp.zeros((b, s), jnp.int32)).cost_analysis()["flops"]
  ours = b * s * flops.forward_flops_per_token(cfg, s, causal=False)
  assert ours <= xla <= 1.03 * ours
  # causal counts only visible keys
  assert b * s * flops.forward_flops_per_token(cfg, s) < ours
