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
`PLTForCausalLM.embed/clp_state/clp_input/logits`, `attention.masked_attention/blend`); the L layers
are a `lax.scan` over the stacked layer params, or a loop over `model.unstack_layers(params)` (on
CPU 1.3-3x faster at batch 1-8 and short contexts; every function here takes either).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp

from loopcoder_jax import attention
from loopcoder_jax.config import PLTConfig
from loopcoder_jax.model import PLTForCausalLM, PLTLayer, abstract_params, rope_tables, shift_right
from loopcoder_jax.sampling import StopRule

MODES = ("batched", "serial")


# ------------------------------------------------------------------------------------- cache
@flax.struct.dataclass
class Cache:
  """Decode state of a batch (spec section 4: functional cache with stored positions).

  k1, v1     [L, B, S, K, D]      loop 1's K/V, the shared global KV, preallocated to max length
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
  def max_len(self) -> int:
    return self.k1.shape[2]


def ring_slots(cfg: PLTConfig) -> int:
  return cfg.window_left + 1


def cache_entries_per_sequence(cfg: PLTConfig, max_len: int) -> int:
  """K/V entries (one token of one layer) per sequence: `L*S + (R-1)*L*(left+1)`."""
  l, r = cfg.num_hidden_layers, cfg.plt_num_loops
  return l * max_len + (r - 1) * l * ring_slots(cfg)


def cache_shapes(cfg: PLTConfig, batch: int, max_len: int) -> Cache:
  """ShapeDtypeStructs of the cache (for AOT compilation and sizing)."""
  l, r, w, d = cfg.num_hidden_layers, cfg.plt_num_loops, ring_slots(cfg), cfg.hidden_size
  kd = (cfg.num_key_value_heads, cfg.head_size)
  dt = jnp.dtype(cfg.runtime.dtype)
  sds = jax.ShapeDtypeStruct
  return Cache(k1=sds((l, batch, max_len, *kd), dt), v1=sds((l, batch, max_len, *kd), dt),
               ring_k=sds((r - 1, l, batch, w, *kd), dt), ring_v=sds((r - 1, l, batch, w, *kd), dt),
               ring_pos=sds((batch, w), jnp.int32), carry=sds((r - 1, batch, d), dt),
               lengths=sds((batch,), jnp.int32))


def init_cache(cfg: PLTConfig, batch: int, max_len: int) -> Cache:
  shapes = cache_shapes(cfg, batch, max_len)
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  return cache.replace(ring_pos=jnp.full(shapes.ring_pos.shape, -1, jnp.int32))


def cache_bytes(cache: Cache) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))


# ------------------------------------------------------------------------------------- pieces
def _model(cfg, params, method, *args):
  return PLTForCausalLM(cfg).apply({"params": params}, *args, method=method)


def _project(cfg, p, h, cos, sin):
  return PLTLayer(cfg).apply({"params": p}, h, cos, sin, method=PLTLayer.project)


def _gate(cfg, p, h, q):
  return PLTLayer(cfg).apply({"params": p}, h, q, method=lambda m, h, q: m.self_attn.gate(h, q))


def _finish(cfg, p, h, y):
  return PLTLayer(cfg).apply({"params": p}, h, y, method=PLTLayer.finish)


def _rows(b):
  return jnp.arange(b)[:, None]


def _global(q_BxNxHxD, qpos_BxN, k1_BxSxKxD, v1_BxSxKxD, k_BxCxKxD, v_BxCxKxD, pos_BxC):
  """Global branch: the new loop-1 keys are written into this layer's shared cache, then read."""
  rows = _rows(q_BxNxHxD.shape[0])
  k = k1_BxSxKxD.at[rows, pos_BxC].set(k_BxCxKxD, mode="drop")
  v = v1_BxSxKxD.at[rows, pos_BxC].set(v_BxCxKxD, mode="drop")
  kpos = jnp.arange(k.shape[1])
  mask = attention.window_visible(qpos_BxN[:, :, None], kpos[None, None, :], None)
  return attention.masked_attention(q_BxNxHxD, k, v, mask)


def _local(left, q_BxNxHxD, qpos_BxN, rk_BxWxKxD, rv_BxWxKxD, rpos_BxW, k_BxCxKxD, v_BxCxKxD, pos_BxC):
  """Local branch over this loop's ring (earlier tokens) plus its new keys; mask from positions."""
  k = jnp.concatenate([rk_BxWxKxD, k_BxCxKxD], axis=1)
  v = jnp.concatenate([rv_BxWxKxD, v_BxCxKxD], axis=1)
  kpos = jnp.concatenate([rpos_BxW, pos_BxC], axis=1)
  mask = attention.window_visible(qpos_BxN[:, :, None], kpos[:, None, :], left) & (kpos >= 0)[:, None, :]
  return attention.masked_attention(q_BxNxHxD, k, v, mask)


