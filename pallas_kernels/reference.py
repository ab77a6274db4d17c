"""The attention reference: the window, the mask value, softmax attention and the G-SWA blend.

This module is the one statement of these for the whole repository; the kernels are tested against
it and the model (`loopcoder_jax.model.attention`, decoding) builds its jnp paths from it.

Window convention (flash-attn `window_size = (left, 0)`): query t sees keys `t - left .. t` of its own
segment (left + 1 keys); `left=None` is plain causal (keys `0 .. t`).

Layouts: q `[B, S, H, D]`, k/v `[B, T, Hkv, D]` (GQA: H % Hkv == 0), segment ids `[B, S]` int (packed
documents never attend to each other), gate `[B, S, H]` = the weight on the GLOBAL branch. Softmax
statistics in float32, scale 1/sqrt(D).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Masked scores: finite, so a fully masked row gives a uniform (ignored) distribution, never NaN.
MASK_VALUE = -1e30


def window_visible(q_idx, k_idx, left: int | None):
  """True where key `k_idx` is visible to query `q_idx`: causal, and within `left` if given."""
  ok = k_idx <= q_idx
  if left is not None:
    ok &= k_idx >= q_idx - left
  return ok


def attention_probs(q, k, mask):
  """Softmax probabilities `[B, Hkv, G, S, T]` (f32) of q `[B, S, H, D]` over k `[B, T, Hkv, D]`
  under a boolean mask `[B, S, T]`; query head h is (h // G, h % G) for G = H // Hkv.
  """
  b, s, h, d = q.shape
  qg = q.reshape(b, s, k.shape[2], h // k.shape[2], d)
  scores = jnp.einsum(
      "bskgd,btkd->bkgst", qg, k, preferred_element_type=jnp.float32
  )
  scores = jnp.where(mask[:, None, None], scores / math.sqrt(d), MASK_VALUE)
  return jax.nn.softmax(scores, axis=-1)


def attention_output(probs, v):
  """`[B, S, H, D]` from probabilities `[B, Hkv, G, S, T]` and v `[B, T, Hkv, D]` (f32 sums)."""
  b, kv_heads, g, s = probs.shape[:4]
  out = jnp.einsum(
      "bkgst,btkd->bskgd",
      probs.astype(v.dtype),
      v,
      preferred_element_type=jnp.float32,
  )
  return out.reshape(b, s, kv_heads * g, v.shape[-1])


def masked_attention(q, k, v, mask):
  """Softmax attention `[B, S, H, D]` with an explicit boolean mask `[B, S, T]` (f32 softmax)."""
  return attention_output(attention_probs(q, k, mask), v).astype(q.dtype)


def dense_mask(segment_ids, length: int, left: int | None):
  """`[B, S, S]` visibility of a row's own keys: the window, within the same segment."""
  idx = jnp.arange(length)
  return window_visible(idx[:, None], idx[None, :], left)[None] & (
      segment_ids[:, :, None] == segment_ids[:, None, :]
  )


def sliding_window_reference(q, k, v, segment_ids=None, *, left: int | None):
  """Causal sliding-window attention with a dense `[S, S]` mask (O(S^2)): the kernels' oracle."""
  b, s = q.shape[:2]
  seg = (
      jnp.zeros((b, s), jnp.int32)
      if segment_ids is None
      else segment_ids.astype(jnp.int32)
  )
  return masked_attention(q, k, v, dense_mask(seg, s, left))


def blend(gate, global_out, local_out):
  """G-SWA: `g * global + (1 - g) * local` per query head, in float32."""
  g = gate[..., None].astype(jnp.float32)
  out = g * global_out.astype(jnp.float32) + (1.0 - g) * local_out.astype(
      jnp.float32
  )
  return out.astype(global_out.dtype)


def gswa_reference(q, k1, v1, k, v, gate, segment_ids=None, *, left: int):
  """Gated sliding-window attention: causal over loop 1's `k1, v1`, windowed over this loop's `k, v`."""
  glob = sliding_window_reference(q, k1, v1, segment_ids, left=None)
  loc = sliding_window_reference(q, k, v, segment_ids, left=left)
  return blend(gate, glob, loc)
