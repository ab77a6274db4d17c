"""Inference: the PLT KV cache, prefill and batched-loop decoding, samplers, text completion."""

from loopcoder_jax.inference.decode import (
    Cache,
    cache_bytes,
    cache_shapes,
    decode_step,
    extend,
    generate,
    init_cache,
    make_serving_fns,
    prefill,
)
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
    "Cache",
    "Greedy",
    "StopRule",
    "StopWatch",
    "Temperature",
    "TextStop",
    "TopK",
    "TopP",
    "cache_bytes",
    "cache_shapes",
    "complete",
    "decode_step",
    "encode_prompts",
    "extend",
    "generate",
    "init_cache",
    "make_sampler",
    "make_serving_fns",
    "prefill",
    "truncate",
]
