"""The PLT KV cache: a batch's decode state, its two layouts, and the KV source that reads it.

Semantics: docs/plt-spec.md section 4. Shapes: B batch, S max length, C chunk, L layers, R loops,
W = left + 1 ring slots, K kv heads, D head dim, d hidden.

Per sequence the cache holds loop 1's K/V for the whole context (the global branch of every loop
reads them), a ring of the last W K/V per later loop and layer (their local windows), and the R-1
carried CLP states. Masks come from stored positions (ring slots hold their token's position), so
ring wrap-around needs no bookkeeping.

Two layouts of the loop-1 K/V (and of the layer params) give the same numbers; they differ only
behind `Layout`:
- `STACKED`: `[L, B, S, K, D]` arrays, layers scanned over (one compiled layer; accelerators, and
  what checkpoints hold). A layer attends over a copy of its slice holding the chunk's new K/V; the
  cache is written once after the pass (writing the scanned cache costs XLA:TPU a copy of it).
- `PER_LAYER`: a tuple of L `[K*B, S, D]` buffers (rows k*B + b), with params from
  `model.unstack_layers`, layers in a Python loop: each layer writes its new K/V into its own buffer
  and reads it, both in place. XLA:CPU decodes 1.2-2.6x faster so (it copies slices of stacked
  arrays, transposes `[B, S, K, D]` for the attention matmuls, and copies a `[.., 1, S, D]` buffer
  to drop the size-1 dimension).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from loopcoder_jax.model import sharding
from loopcoder_jax.model.config import PLTConfig
from loopcoder_jax.model.transformer import stack_layers, unstack_layers
from pallas_kernels.reference import (
    MASK_VALUE,
    blend,
    masked_attention,
    window_visible,
)


class Cache(flax.struct.PyTreeNode):
  """Decode state of a batch (a pytree; every update returns a new one).

  k1, v1     loop 1's K/V, preallocated to the max length: `[L, B, S, K, D]` (STACKED) or a tuple
             of L `[K*B, S, D]` buffers (PER_LAYER)
  ring_k/v   [R-1, L, B, W, K, D] each loop >= 2's own K/V for its local window (ring of W slots)
  ring_pos   [B, W] int32  position held by each ring slot (-1 = empty); all loops >= 2 and layers
             write the same positions, so one table serves them all
  carry      [R-1, B, d]   P(r) of the last cached token, the next token's loop-(r+1) input
  lengths    [B] int32     tokens cached per row (= position of the next token)
  """

  # Arrays, or their ShapeDtypeStructs / shardings (the same pytree for AOT compilation).
  k1: Any
  v1: Any
  ring_k: Any
  ring_v: Any
  ring_pos: Any
  carry: Any
  lengths: Any

  @property
  def layout(self) -> Layout:
    return PER_LAYER if isinstance(self.k1, (tuple, list)) else STACKED

  @property
  def max_len(self) -> int:
    return self.layout.max_len(self.k1)


# ------------------------------------------------------------------------------------- layouts
def _rows(b):
  return jnp.arange(b)[:, None]


def _global(q_BxNxHxD, qpos_BxN, k_BxSxKxD, v_BxSxKxD):
  """Causal attention over loop 1's keys at positions <= each query's."""
  kpos = jnp.arange(k_BxSxKxD.shape[1])
  mask = window_visible(qpos_BxN[:, :, None], kpos[None, None, :], None)
  return masked_attention(q_BxNxHxD, k_BxSxKxD, v_BxSxKxD, mask)


def _global_rows(q_BxNxHxD, qpos_BxN, k1_XxSxD, v1_XxSxD):
  """`_global` over a per-layer buffer `[K*B, S, D]` (rows k*B + b): the same softmax attention with
  the kv-head groups as matmul batches, which XLA:CPU runs without transposing the buffer.
  """
  b, n, h, d = q_BxNxHxD.shape
  x, s = k1_XxSxD.shape[:2]
  kh, g = x // b, h * b // x
  f32 = jnp.float32
  q = q_BxNxHxD.reshape(b, n, kh, g, d).transpose(2, 0, 3, 1, 4)
  q = q.reshape(x, g * n, d)
  scores = jnp.einsum("xmd,xsd->xms", q, k1_XxSxD, preferred_element_type=f32)
  scores = scores.reshape(kh, b, g, n, s)
  visible = window_visible(
      qpos_BxN[:, :, None], jnp.arange(s)[None, None], None
  )
  scores = jnp.where(visible[None, :, None], scores / math.sqrt(d), MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v1_XxSxD.dtype)
  out = jnp.einsum(
      "xms,xsd->xmd",
      probs.reshape(x, g * n, s),
      v1_XxSxD,
      preferred_element_type=f32,
  )
  out = out.reshape(kh, b, g, n, d).transpose(1, 3, 0, 2, 4)
  return out.reshape(b, n, h, d).astype(q_BxNxHxD.dtype)


class Layout:
  """Where loop 1's K/V (and the layer params) live; see the module docstring.

  The small interface the two layouts implement; `CacheKV` and `commit` call nothing else that
  depends on the layout.
  """

  name: str
  per_layer: bool

  def __repr__(self):
    return self.name

  def shapes(self, n_layers, batch, max_len, kv_heads, head_dim, dtype):
    """ShapeDtypeStructs of k1 and v1."""
    raise NotImplementedError

  def max_len(self, k1) -> int:
    raise NotImplementedError

  def params(self, params):
    """`params` in this layout (stacked or per-layer trees)."""
    raise NotImplementedError

  def layer_arrays(self, k1, v1):
    """k1/v1 as the layers' inputs: `(listed, stacked)` (see `model/kv.py`)."""
    raise NotImplementedError

  def attend(self, k1, v1, q, qpos_BxN, new):
    """Causal attention of `q` over loop 1's K/V of one layer, including the chunk's own loop-1
    K/V `new = (pos_BxC, k, v)` unless None (already stored). Returns the output and the layer's
    listed outputs (the updated buffers, for a per-layer cache)."""
    raise NotImplementedError

  def collect(self, k1, v1, listed):
    """k1/v1 after a pass, from the layers' listed outputs."""
    raise NotImplementedError

  def write(self, k1, v1, pos_BxC, k_LxBxCxKxD, v_LxBxCxKxD):
    """Store a chunk's loop-1 K/V of every layer at `pos` (positions >= S are dropped)."""
    raise NotImplementedError


