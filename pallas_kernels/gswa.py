"""Fused gated sliding-window attention (G-SWA, loops >= 2) in one Pallas kernel.

out = g * causal(q, k1, v1) + (1 - g) * window(q, k, v), g = gate [B,S,H] (weight on the GLOBAL
branch over loop 1's K/V). Per query block the kernel reads q once, walks loop 1's causal KV blocks
then the window's KV blocks with two online softmaxes, and blends in the epilogue. The backward
fuses both branches' dq in one kernel (q, dO read once) and runs one dk/dv kernel per branch; the
gate gradient is rowsum(dO * (o_global - o_local)), from the difference the forward saves.
The oracle: `reference.gswa_reference`.
"""

from __future__ import annotations

from pallas_kernels import _ops


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
    block_q: int | None = None,
    block_kv_global: int | None = None,
    block_kv_local: int | None = None,
    backend: str | None = None,
):
  """q [B,S,H,D]; k1/v1 (loop 1) and k/v (this loop) [B,S,Hkv,D]; gate [B,S,H] -> [B,S,H,D]."""
  if left is None:
    raise ValueError(
        "gswa_attention needs an int window `left` for the local branch, got None"
    )
  _ops.check_inputs(q, [(k1, v1), (k, v)], segment_ids, gate, [None, left])
  return _ops.attention(
      q,
      ((k1, v1), (k, v)),
      segment_ids,
      gate,
      lefts=(None, left),
      block_q=block_q,
      blocks_kv=(block_kv_global, block_kv_local),
      backend=backend,
  )
