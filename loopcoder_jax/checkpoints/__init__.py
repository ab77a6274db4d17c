"""Storage: every checkpoint on disk, in and out (the only importer of Orbax).

The params directory (config.json + Orbax params/ + CRC-32 checksums), training checkpoints, HF
safetensors through the name table, staged atomic directories, format detection, and the one
`load` that takes any of them onto a device or a mesh.
"""

from loopcoder_jax.checkpoints.errors import StorageError, storage_problem
from loopcoder_jax.checkpoints.formats import (
    content_hash,
    detect_format,
    tokenizer_dirs,
)
from loopcoder_jax.checkpoints.hf_io import load_hf
from loopcoder_jax.checkpoints.loader import check_base, load
from loopcoder_jax.checkpoints.params_io import (
    is_params_dir,
    load_params,
    lora_record,
    nonfinite_paths,
    read_config,
    save_params,
    write_lora_record,
)
from loopcoder_jax.checkpoints.training import TrainCheckpointer

__all__ = [
    "StorageError",
    "TrainCheckpointer",
    "check_base",
    "content_hash",
    "detect_format",
    "is_params_dir",
    "load",
    "load_hf",
    "load_params",
    "lora_record",
    "nonfinite_paths",
    "read_config",
    "save_params",
    "storage_problem",
    "tokenizer_dirs",
    "write_lora_record",
]