class _Stacked(Layout):
  name, per_layer = "stacked", False

  def shapes(self, n_layers, batch, max_len, kv_heads, head_dim, dtype):
    sds = jax.ShapeDtypeStruct(
        (n_layers, batch, max_len, kv_heads, head_dim), dtype
    )
    return sds, sds

  def max_len(self, k1):
    return k1.shape[2]

  def params(self, params):
    return stack_layers(params)

  def layer_arrays(self, k1, v1):
    return None, {"k1": k1, "v1": v1}

  def attend(self, k1_BxSxKxD, v1_BxSxKxD, q, qpos_BxN, new):
    """A copy of this layer's slice takes the chunk's K/V (`new`); `write` stores them later."""
    pos_BxC, k_BxCxKxD, v_BxCxKxD = new
    at = (_rows(q.shape[0]), pos_BxC)
    k = k1_BxSxKxD.at[at].set(k_BxCxKxD.astype(k1_BxSxKxD.dtype), mode="drop")
    v = v1_BxSxKxD.at[at].set(v_BxCxKxD.astype(v1_BxSxKxD.dtype), mode="drop")
    return _global(q, qpos_BxN, k, v), {}

  def collect(self, k1, v1, listed):
    del listed
    return k1, v1

  def write(self, k1, v1, pos_BxC, k_LxBxCxKxD, v_LxBxCxKxD):
    at = (slice(None), _rows(pos_BxC.shape[0]), pos_BxC)

    def put(c, x):
      return c.at[at].set(x.astype(c.dtype), mode="drop")

    return put(k1, k_LxBxCxKxD), put(v1, v_LxBxCxKxD)


