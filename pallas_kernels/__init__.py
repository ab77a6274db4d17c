"""Pallas attention kernels for PLT: causal sliding-window attention and the fused G-SWA.

`sliding_window_attention(q, k, v, segment_ids, *, left)` and
`gswa_attention(q, k1, v1, k, v, gate, segment_ids, *, left)`, each with forward and backward
kernels and a pure-jnp reference beside it. Mosaic on TPU, interpret mode on CPU, cuDNN/XLA on GPU
(see `_ops.py`); inside `shard_map` under an active mesh.
"""
from pallas_kernels.gswa import gswa_attention, gswa_reference
from pallas_kernels.sliding_window import sliding_window_attention, sliding_window_reference

__all__ = ["sliding_window_attention", "sliding_window_reference", "gswa_attention", "gswa_reference"]
