"""Weight-only int8 for the linear weights: per output channel, a float32 scale, dequantised in the matmul.

What is quantized: the q, k, v, o, gate, up and down projections of every layer and the untied LM
head (`TARGETS`), all but about 5% (the embedding) of the 7B's weights. Not the embedding (a
gather: a decode step reads one row per token), the norms, or the PLT gate (tiny, float32 math).

Per output channel c of a kernel `[in..., out...]` (absmax, symmetric):
  scale_c = max_i |w_ic| / 127,   q_ic = round(w_ic / scale_c)  in [-127, 127],
so every weight is off by at most scale_c / 2. `layers.proj` computes y = (x @ q) * scale with q cast
to the compute dtype (exact) and the scale applied to the float32 accumulator; XLA fuses the cast
into the dot, so the weights stream from memory at one byte each.

Why our own code rather than Qwix or AQT (both evaluated against this model, see docs/serving.md):
Qwix's PTQ finds a weight by the identity of the param array in the module running the dot; our
projections take it from a child `Kernel` module and reshape it before the one 2-D dot (the weight
is the left operand when decoding), so `qwix.quantize_model` left every param float. AQT needs an
`AqtDotGeneral` module injected at each call site and a conversion pass that freezes the weights
into a separate collection.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from loopcoder_jax.model import sharding
from loopcoder_jax.model.config import PLTConfig
from loopcoder_jax.model.transformer import abstract_params

# A quantized weight's module path (stacked layout) -> its number of input axes.
TARGETS: dict[str, int] = {
    "layers/self_attn/q_proj": 1,
    "layers/self_attn/k_proj": 1,
    "layers/self_attn/v_proj": 1,
    "layers/self_attn/o_proj": 2,
    "layers/mlp/gate_proj": 1,
    "layers/mlp/up_proj": 1,
    "layers/mlp/down_proj": 1,
    "lm_head": 1,
}


def targets(cfg: PLTConfig) -> dict[str, int]:
  """The quantized weights of this model (no head when it is tied to the embedding)."""
  return {
      p: n
      for p, n in TARGETS.items()
      if p != "lm_head" or not cfg.tie_word_embeddings
  }


def quantize(w: jax.Array, in_axes: tuple[int, ...]):
  """(int8 values, float32 scale over the other axes) of `w`, absmax per output channel."""
  w = w.astype(jnp.float32)
  scale = jnp.max(jnp.abs(w), axis=in_axes) / 127.0
  safe = jnp.expand_dims(jnp.where(scale == 0, 1.0, scale), in_axes)
  q = jnp.clip(jnp.round(w / safe), -127, 127).astype(jnp.int8)
  return q, scale


def _get(tree, path: str):
  for k in path.split("/"):
    if not isinstance(tree, dict) or k not in tree:
      return None
    tree = tree[k]
  return tree


def _set(tree: dict, path: str, value) -> dict:
  """A copy of `tree` with `path` replaced (the dicts on the way copied, the rest shared)."""
  head, _, rest = path.partition("/")
  return {**tree, head: _set(tree[head], rest, value) if rest else value}


def check_float_weights(cfg: PLTConfig, params: Any) -> None:
  """ValueError naming the first linear weight that an int8 base cannot be made from: missing, not
  floating point (already quantized) or not the shape the config gives."""
  expected = abstract_params(cfg.with_runtime(quantize="none"))
  if isinstance(params.get("layers"), (tuple, list)):
    raise ValueError(
        "int8: params in the per-layer layout; pass stacked params"
    )
  for path in targets(cfg):
    want = _get(expected, path)["kernel"]
    node = _get(params, path)
    got = node.get("kernel") if isinstance(node, dict) else None
    if got is None:
      raise ValueError(
          f"int8: the checkpoint has no linear weight {path}/kernel "
          f"(expected {want.shape})"
      )
    if "scale" in node or not jnp.issubdtype(got.dtype, jnp.floating):
      raise ValueError(
          f"int8: {path}/kernel is {got.dtype}, already quantized; an int8 base "
          f"is made from float weights"
      )
    if tuple(got.shape) != tuple(want.shape):
      raise ValueError(
          f"int8: {path}/kernel has shape {tuple(got.shape)}, the config gives "
          f"{tuple(want.shape)}"
      )


@functools.lru_cache(maxsize=64)
def _jitted(in_axes: tuple[int, ...], out_shardings):
  """`quantize` jitted once per (axes, shardings): the loader calls it for every weight."""
  fn = functools.partial(quantize, in_axes=in_axes)
  if out_shardings is None:
    return jax.jit(fn)
  return jax.jit(fn, out_shardings=out_shardings)


def int8_shardings(cfg: PLTConfig, mesh: Mesh, rules=sharding.DEFAULT_RULES):
  """Shardings of the int8 model's params on `mesh` (values as the float kernels, scales by their
  output axes)."""
  qcfg = cfg.with_runtime(quantize="int8")
  return sharding.param_shardings(abstract_params(qcfg), mesh, rules)


def quantize_weight(
    cfg: PLTConfig, path: str, w, shardings=None, *, consume: bool = False
) -> dict[str, Any]:
  """One weight ('a/b/kernel') as the int8 model holds it: `{path: w}` unless it is a quantized
  kernel, then `{path: int8 values, '<module>/scale': float32 scale}`, placed by `shardings` (the
  int8 model's tree, `int8_shardings`) or on w's device. `consume=True` deletes w once quantized.
  The loader calls this as each weight arrives."""
  module, _, leaf = path.rpartition("/")
  n_in = targets(cfg).get(module)
  if leaf != "kernel" or n_in is None:
    return {path: w}
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise ValueError(
        f"int8: {path} is {w.dtype}, already quantized; an int8 base is made from float weights"
    )
  lead = 1 if module.startswith("layers/") else 0
  outs = None
  if shardings is not None:
    s = _get(shardings, module)
    outs = (s["kernel"], s["scale"])
  q, scale = _jitted(tuple(range(lead, lead + n_in)), outs)(w)
  if consume and isinstance(w, jax.Array):
    q.block_until_ready()
    w.delete()
  return {path: q, f"{module}/scale": scale}


def quantize_params(
    cfg: PLTConfig,
    params: Any,
    mesh: Mesh | None = None,
    rules=sharding.DEFAULT_RULES,
    *,
    consume: bool = False,
) -> tuple[PLTConfig, Any]:
  """(the config with `runtime.quantize="int8"`, the params with every `targets(cfg)` weight int8).

  One weight at a time (`quantize_weight`): on a mesh the int8 values and scales get the shardings
  of the logical axis rules; without one they stay on the float weight's device. `consume=True`
  deletes each float weight once quantized, so the peak is the float params plus one int8 weight.
  Stacked layout.
  """
  check_float_weights(cfg, params)
  shardings = None if mesh is None else int8_shardings(cfg, mesh, rules)
  out = params
  for module in targets(cfg):
    w = _get(params, module)["kernel"]
    new = quantize_weight(
        cfg, f"{module}/kernel", w, shardings, consume=consume
    )
    out = _set(
        out,
        module,
        {"kernel": new[f"{module}/kernel"], "scale": new[f"{module}/scale"]},
    )
  return cfg.with_runtime(quantize="int8"), out
