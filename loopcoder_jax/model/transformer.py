"""PLT / LoopCoder-v2 in Flax Linen: the loop schedule, once for training and decoding.

Shape suffixes: B batch, S sequence (chunk), d hidden, H query heads, K kv heads, D head dim, V vocab,
L layers, R loops. Semantics: docs/plt-spec.md sections 2-4.

`PLTForCausalLM` embeds, runs loop 1 over the L layers, then loops 2..R, each taking the CLP input
`a * E_t + b * P(r-1)_{t-1}` (with `plt_cross_loop=False`, serial looping: `a * E_t + b * P(r-1)_t`),
and applies the head to the last loop. Every loop reuses loop 1's
parameters. Where each layer's attention reads keys and values comes from a *KV source*
(`model/kv.py`): the default attends within the sequence (training); decoding passes a cache source
(`inference/cache.py`), whose chunk's first position takes the CLP carry of the previous chunk, and
which may run the R loops of one new token as R rows of a single pass over the layers.

The L layers run under `nn.scan` (params stacked on axis 0, one compiled layer), loops 2..R under an
outer `nn.scan` with `variable_broadcast="params"` when the source allows; with
`runtime.scan_layers=False`, or a source whose layers are a tuple of per-layer param trees (CPU
decoding, `unstack_layers`), the same layer is applied in a Python loop.

Param tree (HF names, our layouts; the converter's table maps them):
  embed_tokens/embedding [V, d]; norm/scale [d]; lm_head/kernel [d, V] (absent when tied)
  layers/input_layernorm/scale [L, d]; layers/post_attention_layernorm/scale [L, d]
  layers/self_attn/{q_proj [L, d, H, D], k_proj, v_proj [L, d, K, D], o_proj [L, H, D, d]}/kernel
  layers/self_attn/plt_gate/{kernel [L, d, H] (query mode: [L, H, D]), bias [L, H],
                             gate_norm/scale [L, d] (hidden mode)}      -- only when R > 1
  layers/mlp/{gate_proj, up_proj [L, d, I], down_proj [L, I, d]}/kernel
  layers/{self_attn,mlp}/<proj>_lora/{a [L, n, in, r], b [L, n, r, out]}  -- LoRA (`model/lora.py`)
With `runtime.quantize="int8"` (model/quant.py) each projection and the untied head hold `kernel`
int8 and `scale` float32 over the kernel's output axes (q_proj/scale [L, H, D], lm_head/scale [V]).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from loopcoder_jax.model.config import PLTConfig
from loopcoder_jax.model.kv import SequenceKV
from loopcoder_jax.model.layers import (
    Int8Kernel,
    LMHead,
    PLTLayer,
    RMSNorm,
    dtype_of,
    init_normal,
    proj,
    remat,
    rope_tables,
)

_ACTIVATIONS = ("activation_batch", "activation_length", "activation_embed")
NO_CLP_ROWS = (
    "plt_cross_loop=False: loop r needs loop r-1 of the same token, so the loops cannot run "
    "as rows of one pass; decode with mode='serial'"
)


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
  segment ids are given, restart at each segment). `kv`: a KV source (`model/kv.py`); when given,
  the output is `(logits, aux)` with `aux["kv"]` the source after the forward (what it recorded, e.g.
  a cache's new K/V). `return_intermediates=True` also returns (in `aux`) `"hidden": [R,B,S,d]` h(r)
  per loop and `"gates": [R-1,L,B,S,H]`. `logits_at` ([B] int) computes the logits `[B, V]` at one
  position per row only. `head=False` returns the final normed hidden states `[B, S, d]` in place of
  the logits, for `loss.cross_entropy_sum` with `head_weight(cfg, params)`.
  """

  cfg: PLTConfig

  def setup(self):
    cfg = self.cfg
    dt = dtype_of(cfg.runtime.dtype)
    pdt = dtype_of(cfg.runtime.param_dtype)
    self.embed_tokens = nn.Embed(
        cfg.vocab_size,
        cfg.hidden_size,
        dtype=dt,
        param_dtype=pdt,
        embedding_init=init_normal,
    )
    scanned = nn.scan(
        remat(PLTLayer, cfg, prevent_cse=False),
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast, 0),
        length=cfg.num_hidden_layers,
    )
    self.layers = scanned(cfg)
    self.norm = RMSNorm(cfg.rms_norm_eps, dt, pdt)
    if not cfg.tie_word_embeddings:
      self.lm_head = LMHead(cfg.vocab_size, pdt, cfg.runtime.quantize)

  # -- the pieces of the schedule -----------------------------------------------------------
  def embed(self, tokens_BxS):
    return self.embed_tokens(tokens_BxS)

  def clp_state(self, h_BxSxd):
    """P(r): what loop r hands to loop r+1 (normalised when `plt_normalize_per_loop`)."""
    return self.norm(h_BxSxd) if self.cfg.plt_normalize_per_loop else h_BxSxd

  def clp_input(self, e_BxSxd, p_prev_BxSxd):
    """Loop r >= 2 input from the embedding and the already shifted loop-(r-1) state."""
    cfg = self.cfg
    x = cfg.emb_scale * e_BxSxd + cfg.hidden_scale * p_prev_BxSxd
    return x.astype(e_BxSxd.dtype)

  def logits(self, h_BxSxd):
    x = self.norm(h_BxSxd)
    if not self.cfg.tie_word_embeddings:
      return self.lm_head(x)
    return proj(x, self.embed_tokens.embedding.T, out_dtype=jnp.float32)

  def layer_pass(self, h, rope, kv, loops):
    """The L layers once, for rows of the given loops (`model/kv.py`).

    Returns h and the layers' outputs `(listed, stacked)`: a tuple of L dicts (per-layer buffers;
    empty unless the source is per-layer) and a dict of `[L, ...]` arrays (new K/V, gates).
    """
    listed, stacked = kv.layer_inputs(loops)
    kv = kv.for_pass(loops)
    scan = self.cfg.runtime.scan_layers and not kv.per_layer
    if scan or self.is_initializing():
      return self.layers(h, rope, kv, stacked)
    # A Python loop over the same layer: the params are a tuple of L trees when the source is
    # per-layer, else stacked arrays sliced here (debugging without scan).
    params = self.variables["params"]["layers"]
    layer = remat(PLTLayer, self.cfg, prevent_cse=True)(self.cfg, parent=None)
    listed_out, stacked_out = [], []
    for i in range(self.cfg.num_hidden_layers):
      p_i = (
          params[i]
          if kv.per_layer
          else jax.tree.map(lambda x, i=i: x[i], params)
      )
      # Stacked inputs are sliced at a traced index, as the scan does: XLA:CPU copies a
      # constant-index slice more slowly.
      idx = jax.lax.optimization_barrier(jnp.int32(i))
      xs_i = jax.tree.map(
          lambda a, idx=idx: jax.lax.dynamic_index_in_dim(
              a, idx, keepdims=False
          ),
          stacked,
      )
      if listed is not None:
        xs_i = {**listed[i], **xs_i}
      rngs = (
          {"dropout": self.make_rng("dropout")}
          if self.has_rng("dropout")
          else {}
      )
      h, (lo, so) = layer.apply({"params": p_i}, h, rope, kv, xs_i, rngs=rngs)
      listed_out.append(lo)
      stacked_out.append(so)
    return h, (
        tuple(listed_out),
        jax.tree.map(lambda *a: jnp.stack(a), *stacked_out),
    )

  # -- the schedule ---------------------------------------------------------------------------
  def __call__(
      self,
      tokens_BxS,
      segment_ids=None,
      positions=None,
      *,
      kv=None,
      return_intermediates=False,
      logits_at=None,
      head=True,
  ):
    cfg = self.cfg
    source_given = kv is not None
    if kv is None:
      kv = SequenceKV.for_config(cfg, segment_ids)
    if positions is None:
      positions = _default_positions(tokens_BxS, segment_ids)
    e = nn.with_logical_constraint(self.embed(tokens_BxS), _ACTIVATIONS)
    if kv.loops_as_rows:
      h, kv, hidden, gates = self._loops_as_rows(e, positions, kv)
    else:
      h, kv, hidden, gates = self._loops_in_turn(e, positions, segment_ids, kv)

    if (
        logits_at is not None
    ):  # [B] positions: logits [B, V] there only (prefill's last tokens)
      idx = logits_at.astype(jnp.int32)[:, None, None]
      logits = self.logits(jnp.take_along_axis(h, idx, axis=1))[:, 0]
    elif not head:  # the fused loss applies `head_weight` itself
      logits = self.norm(h)
    else:
      logits = self.logits(h)
    if not (return_intermediates or source_given):
      return logits
    aux = {}
    if source_given:
      aux["kv"] = kv
    if return_intermediates:
      aux["hidden"], aux["gates"] = hidden, gates
    return logits, aux

  def _loops_in_turn(self, e, positions, segment_ids, kv):
    """Loop 1, then loops 2..R one after another (training, prefill, a chunk of a cache)."""
    cfg = self.cfg
    n = cfg.plt_num_loops
    rope = rope_tables(cfg, positions)
    h, (listed, stacked) = self.layer_pass(e, rope, kv, (0,))
    p = self.clp_state(h) if n > 1 else None
    kv = kv.after_pass((0,), listed, stacked, p)
    if n == 1:
      return h, kv, h[None], None

    def later_loop(model, p_prev, loop):
      # CLP reads the previous position (and a chunk's carry); serial looping the same position
      x = (
          shift_right(p_prev, segment_ids, kv.carry(loop))
          if cfg.plt_cross_loop
          else p_prev
      )
      h_r, outs = model.layer_pass(model.clp_input(e, x), rope, kv, (loop,))
      p_r = model.clp_state(h_r)
      return p_r, (h_r, p_r, outs)

    per_loop_lora = cfg.lora is not None and cfg.lora.per_loop
    if cfg.runtime.scan_layers and kv.later_loops_alike and not per_loop_lora:
      # One compiled body for loops 2..R: the source treats them all alike (no per-loop state,
      # no per-loop adapters).
      scan = nn.scan(
          lambda model, p_prev, _: later_loop(model, p_prev, 1),
          variable_broadcast="params",
          split_rngs={"params": False, "dropout": True},
          length=n - 1,
      )
      _, ys = scan(self, p, None)
      per_loop = [jax.tree.map(lambda x, i=i: x[i], ys) for i in range(n - 1)]
    else:
      per_loop = []
      for loop in range(1, n):
        p, y = later_loop(self, p, loop)
        per_loop.append(y)
    for loop, (_, p_r, outs) in enumerate(per_loop, start=1):
      kv = kv.after_pass((loop,), *outs, p_r if loop < n - 1 else None)
    hidden = jnp.stack([h] + [y[0] for y in per_loop])
    gates = jnp.stack([y[2][1]["gate"] for y in per_loop])
    return per_loop[-1][0], kv, hidden, gates

  def _loops_as_rows(self, e_Bx1xd, positions_Bx1, kv):
    """All R loops of one new token as R rows of ONE pass over the layers (PLT decoding).

    Loop r at position t reads P(r-1) at t-1 (the carry), loop 1's K/V up to t and its own window:
    never another loop at t, so the loops run side by side. Row r is loop r + 1.
    """
    cfg = self.cfg
    n = cfg.plt_num_loops
    if not cfg.plt_cross_loop:
      raise ValueError(NO_CLP_ROWS)
    rows = [e_Bx1xd] + [
        self.clp_input(e_Bx1xd, kv.carry(r)[:, None]) for r in range(1, n)
    ]
    b = e_Bx1xd.shape[0]
    rope = rope_tables(cfg, jnp.broadcast_to(positions_Bx1, (b, n)))
    h_BxRxd, (listed, stacked) = self.layer_pass(
        jnp.concatenate(rows, axis=1), rope, kv, tuple(range(n))
    )
    # P(r) of rows 1..R-1: the next carries
    p = self.clp_state(h_BxRxd[:, : n - 1])
    kv = kv.after_pass(tuple(range(n)), listed, stacked, p)
    hidden = jnp.moveaxis(h_BxRxd, 1, 0)[:, :, None]  # [R, B, 1, d]
    gates = stacked["gate"]  # [L, B, R-1, H] -> [R-1, L, B, 1, H]
    if gates is not None:
      gates = jnp.moveaxis(gates, 2, 0)[:, :, :, None]
    return h_BxRxd[:, n - 1 :], kv, hidden, gates


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
  """The output projection `[d, V]` (the transposed embedding when tied; an int8 head dequantised
  to the param dtype)."""
  if cfg.tie_word_embeddings:
    return params["embed_tokens"]["embedding"].T
  head = params["lm_head"]
  if "scale" in head:
    return Int8Kernel(head["kernel"], head["scale"]).dequantize(
        dtype_of(cfg.runtime.param_dtype)
    )
  return head["kernel"]


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
