"""KV-cached PLT inference: cache pytree, prefill (whole or chunked), decode steps, generation loop.

Semantics: shared/docs/plt-spec.md section 4. Shapes: B batch, S max length, C chunk, L layers,
R loops, W = left + 1 ring slots, K kv heads, D head dim, d hidden, V vocab.

Batches of different prompt lengths are RIGHT-padded with per-row lengths: every token keeps its true
position (RoPE, masks), so a row's numbers equal an unpadded forward of that row. Cache slots at or
beyond a row's length may hold garbage from padding; every mask stops at the query's own position.

Decode modes (same numbers, different cost):
  "batched": the R loops of the new token are R rows of ONE pass over the L layers (PLT);
  "serial":  one pass over the weights per loop, loops one after another (vanilla looped profile).
The math comes from the model's own pieces (`PLTLayer.project/finish`, `PLTAttention.gate`,
`PLTForCausalLM.embed/clp_state/clp_input/logits`, `reference.masked_attention/blend`).

Layouts (same numbers; the cache follows the params, see `_over_layers`): stacked layer params and
cache, a `lax.scan` over one compiled layer (accelerators; what checkpoints hold), or per-layer
buffers from `model.unstack_layers(params)`, a Python loop over the layers that XLA:CPU runs 1.2-2.6x
faster (no per-step copies of weight or cache slices). `generation.complete` picks per-layer on CPU.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp

from loopcoder_jax.inference.sampling import StopRule
from loopcoder_jax.model.config import PLTConfig
from loopcoder_jax.model.transformer import (
    PLTForCausalLM,
    PLTLayer,
    abstract_params,
    is_per_layer,
    rope_tables,
    shift_right,
)
from pallas_kernels import reference

MODES = ("batched", "serial")


# ------------------------------------------------------------------------------------- cache
@flax.struct.dataclass
class Cache:
  """Decode state of a batch (spec section 4: functional cache with stored positions).

  k1, v1     [L, B, S, K, D]      loop 1's K/V, the shared global KV, preallocated to max length
                                  (XLA:TPU writes a chunk into this order in place; with K before S
                                  it copies the cache for every chunk). With per-layer params
                                  (`model.unstack_layers`): a tuple of L [K*B, S, D] buffers (rows
                                  k*B + b), which XLA:CPU writes and reads in place (it copies slices
                                  of stacked arrays, transposes [B, S, K, D] for the attention
                                  matmuls, and copies a [.., 1, S, D] buffer to drop the size-1 dim)
  ring_k/v   [R-1, L, B, W, K, D] each loop >= 2's own K/V for its local window (ring of W slots)
  ring_pos   [B, W] int32         position held by each ring slot (-1 = empty); all loops >= 2 and
                                  layers write the same positions, so one table serves them all
  carry      [R-1, B, d]          P(r) of the last cached token, the next token's loop-(r+1) input
  lengths    [B] int32            tokens cached per row (= position of the next token)
  """

  k1: jax.Array
  v1: jax.Array
  ring_k: jax.Array
  ring_v: jax.Array
  ring_pos: jax.Array
  carry: jax.Array
  lengths: jax.Array

  @property
  def per_layer(self) -> bool:
    return isinstance(self.k1, (tuple, list))

  @property
  def max_len(self) -> int:
    return self.k1[0].shape[1] if self.per_layer else self.k1.shape[2]


def ring_slots(cfg: PLTConfig) -> int:
  return cfg.window_left + 1


def cache_entries_per_sequence(cfg: PLTConfig, max_len: int) -> int:
  """K/V entries (one token of one layer) per sequence: `L*S + (R-1)*L*(left+1)`."""
  n_layers, r = cfg.num_hidden_layers, cfg.plt_num_loops
  return n_layers * max_len + (r - 1) * n_layers * ring_slots(cfg)


def cache_shapes(
    cfg: PLTConfig, batch: int, max_len: int, per_layer: bool = False
) -> Cache:
  """ShapeDtypeStructs of the cache (for AOT compilation and sizing); `per_layer` for per-layer params."""
  n_layers, r, w, d = (
      cfg.num_hidden_layers,
      cfg.plt_num_loops,
      ring_slots(cfg),
      cfg.hidden_size,
  )
  kd = (cfg.num_key_value_heads, cfg.head_size)
  dt = jnp.dtype(cfg.runtime.dtype)
  sds = jax.ShapeDtypeStruct
  if per_layer:
    kv1 = (sds((kd[0] * batch, max_len, kd[1]), dt),) * n_layers
  else:
    kv1 = sds((n_layers, batch, max_len, *kd), dt)
  return Cache(
      k1=kv1,
      v1=kv1,
      ring_k=sds((r - 1, n_layers, batch, w, *kd), dt),
      ring_v=sds((r - 1, n_layers, batch, w, *kd), dt),
      ring_pos=sds((batch, w), jnp.int32),
      carry=sds((r - 1, batch, d), dt),
      lengths=sds((batch,), jnp.int32),
  )


def init_cache(
    cfg: PLTConfig, batch: int, max_len: int, per_layer: bool = False
) -> Cache:
  shapes = cache_shapes(cfg, batch, max_len, per_layer)
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  return cache.replace(ring_pos=jnp.full(shapes.ring_pos.shape, -1, jnp.int32))


def cache_bytes(cache: Cache) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))


# ------------------------------------------------------------------------------------- pieces
def _model(cfg, params, method, *args):
  return PLTForCausalLM(cfg).apply({"params": params}, *args, method=method)


def _project(cfg, p, h, cos, sin):
  return PLTLayer(cfg).apply(
      {"params": p}, h, cos, sin, method=PLTLayer.project
  )


def _gate(cfg, p, h, q):
  return PLTLayer(cfg).apply(
      {"params": p}, h, q, method=lambda m, h, q: m.self_attn.gate(h, q)
  )


def _finish(cfg, p, h, y):
  return PLTLayer(cfg).apply({"params": p}, h, y, method=PLTLayer.finish)


def _rows(b):
  return jnp.arange(b)[:, None]


def _write_kv1(k1, v1, pos_BxC, k_new, v_new):
  """Write a chunk's loop-1 K/V at `pos` into the cache, in place (positions >= S are dropped).

  k1/v1: a per-layer buffer `[K*B, S, D]` (k_new/v_new `[B, C, K, D]`), or the stacked cache
  `[L, B, S, K, D]` (k_new/v_new `[L, B, C, K, D]`, all layers at once).
  """
  b = pos_BxC.shape[0]
  if k1.ndim == 3:
    kh = k_new.shape[-2]
    at = (jnp.arange(kh * b)[:, None], jnp.tile(pos_BxC, (kh, 1)))

    def to_cache(x):
      return jnp.transpose(x, (2, 0, 1, 3)).reshape(
          kh * b, x.shape[1], x.shape[3]
      )

  else:
    at = (slice(None), _rows(b), pos_BxC)

    def to_cache(x):
      return x

  def write(c, x):
    return c.at[at].set(to_cache(x).astype(c.dtype), mode="drop")

  return write(k1, k_new), write(v1, v_new)


def _global(
    q_BxNxHxD, qpos_BxN, k1_BxSxKxD, v1_BxSxKxD, k_BxCxKxD, v_BxCxKxD, pos_BxC
):
  """Global branch over a layer of the stacked loop-1 cache: the new loop-1 keys are written into
  this layer's slice (a copy; the stacked cache is written once, by `_commit`), then read.
  """
  rows = _rows(q_BxNxHxD.shape[0])
  k = k1_BxSxKxD.at[rows, pos_BxC].set(
      k_BxCxKxD.astype(k1_BxSxKxD.dtype), mode="drop"
  )
  v = v1_BxSxKxD.at[rows, pos_BxC].set(
      v_BxCxKxD.astype(v1_BxSxKxD.dtype), mode="drop"
  )
  kpos = jnp.arange(k.shape[1])
  mask = reference.window_visible(
      qpos_BxN[:, :, None], kpos[None, None, :], None
  )
  return reference.masked_attention(q_BxNxHxD, k, v, mask)


def _global_per_layer(q_BxNxHxD, qpos_BxN, k1_XxSxD, v1_XxSxD):
  """Global branch over a per-layer loop-1 buffer `[K*B, S, D]` (rows k*B + b), new keys written."""
  b, n, h, d = q_BxNxHxD.shape
  x, s = k1_XxSxD.shape[:2]
  kh, g = x // b, h * b // x
  f32 = jnp.float32
  q = jnp.transpose(q_BxNxHxD.reshape(b, n, kh, g, d), (2, 0, 3, 1, 4)).reshape(
      x, g * n, d
  )
  scores = jnp.einsum(
      "xmd,xsd->xms", q, k1_XxSxD, preferred_element_type=f32
  ).reshape(kh, b, g, n, s)
  # [B, N, S]
  visible = reference.window_visible(
      qpos_BxN[:, :, None], jnp.arange(s)[None, None, :], None
  )
  scores = jnp.where(
      visible[None, :, None], scores / math.sqrt(d), reference.MASK_VALUE
  )
  probs = (
      jax.nn.softmax(scores, axis=-1)
      .astype(v1_XxSxD.dtype)
      .reshape(x, g * n, s)
  )
  out = jnp.einsum(
      "xms,xsd->xmd", probs, v1_XxSxD, preferred_element_type=f32
  ).reshape(kh, b, g, n, d)
  return (
      jnp.transpose(out, (1, 3, 0, 2, 4))
      .reshape(b, n, h, d)
      .astype(q_BxNxHxD.dtype)
  )


def _local(
    left,
    q_BxNxHxD,
    qpos_BxN,
    rk_BxWxKxD,
    rv_BxWxKxD,
    rpos_BxW,
    k_BxCxKxD,
    v_BxCxKxD,
    pos_BxC,
):
  """Local branch over this loop's ring (earlier tokens) plus its new keys; mask from positions."""
  k = jnp.concatenate([rk_BxWxKxD, k_BxCxKxD], axis=1)
  v = jnp.concatenate([rv_BxWxKxD, v_BxCxKxD], axis=1)
  kpos = jnp.concatenate([rpos_BxW, pos_BxC], axis=1)
  mask = (
      reference.window_visible(qpos_BxN[:, :, None], kpos[:, None, :], left)
      & (kpos >= 0)[:, None, :]
  )
  return reference.masked_attention(q_BxNxHxD, k, v, mask)


