"""How the model scales to accelerators: FLOPs and chip peaks, ahead-of-time compilation for TPU slices."""

from loopcoder_jax.scaling.aot import (
    compile_serving,
    compile_train,
    parse_topology,
)
from loopcoder_jax.scaling.flops import (
    PEAKS,
    chip_peak,
    decode_flops_per_token,
    forward_flops_per_token,
    mfu,
    train_flops_per_token,
)

__all__ = [
    "PEAKS",
    "chip_peak",
    "compile_serving",
    "compile_train",
    "decode_flops_per_token",
    "forward_flops_per_token",
    "mfu",
    "parse_topology",
    "train_flops_per_token",
]
