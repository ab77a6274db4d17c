"""PLT / LoopCoder-v2 in Flax Linen (semantics: shared/docs/plt-spec.md sections 2-3).

Shape suffixes: B batch, S sequence, d hidden, H query heads, K kv heads, D head dim, V vocab,
L layers, R loops.

Structure: `PLTForCausalLM` embeds, runs loop 1 through `layers` (an `nn.scan` over the L
distinct layers, params stacked on axis 0), then loops 2..R under an outer `nn.scan` with
`variable_broadcast="params"`: every loop reuses loop 1's parameters. With
`runtime.scan_layers=False` the same stacked tree is applied by plain Python loops (debugging).

Param tree (HF names, our layouts; the converter's table maps them):
  embed_tokens/embedding [V, d]; norm/scale [d]; lm_head/kernel [d, V] (absent when tied)
  layers/input_layernorm/scale [L, d]; layers/post_attention_layernorm/scale [L, d]
  layers/self_attn/{q_proj [L, d, H, D], k_proj, v_proj [L, d, K, D], o_proj [L, H, D, d]}/kernel
  layers/self_attn/plt_gate/{kernel [L, d, H] (query mode: [L, H, D]), bias [L, H],
                             gate_norm/scale [L, d] (hidden mode)}      -- only when R > 1
  layers/mlp/{gate_proj, up_proj [L, d, I], down_proj [L, I, d]}/kernel
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from loopcoder_jax.model import attention
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

_init = nn.initializers.normal(stddev=0.02)


def _dtype(name: str):
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
      # absent key: max_position_embeddings (transformers'
      # standardize_rope_params)
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


class Kernel(nn.Module):
  """The `kernel` param of a bias-free projection (`[in..., out...]`); callers apply it with `proj`."""

  shape: tuple[int, ...]
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self):
    return self.param("kernel", _init, self.shape, self.param_dtype)


_FEW_ROWS = 8


def proj(x, kernel, n_in: int = 1, out_dtype=None):
  """Contract x's last `n_in` axes with the kernel's first `n_in` (cast to x's dtype), as one 2-D matmul.

  The tokens are flattened to one matrix axis: the same numbers as the einsum, but XLA:CPU runs the
  N-D form's backward (the weight gradient over B*S) up to twice as slowly. `out_dtype`: the
  accumulation/result dtype (float32 for logits).
  """
  lead, k_in, k_out = (
      x.shape[: x.ndim - n_in],
      math.prod(kernel.shape[:n_in]),
      kernel.shape[n_in:],
  )
  rows = math.prod(lead)
  x2, w2 = x.reshape(rows, k_in), kernel.astype(x.dtype).reshape(k_in, -1)
  # decoding: (w^T x^T)^T, which XLA:CPU streams the weight through faster
  if rows <= _FEW_ROWS:
    y = jax.lax.dot_general(
        w2, x2, (((0,), (1,)), ((), ())), preferred_element_type=out_dtype
    ).T
  else:
    y = jnp.dot(x2, w2, preferred_element_type=out_dtype)
  return y.reshape(*lead, *k_out)


def _kernel(cfg, name, *shape):
  return Kernel(shape, _dtype(cfg.runtime.param_dtype), name=name)


class PLTGate(nn.Module):
  """Per-head gate on the global branch; zero-initialised so g = 0.5 at start."""

  cfg: PLTConfig

  @nn.compact
  def __call__(self, h_in_BxSxd, q_BxSxHxD):
    cfg = self.cfg
    h = cfg.num_attention_heads
    pdt = _dtype(cfg.runtime.param_dtype)
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
    self.o_proj = _kernel(cfg, "o_proj", h, d, dm)
    if cfg.plt_num_loops > 1:
      self.plt_gate = PLTGate(cfg)

  def qkv(self, x_BxSxd, cos, sin):
    """Post-RoPE q `[B,S,H,D]`, k, v `[B,S,K,D]` from the normed layer input."""
    x = x_BxSxd.astype(_dtype(self.cfg.runtime.dtype))
    q = apply_rope(proj(x, self.q_proj()), cos, sin)
    k = apply_rope(proj(x, self.k_proj()), cos, sin)
    v = proj(x, self.v_proj())
    return (
        checkpoint_name(q, "qkv_proj"),
        checkpoint_name(k, "qkv_proj"),
        checkpoint_name(v, "qkv_proj"),
    )

  def gate(self, h_in_BxSxd, q_BxSxHxD):
    return self.plt_gate(h_in_BxSxd, q_BxSxHxD)

  def out(self, y_BxSxHxD):
    y = checkpoint_name(y_BxSxHxD, "attn_out").astype(
        _dtype(self.cfg.runtime.dtype)
    )
    return proj(y, self.o_proj(), n_in=2)


class MLP(nn.Module):
  cfg: PLTConfig

  @nn.compact
  def __call__(self, x_BxSxd):
    cfg = self.cfg
    x = x_BxSxd.astype(_dtype(cfg.runtime.dtype))
    gate = proj(
        x, _kernel(cfg, "gate_proj", cfg.hidden_size, cfg.intermediate_size)()
    )
    up = proj(
        x, _kernel(cfg, "up_proj", cfg.hidden_size, cfg.intermediate_size)()
    )
    hidden = checkpoint_name(_ACT[cfg.hidden_act](gate) * up, "mlp_hidden")
    return proj(
        hidden,
        _kernel(cfg, "down_proj", cfg.intermediate_size, cfg.hidden_size)(),
    )


class PLTLayer(nn.Module):
  """One physical layer. Loop 1 when `kv1` is None; G-SWA (loops >= 2) when it holds loop 1's K/V."""

  cfg: PLTConfig

  def setup(self):
    cfg = self.cfg
    dt, pdt = _dtype(cfg.runtime.dtype), _dtype(cfg.runtime.param_dtype)
    self.input_layernorm = RMSNorm(cfg.rms_norm_eps, dt, pdt)
    self.self_attn = PLTAttention(cfg)
    self.post_attention_layernorm = RMSNorm(cfg.rms_norm_eps, dt, pdt)
    self.mlp = MLP(cfg)

  def project(self, h_in, cos, sin):
    return self.self_attn.qkv(self.input_layernorm(h_in), cos, sin)

  def finish(self, h_in, y_BxSxHxD):
    """o_proj + residual, then the MLP block + residual."""
    h = h_in + self.self_attn.out(y_BxSxHxD).astype(h_in.dtype)
    return h + self.mlp(self.post_attention_layernorm(h)).astype(h.dtype)

  def __call__(self, h_BxSxd, rope, segment_ids, kv1):
    cfg, impl = self.cfg, self.cfg.runtime.attention_impl
    cos, sin = rope
    q, k, v = self.project(h_BxSxd, cos, sin)
    gate = None
    if kv1 is None:
      y = attention.causal_attention(q, k, v, segment_ids, impl=impl)
      if cfg.plt_num_loops > 1 and self.is_initializing():
        # create the shared gate params in the first call
        self.self_attn.gate(h_BxSxd, q)
    else:
      gate = self.self_attn.gate(h_BxSxd, q)
      y = attention.gswa_attention(
          q,
          kv1[0],
          kv1[1],
          k,
          v,
          gate,
          segment_ids,
          left=cfg.window_left,
          impl=impl,
          block_size=cfg.runtime.local_block_size,
      )
    h = self.finish(h_BxSxd, y)
    h = nn.with_logical_constraint(
        h, ("activation_batch", "activation_length", "activation_embed")
    )
    return h, {"k": k, "v": v, "gate": gate}


class LMHead(nn.Module):
  """Untied output projection; logits accumulate in float32 whatever the compute dtype."""

  vocab_size: int
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxSxd):
    w = self.param(
        "kernel", _init, (x_BxSxd.shape[-1], self.vocab_size), self.param_dtype
    )
    return proj(x_BxSxd, w, out_dtype=jnp.float32)