def _over_layers(layer, h, layers, cache, *xs):
  """`layer(h, (params_i, k1_i, v1_i, *xs_i)) -> (h, (k1_i, v1_i), y_i)` over the L layers.

  Returns h, the loop-1 cache (k1, v1) and the y_i stacked. Two layouts, same numbers:
  - stacked params and cache: a `lax.scan` (one compiled layer) that leaves the cache as it was
    (each layer attends over a copy of its slice with the new loop-1 K/V; `_commit` writes them
    after the pass: writing into the scanned cache costs XLA:TPU a copy of the whole cache);
  - per-layer params and cache (`model.unstack_layers`; the cache follows the params): a Python
    loop in which each layer writes into its own buffer and then reads it, both in place (XLA:CPU
    copies slices out of stacked arrays, and copies a buffer written after it was read).
  """
  per_layer = is_per_layer(layers)
  if per_layer != cache.per_layer:
    raise ValueError(
        f"the cache layout (per_layer={cache.per_layer}) must match the params layout "
        f"(per_layer={per_layer}): build the cache from the same params"
    )
  if not per_layer:

    def body(h, xs_i):
      h, _, y = layer(h, xs_i)
      return h, y

    h, ys = jax.lax.scan(body, h, (layers, cache.k1, cache.v1, *xs))
    return h, (cache.k1, cache.v1), ys
  k1s, v1s, ys = [], [], []
  for i, p in enumerate(layers):
    # The other stacked inputs (rings, new K/V) are sliced at a traced index, as the scan does (a
    # constant index becomes a static slice, which XLA:CPU copies more slowly).
    idx = jax.lax.optimization_barrier(jnp.int32(i))

    def at_i(a):
      return jax.lax.dynamic_index_in_dim(a, idx, keepdims=False)  # noqa: B023 - used at once

    h, (k1, v1), y = layer(
        h, (p, cache.k1[i], cache.v1[i], *(jax.tree.map(at_i, x) for x in xs))
    )
    k1s.append(k1)
    v1s.append(v1)
    ys.append(y)
  return h, (tuple(k1s), tuple(v1s)), jax.tree.map(lambda *a: jnp.stack(a), *ys)


