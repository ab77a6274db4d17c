"""Training: the ml_collections config and its validation, optimizer, sharded step, checkpoints, the loop."""

from loopcoder_jax.checkpoints import (
    TrainCheckpointer,
    is_params_dir,
    load_params,
    save_params,
)
from loopcoder_jax.train.config import (
    base_config,
    load_config,
    model_config_from,
    validate,
)
from loopcoder_jax.train.optim import make_optimizer
from loopcoder_jax.train.step import TrainState, make_eval_fn, make_train_fns
from loopcoder_jax.train.trainer import TrainingDiverged, train

__all__ = [
    "TrainCheckpointer",
    "TrainState",
    "TrainingDiverged",
    "base_config",
    "is_params_dir",
    "load_config",
    "load_params",
    "make_eval_fn",
    "make_optimizer",
    "make_train_fns",
    "model_config_from",
    "save_params",
    "train",
    "validate",
]
