"""The pieces of a PLT layer (Flax Linen): RMSNorm, RoPE, projections, the G-SWA gate, MLP, the layer.

Shape suffixes: B batch, S sequence (or rows), d hidden, H query heads, K kv heads, D head dim,
V vocab, I MLP width. Params are created in `param_dtype` and cast to the compute `dtype`; norms,
RoPE, softmax and the gate compute in float32 (docs/plt-spec.md section 3).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
from jax.custom_derivatives import SymbolicZero
import jax.numpy as jnp

from loopcoder_jax.model import lora
from loopcoder_jax.model.config import PLTConfig

_ACT = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names(
        "qkv_proj", "attn_out"
    ),
}

init_normal = nn.initializers.normal(stddev=0.02)


def dtype_of(name: str):
  return jnp.dtype(name)


# ------------------------------------------------------------------------------------- pieces
class RMSNorm(nn.Module):
  eps: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxSxd):
    scale = self.param(
        "scale", nn.initializers.ones, (x_BxSxd.shape[-1],), self.param_dtype
    )
    x = x_BxSxd.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * scale.astype(jnp.float32)).astype(self.dtype)


def rope_tables(cfg: PLTConfig, positions_BxS):
  """cos/sin `[B, S, D]` (f32) for rotate-half RoPE at absolute positions."""
  d = cfg.head_size
  inv_freq = 1.0 / (
      cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
  )
  scaling = cfg.rope_scaling
  if scaling is not None:
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling["factor"])
    if kind == "linear":
      inv_freq = inv_freq / factor
    elif kind == "llama3":
      low = float(scaling.get("low_freq_factor", 1.0))
      high = float(scaling.get("high_freq_factor", 4.0))
      # Absent key: max_position_embeddings, as transformers' standardize_rope_params.
      old_ctx = float(
          scaling.get(
              "original_max_position_embeddings", cfg.max_position_embeddings
          )
      )
      wavelen = 2 * jnp.pi / inv_freq
      smooth = (old_ctx / wavelen - low) / (high - low)
      scaled = jnp.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
      mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
      is_mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
      inv_freq = jnp.where(is_mid, mid, scaled)
  freqs = positions_BxS.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_BxSxNxD, cos_BxSxD, sin_BxSxD):
  x = x_BxSxNxD.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  out = x * cos_BxSxD[:, :, None] + rotated * sin_BxSxD[:, :, None]
  return out.astype(x_BxSxNxD.dtype)


class Int8Kernel(NamedTuple):
  """A weight-only int8 projection weight (`model/quant.py`): w ~= values * scale.

  values: int8 `[in..., out...]`; scale: float32 `[out...]`, one per output channel.
  """

  values: jax.Array
  scale: jax.Array

  def dequantize(self, dtype) -> jax.Array:
    return (self.values.astype(jnp.float32) * self.scale).astype(dtype)


def linear_param(module: nn.Module, shape, n_in: int, param_dtype, quantize):
  """A projection weight `[in..., out...]` of `module`: the float `kernel`, or (quantize="int8")
  `kernel` int8 and `scale` float32 `[out...]` as an `Int8Kernel`. An int8 model is made by
  `quant.quantize_params`; its init (zeros) only gives the tree's shapes."""
  if quantize == "int8":
    values = module.param("kernel", nn.initializers.zeros, shape, jnp.int8)
    scale = module.param(
        "scale", nn.initializers.zeros, shape[n_in:], jnp.float32
    )
    return Int8Kernel(values, scale)
  return module.param("kernel", init_normal, shape, param_dtype)


class Kernel(nn.Module):
  """The weight of a bias-free projection (`[in..., out...]`, `n_in` input axes); callers apply it
  with `proj`."""

  shape: tuple[int, ...]
  param_dtype: Any = jnp.float32
  n_in: int = 1
  quantize: str = "none"

  @nn.compact
  def __call__(self):
    return linear_param(
        self, self.shape, self.n_in, self.param_dtype, self.quantize
    )


_FEW_ROWS = 8


@jax.custom_jvp
def tie(w, x):
  """`w` unchanged; under differentiation, tied to the activation `x` by an optimization barrier.

  Why: differentiating a scan, JAX hoists out of it whatever its body computes from loop-invariant
  inputs alone (`_scan_known_hoisting`). The later loops' scan (`transformer.py`) has the stacked
  layer weights as such inputs, so the int8 -> bf16 casts and the reshapes of every projection
  weight became one stacked copy of all L layers' weights, computed before the loop and kept until
  its last use: 12.7 GiB in the 7B's LoRA step (docs/scaling.md). Tied to the activation, each frozen
  weight is converted inside the layer, one layer at a time. Only frozen weights (no tangent: a
  LoRA base) are tied: a trained weight's program stays as it was (FSDP gathers its shards freely,
  and the hoisted copies are of shards), and without differentiation nothing is added at all.
  """
  del x
  return w