def _attend_loop1(cache, q, qpos, k1, v1, pos_BxC, k_new, v_new):
  """Loop 1's global attention with its new K/V at `pos`: a per-layer buffer takes them in place and
  is returned updated; a stacked layer's slice takes them in a copy (`_commit` writes the cache).
  """
  if cache.per_layer:
    k1, v1 = _write_kv1(k1, v1, pos_BxC, k_new, v_new)
    return _global_per_layer(q, qpos, k1, v1), (k1, v1)
  return _global(q, qpos, k1, v1, k_new, v_new, pos_BxC), (k1, v1)


def _loop_pass(cfg, params, cache, h_BxCxd, pos_BxC, loop, kv1=None):
  """One loop (0-based `loop`) over a chunk of C tokens: one pass over the L layers.

  Loop 1 adds the chunk's K/V to the shared cache (in place for per-layer buffers; stacked ones
  take `kv1` = loop 1's new K/V `[L,B,C,K,D]` each, required for loop >= 1, until `_commit`).
  Returns h, the cache and this loop's new K/V per layer `[L,B,C,K,D]`.
  """
  cos, sin = rope_tables(cfg, pos_BxC)

  def layer(h, xs):
    p, k1, v1, new1, ring = xs
    q, k, v = _project(cfg, p, h, cos, sin)
    if loop == 0:
      y, (k1, v1) = _attend_loop1(cache, q, pos_BxC, k1, v1, pos_BxC, k, v)
    else:
      if cache.per_layer:
        glob = _global_per_layer(q, pos_BxC, k1, v1)
      else:
        glob = _global(q, pos_BxC, k1, v1, *new1, pos_BxC)
      loc = _local(
          cfg.window_left, q, pos_BxC, *ring, cache.ring_pos, k, v, pos_BxC
      )
      y = reference.blend(_gate(cfg, p, h, q), glob, loc)
    return _finish(cfg, p, h, y), (k1, v1), (k, v)

  ring = None if loop == 0 else (cache.ring_k[loop - 1], cache.ring_v[loop - 1])
  # per-layer buffers already hold loop 1's new K/V
  new1 = None if cache.per_layer else kv1
  h, (k1, v1), kv = _over_layers(
      layer, h_BxCxd, params["layers"], cache, new1, ring
  )
  return h, cache.replace(k1=k1, v1=v1), kv


