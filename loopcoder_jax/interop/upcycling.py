"""Upcycling: a Llama or R = 1 checkpoint made into an R >= 2 PLT, for continued pretraining.

The shared layers stay as they are; each physical layer gets the gate that G-SWA needs (spec
section 3), initialised by one rule: zero weights, a unit `gate_norm` and the bias `gate_bias` on
every head. What the rule promises at initialisation:

- every gate is g0 = sigmoid(gate_bias) at every token and head, whatever its input (the weights are
  zero): loops >= 2 weigh the global branch, loop 1's trained keys and values, by g0 and their own
  window by 1 - g0. The default bias 2 gives g0 = 0.88: near the global branch, with the gate's
  slope g0 (1 - g0) = 0.10 left to learn from;
- loop 1 is the source model, so the logit lens of loop 1, N(h(1)) W_head, is the source's logits;
- in the limit g0 = 1 (a bias of 20 or more rounds it to 1 in float32) with `plt_hidden_scale = 0`
  and `plt_emb_scale` 1, every loop >= 2 recomputes loop 1 and the logits are the source's. The
  scales are config constants (a hidden scale of 0 turns cross-loop parallelism off for good), so
  this bounds the rule rather than recommending a setting.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from loopcoder_jax.checkpoints import hf_names
from loopcoder_jax.model.config import PLTConfig

DEFAULT_GATE_BIAS = 2.0
GATE_PREFIX = "layers/self_attn/plt_gate/"  # the params upcycling adds


def gate_params(
    cfg: PLTConfig, dtype, gate_bias: float = DEFAULT_GATE_BIAS
) -> dict[str, np.ndarray]:
  """The new gates of an R >= 2 `cfg` by the rule above, flat ('a/b/c' -> array of `dtype`)."""
  init = {"kernel": 0.0, "bias": float(gate_bias), "gate_norm/scale": 1.0}
  shapes = hf_names.param_shapes(cfg)
  return {
      p: np.full(shape, init[p[len(GATE_PREFIX) :]], dtype)
      for p, shape in shapes.items()
      if p.startswith(GATE_PREFIX)
  }


def plan_loops(
    cfg: PLTConfig, loops: int, gate_bias: float | None = None
) -> tuple[PLTConfig, bool]:
  """(config with `loops` loops, whether gates must be added), or ValueError.

  R = 1 -> R >= 2 adds gates; R >= 2 -> R' >= 2 only changes the count (the gates are shared by all
  loops >= 2), and `gate_bias` must then be None; fewer than 2 loops from R >= 2 is refused.
  """
  if isinstance(loops, bool) or not isinstance(loops, int) or loops < 1:
    raise ValueError(f"loops must be an integer >= 1, got {loops!r}")
  if gate_bias is not None and not np.isfinite(gate_bias):
    raise ValueError(f"gate_bias must be a finite number, got {gate_bias!r}")
  have = cfg.plt_num_loops
  if have > 1 and gate_bias is not None:
    raise ValueError(
        f"gate_bias applies only when upcycling an R = 1 checkpoint; this one has "
        f"plt_num_loops={have} and its own gates"
    )
  if have > 1 and loops == 1:
    raise ValueError(
        f"loops=1 would drop the gates of an R = {have} checkpoint; evaluate it with "
        "fewer loops instead (interop.load(..., loops=) or --loops in the scripts)"
    )
  return cfg.replace(plt_num_loops=loops), have == 1 and loops > 1


def upcycle(
    cfg: PLTConfig, params: Any, loops: int, *, gate_bias: float | None = None
) -> tuple[PLTConfig, Any]:
  """(cfg, params) of the model with `loops` loops; from R = 1 the gates are added by the rule in
  the module docstring (`gate_bias` None: `DEFAULT_GATE_BIAS`). `params` is not modified.
  """
  new_cfg, add = plan_loops(cfg, loops, gate_bias)
  if not add:
    return new_cfg, params
  flat = dict(hf_names.flatten(params))
  dtype = np.asarray(flat["norm/scale"]).dtype
  bias = DEFAULT_GATE_BIAS if gate_bias is None else gate_bias
  flat.update(gate_params(new_cfg, dtype, bias))
  return new_cfg, hf_names.unflatten(flat)
