"""Attention for PLT: causal (global) and sliding-window (local) branches, and their G-SWA blend.

Layouts: q `[B, S, H, D]`, k/v `[B, T, Hkv, D]` (GQA: H % Hkv == 0), segment ids `[B, S]` int32
(packed documents never attend to each other), gate `[B, S, H]` = weight on the GLOBAL branch.
Masks use the index inside the row; RoPE positions are applied by the caller.

Window convention (the only place it is encoded for the references): query t sees keys
`t - left .. t` of its own loop (left + 1 keys), i.e. flash-attn's `window_size = (left, 0)`.
`window_visible` is the formula; the blocked reference and the kernels are tested against it.

`attention_impl` selects: "reference" (pure jnp; local branch costs O(S x window); the kernels'
oracle and the CPU default), "xla" (`jax.nn.dot_product_attention`, cuDNN on GPU when it applies)
and "pallas" (our kernels).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # masked scores: finite, so a fully masked row gives no NaN


def window_visible(q_idx, k_idx, left: int | None):
  """True where key k_idx is visible to query q_idx: causal, and within `left` if given."""
  ok = k_idx <= q_idx
  if left is not None:
    ok &= k_idx >= q_idx - left
  return ok


def _group(q, num_kv_heads):
  b, s, h, d = q.shape
  return q.reshape(b, s, num_kv_heads, h // num_kv_heads, d)


def masked_attention(q, k, v, mask):
  """Dense softmax attention with an explicit boolean mask `[B, S, T]` (f32 softmax)."""
  b, s, h, d = q.shape
  qg = _group(q, k.shape[2])
  scores = jnp.einsum("bskgd,btkd->bkgst", qg, k, preferred_element_type=jnp.float32)
  scores = scores / math.sqrt(d)
  scores = jnp.where(mask[:, None, None], scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bkgst,btkd->bskgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.reshape(b, s, h, d).astype(q.dtype)


def _segments(segment_ids, batch, length):
  if segment_ids is None:
    return jnp.zeros((batch, length), jnp.int32)
  return segment_ids.astype(jnp.int32)


def dense_mask(segment_ids, length: int, left: int | None):
  idx = jnp.arange(length)
  mask = window_visible(idx[:, None], idx[None, :], left)[None]
  return mask & (segment_ids[:, :, None] == segment_ids[:, None, :])


def causal_attention_reference(q, k, v, segment_ids=None):
  """Global branch: causal attention over keys 0..t of the same segment (dense mask)."""
  seg = _segments(segment_ids, q.shape[0], q.shape[1])
  return masked_attention(q, k, v, dense_mask(seg, q.shape[1], None))


def local_attention_reference(q, k, v, segment_ids=None, *, left: int, block_size: int = 0):
  """Local branch in O(S x (block + left)): each query block sees its own and the previous block."""
  b, s, h, d = q.shape
  seg = _segments(segment_ids, b, s)
  block = max(block_size, left, 1)
  if block >= s:
    return masked_attention(q, k, v, dense_mask(seg, s, left))
  n = -(-s // block)
  pad = n * block - s
  pad3 = ((0, 0), (0, pad), (0, 0), (0, 0))
  qb = jnp.pad(q, pad3).reshape(b, n, block, h, d)
  kb = jnp.pad(k, pad3).reshape(b, n, block, k.shape[2], d)
  vb = jnp.pad(v, pad3).reshape(b, n, block, k.shape[2], d)
  sb = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=-1).reshape(b, n, block)

  def with_prev(x):  # [B, n, block, ...] -> [B, n, 2*block, ...]: previous block then this one
    prev = jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1)
    return jnp.concatenate([prev, x], axis=2)

  kk, vv = with_prev(kb), with_prev(vb)
  sk = with_prev(sb)
  q_idx = jnp.arange(n * block).reshape(n, block)
  k_idx = q_idx[:, :1] - block + jnp.arange(2 * block)[None]
  mask = window_visible(q_idx[:, :, None], k_idx[:, None, :], left) & (k_idx >= 0)[:, None, :]
  mask = mask[None] & (sb[..., :, None] == sk[..., None, :])
  fold = lambda x: x.reshape(b * n, *x.shape[2:])
  out = masked_attention(fold(qb), fold(kk), fold(vv), fold(mask))
  return out.reshape(b, n * block, h, d)[:, :s]


def _xla_attention(q, k, v, segment_ids, left):
  seg = _segments(segment_ids, q.shape[0], q.shape[1])
  mask = (seg[:, :, None] == seg[:, None, :])[:, None]
  window = None if left is None else (left, 0)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, local_window_size=window)


def causal_attention(q, k, v, segment_ids=None, *, impl: str = "reference"):
  if impl == "pallas":
    from pallas_kernels import sliding_window_attention
    return sliding_window_attention(q, k, v, segment_ids, left=None)
  if impl == "xla":
    return _xla_attention(q, k, v, segment_ids, None)
  return causal_attention_reference(q, k, v, segment_ids)


def local_attention(q, k, v, segment_ids=None, *, left: int, impl: str = "reference", block_size: int = 0):
  if impl == "pallas":
    from pallas_kernels import sliding_window_attention
    return sliding_window_attention(q, k, v, segment_ids, left=left)
  if impl == "xla":
    return _xla_attention(q, k, v, segment_ids, left)
  return local_attention_reference(q, k, v, segment_ids, left=left, block_size=block_size)


def blend(gate, global_out, local_out):
  """y = g * global + (1 - g) * local, per query head."""
  g = gate[..., None].astype(jnp.float32)
  out = g * global_out.astype(jnp.float32) + (1.0 - g) * local_out.astype(jnp.float32)
  return out.astype(global_out.dtype)


def gswa_attention(q, k1, v1, k, v, gate, segment_ids=None, *, left: int, impl: str = "reference",
                   block_size: int = 0):
  """Gated sliding-window attention of loops >= 2: global over loop 1's K/V, local over own K/V."""
  if impl == "pallas":
    from pallas_kernels import gswa_attention as fused
    return fused(q, k1, v1, k, v, gate, segment_ids, left=left)
  glob = causal_attention(q, k1, v1, segment_ids, impl=impl)
  loc = local_attention(q, k, v, segment_ids, left=left, impl=impl, block_size=block_size)
  return blend(gate, glob, loc)