def _batched_pass(cfg, params, cache, h_BxRxd, pos_B):
  """All R loops of one token as R rows of ONE pass over the L layers (PLT decoding).

  Row 0 is loop 1; all rows read the shared cache with its new K/V in one attention, and rows >= 1
  also read their own rings. Returns h, the cache and new K/V per layer `[L,B,R,K,D]`.
  """
  r = cfg.plt_num_loops
  pos_Bx1 = pos_B[:, None]
  pos_BxR = jnp.broadcast_to(pos_Bx1, h_BxRxd.shape[:2])
  cos, sin = rope_tables(cfg, pos_BxR)
  local = jax.vmap(
      functools.partial(_local, cfg.window_left),
      in_axes=(0, None, 0, 0, None, 0, 0, None),
  )

  def layer(h, xs):
    p, k1, v1, rk, rv = xs
    q, k, v = _project(cfg, p, h, cos, sin)
    y, (k1, v1) = _attend_loop1(
        cache, q, pos_BxR, k1, v1, pos_Bx1, k[:, :1], v[:, :1]
    )
    if r > 1:

      def loops_first(x):
        return jnp.moveaxis(x[:, 1:, None], 1, 0)  # [B,R,..] -> [R-1,B,1,..]

      loc = local(
          loops_first(q),
          pos_Bx1,
          rk,
          rv,
          cache.ring_pos,
          loops_first(k),
          loops_first(v),
          pos_Bx1,
      )
      loc = jnp.moveaxis(loc[:, :, 0], 0, 1)
      mixed = reference.blend(_gate(cfg, p, h[:, 1:], q[:, 1:]), y[:, 1:], loc)
      y = jnp.concatenate([y[:, :1], mixed], axis=1)
    return _finish(cfg, p, h, y), (k1, v1), (k, v)

  # [L,R-1,...]
  rings = (
      jnp.moveaxis(cache.ring_k, 1, 0),
      jnp.moveaxis(cache.ring_v, 1, 0),
  )
  h, (k1, v1), kv = _over_layers(
      layer, h_BxRxd, params["layers"], cache, *rings
  )
  return h, cache.replace(k1=k1, v1=v1), kv


