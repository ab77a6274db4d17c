"""How the model scales to accelerators: FLOPs and chip peaks, ahead-of-time compilation for TPU slices."""

from loopcoder_jax.hardware import PEAKS, chip_peak, mfu
from loopcoder_jax.model.flops import (
    decode_flops_per_token,
    forward_flops_per_token,
    train_flops_per_token,
)
from loopcoder_jax.scaling.aot import (
    compile_serving,
    compile_train,
    parse_topology,
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
