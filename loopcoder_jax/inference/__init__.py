"""Inference: the PLT KV cache, prefill and batched-loop decoding, samplers, text completion, the
engine (compiled once per shape bucket) and continuous batching (the HTTP server over it is the
`serving` room).
"""

from loopcoder_jax.inference.batching import (
    QueueFull,
    Request,
    Scheduler,
)
from loopcoder_jax.inference.cache import (
    LAYOUTS,
    PER_LAYER,
    STACKED,
    Cache,
    CacheKV,
    Layout,
    cache_bytes,
    cache_entries_per_sequence,
    cache_shapes,
    cache_shardings,
    init_cache,
    params_layout,
)
from loopcoder_jax.inference.decode import (
    MODES,
    decode_step,
    extend,
    generate,
    make_serving_fns,
    prefill,
    prefill_and_generate,
    serving_shardings,
)
from loopcoder_jax.inference.engine import Engine
from loopcoder_jax.inference.generation import (
    StopWatch,
    TextStop,
    complete,
    encode_prompts,
    truncate,
)
from loopcoder_jax.inference.sampling import (
    Greedy,
    StopRule,
    Temperature,
    TopK,
    TopP,
    make_sampler,
)

__all__ = [
    "LAYOUTS",
    "MODES",
    "PER_LAYER",
    "STACKED",
    "Cache",
    "CacheKV",
    "Engine",
    "Greedy",
    "Layout",
    "QueueFull",
    "Request",
    "Scheduler",
    "StopRule",
    "StopWatch",
    "Temperature",
    "TextStop",
    "TopK",
    "TopP",
    "cache_bytes",
    "cache_entries_per_sequence",
    "cache_shapes",
    "cache_shardings",
    "complete",
    "decode_step",
    "encode_prompts",
    "extend",
    "generate",
    "init_cache",
    "make_sampler",
    "make_serving_fns",
    "params_layout",
    "prefill",
    "truncate",
    "prefill_and_generate",
    "serving_shardings",
]