def _commit(cfg, cache, k_RxLxBxCxKxD, v_RxLxBxCxKxD, p_Rm1xBxCxd, n_B):
  """Write a chunk's new state into the cache; row b's first `n_B[b]` chunk tokens are real.

  Loop 1's K/V go to positions `lengths + i` (per-layer buffers already hold them; padding lands
  beyond the row's length, never visible); the last W real tokens go to ring slots `pos % W`; the
  carry becomes P(r) of the row's last real token. Rows with n = 0 keep ring and carry. All in
  place: one indexed write per array.
  """
  b, c = k_RxLxBxCxKxD.shape[2:4]
  start = cache.lengths
  i = jnp.arange(c)
  pos_BxC = start[:, None] + i
  if not cache.per_layer:
    k1, v1 = _write_kv1(
        cache.k1, cache.v1, pos_BxC, k_RxLxBxCxKxD[0], v_RxLxBxCxKxD[0]
    )
    cache = cache.replace(k1=k1, v1=v1)
  w = ring_slots(cfg)
  # distinct slots; the others are dropped
  keep = (i < n_B[:, None]) & (i >= n_B[:, None] - w)
  # slot W does not exist: mode="drop" skips it
  slot_BxC = jnp.where(keep, pos_BxC % w, w)
  rows = _rows(b)

  def ring(old, new):
    return old.at[:, :, rows, slot_BxC].set(new.astype(old.dtype), mode="drop")

  last_idx = jnp.clip(n_B - 1, 0, c - 1)
  p_last = jnp.take_along_axis(
      p_Rm1xBxCxd, last_idx[None, :, None, None], axis=2
  )[:, :, 0]
  return cache.replace(
      ring_k=ring(cache.ring_k, k_RxLxBxCxKxD[1:]),
      ring_v=ring(cache.ring_v, v_RxLxBxCxKxD[1:]),
      ring_pos=cache.ring_pos.at[rows, slot_BxC].set(pos_BxC, mode="drop"),
      carry=jnp.where(
          (n_B > 0)[None, :, None],
          p_last.astype(cache.carry.dtype),
          cache.carry,
      ),
      lengths=start + n_B,
  )


def _check_mode(mode):
  if mode not in MODES:
    raise ValueError(f"decode mode must be one of {MODES}, got {mode!r}")


# ------------------------------------------------------------------------------------- extend
def extend(
    cfg: PLTConfig, params, cache: Cache, tokens_BxC, n_B=None, logits_at=None
):
  """Run a chunk through the loops one after another (the training computation) from the cache.

  Each row's chunk starts at its `lengths`; its first position takes the carry saved by the previous
  chunk. Returns logits `[B, C, V]` (with `logits_at` `[B]`: only those chunk indices', `[B, V]`)
  and the updated cache. Serial decoding is this with C = 1.
  """
  b, c = tokens_BxC.shape
  n_B = jnp.full((b,), c, jnp.int32) if n_B is None else n_B.astype(jnp.int32)
  pos_BxC = cache.lengths[:, None] + jnp.arange(c)
  e = _model(cfg, params, "embed", tokens_BxC)
  h, cache_1, kv1 = _loop_pass(cfg, params, cache, e, pos_BxC, 0)
  ks, vs, ps = [kv1[0]], [kv1[1]], []
  for loop in range(1, cfg.plt_num_loops):
    ps.append(_model(cfg, params, "clp_state", h))
    x = _model(
        cfg,
        params,
        "clp_input",
        e,
        shift_right(ps[-1], None, cache.carry[loop - 1]),
    )
    h, _, (k, v) = _loop_pass(cfg, params, cache_1, x, pos_BxC, loop, kv1)
    ks.append(k)
    vs.append(v)
  p = jnp.stack(ps) if ps else jnp.zeros((0, *h.shape), h.dtype)
  if logits_at is not None:  # the head on B rows, not B*C
    h = jnp.take_along_axis(h, logits_at[:, None, None], axis=1)
  logits = _model(cfg, params, "logits", h)
  logits = logits if logits_at is None else logits[:, 0]
  return logits, _commit(cfg, cache_1, jnp.stack(ks), jnp.stack(vs), p, n_B)