def _over_layers(layer, h, layers, *xs):
  """`layer(h, (params_i, *xs_i)) -> (h, y_i)` over the L layers; the y_i come back stacked.

  Stacked params: a `lax.scan` (one compiled layer). Per-layer params (`model.unstack_layers`): a
  Python loop, each layer's weights read in place rather than sliced out of the stacked arrays.
  """
  if not isinstance(layers, (tuple, list)):
    return jax.lax.scan(layer, h, (layers, *xs))
  ys = []
  for i, p in enumerate(layers):
    # The cache etc. stay stacked: slice them at a traced index, as the scan does (a constant index
    # becomes a static slice, which XLA:CPU copies more slowly).
    idx = jax.lax.optimization_barrier(jnp.int32(i))
    at_i = lambda a: jax.lax.dynamic_index_in_dim(a, idx, keepdims=False)  # noqa: B023 - used at once
    h, y = layer(h, (p, *(jax.tree.map(at_i, x) for x in xs)))
    ys.append(y)
  return h, jax.tree.map(lambda *a: jnp.stack(a), *ys)


def _loop_pass(cfg, params, cache, h_BxCxd, pos_BxC, loop, kv1=None):
  """One loop (0-based `loop`) over a chunk of C tokens: one pass over the L layers.

  `kv1` ([L,B,C,K,D] each) is loop 1's new K/V of the chunk, required for loop >= 1.
  Returns h and this loop's new K/V per layer.
  """
  cos, sin = rope_tables(cfg, pos_BxC)

  def layer(h, xs):
    p, k1, v1, new1, ring = xs
    q, k, v = _project(cfg, p, h, cos, sin)
    if loop == 0:
      y = _global(q, pos_BxC, k1, v1, k, v, pos_BxC)
    else:
      glob = _global(q, pos_BxC, k1, v1, *new1, pos_BxC)
      loc = _local(cfg.window_left, q, pos_BxC, *ring, cache.ring_pos, k, v, pos_BxC)
      y = attention.blend(_gate(cfg, p, h, q), glob, loc)
    return _finish(cfg, p, h, y), (k, v)

  ring = None if loop == 0 else (cache.ring_k[loop - 1], cache.ring_v[loop - 1])
  return _over_layers(layer, h_BxCxd, params["layers"], cache.k1, cache.v1, kv1, ring)


def _batched_pass(cfg, params, cache, h_BxRxd, pos_B):
  """All R loops of one token as R rows of ONE pass over the L layers (PLT decoding).

  Row 0 is loop 1; rows >= 1 share its just-written K/V (one attention read of the shared cache
  for all rows) and each reads its own ring. Returns h and new K/V per layer `[L,B,R,K,D]`.
  """
  r = cfg.plt_num_loops
  pos_Bx1 = pos_B[:, None]
  pos_BxR = jnp.broadcast_to(pos_Bx1, h_BxRxd.shape[:2])
  cos, sin = rope_tables(cfg, pos_BxR)
  local = jax.vmap(functools.partial(_local, cfg.window_left), in_axes=(0, None, 0, 0, None, 0, 0, None))

  def layer(h, xs):
    p, k1, v1, rk, rv = xs
    q, k, v = _project(cfg, p, h, cos, sin)
    y = _global(q, pos_BxR, k1, v1, k[:, :1], v[:, :1], pos_Bx1)
    if r > 1:
      loops_first = lambda x: jnp.moveaxis(x[:, 1:, None], 1, 0)  # [B,R,..] -> [R-1,B,1,..]
      loc = local(loops_first(q), pos_Bx1, rk, rv, cache.ring_pos, loops_first(k), loops_first(v), pos_Bx1)
      loc = jnp.moveaxis(loc[:, :, 0], 0, 1)
      mixed = attention.blend(_gate(cfg, p, h[:, 1:], q[:, 1:]), y[:, 1:], loc)
      y = jnp.concatenate([y[:, :1], mixed], axis=1)
    return _finish(cfg, p, h, y), (k, v)

  rings = (jnp.moveaxis(cache.ring_k, 1, 0), jnp.moveaxis(cache.ring_v, 1, 0))  # [L,R-1,...]
  return _over_layers(layer, h_BxRxd, params["layers"], cache.k1, cache.v1, *rings)


