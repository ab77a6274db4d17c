"""Decoding with the PLT cache: prefill (whole or chunked), extend, decode steps, the sampling loop.

Semantics: docs/plt-spec.md section 4. Shapes: B batch, S max length, C chunk, P prompt, V vocab.
Every function here runs the model itself (`PLTForCausalLM`) with a KV source over the cache
(`cache.CacheKV`), then commits what the source recorded; the loop schedule and the layer exist only
in the model.

Batches of different prompt lengths are RIGHT-padded with per-row lengths: every token keeps its true
position (RoPE, masks), so a row's numbers equal an unpadded forward of that row. Cache slots at or
beyond a row's length may hold garbage from padding; every mask stops at the query's own position.

Decode modes (same numbers, different cost):
  "batched": the R loops of the new token are R rows of ONE pass over the L layers (PLT);
  "serial":  one pass over the weights per loop, loops one after another (vanilla looped profile);
             the only mode of a model without cross-loop parallelism (`plt_cross_loop=False`).
"""

from __future__ import annotations

from collections.abc import Callable
import contextlib
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from loopcoder_jax.inference.cache import (
    PER_LAYER,
    STACKED,
    Cache,
    CacheKV,
    cache_shapes,
    cache_shardings,
    check_layout,
    commit,
    init_cache,
    params_layout,
)
from loopcoder_jax.inference.sampling import StopRule
from loopcoder_jax.model import sharding
from loopcoder_jax.model.config import PLTConfig
from loopcoder_jax.model.kv import SequenceKV, stack_records
from loopcoder_jax.model.transformer import (
    NO_CLP_ROWS,
    PLTForCausalLM,
    abstract_params,
)

MODES = ("batched", "serial")


def _check_mode(mode, cfg: PLTConfig):
  if mode not in MODES:
    raise ValueError(f"decode mode must be one of {MODES}, got {mode!r}")
  if mode == "batched" and cfg.plt_num_loops > 1 and not cfg.plt_cross_loop:
    raise ValueError(NO_CLP_ROWS)


def extend(
    cfg: PLTConfig, params, cache: Cache, tokens_BxC, n_B=None, logits_at=None
):
  """Run a chunk through the loops one after another (the training computation) from the cache.

  Each row's chunk starts at its `lengths`; its first position takes the carry saved by the
  previous chunk; row b's first `n_B[b]` tokens are real (default all). Returns logits `[B, C, V]`
  (with `logits_at` `[B]`: only those chunk indices', `[B, V]`) and the updated cache. Serial
  decoding is this with C = 1.
  """
  check_layout(cache, params)
  b, c = tokens_BxC.shape
  n_B = jnp.full((b,), c, jnp.int32) if n_B is None else n_B.astype(jnp.int32)
  kv = CacheKV.start(cfg, cache, c)
  logits, aux = PLTForCausalLM(cfg).apply(
      {"params": params},
      tokens_BxC,
      positions=kv.pos_BxC,
      kv=kv,
      logits_at=logits_at,
  )
  return logits, aux["kv"].commit(n_B)


