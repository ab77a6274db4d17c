"""Causal sliding-window flash attention (Pallas), forward and backward, and its jnp reference.

Window convention (flash-attn `window_size = (left, 0)`): query t sees keys `t - left .. t` of its
own segment; `left=None` is plain causal (keys `0 .. t`). Softmax scale 1/sqrt(D), f32 statistics
and accumulation, output in q's dtype. Kernels: `pallas_kernels/_flash.py`; backend/mesh: `_ops.py`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels import _ops


def sliding_window_attention(q, k, v, segment_ids=None, *, left: int | None, block_q: int | None = None,
                             block_kv: int | None = None, backend: str | None = None):
  """q [B,S,H,D], k/v [B,S,Hkv,D] (GQA), segment_ids [B,S] int or None -> [B,S,H,D].

  Work is O(S x (block_q + block_kv + left)) for an int `left`: only the KV blocks that intersect a
  query block's window are visited. `block_q`/`block_kv` are powers of two (default 128 for a
  window, 512 causal; capped at the sequence). `backend` overrides `jax.default_backend()`.
  """
  _ops.check_inputs(q, [(k, v)], segment_ids, None, [left])
  return _ops.attention(q, ((k, v),), segment_ids, None, lefts=(left,), block_q=block_q,
                        blocks_kv=(block_kv,), backend=backend)


def sliding_window_reference(q, k, v, segment_ids=None, *, left: int | None):
  """Dense-mask reference (O(S^2)); same contract as `sliding_window_attention`."""
  b, s, h, d = q.shape
  qg = q.reshape(b, s, k.shape[2], h // k.shape[2], d)
  scores = jnp.einsum("bskgd,btkd->bkgst", qg, k, preferred_element_type=jnp.float32) / math.sqrt(d)
  idx = jnp.arange(s)
  mask = idx[None, :] <= idx[:, None]
  if left is not None:
    mask &= idx[None, :] >= idx[:, None] - left
  mask = jnp.broadcast_to(mask, (b, s, s))
  if segment_ids is not None:
    mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
  probs = jax.nn.softmax(jnp.where(mask[:, None, None], scores, -jnp.inf), axis=-1)
  out = jnp.einsum("bkgst,btkd->bskgd", probs, v.astype(jnp.float32))
  return out.reshape(b, s, h, d).astype(q.dtype)