class _PerLayer(Layout):
  name, per_layer = "per_layer", True

  def shapes(self, n_layers, batch, max_len, kv_heads, head_dim, dtype):
    sds = (jax.ShapeDtypeStruct((kv_heads * batch, max_len, head_dim), dtype),)
    return sds * n_layers, sds * n_layers

  def max_len(self, k1):
    return k1[0].shape[1]

  def params(self, params):
    return unstack_layers(params)

  def layer_arrays(self, k1, v1):
    return tuple({"k1": k, "v1": v} for k, v in zip(k1, v1)), {}

  def attend(self, k1_XxSxD, v1_XxSxD, q, qpos_BxN, new):
    """The chunk's K/V (`new`, unless already there) go into the buffer in place, then it is read."""
    if new is not None:
      k1_XxSxD, v1_XxSxD = self._put(k1_XxSxD, v1_XxSxD, *new)
    return _global_rows(q, qpos_BxN, k1_XxSxD, v1_XxSxD), {
        "k1": k1_XxSxD,
        "v1": v1_XxSxD,
    }

  def collect(self, k1, v1, listed):
    if not listed or "k1" not in listed[0]:
      return k1, v1
    return tuple(x["k1"] for x in listed), tuple(x["v1"] for x in listed)

  def write(self, k1, v1, pos_BxC, k_LxBxCxKxD, v_LxBxCxKxD):
    pairs = [
        self._put(k, v, pos_BxC, k_LxBxCxKxD[i], v_LxBxCxKxD[i])
        for i, (k, v) in enumerate(zip(k1, v1))
    ]
    return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)

  @staticmethod
  def _put(k1_XxSxD, v1_XxSxD, pos_BxC, k_BxCxKxD, v_BxCxKxD):
    b, kh = pos_BxC.shape[0], k_BxCxKxD.shape[2]
    at = (jnp.arange(kh * b)[:, None], jnp.tile(pos_BxC, (kh, 1)))

    def put(c, x):  # [B, C, K, D] -> rows k*B + b
      x = x.transpose(2, 0, 1, 3).reshape(kh * b, x.shape[1], x.shape[3])
      return c.at[at].set(x.astype(c.dtype), mode="drop")

    return put(k1_XxSxD, k_BxCxKxD), put(v1_XxSxD, v_BxCxKxD)


STACKED = _Stacked()
PER_LAYER = _PerLayer()
LAYOUTS = {x.name: x for x in (STACKED, PER_LAYER)}


def params_layout(params) -> Layout:
  """The layout a param tree is in (`unstack_layers` gives PER_LAYER)."""
  return PER_LAYER if isinstance(params["layers"], (tuple, list)) else STACKED


def check_layout(cache: Cache, params) -> None:
  if params_layout(params) is not cache.layout:
    raise ValueError(
        f"the cache layout ({cache.layout}) must match the params layout "
        f"({params_layout(params)}): build the cache from the same params"
    )


# ------------------------------------------------------------------------------------- the cache
def ring_slots(cfg: PLTConfig) -> int:
  return cfg.window_left + 1


def cache_entries_per_sequence(cfg: PLTConfig, max_len: int) -> int:
  """K/V entries (one token of one layer) per sequence: `L*S + (R-1)*L*(left+1)`."""
  n_layers, r = cfg.num_hidden_layers, cfg.plt_num_loops
  return n_layers * max_len + (r - 1) * n_layers * ring_slots(cfg)


def cache_shapes(
    cfg: PLTConfig, batch: int, max_len: int, layout: Layout = STACKED
) -> Cache:
  """ShapeDtypeStructs of the cache (for AOT compilation and sizing)."""
  n_layers, r, w = cfg.num_hidden_layers, cfg.plt_num_loops, ring_slots(cfg)
  kd = (cfg.num_key_value_heads, cfg.head_size)
  dt = jnp.dtype(cfg.runtime.dtype)
  sds = jax.ShapeDtypeStruct
  k1, v1 = layout.shapes(n_layers, batch, max_len, *kd, dt)
  ring = sds((r - 1, n_layers, batch, w, *kd), dt)
  return Cache(
      k1=k1,
      v1=v1,
      ring_k=ring,
      ring_v=ring,
      ring_pos=sds((batch, w), jnp.int32),
      carry=sds((r - 1, batch, cfg.hidden_size), dt),
      lengths=sds((batch,), jnp.int32),
  )


# Logical axes (`model/sharding.py` rules) of the stacked cache's arrays.
_KV = (
    "layers",
    "activation_batch",
    "activation_length",
    "kv_heads",
    "head_dim",
)
_RING = (None, "layers", "activation_batch", None, "kv_heads", "head_dim")
_CACHE_AXES = {
    "k1": _KV,
    "v1": _KV,
    "ring_k": _RING,
    "ring_v": _RING,
    "ring_pos": ("activation_batch", None),
    "carry": (None, "activation_batch", "activation_embed"),
    "lengths": ("activation_batch",),
}


def cache_shardings(
    cfg: PLTConfig, mesh: Mesh, batch: int, rules=sharding.DEFAULT_RULES
) -> Cache:
  """NamedShardings of the STACKED cache on a mesh, by the logical axis rules: rows over the data
  axes that divide `batch`, kv heads over `tensor` when it divides them, the rest replicated.
  """
  shapes = cache_shapes(cfg, batch, 1)  # the length is never sharded
  return Cache(
      **{
          name: NamedSharding(
              mesh,
              sharding.logical_to_spec(
                  axes, getattr(shapes, name).shape, mesh, rules
              ),
          )
          for name, axes in _CACHE_AXES.items()
      }
  )