def _remat(cls, cfg: PLTConfig, prevent_cse: bool):
  policy = cfg.runtime.remat_policy
  if policy == "none":
    return cls
  return nn.remat(cls, policy=REMAT_POLICIES[policy], prevent_cse=prevent_cse)


def shift_right(x_BxSxd, segment_ids_BxS, first_BxD=None):
  """x_{t-1} at t; position 0 and every packed-segment start get `first` (default 0)."""
  first = (
      jnp.zeros_like(x_BxSxd[:, :1])
      if first_BxD is None
      else first_BxD[:, None].astype(x_BxSxd.dtype)
  )
  shifted = jnp.concatenate([first, x_BxSxd[:, :-1]], axis=1)
  if segment_ids_BxS is None:
    return shifted
  starts = jnp.concatenate(
      [
          jnp.zeros_like(segment_ids_BxS[:, :1], bool),
          segment_ids_BxS[:, 1:] != segment_ids_BxS[:, :-1],
      ],
      axis=1,
  )
  return jnp.where(starts[..., None], 0, shifted)


# ------------------------------------------------------------------------------------- model
class PLTForCausalLM(nn.Module):
  """`logits [B,S,V] f32 = model.apply({"params": p}, tokens [B,S] int32)`.

  Optional `segment_ids`/`positions` for packed rows (positions default to 0..S-1 and, when only
  segment ids are given, restart at each segment). `return_intermediates=True` also returns
  `{"hidden": [R,B,S,d] h(r) per loop, "gates": [R-1,L,B,S,H]}`; `return_kv=True` adds the per-loop
  K/V (`"kv"`: k, v each `[R,L,B,S,K,D]`) and the CLP states `"clp": [R,B,S,d]` (P(r)), used by
  prefill. Both are off by default and then cost nothing. `logits_at` ([B] int) computes the
  logits `[B, V]` at one position per row only. `head=False` returns the final normed hidden states
  `[B, S, d]` in place of the logits, for `loss.cross_entropy_sum` with `head_weight(cfg, params)`.
  """

  cfg: PLTConfig

  def setup(self):
    cfg = self.cfg
    dt, pdt = _dtype(cfg.runtime.dtype), _dtype(cfg.runtime.param_dtype)
    self.embed_tokens = nn.Embed(
        cfg.vocab_size,
        cfg.hidden_size,
        dtype=dt,
        param_dtype=pdt,
        embedding_init=_init,
    )
    scanned = nn.scan(
        _remat(PLTLayer, cfg, prevent_cse=False),
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, 0),
        length=cfg.num_hidden_layers,
    )
    self.layers = scanned(cfg)
    self.norm = RMSNorm(cfg.rms_norm_eps, dt, pdt)
    if not cfg.tie_word_embeddings:
      self.lm_head = LMHead(cfg.vocab_size, pdt)

  # -- pieces reused by decoding ------------------------------------------------------------
  def embed(self, tokens_BxS):
    return self.embed_tokens(tokens_BxS)

  def clp_state(self, h_BxSxd):
    """P(r): what loop r hands to loop r+1 (normalised when `plt_normalize_per_loop`)."""
    return self.norm(h_BxSxd) if self.cfg.plt_normalize_per_loop else h_BxSxd

  def clp_input(self, e_BxSxd, p_prev_BxSxd):
    """Loop r >= 2 input from the embedding and the already shifted loop-(r-1) state."""
    cfg = self.cfg
    return (cfg.emb_scale * e_BxSxd + cfg.hidden_scale * p_prev_BxSxd).astype(
        e_BxSxd.dtype
    )

  def logits(self, h_BxSxd):
    x = self.norm(h_BxSxd)
    if not self.cfg.tie_word_embeddings:
      return self.lm_head(x)
    return proj(x, self.embed_tokens.embedding.T, out_dtype=jnp.float32)

  def stack(self, h_BxSxd, rope, segment_ids, kv1):
    """The L layers once (one loop). Returns h and stacked per-layer {k, v, gate}.

    Params in the per-layer layout (`unstack_layers`) always take the Python loop.
    """
    layers = (
        None if self.is_initializing() else self.variables["params"]["layers"]
    )
    per_layer = is_per_layer(layers)
    if (
        self.cfg.runtime.scan_layers and not per_layer
    ) or self.is_initializing():
      return self.layers(h_BxSxd, rope, segment_ids, kv1)
    layer = _remat(PLTLayer, self.cfg, prevent_cse=True)(self.cfg, parent=None)
    outs = []
    for i in range(self.cfg.num_hidden_layers):
      p_i = (
          layers[i] if per_layer else jax.tree.map(lambda x, i=i: x[i], layers)
      )
      kv_i = None if kv1 is None else jax.tree.map(lambda x, i=i: x[i], kv1)
      h_BxSxd, aux = layer.apply(
          {"params": p_i}, h_BxSxd, rope, segment_ids, kv_i
      )
      outs.append(aux)
    return h_BxSxd, jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

  # -- forward ------------------------------------------------------------------------------
  def __call__(
      self,
      tokens_BxS,
      segment_ids=None,
      positions=None,
      *,
      return_intermediates=False,
      return_kv=False,
      logits_at=None,
      head=True,
  ):
    cfg = self.cfg
    if positions is None:
      positions = _default_positions(tokens_BxS, segment_ids)
    rope = rope_tables(cfg, positions)
    e = self.embed(tokens_BxS)
    e = nn.with_logical_constraint(
        e, ("activation_batch", "activation_length", "activation_embed")
    )

    h, aux1 = self.stack(e, rope, segment_ids, None)
    kv1 = (aux1["k"], aux1["v"])
    hiddens, kvs, clps, gates = [h], [kv1], [], []
    if cfg.plt_num_loops > 1:
      p = self.clp_state(h)
      if cfg.runtime.scan_layers:

        def loop(model, p_prev, _):
          x = model.clp_input(e, shift_right(p_prev, segment_ids))
          h_r, aux = model.stack(x, rope, segment_ids, kv1)
          p_r = model.clp_state(h_r)
          keep = {"h": h_r, "p": p_r, "gate": aux["gate"]}
          if return_kv:
            keep["kv"] = (aux["k"], aux["v"])
          return p_r, keep

        scan = nn.scan(
            loop,
            variable_broadcast="params",
            split_rngs={"params": False},
            length=cfg.plt_num_loops - 1,
        )
        _, ys = scan(self, p, None)
        hiddens.append(ys["h"])
        h = ys["h"][-1]
        clps = [p[None], ys["p"]]
        gates = ys["gate"]
        if return_kv:
          kvs.append(ys["kv"])
      else:
        ps, hs, gs, kv_r = [p], [], [], []
        for _ in range(cfg.plt_num_loops - 1):
          x = self.clp_input(e, shift_right(ps[-1], segment_ids))
          h, aux = self.stack(x, rope, segment_ids, kv1)
          hs.append(h)
          gs.append(aux["gate"])
          ps.append(self.clp_state(h))
          kv_r.append((aux["k"], aux["v"]))
        hiddens.append(jnp.stack(hs))
        clps = [jnp.stack(ps)]
        gates = jnp.stack(gs)
        kvs.append(jax.tree.map(lambda *xs: jnp.stack(xs), *kv_r))

    # [B] positions: logits [B, V] there only (prefill's last tokens)
    if logits_at is not None:
      h = jnp.take_along_axis(
          h, logits_at.astype(jnp.int32)[:, None, None], axis=1
      )
      logits = self.logits(h)[:, 0]
    elif not head:  # the fused loss applies `head_weight` itself
      logits = self.norm(h)
    else:
      logits = self.logits(h)
    if not (return_intermediates or return_kv):
      return logits
    extra = {}
    if return_intermediates:
      extra["hidden"] = jnp.concatenate(
          [hiddens[0][None]] + hiddens[1:], axis=0
      )
      extra["gates"] = gates if cfg.plt_num_loops > 1 else None
    if return_kv:
      k = jnp.concatenate([kvs[0][0][None]] + [x[0] for x in kvs[1:]], axis=0)
      v = jnp.concatenate([kvs[0][1][None]] + [x[1] for x in kvs[1:]], axis=0)
      extra["kv"] = (k, v)
      extra["clp"] = (
          jnp.concatenate(clps, axis=0) if clps else self.clp_state(h)[None]
      )
    return logits, extra


