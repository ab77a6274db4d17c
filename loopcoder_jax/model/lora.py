"""LoRA adapters on the shared layers' projections, and the trees that hold them.

A targeted projection `y = x W` (W `[in..., out...]`, `model/layers.py`) becomes
`y + scale * (x A) B` with `scale = alpha / rank`, A `[n, in, rank]`, B `[n, rank, out]` (the in and
out axes flattened; float32 whatever the base's dtype), B zero-initialised so an untrained adapter
changes nothing. n is 1 for shared
adapters (every loop) and R for per-loop adapters, where the rows of loop r use `A[r], B[r]`. Which
loop a row belongs to is the KV source's `loops` (`model/kv.py`): one loop for a whole pass, or, when
the R loops of a decode step run as R rows of one pass, loop `loops[s]` for row s.

The adapters are params of sibling modules named `<projection>_lora` (`layers/self_attn/q_proj_lora/a`),
so a LoRA model's param tree is the base tree plus adapter leaves: `split` separates them (the
trainer differentiates and checkpoints only the adapters), `combine` puts them back, `merge` folds
shared adapters into the base kernels (the plain model of the same function).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from loopcoder_jax.model.config import PLTConfig

SUFFIX = "_lora"
# LoRA target -> (param scope under `layers`, projection module name, input axes of its kernel)
TARGETS: dict[str, tuple[str, str, int]] = {
    "q": ("self_attn", "q_proj", 1),
    "k": ("self_attn", "k_proj", 1),
    "v": ("self_attn", "v_proj", 1),
    "o": ("self_attn", "o_proj", 2),
    "gate": ("mlp", "gate_proj", 1),
    "up": ("mlp", "up_proj", 1),
    "down": ("mlp", "down_proj", 1),
}


def _a_init(key, shape, dtype):
  """PEFT's default for A (Kaiming-uniform, a = sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))."""
  bound = 1.0 / math.sqrt(shape[-2])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class Adapter(nn.Module):
  """The low-rank update of one projection whose kernel has shape `shape` (`n_in` input axes)."""

  cfg: PLTConfig
  shape: tuple[int, ...]
  n_in: int = 1

  @nn.compact
  def __call__(self, x, y, loops: tuple[int, ...]):
    """`y` (the projection of `x`, `[B, S, out...]`) plus this adapter's update for rows of `loops`."""
    lc = self.cfg.lora
    assert lc is not None
    pdt = (
        jnp.float32
    )  # the trained masters, whatever the base's dtype (they are small)
    n = self.cfg.plt_num_loops if lc.per_loop else 1
    k_in = math.prod(self.shape[: self.n_in])
    k_out = math.prod(self.shape[self.n_in :])
    a = self.param("a", _a_init, (n, k_in, lc.rank), pdt).astype(x.dtype)
    b = self.param("b", nn.initializers.zeros, (n, lc.rank, k_out), pdt)
    b = b.astype(x.dtype)
    x2 = x.reshape(*x.shape[: x.ndim - self.n_in], k_in)  # [B, S, in]
    if lc.dropout > 0 and self.has_rng("dropout"):
      keep = jax.random.bernoulli(
          self.make_rng("dropout"), 1.0 - lc.dropout, x2.shape
      )
      x2 = jnp.where(keep, x2 / (1.0 - lc.dropout), 0).astype(x2.dtype)
    if n == 1 or len(set(loops)) == 1:
      r = 0 if n == 1 else loops[0]
      delta = (x2 @ a[r]) @ b[r]
    else:  # row s of the pass is loop loops[s]
      if x2.shape[1] != len(loops):
        raise ValueError(
            f"{x2.shape[1]} rows for the {len(loops)} loops {loops}"
        )
      idx = jnp.asarray(loops)
      low = jnp.einsum("bsi,sir->bsr", x2, a[idx])
      delta = jnp.einsum("bsr,sro->bso", low, b[idx])
    delta = (lc.scale * delta).reshape(*x.shape[: x.ndim - self.n_in], -1)
    return y + delta.reshape(y.shape).astype(y.dtype)


def declare(module: nn.Module, shapes: dict[str, tuple[int, ...]]) -> None:
  """In a `setup`: an Adapter attribute `<projection>_lora` for each targeted kernel shape."""
  lc = module.cfg.lora
  for target, shape in shapes.items():
    if lc is not None and target in lc.targets:
      _, name, n_in = TARGETS[target]
      setattr(module, name + SUFFIX, Adapter(module.cfg, shape, n_in))


def adapt(module: nn.Module, target: str, x, y, loops, shape=None):
  """`y = proj(x, W)` plus the target's adapter when the config adapts it: the one `declare`d in
  `module`'s setup, or (inside a compact method) one created here for a kernel of `shape`.
  """
  lc = module.cfg.lora
  if lc is None or target not in lc.targets:
    return y
  _, name, n_in = TARGETS[target]
  adapter = getattr(module, name + SUFFIX, None)
  if adapter is None:
    adapter = Adapter(module.cfg, tuple(shape), n_in, name=name + SUFFIX)
  return adapter(x, y, loops)


# ------------------------------------------------------------------------------------ the trees
def _is_adapter(key: str) -> bool:
  return key.endswith(SUFFIX)


def split(params: Any) -> tuple[Any, Any]:
  """(base params, adapters) of a LoRA model's stacked param tree (dicts; adapters keep their paths)."""

  def walk(tree):
    base, ad = {}, {}
    for k, v in tree.items():
      if _is_adapter(k):
        ad[k] = v
      elif isinstance(v, dict):
        b, a = walk(v)
        base[k] = b
        if a:
          ad[k] = a
      else:
        base[k] = v
    return base, ad

  return walk(dict(params))


def combine(base: Any, adapters: Any) -> Any:
  """The LoRA model's param tree: `base` with the adapter leaves added at their paths."""
  out = dict(base)
  for k, v in adapters.items():
    out[k] = combine(out[k], v) if k in out and not _is_adapter(k) else v
  return out


def merge(cfg: PLTConfig, params: Any) -> Any:
  """Shared adapters folded into the base kernels: `W + scale * A @ B` (float32, cast to W's dtype).

  Returns the plain model's params (no adapter leaves), for `cfg.replace(lora=None)`.
  """
  lc = cfg.lora
  if lc is None:
    return params
  if lc.per_loop:
    raise ValueError(
        "per-loop LoRA adapters cannot be merged: the loops share one weight set"
    )
  base, adapters = split(params)
  layers = {k: dict(v) for k, v in base["layers"].items()}
  for target in lc.targets:
    scope, name, _ = TARGETS[target]
    ab = adapters["layers"][scope][name + SUFFIX]
    kernel = layers[scope][name]["kernel"]
    delta = jnp.einsum(
        "lir,lro->lio",
        ab["a"][:, 0].astype(jnp.float32),
        ab["b"][:, 0].astype(jnp.float32),
    )
    merged = kernel.astype(jnp.float32) + lc.scale * delta.reshape(kernel.shape)
    layers[scope] = {
        **layers[scope],
        name: {**layers[scope][name], "kernel": merged.astype(kernel.dtype)},
    }
  return {**base, "layers": layers}


def count(adapters: Any) -> tuple[int, int]:
  """(parameters, bytes) of an adapter tree (arrays or ShapeDtypeStructs)."""
  leaves = jax.tree.leaves(adapters)
  return (
      sum(math.prod(x.shape) for x in leaves),
      sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in leaves),
  )