def _commit(cfg, cache, k_RxLxBxCxKxD, v_RxLxBxCxKxD, p_Rm1xBxCxd, n_B):
  """Write a chunk's new state into the cache; row b's first `n_B[b]` chunk tokens are real.

  Loop 1's K/V go to positions `lengths + i` (padding lands beyond the row's length, never visible);
  each ring slot keeps the latest real position that maps to it; the carry becomes P(r) of the
  row's last real token. Rows with n = 0 keep their ring and carry.
  """
  b, c = k_RxLxBxCxKxD.shape[2:4]
  start = cache.lengths
  pos_BxC = start[:, None] + jnp.arange(c)
  rows = _rows(b)
  k1 = cache.k1.at[:, rows, pos_BxC].set(k_RxLxBxCxKxD[0], mode="drop")
  v1 = cache.v1.at[:, rows, pos_BxC].set(v_RxLxBxCxKxD[0], mode="drop")
  last = start + n_B - 1
  w = ring_slots(cfg)
  slot_pos = last[:, None] - jnp.mod(last[:, None] - jnp.arange(w), w)  # [B, W]
  take = (n_B[:, None] > 0) & (slot_pos >= start[:, None])
  idx = jnp.clip(slot_pos - start[:, None], 0, c - 1)

  def ring(old, new):  # old [R-1,L,B,W,K,D], new [R-1,L,B,C,K,D]
    picked = jnp.take_along_axis(new, idx[None, None, :, :, None, None], axis=3)
    return jnp.where(take[None, None, :, :, None, None], picked, old)

  last_idx = jnp.clip(n_B - 1, 0, c - 1)
  p_last = jnp.take_along_axis(p_Rm1xBxCxd, last_idx[None, :, None, None], axis=2)[:, :, 0]
  return cache.replace(
      k1=k1, v1=v1, ring_k=ring(cache.ring_k, k_RxLxBxCxKxD[1:]), ring_v=ring(cache.ring_v, v_RxLxBxCxKxD[1:]),
      ring_pos=jnp.where(take, slot_pos, cache.ring_pos),
      carry=jnp.where((n_B > 0)[None, :, None], p_last.astype(cache.carry.dtype), cache.carry),
      lengths=start + n_B)


def _check_mode(mode):
  if mode not in MODES:
    raise ValueError(f"decode mode must be one of {MODES}, got {mode!r}")


# ------------------------------------------------------------------------------------- extend
def extend(cfg: PLTConfig, params, cache: Cache, tokens_BxC, n_B=None):
  """Run a chunk through the loops one after another (the training computation) from the cache.

  Each row's chunk starts at its `lengths`; its first position takes the carry saved by the previous
  chunk. Returns logits `[B, C, V]` and the updated cache. Serial decoding is this with C = 1.
  """
  b, c = tokens_BxC.shape
  n_B = jnp.full((b,), c, jnp.int32) if n_B is None else n_B.astype(jnp.int32)
  pos_BxC = cache.lengths[:, None] + jnp.arange(c)
  e = _model(cfg, params, "embed", tokens_BxC)
  h, kv1 = _loop_pass(cfg, params, cache, e, pos_BxC, 0)
  ks, vs, ps = [kv1[0]], [kv1[1]], []
  for loop in range(1, cfg.plt_num_loops):
    ps.append(_model(cfg, params, "clp_state", h))
    x = _model(cfg, params, "clp_input", e, shift_right(ps[-1], None, cache.carry[loop - 1]))
    h, (k, v) = _loop_pass(cfg, params, cache, x, pos_BxC, loop, kv1)
    ks.append(k)
    vs.append(v)
  p = jnp.stack(ps) if ps else jnp.zeros((0, *h.shape), h.dtype)
  logits = _model(cfg, params, "logits", h)
  return logits, _commit(cfg, cache, jnp.stack(ks), jnp.stack(vs), p, n_B)


def decode_step(cfg: PLTConfig, params, cache: Cache, tokens_B, mode: str = "batched"):
  """One new token per row at position `cache.lengths`: logits `[B, V]` and the updated cache."""
  _check_mode(mode)
  if mode == "serial" or cfg.plt_num_loops == 1:
    logits, cache = extend(cfg, params, cache, tokens_B[:, None])
    return logits[:, 0], cache
  r = cfg.plt_num_loops
  e = _model(cfg, params, "embed", tokens_B[:, None])  # [B, 1, d]
  rows = [e] + [_model(cfg, params, "clp_input", e, cache.carry[i][:, None]) for i in range(r - 1)]
  h, (k, v) = _batched_pass(cfg, params, cache, jnp.concatenate(rows, axis=1), cache.lengths)
  p = _model(cfg, params, "clp_state", h[:, : r - 1])  # [B, R-1, d]: P(r) of rows 1..R-1
  logits = _model(cfg, params, "logits", h[:, r - 1:])[:, 0]
  to_loops = lambda x: jnp.moveaxis(x, 2, 0)[:, :, :, None]  # [L,B,R,K,D] -> [R,L,B,1,K,D]
  n_B = jnp.ones(tokens_B.shape, jnp.int32)
  return logits, _commit(cfg, cache, to_loops(k), to_loops(v), jnp.moveaxis(p, 1, 0)[:, :, None], n_B)