def _no_tangent(t) -> bool:
  leaves = jax.tree.leaves(t, is_leaf=lambda v: isinstance(v, SymbolicZero))
  return all(isinstance(v, SymbolicZero) for v in leaves)


@functools.partial(tie.defjvp, symbolic_zeros=True)
def _tie_jvp(primals, tangents):
  w, x = primals
  if _no_tangent(tangents[0]):
    w, _ = jax.lax.optimization_barrier((w, x))
  return w, tangents[0]


def proj(x, kernel, n_in: int = 1, out_dtype=None):
  """Contract x's last `n_in` axes with the kernel's first `n_in` (cast to x's dtype), as one 2-D matmul.

  The tokens are flattened to one matrix axis: the same numbers as the einsum, but XLA:CPU runs the
  N-D form's backward (the weight gradient over B*S) up to twice as slowly. `out_dtype`: the
  accumulation/result dtype (float32 for logits). An `Int8Kernel` is dequantised inside the matmul:
  its int8 values cast to x's dtype (exact: |q| <= 127) and the per-channel scale applied to the
  float32 accumulator, y = (x @ q) * scale, so no float copy of the weight is kept.
  """
  kernel = tie(kernel, x)
  scale = None
  if isinstance(kernel, Int8Kernel):
    kernel, scale = kernel.values, kernel.scale
  lead, k_in, k_out = (
      x.shape[: x.ndim - n_in],
      math.prod(kernel.shape[:n_in]),
      kernel.shape[n_in:],
  )
  rows = math.prod(lead)
  x2, w2 = x.reshape(rows, k_in), kernel.astype(x.dtype).reshape(k_in, -1)
  acc = out_dtype if scale is None else jnp.float32
  # decoding: (w^T x^T)^T, which XLA:CPU streams the weight through faster
  if rows <= _FEW_ROWS:
    y = jax.lax.dot_general(
        w2, x2, (((0,), (1,)), ((), ())), preferred_element_type=acc
    ).T
  else:
    y = jnp.dot(x2, w2, preferred_element_type=acc)
  if scale is not None:
    y = (y * scale.reshape(-1)).astype(out_dtype or x.dtype)
  return y.reshape(*lead, *k_out)


def _kernel(cfg, name, *shape, n_in: int = 1):
  return Kernel(
      shape,
      dtype_of(cfg.runtime.param_dtype),
      n_in,
      cfg.runtime.quantize,
      name=name,
  )


class PLTGate(nn.Module):
  """Per-head gate on the global branch; zero-initialised so g = 0.5 at start."""

  cfg: PLTConfig

  @nn.compact
  def __call__(self, h_in_BxSxd, q_BxSxHxD):
    cfg = self.cfg
    h = cfg.num_attention_heads
    pdt = dtype_of(cfg.runtime.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (h,), pdt)
    if cfg.plt_gate_use_hidden_states:
      x = RMSNorm(cfg.rms_norm_eps, jnp.float32, pdt, name="gate_norm")(
          h_in_BxSxd
      )
      kernel = self.param(
          "kernel", nn.initializers.zeros, (cfg.hidden_size, h), pdt
      )
      logits = jnp.einsum("bsd,dh->bsh", x, kernel.astype(jnp.float32))
    else:
      kernel = self.param(
          "kernel", nn.initializers.zeros, (h, cfg.head_size), pdt
      )
      logits = jnp.einsum(
          "bshd,hd->bsh",
          q_BxSxHxD.astype(jnp.float32),
          kernel.astype(jnp.float32),
      )
    return jax.nn.sigmoid(logits + bias.astype(jnp.float32))


class PLTAttention(nn.Module):
  cfg: PLTConfig

  def setup(self):
    cfg = self.cfg
    h, k, d, dm = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_size,
        cfg.hidden_size,
    )
    self.q_proj = _kernel(cfg, "q_proj", dm, h, d)
    self.k_proj = _kernel(cfg, "k_proj", dm, k, d)
    self.v_proj = _kernel(cfg, "v_proj", dm, k, d)
    self.o_proj = _kernel(cfg, "o_proj", h, d, dm, n_in=2)
    lora.declare(
        self,
        {"q": (dm, h, d), "k": (dm, k, d), "v": (dm, k, d), "o": (h, d, dm)},
    )
    if cfg.plt_num_loops > 1:
      self.plt_gate = PLTGate(cfg)

  def qkv(self, x_BxSxd, cos, sin, loops=(0,)):
    """Post-RoPE q `[B,S,H,D]`, k, v `[B,S,K,D]` from the normed layer input (rows of `loops`)."""
    x = x_BxSxd.astype(dtype_of(self.cfg.runtime.dtype))
    q = lora.adapt(self, "q", x, proj(x, self.q_proj()), loops)
    k = lora.adapt(self, "k", x, proj(x, self.k_proj()), loops)
    v = lora.adapt(self, "v", x, proj(x, self.v_proj()), loops)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return (
        checkpoint_name(q, "qkv_proj"),
        checkpoint_name(k, "qkv_proj"),
        checkpoint_name(v, "qkv_proj"),
    )

  def gate(self, h_in_BxSxd, q_BxSxHxD):
    return self.plt_gate(h_in_BxSxd, q_BxSxHxD)

  def out(self, y_BxSxHxD, loops=(0,)):
    y = checkpoint_name(y_BxSxHxD, "attn_out").astype(
        dtype_of(self.cfg.runtime.dtype)
    )
    return lora.adapt(self, "o", y, proj(y, self.o_proj(), n_in=2), loops)