def decode_step(
    cfg: PLTConfig, params, cache: Cache, tokens_B, mode: str = "batched"
):
  """One new token per row at position `cache.lengths`: logits `[B, V]` and the updated cache."""
  _check_mode(mode)
  if mode == "serial" or cfg.plt_num_loops == 1:
    logits, cache = extend(cfg, params, cache, tokens_B[:, None])
    return logits[:, 0], cache
  r = cfg.plt_num_loops
  e = _model(cfg, params, "embed", tokens_B[:, None])  # [B, 1, d]
  rows = [e] + [
      _model(cfg, params, "clp_input", e, cache.carry[i][:, None])
      for i in range(r - 1)
  ]
  h, cache, (k, v) = _batched_pass(
      cfg, params, cache, jnp.concatenate(rows, axis=1), cache.lengths
  )
  # [B, R-1, d]: P(r) of rows 1..R-1
  p = _model(cfg, params, "clp_state", h[:, : r - 1])
  logits = _model(cfg, params, "logits", h[:, r - 1 :])[:, 0]

  def to_loops(x):
    return jnp.moveaxis(x, 2, 0)[:, :, :, None]  # [L,B,R,K,D] -> [R,L,B,1,K,D]

  n_B = jnp.ones(tokens_B.shape, jnp.int32)
  return logits, _commit(
      cfg,
      cache,
      to_loops(k),
      to_loops(v),
      jnp.moveaxis(p, 1, 0)[:, :, None],
      n_B,
  )