# ------------------------------------------------------------------------------------- prefill
def prefill(cfg: PLTConfig, params, tokens_BxP, lengths_B, max_len: int, chunk: int = 0,
            return_all_logits: bool = False):
  """Fill a fresh cache with right-padded prompts (row b's real tokens are `tokens[b, :lengths[b]]`,
  lengths >= 1). `chunk = 0` (or >= P) runs the training forward on the whole prompt; otherwise
  chunks of that size run through `extend`. Returns the logits of each row's last prompt token
  `[B, V]` (all positions `[B, P, V]` with `return_all_logits`) and the cache.
  """
  b, plen = tokens_BxP.shape
  if plen > max_len:
    raise ValueError(f"prompt length {plen} exceeds the cache length max_len={max_len}")
  lengths_B = lengths_B.astype(jnp.int32)
  cache = init_cache(cfg, b, max_len)
  # Only the last prompt token's logits are kept unless asked: all of them are B*P*V floats.
  if chunk <= 0 or chunk >= plen:
    logits, extra = PLTForCausalLM(cfg).apply({"params": params}, tokens_BxP, return_kv=True,
                                              logits_at=None if return_all_logits else lengths_B - 1)
    k, v = extra["kv"]
    cache = _commit(cfg, cache, k, v, extra["clp"][: cfg.plt_num_loops - 1], lengths_B)
    return logits, cache
  n_chunks = -(-plen // chunk)
  tokens = jnp.pad(tokens_BxP, ((0, 0), (0, n_chunks * chunk - plen)))
  tokens = jnp.moveaxis(tokens.reshape(b, n_chunks, chunk), 1, 0)

  def step(carry, xs):
    cache, last_BxV = carry
    i, toks = xs
    n_B = jnp.clip(lengths_B - i * chunk, 0, chunk)
    logits, cache = extend(cfg, params, cache, toks, n_B)
    if return_all_logits:
      return (cache, last_BxV), logits
    here = (lengths_B - 1) // chunk == i  # this chunk holds the row's last prompt token
    at = jnp.take_along_axis(logits, ((lengths_B - 1) % chunk)[:, None, None], axis=1)[:, 0]
    return (cache, jnp.where(here[:, None], at, last_BxV)), None

  last = jnp.zeros((b, cfg.vocab_size), jnp.float32)
  (cache, last), all_logits = jax.lax.scan(step, (cache, last), (jnp.arange(n_chunks), tokens))
  if return_all_logits:
    return jnp.moveaxis(all_logits, 0, 1).reshape(b, n_chunks * chunk, -1)[:, :plen], cache
  return last, cache


# ------------------------------------------------------------------------------------- generation
def generate(cfg: PLTConfig, params, cache: Cache, logits_BxV, key, sampler, stop: StopRule,
             mode: str = "batched", callback: Callable[..., Any] | None = None, pad_id: int = 0):
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

  init = (jnp.int32(0), jnp.full((b, n), pad_id, jnp.int32), jnp.zeros((b,), bool),
          jnp.zeros((b,), jnp.int32), cache, logits_BxV, key)
  _, ids, _, counts, cache, _, _ = jax.lax.while_loop(cond, body, init)
  return ids, counts, cache


# ------------------------------------------------------------------------------------- serving
def make_serving_fns(cfg: PLTConfig, *, batch: int, max_len: int, prefill_len: int, mode: str = "batched",
                     chunk: int = 0, param_shardings=None, cache_shardings=None, data_sharding=None):
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
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)

  sds = jax.ShapeDtypeStruct
  params = place(abstract_params(cfg), param_shardings)
  cache = place(cache_shapes(cfg, batch, max_len), cache_shardings)
  data = lambda shape: place(sds(shape, jnp.int32), data_sharding)
  abstract_args = {"prefill": (params, data((batch, prefill_len)), data((batch,))),
                   "decode": (params, cache, data((batch,)))}
  return prefill_fn, decode_step_fn, abstract_args
