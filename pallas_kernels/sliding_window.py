"""Causal sliding-window flash attention (Pallas), forward and backward.

Window convention (flash-attn `window_size = (left, 0)`): query t sees keys `t - left .. t` of its
own segment; `left=None` is plain causal (keys `0 .. t`). Softmax scale 1/sqrt(D), f32 statistics
and accumulation, output in q's dtype. Kernels: `_flash.py`; backend and mesh: `_ops.py`; the oracle:
`reference.sliding_window_reference`.
"""

from __future__ import annotations

from pallas_kernels import _ops


def sliding_window_attention(
    q,
    k,
    v,
    segment_ids=None,
    *,
    left: int | None,
    block_q: int | None = None,
    block_kv: int | None = None,
    backend: str | None = None,
):
  """q [B,S,H,D], k/v [B,S,Hkv,D] (GQA), segment_ids [B,S] int or None -> [B,S,H,D].

  Work is O(S x (block_q + block_kv + left)) for an int `left`: only the KV blocks that intersect a
  query block's window are visited. `block_q`/`block_kv` are powers of two (default 128 for a
  window, 512 causal; capped at the sequence). `backend` overrides `jax.default_backend()`.
  """
  _ops.check_inputs(q, [(k, v)], segment_ids, None, [left])
  return _ops.attention(
      q,
      ((k, v),),
      segment_ids,
      None,
      lefts=(left,),
      block_q=block_q,
      blocks_kv=(block_kv,),
      backend=backend,
  )
