"""The model's attention over a whole sequence: global (causal) and local (windowed) branches, G-SWA.

Layouts, the window convention, the mask value and the blend are those of `pallas_kernels.reference`
(the one statement of them). Masks use the index inside the row; RoPE is applied by the caller.

`attention_impl` selects: "reference" (pure jnp from the reference's `masked_attention`: the global
branch with a dense mask, the local branch blocked in O(S x window); the CPU default), "xla"
(`jax.nn.dot_product_attention`, cuDNN on GPU when it applies) and "pallas" (our kernels).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import pallas_kernels
from pallas_kernels.reference import (
    blend,
    dense_mask,
    masked_attention,
    sliding_window_reference,
    window_visible,
)

__all__ = [
    "causal_attention",
    "gswa_attention",
    "local_attention",
    "local_attention_reference",
]


def _segments(segment_ids, batch, length):
  if segment_ids is None:
    return jnp.zeros((batch, length), jnp.int32)
  return segment_ids.astype(jnp.int32)


def local_attention_reference(
    q, k, v, segment_ids=None, *, left: int, block_size: int = 0
):
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

  # [B, n, block, ...] -> [B, n, 2*block, ...]: previous block then this one
  def with_prev(
      x,
  ):
    prev = jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1)
    return jnp.concatenate([prev, x], axis=2)

  kk, vv = with_prev(kb), with_prev(vb)
  sk = with_prev(sb)
  q_idx = jnp.arange(n * block).reshape(n, block)
  k_idx = q_idx[:, :1] - block + jnp.arange(2 * block)[None]
  mask = (
      window_visible(q_idx[:, :, None], k_idx[:, None, :], left)
      & (k_idx >= 0)[:, None, :]
  )
  mask = mask[None] & (sb[..., :, None] == sk[..., None, :])

  def fold(x):
    return x.reshape(b * n, *x.shape[2:])

  out = masked_attention(fold(qb), fold(kk), fold(vv), fold(mask))
  return out.reshape(b, n * block, h, d)[:, :s]


def _xla_attention(q, k, v, segment_ids, left):
  seg = _segments(segment_ids, q.shape[0], q.shape[1])
  mask = (seg[:, :, None] == seg[:, None, :])[:, None]
  window = None if left is None else (left, 0)
  return jax.nn.dot_product_attention(
      q, k, v, mask=mask, is_causal=True, local_window_size=window
  )


def causal_attention(q, k, v, segment_ids=None, *, impl: str = "reference"):
  if impl == "pallas":
    return pallas_kernels.sliding_window_attention(
        q, k, v, segment_ids, left=None
    )
  if impl == "xla":
    return _xla_attention(q, k, v, segment_ids, None)
  return sliding_window_reference(q, k, v, segment_ids, left=None)


def local_attention(
    q,
    k,
    v,
    segment_ids=None,
    *,
    left: int,
    impl: str = "reference",
    block_size: int = 0,
):
  if impl == "pallas":
    return pallas_kernels.sliding_window_attention(
        q, k, v, segment_ids, left=left
    )
  if impl == "xla":
    return _xla_attention(q, k, v, segment_ids, left)
  return local_attention_reference(
      q, k, v, segment_ids, left=left, block_size=block_size
  )


def gswa_attention(
    q,
    k1,
    v1,
    k,
    v,
    gate,
    segment_ids=None,
    *,
    left: int,
    impl: str = "reference",
    block_size: int = 0,
):
  """Gated sliding-window attention of loops >= 2: global over loop 1's K/V, local over own K/V."""
  if impl == "pallas":
    return pallas_kernels.gswa_attention(
        q, k1, v1, k, v, gate, segment_ids, left=left
    )
  glob = causal_attention(q, k1, v1, segment_ids, impl=impl)
  loc = local_attention(
      q, k, v, segment_ids, left=left, impl=impl, block_size=block_size
  )
  return blend(gate, glob, loc)
