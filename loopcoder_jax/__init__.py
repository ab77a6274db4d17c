"""loopcoder-jax: Parallel Loop Transformer (LoopCoder-v2) models in JAX/Flax."""

from loopcoder_jax.model.config import PLTConfig, RuntimeConfig
from loopcoder_jax.model.transformer import PLTForCausalLM

__version__ = "0.1.0"
__all__ = ["PLTConfig", "PLTForCausalLM", "RuntimeConfig", "__version__"]
