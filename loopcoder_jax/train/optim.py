"""Optimizer and learning-rate schedule: the LoopCoder-v2 recipe (spec section 6) as defaults.

Adam(b1 0.9, b2 0.95, eps 1e-15), decoupled weight decay 0.1, global-norm clip 1.0, peak lr 4e-4,
linear warmup over the first 5% of the steps, then cosine decay to `end_lr_frac * peak` (the paper
does not state the floor; 0.1 is the common choice). Weight decay is AdamW-style (multiplied by the
scheduled lr) and applies only to matrices (`kernel`, `embedding`): norm scales and the PLT gate bias
are not decayed, since pulling a norm scale towards 0 or the gate towards 0.5 is not regularisation.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

DECAYED_LEAVES = ("kernel", "embedding")
_F32_MAX = float(np.finfo(np.float32).max)


def default_optim_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      dict(
          peak_lr=4e-4,
          warmup_frac=0.05,
          end_lr_frac=0.1,
          b1=0.9,
          b2=0.95,
          eps=1e-15,
          weight_decay=0.1,
          clip_norm=1.0,
      )
  )


def _cfg(optim_cfg: Any) -> dict:
  cfg = default_optim_config().to_dict()
  given = (
      optim_cfg.to_dict()
      if hasattr(optim_cfg, "to_dict")
      else dict(optim_cfg or {})
  )
  unknown = set(given) - set(cfg)
  if unknown:
    raise ValueError(
        f"optim: unknown keys {sorted(unknown)}; expected {sorted(cfg)}"
    )
  cfg.update(given)
  return cfg


def validate_optim_config(optim_cfg: Any) -> dict:
  c = _cfg(optim_cfg)
  if not 0 < c["peak_lr"] <= _F32_MAX:  # the schedule runs in float32
    raise ValueError(
        f"optim.peak_lr must be > 0 and finite in float32, got {c['peak_lr']}"
    )
  if not 0 <= c["warmup_frac"] < 1:
    raise ValueError(
        f"optim.warmup_frac must be in [0, 1), got {c['warmup_frac']}"
    )
  if not 0 <= c["end_lr_frac"] <= 1:
    raise ValueError(
        f"optim.end_lr_frac must be in [0, 1], got {c['end_lr_frac']}"
    )
  for k in ("b1", "b2"):
    if not 0 <= c[k] < 1:
      raise ValueError(f"optim.{k} must be in [0, 1), got {c[k]}")
  if not c["eps"] > 0:  # 0 divides a zero gradient by zero: NaN params
    raise ValueError(f"optim.eps must be > 0, got {c['eps']}")
  if c["weight_decay"] < 0 or c["clip_norm"] < 0:
    raise ValueError("optim.weight_decay and optim.clip_norm must be >= 0")
  return c


def make_schedule(optim_cfg: Any, total_steps: int) -> optax.Schedule:
  c = validate_optim_config(optim_cfg)
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {total_steps}")
  # at least one step of decay: optax's cosine needs decay_steps > warmup_steps
  warmup = min(math.ceil(c["warmup_frac"] * total_steps), total_steps - 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=c["peak_lr"],
      warmup_steps=warmup,
      decay_steps=total_steps,
      end_value=c["peak_lr"] * c["end_lr_frac"],
  )


def decay_mask(params: Any) -> Any:
  """True for the leaves that get weight decay (matrices only)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) in DECAYED_LEAVES, params
  )


def make_optimizer(
    optim_cfg: Any, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`(tx, schedule)`; `tx` clips, then AdamW with the schedule. State is sharded like the params."""
  c = validate_optim_config(optim_cfg)
  schedule = make_schedule(c, total_steps)
  parts = []
  if c["clip_norm"] > 0:
    parts.append(optax.clip_by_global_norm(c["clip_norm"]))
  parts.append(
      optax.adamw(
          schedule,
          b1=c["b1"],
          b2=c["b2"],
          eps=c["eps"],
          weight_decay=c["weight_decay"],
          mask=decay_mask,
      )
  )
  return optax.chain(*parts), schedule