def init_cache(
    cfg: PLTConfig, batch: int, max_len: int, layout: Layout = STACKED
) -> Cache:
  shapes = cache_shapes(cfg, batch, max_len, layout)
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  return cache.replace(ring_pos=jnp.full(shapes.ring_pos.shape, -1, jnp.int32))


def cache_bytes(cache: Cache) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))


def commit(
    cache: Cache,
    k_RxLxBxCxKxD,
    v_RxLxBxCxKxD,
    p_Rm1xBxCxd,
    n_B,
    *,
    kv1_stored: bool = False,
) -> Cache:
  """Write a chunk's new state into the cache; row b's first `n_B[b]` chunk tokens are real.

  Loop 1's K/V go to positions `lengths + i` (unless `kv1_stored`: per-layer buffers hold them
  already; padding lands beyond the row's length, never visible); the last W real tokens of each
  later loop go to ring slots `pos % W`; the carry becomes P(r) of the row's last real token. Rows
  with n = 0 keep ring and carry. All in place: one indexed write per array.
  """
  b, c = k_RxLxBxCxKxD.shape[2:4]
  start = cache.lengths
  i = jnp.arange(c)
  pos_BxC = start[:, None] + i
  if not kv1_stored:
    k1, v1 = cache.layout.write(
        cache.k1, cache.v1, pos_BxC, k_RxLxBxCxKxD[0], v_RxLxBxCxKxD[0]
    )
    cache = cache.replace(k1=k1, v1=v1)
  w = cache.ring_pos.shape[1]
  keep = (i < n_B[:, None]) & (i >= n_B[:, None] - w)  # distinct slots
  slot_BxC = jnp.where(keep, pos_BxC % w, w)  # slot W does not exist: dropped
  rows = _rows(b)

  def ring(old, new):
    return old.at[:, :, rows, slot_BxC].set(new.astype(old.dtype), mode="drop")

  last = jnp.clip(n_B - 1, 0, c - 1)
  p_last = jnp.take_along_axis(p_Rm1xBxCxd, last[None, :, None, None], axis=2)
  carry = jnp.where(
      (n_B > 0)[None, :, None],
      p_last[:, :, 0].astype(cache.carry.dtype),
      cache.carry,
  )
  return cache.replace(
      ring_k=ring(cache.ring_k, k_RxLxBxCxKxD[1:]),
      ring_v=ring(cache.ring_v, v_RxLxBxCxKxD[1:]),
      ring_pos=cache.ring_pos.at[rows, slot_BxC].set(pos_BxC, mode="drop"),
      carry=carry,
      lengths=start + n_B,
  )


# ------------------------------------------------------------------------------------- KV source
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
  mask = window_visible(qpos_BxN[:, :, None], kpos[:, None, :], left)
  mask &= (kpos >= 0)[:, None, :]
  return masked_attention(q_BxNxHxD, k, v, mask)