class MLP(nn.Module):
  cfg: PLTConfig

  @nn.compact
  def __call__(self, x_BxSxd, loops=(0,)):
    cfg = self.cfg
    d, i = cfg.hidden_size, cfg.intermediate_size
    x = x_BxSxd.astype(dtype_of(cfg.runtime.dtype))
    gate = proj(x, _kernel(cfg, "gate_proj", d, i)())
    gate = lora.adapt(self, "gate", x, gate, loops, (d, i))
    up = lora.adapt(
        self, "up", x, proj(x, _kernel(cfg, "up_proj", d, i)()), loops, (d, i)
    )
    hidden = checkpoint_name(_ACT[cfg.hidden_act](gate) * up, "mlp_hidden")
    down = proj(hidden, _kernel(cfg, "down_proj", i, d)())
    return lora.adapt(self, "down", hidden, down, loops, (i, d))


class PLTLayer(nn.Module):
  """One physical layer: project, (gate), attend through a KV source, o_proj and MLP with residuals."""

  cfg: PLTConfig

  def setup(self):
    cfg = self.cfg
    dt, pdt = dtype_of(cfg.runtime.dtype), dtype_of(cfg.runtime.param_dtype)
    self.input_layernorm = RMSNorm(cfg.rms_norm_eps, dt, pdt)
    self.self_attn = PLTAttention(cfg)
    self.post_attention_layernorm = RMSNorm(cfg.rms_norm_eps, dt, pdt)
    self.mlp = MLP(cfg)

  def project(self, h_in, cos, sin, loops=(0,)):
    return self.self_attn.qkv(self.input_layernorm(h_in), cos, sin, loops)

  def finish(self, h_in, y_BxSxHxD, loops=(0,)):
    """o_proj + residual, then the MLP block + residual."""
    h = h_in + self.self_attn.out(y_BxSxHxD, loops).astype(h_in.dtype)
    return h + self.mlp(self.post_attention_layernorm(h), loops).astype(h.dtype)

  def __call__(self, h_BxSxd, rope, kv, xs):
    """One pass of this layer. `kv` is the pass's KV source (`model/kv.py`) and `xs` its inputs for
    this layer; rows of loops >= 2 get the gate. Returns h and the source's per-layer outputs plus
    the gate (`[B, rows, H]` or None)."""
    cos, sin = rope
    q, k, v = self.project(h_BxSxd, cos, sin, kv.loops)
    # the first row of a loop >= 2 (None: only loop 1 here)
    gated = next((i for i, r in enumerate(kv.loops) if r > 0), None)
    gate = None
    if gated is not None:
      gate = self.self_attn.gate(h_BxSxd[:, gated:], q[:, gated:])
    elif self.cfg.plt_num_loops > 1 and self.is_initializing():
      # scanned params must exist after the first call
      self.self_attn.gate(h_BxSxd, q)
    y, (listed, stacked) = kv.attend(xs, q, k, v, gate)
    h = self.finish(h_BxSxd, y, kv.loops)
    h = nn.with_logical_constraint(
        h, ("activation_batch", "activation_length", "activation_embed")
    )
    return h, (listed, {**stacked, "gate": gate})


class LMHead(nn.Module):
  """Untied output projection; logits accumulate in float32 whatever the compute dtype."""

  vocab_size: int
  param_dtype: Any = jnp.float32
  quantize: str = "none"

  @nn.compact
  def __call__(self, x_BxSxd):
    w = linear_param(
        self,
        (x_BxSxd.shape[-1], self.vocab_size),
        1,
        self.param_dtype,
        self.quantize,
    )
    return proj(x_BxSxd, w, out_dtype=jnp.float32)


def remat(cls, cfg: PLTConfig, prevent_cse: bool):
  """`cls` under the config's remat policy (by name, over `checkpoint_name` tags)."""
  policy = cfg.runtime.remat_policy
  if policy == "none":
    return cls
  return nn.remat(cls, policy=REMAT_POLICIES[policy], prevent_cse=prevent_cse)
