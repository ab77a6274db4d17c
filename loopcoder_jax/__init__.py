"""loopcoder-jax: Parallel Loop Transformer (LoopCoder-v2) models in JAX/Flax."""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
  from loopcoder_jax.model.config import PLTConfig, RuntimeConfig
  from loopcoder_jax.model.transformer import PLTForCausalLM

__version__ = "0.1.0"
__all__ = ["PLTConfig", "PLTForCausalLM", "RuntimeConfig", "__version__"]

# Imported on first use: `loopcoder_jax.cli` (the scripts' flag parsing) runs
# without importing JAX.
_LAZY = {
    "PLTConfig": "loopcoder_jax.model.config",
    "RuntimeConfig": "loopcoder_jax.model.config",
    "PLTForCausalLM": "loopcoder_jax.model.transformer",
}


def __getattr__(name: str):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
