"""FLOP accounting for PLT training and decoding (chip peaks and MFU: `loopcoder_jax/hardware.py`).

Counted: every matmul FLOP the model must do (2 per multiply-add), over all R loops. Not counted:
elementwise work (norms, RoPE, softmax, SiLU), the embedding gather, masked-out attention work that
an implementation may still execute (a dense causal mask does ~2x the useful global-branch work),
and remat recompute (useful FLOPs only, as in the PaLM/MaxText MFU definition).

Per token of a length-S sequence, forward, with d hidden, L layers, H/K query/kv heads, D head dim,
I intermediate, V vocab, window left `w`:

  dense_per_layer = 2 * (d*H*D + 2*d*K*D + H*D*d + 3*d*I)          q, k, v, o projections, SwiGLU MLP
  attn(keys)      = 4 * H * D * keys                               QK^T and PV
  global keys     = (S + 1) / 2                                    causal mean over t of (t + 1)
  local keys      = mean over t of min(t + 1, w + 1)
  gate            = 2 * d * H  (hidden mode) or 2 * H * D (query mode)     loops >= 2 only
  loop 1          = L * (dense_per_layer + attn(global keys))
  loop r >= 2     = L * (dense_per_layer + attn(global keys) + attn(local keys) + gate)
  forward         = loop 1 + (R - 1) * loop r>=2 + 2 * d * V       (lm_head once, on the last loop)
  train           = 3 * forward                                    (backward = 2x forward)

XLA's cost analysis cannot replace this: it does not multiply a scan body by its trip count and
does not see inside custom kernels (the tests check the two agree on an unscanned R=1 forward).
"""

from __future__ import annotations

from loopcoder_jax.model.config import PLTConfig


def _mean_keys(seq_len: int, left: int | None) -> float:
  """Mean over query positions t in [0, S) of the visible keys: min(t + 1, left + 1)."""
  if left is None or left + 1 >= seq_len:
    return (seq_len + 1) / 2
  w = left + 1  # t < w sees t + 1 keys, the rest see w
  return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def _dense_per_layer(cfg: PLTConfig) -> int:
  d, h, k, hd, i = (
      cfg.hidden_size,
      cfg.num_attention_heads,
      cfg.num_key_value_heads,
      cfg.head_size,
      cfg.intermediate_size,
  )
  return 2 * (d * h * hd + 2 * d * k * hd + h * hd * d + 3 * d * i)


def _gate(cfg: PLTConfig) -> int:
  h = cfg.num_attention_heads
  return (
      2
      * h
      * (cfg.hidden_size if cfg.plt_gate_use_hidden_states else cfg.head_size)
  )


def _attn(cfg: PLTConfig, keys: float) -> float:
  return 4 * cfg.num_attention_heads * cfg.head_size * keys


def forward_flops_per_token(
    cfg: PLTConfig, seq_len: int, *, causal: bool = True
) -> float:
  """Forward FLOPs per token (module docstring). `causal=False` counts every query against all S keys
  in both branches, i.e. what a dense-mask implementation executes (for comparing with XLA).
  """
  if seq_len < 1:
    raise ValueError(f"seq_len must be >= 1, got {seq_len}")
  glob = _mean_keys(seq_len, None) if causal else seq_len
  loc = _mean_keys(seq_len, cfg.window_left) if causal else seq_len
  dense = _dense_per_layer(cfg)
  loop1 = cfg.num_hidden_layers * (dense + _attn(cfg, glob))
  loop_r = cfg.num_hidden_layers * (
      dense + _attn(cfg, glob) + _attn(cfg, loc) + _gate(cfg)
  )
  return (
      loop1
      + (cfg.plt_num_loops - 1) * loop_r
      + 2 * cfg.hidden_size * cfg.vocab_size
  )


def train_flops_per_token(cfg: PLTConfig, seq_len: int) -> float:
  """Useful training FLOPs per token: 3 x forward (see module docstring); remat is not counted."""
  return 3 * forward_flops_per_token(cfg, seq_len)


def decode_flops_per_token(cfg: PLTConfig, context_len: int) -> float:
  """FLOPs to produce one token at position `context_len - 1` (all R loop rows of one decode step):
  the new token attends to `context_len` loop-1 keys and min(context_len, left + 1) own keys.
  """
  if context_len < 1:
    raise ValueError(f"context_len must be >= 1, got {context_len}")
  dense = _dense_per_layer(cfg)
  loc = min(context_len, cfg.window_left + 1)
  loop1 = cfg.num_hidden_layers * (dense + _attn(cfg, context_len))
  loop_r = cfg.num_hidden_layers * (
      dense + _attn(cfg, context_len) + _attn(cfg, loc) + _gate(cfg)
  )
  return (
      loop1
      + (cfg.plt_num_loops - 1) * loop_r
      + 2 * cfg.hidden_size * cfg.vocab_size
  )