class CacheKV(flax.struct.PyTreeNode):
  """The decoding KV source (`model/kv.py`): a chunk of C new tokens per row at positions
  `lengths + 0..C-1`. Loop 1 adds the chunk's K/V to the cache and attends over it; a later loop
  attends over loop 1's cache (global) and its ring plus its own new K/V (local); with
  `loops_as_rows` the chunk is one token and all loops run as rows of one pass. The source records
  every loop's new K/V and P(r); `commit` writes them into the cache.
  """

  cache: Cache
  pos_BxC: jax.Array
  new: tuple = ()  # per loop: (k, v) `[L, B, C, K, D]`
  clp: tuple = ()  # per loop r < R: P(r) `[B, C, d]`
  layout: Layout = flax.struct.field(pytree_node=False, default=STACKED)
  left: int = flax.struct.field(pytree_node=False, default=0)
  loops_as_rows: bool = flax.struct.field(pytree_node=False, default=False)
  kv1_stored: bool = flax.struct.field(pytree_node=False, default=False)
  loops: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())

  later_loops_alike = False  # each loop has its own ring

  @classmethod
  def start(
      cls, cfg: PLTConfig, cache: Cache, chunk: int, loops_as_rows: bool = False
  ):
    pos_BxC = cache.lengths[:, None] + jnp.arange(chunk)
    return cls(
        cache=cache,
        pos_BxC=pos_BxC,
        layout=cache.layout,
        left=cfg.window_left,
        loops_as_rows=loops_as_rows and cfg.plt_num_loops > 1,
    )

  @property
  def per_layer(self) -> bool:
    return self.layout.per_layer

  def for_pass(self, loops):
    # What every layer shares: positions and the ring's; per-layer arrays come as layer inputs.
    view = self.cache.replace(
        k1=None, v1=None, ring_k=None, ring_v=None, carry=None, lengths=None
    )
    return self.replace(cache=view, new=(), clp=(), loops=tuple(loops))

  def layer_inputs(self, loops):
    c = self.cache
    listed, stacked = self.layout.layer_arrays(c.k1, c.v1)
    if len(loops) > 1:  # rows: rings as [L, R-1, B, W, K, D]
      stacked.update(
          ring_k=jnp.moveaxis(c.ring_k, 1, 0),
          ring_v=jnp.moveaxis(c.ring_v, 1, 0),
      )
    elif loops[0] > 0:
      stacked.update(
          ring_k=c.ring_k[loops[0] - 1], ring_v=c.ring_v[loops[0] - 1]
      )
      if not self.kv1_stored:  # loop 1's new K/V, held apart until `commit`
        stacked.update(new_k=self.new[0][0], new_v=self.new[0][1])
    return listed, stacked

  def attend(self, xs, q, k, v, gate):
    pos = self.pos_BxC
    if len(self.loops) > 1:
      return self._attend_rows(xs, q, k, v, gate)
    if self.loops == (0,):  # loop 1: add the chunk to the cache, attend over it
      y, listed = self.layout.attend(xs["k1"], xs["v1"], q, pos, (pos, k, v))
      return y, (listed, {"k": k, "v": v})
    new = (pos, xs["new_k"], xs["new_v"]) if "new_k" in xs else None
    glob, _ = self.layout.attend(xs["k1"], xs["v1"], q, pos, new)
    loc = _local(
        self.left,
        q,
        pos,
        xs["ring_k"],
        xs["ring_v"],
        self.cache.ring_pos,
        k,
        v,
        pos,
    )
    return blend(gate, glob, loc), ({}, {"k": k, "v": v})

  def _attend_rows(self, xs, q_BxRxHxD, k, v, gate):
    """Row 0 (loop 1) writes its K/V; all rows read loop 1's cache in one attention, and rows >= 1
    their own rings and new K/V."""
    pos_Bx1 = self.pos_BxC
    qpos_BxR = jnp.broadcast_to(pos_Bx1, q_BxRxHxD.shape[:2])
    y, listed = self.layout.attend(
        xs["k1"], xs["v1"], q_BxRxHxD, qpos_BxR, (pos_Bx1, k[:, :1], v[:, :1])
    )

    def loops_first(x):  # [B, R, ...] -> [R-1, B, 1, ...]
      return jnp.moveaxis(x[:, 1:, None], 1, 0)

    local = jax.vmap(
        functools.partial(_local, self.left),
        in_axes=(0, None, 0, 0, None, 0, 0, None),
    )
    loc = local(
        loops_first(q_BxRxHxD),
        pos_Bx1,
        xs["ring_k"],
        xs["ring_v"],
        self.cache.ring_pos,
        loops_first(k),
        loops_first(v),
        pos_Bx1,
    )
    mixed = blend(gate, y[:, 1:], jnp.moveaxis(loc[:, :, 0], 0, 1))
    return jnp.concatenate([y[:, :1], mixed], axis=1), (
        listed,
        {"k": k, "v": v},
    )

  def after_pass(self, loops, listed, stacked, clp=None):
    c = self.cache
    k1, v1 = self.layout.collect(c.k1, c.v1, listed)
    out = self.replace(
        cache=c.replace(k1=k1, v1=v1),
        kv1_stored=self.kv1_stored or self.per_layer,
    )
    if len(loops) == 1:
      new = ((stacked["k"], stacked["v"]),)
      clp = () if clp is None else (clp,)
    else:  # rows [L, B, R, ...] -> per loop [L, B, 1, ...]
      new = tuple(
          (stacked["k"][:, :, r : r + 1], stacked["v"][:, :, r : r + 1])
          for r in range(len(loops))
      )
      clp = tuple(clp[:, r : r + 1] for r in range(clp.shape[1]))
    return out.replace(new=self.new + new, clp=self.clp + clp)

  def carry(self, loop):
    return self.cache.carry[loop - 1]

  def commit(self, n_B) -> Cache:
    k = jnp.stack([x[0] for x in self.new])
    v = jnp.stack([x[1] for x in self.new])
    p = (
        jnp.stack(self.clp)
        if self.clp
        else jnp.zeros(
            (0, *self.pos_BxC.shape, self.cache.carry.shape[-1]),
            self.cache.carry.dtype,
        )
    )
    return commit(self.cache, k, v, p, n_B, kv1_stored=self.kv1_stored)