# ------------------------------------------------------------------------------------- prefill
def prefill(
    cfg: PLTConfig,
    params,
    tokens_BxP,
    lengths_B,
    max_len: int,
    chunk: int = 0,
    return_all_logits: bool = False,
):
  """Fill a fresh cache with right-padded prompts (row b's real tokens are `tokens[b, :lengths[b]]`,
  lengths >= 1). `chunk = 0` (or >= P) runs the training forward on the whole prompt; otherwise
  chunks of that size run through `extend`. Returns the logits of each row's last prompt token
  `[B, V]` (all positions `[B, P, V]` with `return_all_logits`) and the cache.
  """
  b, plen = tokens_BxP.shape
  if plen > max_len:
    raise ValueError(
        f"prompt length {plen} exceeds the cache length max_len={max_len}"
    )
  lengths_B = lengths_B.astype(jnp.int32)
  cache = init_cache(cfg, b, max_len, is_per_layer(params["layers"]))
  # Only the last prompt token's logits are kept unless asked: all of them are B*P*V floats.
  if chunk <= 0 or chunk >= plen:
    logits, extra = PLTForCausalLM(cfg).apply(
        {"params": params},
        tokens_BxP,
        return_kv=True,
        logits_at=None if return_all_logits else lengths_B - 1,
    )
    k, v = extra["kv"]  # [R, L, B, P, K, D]
    if cache.per_layer:  # `_commit` writes stacked caches only
      pos_BxP = jnp.broadcast_to(jnp.arange(plen), (b, plen))
      k1, v1 = zip(
          *(
              _write_kv1(k1_i, v1_i, pos_BxP, k[0, i], v[0, i])
              for i, (k1_i, v1_i) in enumerate(zip(cache.k1, cache.v1))
          )
      )
      cache = cache.replace(k1=k1, v1=v1)
    cache = _commit(
        cfg, cache, k, v, extra["clp"][: cfg.plt_num_loops - 1], lengths_B
    )
    return logits, cache
  n_chunks = -(-plen // chunk)
  tokens = jnp.pad(tokens_BxP, ((0, 0), (0, n_chunks * chunk - plen)))
  tokens = jnp.moveaxis(tokens.reshape(b, n_chunks, chunk), 1, 0)

  def step(carry, xs):
    cache, last_BxV = carry
    i, toks = xs
    n_B = jnp.clip(lengths_B - i * chunk, 0, chunk)
    if return_all_logits:
      logits, cache = extend(cfg, params, cache, toks, n_B)
      return (cache, last_BxV), logits
    logits, cache = extend(
        cfg, params, cache, toks, n_B, logits_at=(lengths_B - 1) % chunk
    )
    here = (
        lengths_B - 1
    ) // chunk == i  # this chunk holds the row's last prompt token
    return (cache, jnp.where(here[:, None], logits, last_BxV)), None

  last = jnp.zeros((b, cfg.vocab_size), jnp.float32)
  (cache, last), all_logits = jax.lax.scan(
      step, (cache, last), (jnp.arange(n_chunks), tokens)
  )
  if return_all_logits:
    return (
        jnp.moveaxis(all_logits, 0, 1).reshape(b, n_chunks * chunk, -1)[
            :, :plen
        ],
        cache,
    )
  return last, cache


# ------------------------------------------------------------------------------------- generation
def generate(
    cfg: PLTConfig,
    params,
    cache: Cache,
    logits_BxV,
    key,
    sampler,
    stop: StopRule,
    mode: str = "batched",
    callback: Callable[..., Any] | None = None,
    pad_id: int = 0,
):
  """Sample up to `stop.max_new_tokens` per row in one `lax.while_loop` (static shapes).

  The cache must have room for `lengths + max_new_tokens` (writes past `max_len` are dropped).
  The first token comes from `logits_BxV` (the prefill's). A row stops after its first stop id; it
  then emits `pad_id` and the loop ends when every row has stopped. `callback(step, ids_B, live_B)`
  streams each new token to the host through an ordered `jax.debug.callback` (the whole loop stays
  one device program; only B ints cross per step). Returns (ids `[B, max_new_tokens]`,
  counts `[B]` of real tokens including the stop id, cache).
  """
  _check_mode(mode)
  b = logits_BxV.shape[0]
  n = stop.max_new_tokens

  def cond(state):
    step, _, done, *_ = state
    return (step < n) & ~jnp.all(done)

  def body(state):
    step, ids, done, counts, cache, logits, key = state
    key, sub = jax.random.split(key)
    tok = jnp.where(done, pad_id, sampler(logits, sub))
    live = ~done
    if callback is not None:
      jax.debug.callback(callback, step, tok, live, ordered=True)
    ids = ids.at[:, step].set(tok)
    counts = counts + live
    done = done | stop.is_stop(tok)
    logits, cache = decode_step(cfg, params, cache, tok, mode)
    return step + 1, ids, done, counts, cache, logits, key

  init = (
      jnp.int32(0),
      jnp.full((b, n), pad_id, jnp.int32),
      jnp.zeros((b,), bool),
      jnp.zeros((b,), jnp.int32),
      cache,
      logits_BxV,
      key,
  )
  _, ids, _, counts, cache, _, _ = jax.lax.while_loop(cond, body, init)
  return ids, counts, cache


# ------------------------------------------------------------------------------------- serving
def make_serving_fns(
    cfg: PLTConfig,
    *,
    batch: int,
    max_len: int,
    prefill_len: int,
    mode: str = "batched",
    chunk: int = 0,
    param_shardings=None,
    cache_shardings=None,
    data_sharding=None,
):
  """Pure serving functions and their abstract arguments, for `jax.jit(...).lower(...).compile()`.

  prefill_fn(params, tokens [B,P] int32, lengths [B] int32) -> (logits [B,V] f32, cache)
  decode_step_fn(params, cache, tokens [B] int32) -> (logits [B,V] f32, cache); donate arg 1.
  abstract_args = {"prefill": (params, tokens, lengths), "decode": (params, cache, tokens)} as
  ShapeDtypeStructs, carrying the given shardings (a pytree like the target, or one Sharding).
  """
  _check_mode(mode)
  if prefill_len > max_len:
    raise ValueError(f"prefill_len={prefill_len} exceeds max_len={max_len}")

  def prefill_fn(params, tokens_BxP, lengths_B):
    return prefill(cfg, params, tokens_BxP, lengths_B, max_len, chunk)

  def decode_step_fn(params, cache, tokens_B):
    return decode_step(cfg, params, cache, tokens_B, mode)

  def place(tree, shardings):
    if shardings is None:
      return tree
    if isinstance(shardings, jax.sharding.Sharding):
      shardings = jax.tree.map(lambda _: shardings, tree)
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        tree,
        shardings,
    )

  sds = jax.ShapeDtypeStruct
  params = place(abstract_params(cfg), param_shardings)
  cache = place(cache_shapes(cfg, batch, max_len), cache_shardings)

  def data(shape):
    return place(sds(shape, jnp.int32), data_sharding)

  abstract_args = {
      "prefill": (params, data((batch, prefill_len)), data((batch,))),
      "decode": (params, cache, data((batch,))),
  }
  return prefill_fn, decode_step_fn, abstract_args