def decode_step(
    cfg: PLTConfig,
    params,
    cache: Cache,
    tokens_B,
    mode: str = "batched",
    active_B=None,
):
  """One new token per row at position `cache.lengths`: logits `[B, V]` and the updated cache.

  Rows where `active_B` (bool `[B]`) is False keep their length, ring and carry (a free slot of
  continuous batching); their loop-1 K/V land at their length, beyond what any mask shows.
  """
  _check_mode(mode, cfg)
  check_layout(cache, params)
  kv = CacheKV.start(cfg, cache, 1, loops_as_rows=mode == "batched")
  logits, aux = PLTForCausalLM(cfg).apply(
      {"params": params}, tokens_B[:, None], positions=kv.pos_BxC, kv=kv
  )
  n_B = jnp.ones(tokens_B.shape, jnp.int32)
  if active_B is not None:
    n_B = active_B.astype(jnp.int32)
  return logits[:, 0], aux["kv"].commit(n_B)


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
  chunks of that size run through `extend`. The cache takes the params' layout (`unstack_layers`:
  per-layer). Returns the logits of each row's last prompt token `[B, V]` (all positions
  `[B, P, V]` with `return_all_logits`) and the cache.
  """
  b, plen = tokens_BxP.shape
  if plen > max_len:
    raise ValueError(
        f"prompt length {plen} exceeds the cache length max_len={max_len}"
    )
  lengths_B = lengths_B.astype(jnp.int32)
  layout = params_layout(params)
  cache = init_cache(cfg, b, max_len, layout)
  # Only the last prompt token's logits are kept unless asked: all of them are B*P*V floats.
  if chunk <= 0 or chunk >= plen:
    logits, aux = PLTForCausalLM(cfg).apply(
        {"params": params},
        tokens_BxP,
        kv=SequenceKV.for_config(cfg, record=True, per_layer=layout.per_layer),
        logits_at=None if return_all_logits else lengths_B - 1,
    )
    rec = aux["kv"]
    clp_like = jax.ShapeDtypeStruct(
        (b, plen, cfg.hidden_size), cache.carry.dtype
    )
    k, v, p = stack_records(rec.kv, rec.clp, clp_like)
    return logits, commit(cache, k, v, p, lengths_B)
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
    all_logits = jnp.moveaxis(all_logits, 0, 1)
    return all_logits.reshape(b, n_chunks * chunk, -1)[:, :plen], cache
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
    ordered: bool = True,
    limits_B=None,
):
  """Sample up to `stop.max_new_tokens` per row in one `lax.while_loop` (static shapes).

  The cache must have room for `lengths + max_new_tokens` (writes past `max_len` are dropped).
  The first token comes from `logits_BxV` (the prefill's). A row stops after its first stop id; it
  then emits `pad_id` and the loop ends when every row has stopped. `callback(step, ids_B, live_B)`
  streams each new token to the host through a `jax.debug.callback` (the whole loop stays one
  device program; only B ints cross per step), an ordered one unless `ordered=False` (JAX orders
  them on one device only; `in_step_order` restores the order on the host). `limits_B` (int32
  `[B]`, each at most `max_new_tokens`) ends rows sooner, so one compiled loop serves any smaller
  budget. Returns (ids `[B, max_new_tokens]`, counts `[B]` of real tokens including the stop id,
  cache).
  """
  _check_mode(mode, cfg)
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
      jax.debug.callback(callback, step, tok, live, ordered=ordered)
    ids = ids.at[:, step].set(tok)
    counts = counts + live
    done = done | stop.is_stop(tok)
    if limits_B is not None:
      done = done | (counts >= limits_B)
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


def in_step_order(callback: Callable[..., Any]) -> Callable[..., Any]:
  """`callback(step, ...)` for one `generate` loop, called in step order whatever order unordered
  device callbacks arrive in."""
  pending: dict[int, tuple] = {}
  next_step = [0]

  def call(step, *args):
    pending[int(step)] = args
    while next_step[0] in pending:
      callback(next_step[0], *pending.pop(next_step[0]))
      next_step[0] += 1

  return call


def generation_program(
    cfg: PLTConfig,
    sampler,
    stop: StopRule,
    *,
    max_len: int,
    mode: str = "batched",
    prefill_chunk: int = 0,
    callback: Callable[..., Any] | None = None,
    pad_id: int = 0,
    cache_sharding: Cache | None = None,
):
  """The pure function `prefill` then `generate`: `run(params, tokens_BxP, lengths_B, limits_B,
  key) -> (ids [B, max_new_tokens], counts [B])`, for `jax.jit` (its settings are all static).

  `cache_sharding` (a mesh's `serving_shardings` cache) pins the cache on the mesh; host callbacks
  are then unordered (JAX orders them on one device only), so wrap `callback` in `in_step_order`.
  """
  _check_mode(mode, cfg)

  def run(params, tokens_BxP, lengths_B, limits_B, key):
    with mesh_context(cache_sharding):
      logits, cache = prefill(
          cfg, params, tokens_BxP, lengths_B, max_len, prefill_chunk
      )
      if cache_sharding is not None:
        cache = jax.lax.with_sharding_constraint(cache, cache_sharding)
      ids, counts, _ = generate(
          cfg,
          params,
          cache,
          logits,
          key,
          sampler,
          stop,
          mode,
          callback,
          pad_id,
          ordered=cache_sharding is None,
          limits_B=limits_B,
      )
    return ids, counts

  return run


def serving_params(params, mesh: Mesh | None, layout=None):
  """Params as decoding wants them: per-layer on CPU without a mesh (XLA:CPU decodes 1.2-2.6x
  faster with per-layer buffers: it copies slices of stacked ones at every step), else stacked
  (one compiled layer, and the layout mesh shardings describe); `layout` overrides the choice.
  """
  if layout is None:
    cpu = jax.default_backend() == "cpu" and mesh is None
    layout = PER_LAYER if cpu else STACKED
  if mesh is not None and layout is PER_LAYER:
    raise ValueError("a mesh serves the stacked layout only (its shardings)")
  if mesh is None:
    # one device: params left sharded by a trainer's mesh would make the program span every
    # device, where JAX cannot order the streaming callbacks
    params = jax.device_put(params, jax.local_devices()[0])
  return layout.params(params)


def program_shardings(cfg: PLTConfig, mesh: Mesh | None, batch: int, rules):
  """For a generation program over `batch` rows: the cache sharding (None without a mesh) and
  the `jax.jit` keywords placing params, rows and the replicated result on `mesh`.
  """
  if mesh is None:
    return None, {}
  p_sh, cache_sharding, rows = serving_shardings(cfg, mesh, batch, rules)
  jit_kw = dict(
      in_shardings=(p_sh, rows, rows, rows, None),
      out_shardings=sharding.replicated(mesh),
  )
  return cache_sharding, jit_kw


@functools.lru_cache(maxsize=8)
def _jitted_program(cfg, sampler, stop, settings, mesh, rules, batch):
  """One jitted `generation_program` per distinct settings (reused across calls)."""
  cache_sharding, jit_kw = program_shardings(cfg, mesh, batch, rules)
  program = generation_program(
      cfg, sampler, stop, cache_sharding=cache_sharding, **dict(settings)
  )
  return jax.jit(program, **jit_kw)


def prefill_and_generate(
    cfg: PLTConfig,
    params,
    tokens_BxP,
    lengths_B,
    key,
    sampler,
    stop: StopRule,
    *,
    max_len: int,
    mode: str = "batched",
    prefill_chunk: int = 0,
    callback: Callable[..., Any] | None = None,
    pad_id: int = 0,
    mesh: Mesh | None = None,
    rules=sharding.DEFAULT_RULES,
):
  """`prefill` then `generate`, as one jitted program: (ids `[B, max_new_tokens]`, counts `[B]`).

  With a `mesh` of more than one device it runs sharded as `serving_shardings` places params,
  cache and rows (params are moved there unless they already are, e.g. by
  `interop.load(..., mesh=)`); otherwise params and cache take `serving_params`' layout.
  `callback` as in `generate`, called in step order. The jitted program is kept per settings
  (the same `callback` object reuses it); `engine.Engine` also buckets shapes and owns its
  compiled programs: what repeated callers should use.
  """
  if mesh is not None and mesh.size == 1:
    mesh = None
  params = serving_params(params, mesh)
  batch = tokens_BxP.shape[0]
  limits_B = jnp.full((batch,), stop.max_new_tokens, jnp.int32)
  if mesh is not None:
    p_sh, _, rows = serving_shardings(cfg, mesh, batch, rules)
    params = jax.device_put(params, p_sh)
    tokens_BxP, lengths_B, limits_B = jax.device_put(
        (tokens_BxP, lengths_B, limits_B), rows
    )
    if callback is not None:
      callback = in_step_order(callback)
  settings = (
      ("max_len", max_len),
      ("mode", mode),
      ("prefill_chunk", prefill_chunk),
      ("callback", callback),
      ("pad_id", pad_id),
  )
  run = _jitted_program(cfg, sampler, stop, settings, mesh, rules, batch)
  return run(params, tokens_BxP, lengths_B, limits_B, key)


# ------------------------------------------------------------------------------------- serving
def mesh_context(shardings):
  """Trace-time context naming the mesh of `shardings` (a pytree of them; none: no mesh), so the
  attention kernels (`attention_impl="pallas"`) run per shard under `shard_map`. No logical axis
  rules: the model's activation constraints stay off, shardings propagate from the arguments.
  """
  for s in jax.tree.leaves(shardings):
    if isinstance(s, NamedSharding):
      return jax.sharding.use_abstract_mesh(s.mesh.abstract_mesh)
  return contextlib.nullcontext()


def serving_shardings(
    cfg: PLTConfig, mesh: Mesh, batch: int, rules=sharding.DEFAULT_RULES
):
  """Shardings for serving `batch` rows on a mesh (what AOT compiles and `generation` runs):
  `(params, cache, rows)`. Params by the training rules (heads, kv heads, MLP and vocab on
  `tensor`, the model dimension on `fsdp`); the stacked cache by `cache.cache_shardings`; token
  rows (`[B]`, `[B, P]`) split like the cache's rows.
  """
  rows = sharding.logical_to_spec(("activation_batch",), (batch,), mesh, rules)
  return (
      sharding.param_shardings(abstract_params(cfg), mesh, rules),
      cache_shardings(cfg, mesh, batch, rules),
      NamedSharding(mesh, rows),
  )


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
  _check_mode(mode, cfg)
  if prefill_len > max_len:
    raise ValueError(f"prefill_len={prefill_len} exceeds max_len={max_len}")

  def prefill_fn(params, tokens_BxP, lengths_B):
    with mesh_context(param_shardings):
      return prefill(cfg, params, tokens_BxP, lengths_B, max_len, chunk)

  def decode_step_fn(params, cache, tokens_B):
    with mesh_context(param_shardings):
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
