"""The sharded training step: state, loss, gradient accumulation, jit with shardings and donation.

Batch = dict of `[global_batch, seq_len]` arrays: `inputs, targets, segment_ids, positions` (int32)
and `loss_mask` (float32). Loss = mean next-token cross-entropy (float32) over `loss_mask` of the
whole global batch; with `grad_accum = A` the batch is split into A micro-batches (row j*A + a goes
to micro-batch a, so every micro-batch stays spread over all data shards) whose summed gradients
equal the full-batch gradient.

LoRA (`model_cfg.lora`): the state's params are the adapters only (`model.lora.split`), and the
frozen base params are an input of the step that is never differentiated: no gradient and no
optimizer state exist for them. `step_fn(state, batch, base)`; dropout masks, when `lora.dropout`,
come from `seed` and the step, so a resumed run draws the same ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import optax

from loopcoder_jax.model import lora, loss
from loopcoder_jax.model import sharding as shd
from loopcoder_jax.model.config import PLTConfig
from loopcoder_jax.model.transformer import (
    PLTForCausalLM,
    abstract_params,
    head_weight,
)

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


@flax.struct.dataclass
class TrainState:
  step: Any  # an int32 scalar (or its ShapeDtypeStruct / sharding)
  params: Any
  opt_state: Any


def batch_spec(
    global_batch: int, seq_len: int
) -> dict[str, jax.ShapeDtypeStruct]:
  """Abstract batch (for `.lower()` and checks)."""
  return {
      k: jax.ShapeDtypeStruct(
          (global_batch, seq_len),
          jnp.float32 if k == "loss_mask" else jnp.int32,
      )
      for k in BATCH_KEYS
  }


def state_shardings_for(
    model_cfg: PLTConfig, tx: optax.GradientTransformation, mesh: Mesh, rules
):
  """(abstract TrainState, TrainState of NamedShardings): optimizer state sharded like its params
  (a LoRA model's: the adapters)."""
  abs_params = trained_params(abstract_params(model_cfg), model_cfg)
  p_sh = shd.param_shardings(abs_params, mesh, rules)
  abs_opt = jax.eval_shape(tx.init, abs_params)
  rep = shd.replicated(mesh)
  opt_sh = optax.tree_map_params(
      tx,
      lambda _, s: s,
      abs_opt,
      p_sh,
      transform_non_params=lambda _: rep,
      is_leaf=lambda x: isinstance(x, optax.MaskedNode),
  )
  abs_state = TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32),
      params=abs_params,
      opt_state=abs_opt,
  )
  return abs_state, TrainState(step=rep, params=p_sh, opt_state=opt_sh)


def trained_params(params, model_cfg: PLTConfig):
  """What a step trains of the model's params: all of them, or a LoRA model's adapters."""
  return params if model_cfg.lora is None else lora.split(params)[1]


def base_shardings(model_cfg: PLTConfig, mesh: Mesh, rules=shd.DEFAULT_RULES):
  """(abstract base params, their NamedShardings) of a LoRA model: the step's frozen input."""
  base = lora.split(abstract_params(model_cfg))[0]
  return base, shd.param_shardings(base, mesh, rules)


def _ce_sums(model: PLTForCausalLM, params, batch, rngs=None):
  """(sum of masked next-token CE in float32, sum over loops >= 2 of the masked mean-over-L,H gate)."""
  x_BxSxd, inter = model.apply(
      {"params": params},
      batch["inputs"],
      segment_ids=batch["segment_ids"],
      positions=batch["positions"],
      return_intermediates=True,
      head=False,
      rngs=rngs,
  )
  mask_BxS = batch["loss_mask"].astype(jnp.float32)
  ce_sum = loss.cross_entropy_sum(
      x_BxSxd,
      head_weight(model.cfg, params),
      batch["targets"],
      mask_BxS,
      chunk=model.cfg.runtime.loss_chunk,
  )
  gates = inter["gates"]  # [R-1, L, B, S, H] or None
  if gates is None:
    gate_sum_R = jnp.zeros((0,), jnp.float32)
  else:
    gate_sum_R = jnp.einsum(
        "rlbsh,bs->r", gates.astype(jnp.float32), mask_BxS
    ) / (gates.shape[1] * gates.shape[4])
  return ce_sum, gate_sum_R