def _default_positions(tokens_BxS, segment_ids):
  b, s = tokens_BxS.shape
  idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  if segment_ids is None:
    return idx
  starts = jnp.concatenate(
      [jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
      axis=1,
  )
  start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
  return idx - start_idx


def head_weight(cfg: PLTConfig, params):
  """The output projection `[d, V]` (the transposed embedding when tied)."""
  if cfg.tie_word_embeddings:
    return params["embed_tokens"]["embedding"].T
  return params["lm_head"]["kernel"]


def is_per_layer(layers) -> bool:
  """Whether `params["layers"]` is in the per-layer layout (`unstack_layers`) rather than stacked."""
  return isinstance(layers, (tuple, list))


def unstack_layers(params):
  """The per-layer layout: `layers` as a tuple of L trees (separate buffers) instead of stacked arrays.

  Same numbers. For decoding on CPU, where XLA copies each layer's weights out of the stacked
  arrays at every step (a `dynamic_slice` per weight) and that copy costs more than the matmuls;
  `stack_layers` inverts it. Checkpoints and training keep the stacked layout.
  """
  layers = params["layers"]
  if is_per_layer(layers):
    return params
  n = jax.tree.leaves(layers)[0].shape[0]
  return {
      **params,
      "layers": tuple(
          jax.tree.map(lambda x, i=i: x[i], layers) for i in range(n)
      ),
  }


def stack_layers(params):
  layers = params["layers"]
  if not is_per_layer(layers):
    return params
  return {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def abstract_params(cfg: PLTConfig):
  """ShapeDtypeStructs of the params (no allocation); the layout every loader restores into."""
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  shapes = jax.eval_shape(
      lambda t: PLTForCausalLM(cfg).init(jax.random.key(0), t), tokens
  )
  return shapes["params"]


def init_params(cfg: PLTConfig, rng: jax.Array):
  return PLTForCausalLM(cfg).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]
