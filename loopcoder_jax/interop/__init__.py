"""HF interop: HF <-> Orbax conversion and exports with the PyTorch modeling files, upcycling R = 1
to a PLT (`upcycle`). Storage itself (the name table, safetensors, `load`) is `loopcoder_jax.checkpoints`.
"""

from loopcoder_jax.checkpoints import load, load_hf
from loopcoder_jax.interop.convert import convert_checkpoint, save_hf
from loopcoder_jax.interop.upcycling import upcycle

__all__ = ["convert_checkpoint", "load", "load_hf", "save_hf", "upcycle"]
