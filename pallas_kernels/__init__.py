"""Pallas attention kernels for PLT: causal sliding-window attention and the fused G-SWA.

`sliding_window_attention(q, k, v, segment_ids, *, left)` and
`gswa_attention(q, k1, v1, k, v, gate, segment_ids, *, left)`, each with forward and backward
kernels, tested against the one jnp attention reference in `reference.py` (which also states the
window convention, the mask value and the G-SWA blend for the whole repository). Mosaic on TPU,
interpret mode on CPU, cuDNN/XLA on GPU, picked at trace time (`default_backend` overrides it, see
`_ops.py`); inside `shard_map` under an active mesh.
"""

from pallas_kernels._ops import BACKENDS, default_backend
from pallas_kernels.gswa import gswa_attention
from pallas_kernels.reference import gswa_reference, sliding_window_reference
from pallas_kernels.sliding_window import sliding_window_attention

__all__ = [
    "BACKENDS",
    "default_backend",
    "gswa_attention",
    "gswa_reference",
    "sliding_window_attention",
    "sliding_window_reference",
]
