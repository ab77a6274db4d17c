"""KV sources: where each layer's attention reads keys and values, and what it keeps of them.

This is the one seam between the model and decoding. `PLTForCausalLM` runs the loop schedule (embed,
loop 1, CLP inputs, loops 2..R, head) and the layer (project, gate, attend, finish) once for every use;
what differs between training, prefill, extending a cache by a chunk and a decode step is only where
attention finds its keys and values. A source is a `flax.struct` pytree (array fields are data,
everything else static) with:

  loops_as_rows   static: the chunk is one new token and all R loops run as R rows of one pass over
                  the layers (PLT decoding), instead of one pass per loop
  later_loops_alike  static: passes of loops 2..R see the same inputs, so one scanned body can run
                  them all (training); a cache keeps a ring per loop, so decoding runs them in turn
  per_layer       static: layer params are a tuple of L trees (and so are the source's per-layer
                  buffers) iterated in Python, instead of stacked `[L, ...]` arrays scanned over
  for_pass(loops) the source as every layer of one pass sees it (broadcast to all layers): `loops`
                  (static) holds the loop of each row, `(r,)` for a pass of loop r over the chunk,
                  `(0, .., R-1)` for loops as rows
  layer_inputs(loops)  the per-layer inputs of that pass: `(listed, stacked)`, a tuple of L dicts
                  (or None) and a dict of `[L, ...]` arrays; a layer gets both merged into one dict
  attend(xs_i, q, k, v, gate)  one layer's attention output and its per-layer outputs
                  `(listed_out, stacked_out)` (dicts; listed_out empty unless `per_layer`)
  after_pass(loops, listed, stacked, clp)  the source updated by a pass's outputs (e.g. loop 1's K/V
                  now visible to the later loops); `clp` holds P(r) of the pass's rows (None for the
                  last loop), for the next chunk's carries
  carry(loop)     the CLP state entering the chunk's first position for `loop` >= 1 (None: zeros)

`SequenceKV` (here) is the training source: every loop attends within the sequence itself. The
decoding source, over a KV cache, is `loopcoder_jax.inference.cache.CacheKV`.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

from loopcoder_jax.model import attention
from loopcoder_jax.model.config import PLTConfig


class SequenceKV(flax.struct.PyTreeNode):
  """Attention within the sequence: loop 1 causal over its own K/V, loops >= 2 G-SWA over loop 1's
  K/V of the same layer and their own (training, whole-prompt prefill).

  With `record=True` every pass's K/V and CLP states are kept (`kv`, `clp`), for a prefill to copy
  into a cache; `per_layer=True` for params in the per-layer layout (`unstack_layers`).
  """

  segment_ids: jax.Array | None
  # Loop 1's (k, v) per layer, `[L, B, S, K, D]` each, once loop 1 has run.
  kv1: Any = None
  kv: tuple = ()  # recorded: per loop, (k, v) `[L, B, S, K, D]`
  clp: tuple = ()  # recorded: per loop r < R, P(r) `[B, S, d]`
  impl: str = flax.struct.field(pytree_node=False, default="reference")
  left: int = flax.struct.field(pytree_node=False, default=0)
  block_size: int = flax.struct.field(pytree_node=False, default=0)
  record: bool = flax.struct.field(pytree_node=False, default=False)
  per_layer: bool = flax.struct.field(pytree_node=False, default=False)
  loops: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())

  loops_as_rows = False
  later_loops_alike = True

  @classmethod
  def for_config(
      cls,
      cfg: PLTConfig,
      segment_ids=None,
      *,
      record: bool = False,
      per_layer: bool = False,
  ):
    rt = cfg.runtime
    return cls(
        segment_ids=segment_ids,
        impl=rt.attention_impl,
        left=cfg.window_left,
        block_size=rt.local_block_size,
        record=record,
        per_layer=per_layer,
    )

  def for_pass(self, loops):
    # The layers see neither loop 1's stacked K/V (they come per layer) nor the records.
    return self.replace(kv1=None, kv=(), clp=(), loops=tuple(loops))

  def layer_inputs(self, loops):
    if loops == (0,):
      return None, {}
    return None, {"k1": self.kv1[0], "v1": self.kv1[1]}

  def attend(self, xs_i, q, k, v, gate):
    seg = self.segment_ids
    if self.loops == (0,):
      y = attention.causal_attention(q, k, v, seg, impl=self.impl)
    else:
      y = attention.gswa_attention(
          q,
          xs_i["k1"],
          xs_i["v1"],
          k,
          v,
          gate,
          seg,
          left=self.left,
          impl=self.impl,
          block_size=self.block_size,
      )
    # Later loops' K/V leave the layers only when recorded (stacking them costs memory).
    keep = self.loops == (0,) or self.record
    return y, ({}, {"k": k, "v": v} if keep else {})

  def after_pass(self, loops, listed, stacked, clp=None):
    del listed
    out = self
    if loops == (0,):
      out = out.replace(kv1=(stacked["k"], stacked["v"]))
    if self.record:
      clps = out.clp if clp is None else out.clp + (clp,)
      out = out.replace(kv=out.kv + ((stacked["k"], stacked["v"]),), clp=clps)
    return out

  def carry(self, loop):
    del loop
    return None


def stack_records(kv: tuple, clp: tuple, like):
  """Recorded per-loop K/V and CLP states as arrays: `[R, L, B, S, K, D]` each and `[R-1, B, S, d]`
  (`like`: a `[B, S, d]` array giving the CLP shape and dtype when R = 1)."""
  k = jnp.stack([x[0] for x in kv])
  v = jnp.stack([x[1] for x in kv])
  p = jnp.stack(clp) if clp else jnp.zeros((0, *like.shape), like.dtype)
  return k, v, p
