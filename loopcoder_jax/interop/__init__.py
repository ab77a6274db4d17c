"""Checkpoints in and out: HF safetensors <-> our params, loading for use, the PyTorch modeling files."""

from loopcoder_jax.interop.convert import (
    convert_checkpoint,
    load_checkpoint,
    load_hf,
    save_hf,
)

__all__ = ["convert_checkpoint", "load_checkpoint", "load_hf", "save_hf"]