def make_train_fns(
    model_cfg: PLTConfig,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules=shd.DEFAULT_RULES,
    *,
    grad_accum: int = 1,
    schedule: Callable | None = None,
    seed: int = 0,
):
  """Returns `(init_fn(rng) -> TrainState, step_fn(state, batch) -> (state, metrics), state_shardings)`
  (LoRA: `step_fn(state, batch, base)`, and `init_fn` initialises the adapters only).

  Both are jitted with explicit shardings (`step_fn` donates the state). `metrics`: loss, grad_norm,
  tokens (loss-mask sum), gate_mean `[R-1]` (mean global-branch gate per loop >= 2) and, when
  `schedule` is given, lr (the rate applied in this step).
  """
  if grad_accum < 1:
    raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
  model = PLTForCausalLM(model_cfg)
  lc = model_cfg.lora
  _, state_sh = state_shardings_for(model_cfg, tx, mesh, rules)
  rep = shd.replicated(mesh)
  b_sh = shd.batch_sharding(mesh, rules)

  def _init(rng):
    # No logical context here: init traces a (1, 1) dummy batch that no mesh axis divides. A LoRA
    # model's base params are initialised and dropped (XLA removes that work): adapters only.
    params = model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]
    params = trained_params(params, model_cfg)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params)
    )

  def grads_of(params, base, batch, denom, rng):
    """Gradients w.r.t. `params` (the trained tree); `base` (LoRA: the frozen params) is closed
    over, not differentiated."""

    def loss_fn(p, mb, rng):
      full = p if base is None else lora.combine(base, p)
      rngs = None if rng is None else {"dropout": rng}
      ce_sum, gate_sum = _ce_sums(model, full, mb, rngs)
      return ce_sum / denom, (ce_sum, gate_sum)

    if grad_accum == 1:
      (_, (ce_sum, gate_sum)), grads = jax.value_and_grad(
          loss_fn, has_aux=True
      )(params, batch, rng)
      return grads, ce_sum, gate_sum

    def split(x):
      b = x.shape[0]
      if b % grad_accum:
        raise ValueError(
            f"global batch {b} is not divisible by grad_accum={grad_accum}"
        )
      return x.reshape(b // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)

    micro = jax.tree.map(split, batch)

    def body(carry, xs):
      mb, i = xs
      mb = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, b_sh), mb)
      rng_i = None if rng is None else jax.random.fold_in(rng, i)
      (_, (ce_sum, gate_sum)), g = jax.value_and_grad(loss_fn, has_aux=True)(
          params, mb, rng_i
      )
      g = jax.lax.with_sharding_constraint(
          jax.tree.map(lambda x: x.astype(jnp.float32), g), state_sh.params
      )
      return jax.tree.map(jnp.add, carry, (g, ce_sum, gate_sum)), None

    zeros = (
        jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
        jnp.zeros((), jnp.float32),
        jnp.zeros((max(model_cfg.plt_num_loops - 1, 0),), jnp.float32),
    )
    (grads, ce_sum, gate_sum), _ = jax.lax.scan(
        body, zeros, (micro, jnp.arange(grad_accum))
    )
    return grads, ce_sum, gate_sum

  def _step(state: TrainState, batch, base=None):
    rng = None
    if lc is not None and lc.dropout > 0:
      rng = jax.random.fold_in(jax.random.key(seed), state.step)
    with shd.logical_context(mesh, rules):
      tokens = jnp.sum(batch["loss_mask"].astype(jnp.float32))
      denom = jnp.maximum(tokens, 1.0)
      grads, ce_sum, gate_sum = grads_of(state.params, base, batch, denom, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": ce_sum / denom,
        "grad_norm": optax.tree.norm(grads),
        "tokens": tokens,
        "gate_mean": gate_sum / denom,
    }
    if schedule is not None:
      metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
    return (
        TrainState(step=state.step + 1, params=params, opt_state=opt_state),
        metrics,
    )

  init_fn = jax.jit(_init, out_shardings=state_sh)
  batch_sh = {k: b_sh for k in BATCH_KEYS}
  in_sh: tuple = (state_sh, batch_sh)
  if lc is not None:
    in_sh += (base_shardings(model_cfg, mesh, rules)[1],)
  step_fn = jax.jit(
      _step,
      in_shardings=in_sh,
      out_shardings=(state_sh, rep),
      donate_argnums=0,
  )
  return init_fn, step_fn, state_sh


def make_eval_fn(model_cfg: PLTConfig, mesh: Mesh, rules=shd.DEFAULT_RULES):
  """`eval_fn(params, batch) -> (sum of masked CE in nats, loss-mask sum)`, jitted and sharded."""
  model = PLTForCausalLM(model_cfg)
  p_sh = shd.param_shardings(abstract_params(model_cfg), mesh, rules)
  b_sh = shd.batch_sharding(mesh, rules)

  def _eval(params, batch):
    with shd.logical_context(mesh, rules):
      ce_sum, _ = _ce_sums(model, params, batch)
    return ce_sum, jnp.sum(batch["loss_mask"].astype(jnp.float32))

  return jax.jit(
      _eval,
      in_shardings=(p_sh, {k: b_sh for k in BATCH_KEYS}),
      out_shardings=shd.replicated(mesh),
  )


def global_batch(
    local_batch: dict, mesh: Mesh, rules=shd.DEFAULT_RULES
) -> dict[str, jax.Array]:
  """Per-host numpy rows -> global jax Arrays (this host's rows land on its devices)."""
  b_sh = shd.batch_sharding(mesh, rules)
  missing = set(BATCH_KEYS) - set(local_batch)
  if missing:
    raise ValueError(
        f"batch lacks keys {sorted(missing)}; expected {BATCH_KEYS}"
    )
  return {
      k: jax.make_array_from_process_local_data(b_sh, local_batch[k])
      for k in BATCH_KEYS
  }
