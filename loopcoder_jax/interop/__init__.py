"""Checkpoints in and out: the HF name table, streaming safetensors I/O, HF <-> our params, loading
for use (`load`), upcycling R = 1 to a PLT (`upcycle`), the PyTorch modeling files.
"""

from loopcoder_jax.interop.convert import (
    convert_checkpoint,
    load_hf,
    save_hf,
)
from loopcoder_jax.interop.loader import load
from loopcoder_jax.interop.upcycling import upcycle

__all__ = ["convert_checkpoint", "load", "load_hf", "save_hf", "upcycle"]
