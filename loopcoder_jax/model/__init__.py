"""The PLT model: config, Flax module, attention, loss, and how its arrays map onto a mesh."""

from loopcoder_jax.model import quant
from loopcoder_jax.model.config import PLTConfig, RuntimeConfig
from loopcoder_jax.model.kv import SequenceKV
from loopcoder_jax.model.loss import cross_entropy_sum
from loopcoder_jax.model.sharding import (
    DEFAULT_RULES,
    MESH_AXES,
    make_mesh,
    param_shardings,
)
from loopcoder_jax.model.transformer import (
    PLTForCausalLM,
    abstract_params,
    head_weight,
    init_params,
    stack_layers,
    unstack_layers,
)

__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "PLTConfig",
    "PLTForCausalLM",
    "RuntimeConfig",
    "SequenceKV",
    "abstract_params",
    "cross_entropy_sum",
    "head_weight",
    "init_params",
    "make_mesh",
    "param_shardings",
    "quant",
    "stack_layers",
    "unstack_layers",
]
