"""Glue shared by both public ops: block plan, layout and padding, custom VJP, backend, mesh.

Backend (chosen at trace time: `backend=`, else the `default_backend(...)` context, else
`jax.default_backend()`):
  tpu  -> the Mosaic kernels;
  gpu  -> `jax.nn.dot_product_attention` (cuDNN/XLA) with `local_window_size` per branch, blended
          in XLA (the Mosaic kernels do not lower to Triton);
  cpu  -> the same TPU kernels in Pallas interpret mode (`interpret=True`, or
          `pltpu.InterpretParams()` with `backend="cpu_tpu_interpret"`, which also simulates TPU
          DMAs/semaphores). This is how `attention_impl="pallas"` runs on a CPU host and how the
          tests exercise the kernels; it is slow, use "reference"/"xla" for real CPU work.
Under an active mesh (`jax.set_mesh(mesh)`, `jax.sharding.use_abstract_mesh` as the trainer does,
or the legacy `with mesh:`) with axes among `data`, `fsdp`, `tensor`, the kernels run inside
`jax.shard_map`: batch over ("data", "fsdp"), heads over "tensor" (kept whole when the head counts
do not divide the axis).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import jax
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels._flash import (
    LANES,
    SUBLANES,
    Branch,
    Plan,
    backward_dkv,
    backward_dq,
    forward,
)
from pallas_kernels.reference import blend

# Defaults tuned for the TPU MXU (multiples of 128): large blocks for the causal branch, small
# KV blocks for the window so that work stays ~ S * (block + left).
CAUSAL_BLOCK = 512
LOCAL_BLOCK = 128
BACKENDS = ("tpu", "gpu", "cpu", "cpu_tpu_interpret")


# ------------------------------------------------------------------------------------ checks
def check_inputs(q, pairs, segment_ids, gate, lefts):
  if q.ndim != 4:
    raise ValueError(f"q must be [B, S, H, D], got shape {q.shape}")
  b, s, h, d = q.shape
  for k, v in pairs:
    if (
        k.ndim != 4
        or k.shape != v.shape
        or k.shape[:2] != (b, s)
        or k.shape[3] != d
    ):
      raise ValueError(
          f"k/v must be [B, S, Hkv, D] matching q {q.shape}, got {k.shape} and {v.shape}"
      )
    if h % k.shape[2]:
      raise ValueError(
          f"query heads {h} must be a multiple of kv heads {k.shape[2]}"
      )
  if segment_ids is not None and segment_ids.shape != (b, s):
    raise ValueError(
        f"segment_ids must be [B, S] = {(b, s)}, got {segment_ids.shape}"
    )
  if gate is not None and gate.shape != (b, s, h):
    raise ValueError(f"gate must be [B, S, H] = {(b, s, h)}, got {gate.shape}")
  for left in lefts:
    if left is not None and (not isinstance(left, int) or left < 0):
      raise ValueError(f"left must be None or an int >= 0, got {left!r}")


def _pow2(name, x):
  if x is not None and (x < 8 or x & (x - 1)):
    raise ValueError(f"{name} must be a power of two >= 8, got {x}")


def make_plan(seq_len, lefts, block_q, blocks_kv, interpret):
  """Blocks are powers of two; all are capped at the sequence rounded up to a power of two, so the
  padded length is a multiple of every block (on TPU a block then either is a multiple of 128 or
  covers the whole padded sequence, as Mosaic requires)."""
  _pow2("block_q", block_q)
  for bk in blocks_kv:
    _pow2("block_kv", bk)
  cap = max(8, 1 << (seq_len - 1).bit_length())
  bks = [
      min(bk or (CAUSAL_BLOCK if left is None else LOCAL_BLOCK), cap)
      for left, bk in zip(lefts, blocks_kv)
  ]
  bq = min(
      block_q
      or (
          CAUSAL_BLOCK
          if lefts == (None,)
          else 2 * LOCAL_BLOCK
          if len(lefts) > 1
          else LOCAL_BLOCK
      ),
      cap,
  )
  plan = Plan(
      tuple(Branch(left, bk) for left, bk in zip(lefts, bks)),
      bq,
      len(lefts) == 2,
      interpret,
  )
  padded = -(-seq_len // max(bq, *bks)) * max(bq, *bks)
  return plan, padded


# ------------------------------------------------------------------------------------ custom VJP
def _rows(x_BxHxS):
  return x_BxHxS[:, :, None, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def attention_core(plan, q, ks, vs, seg, gate):
  """Head-major padded core: q [B,H,Sp,D], ks/vs tuples [B,Hkv,Sp,D], gate [B,H,1,Sp] or None."""
  return forward(plan, q, ks, vs, seg, gate, residuals=False)


def _core_fwd(plan, q, ks, vs, seg, gate):
  out, lses, delta = forward(plan, q, ks, vs, seg, gate, residuals=True)
  return out, (q, ks, vs, seg, gate, out, lses, delta)


def _core_bwd(plan, res, do):
  q, ks, vs, seg, gate, out, lses, delta = res
  do32, out32 = do.astype(jnp.float32), out.astype(jnp.float32)
  # o0 = out + (1-g) delta, o1 = out - g delta  (delta = o0 - o1)
  if plan.gated:
    g = jnp.swapaxes(gate, 2, 3)  # [B,H,Sp,1]
    delta32 = delta.astype(jnp.float32)
    di0 = jnp.sum(do32 * (out32 + (1.0 - g) * delta32), axis=-1)
    di1 = jnp.sum(do32 * (out32 - g * delta32), axis=-1)
    dis = (_rows(di0), _rows(di1))
    dgate = _rows(di0 - di1)
  else:
    dis = (_rows(jnp.sum(do32 * out32, axis=-1)),)
    dgate = None
  dq = backward_dq(plan, q, do, ks, vs, seg, gate, lses, dis)
  dks, dvs = [], []
  for n, branch in enumerate(plan.branches):
    dk, dv = backward_dkv(
        plan,
        branch,
        q,
        do,
        ks[n],
        vs[n],
        seg,
        lses[n],
        dis[n],
        weight=gate,
        complement=n == 1,
    )
    dks.append(dk)
    dvs.append(dv)
  return dq, tuple(dks), tuple(dvs), None, dgate


attention_core.defvjp(_core_fwd, _core_bwd)


def run_kernels(
    q, pairs, segment_ids, gate, *, lefts, block_q, blocks_kv, interpret
):
  """[B,S,...] in, [B,S,H,D] out: transpose to head-major, pad, run the core, crop."""
  b, s, h, d = q.shape
  plan, sp = make_plan(s, lefts, block_q, blocks_kv, interpret)
  pad = sp - s

  def heads_first(x):  # [B,S,H,D] -> [B,H,Sp,D]
    return jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, pad), (0, 0)))

  seg = None
  if segment_ids is not None:
    ids = jnp.pad(
        segment_ids.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=-1
    )
    seg = (
        jnp.broadcast_to(ids[:, :, None], (b, sp, LANES)),
        jnp.broadcast_to(ids[:, None, :], (b, SUBLANES, sp)),
    )
  gate_rows = None
  if gate is not None:
    gate_rows = _rows(
        jnp.pad(
            jnp.swapaxes(gate.astype(jnp.float32), 1, 2),
            ((0, 0), (0, 0), (0, pad)),
        )
    )
  out = attention_core(
      plan,
      heads_first(q),
      tuple(heads_first(k) for k, _ in pairs),
      tuple(heads_first(v) for _, v in pairs),
      seg,
      gate_rows,
  )
  return jnp.swapaxes(out[:, :, :s], 1, 2)


# ------------------------------------------------------------------------------------ GPU path
def gpu_attention(q, k, v, segment_ids, left):
  """cuDNN/XLA attention for one branch (no Pallas): the window via `local_window_size`."""
  mask = None
  if segment_ids is not None:
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  window = None if left is None else (left, 0)
  return jax.nn.dot_product_attention(
      q, k, v, mask=mask, is_causal=True, local_window_size=window
  )


# ------------------------------------------------------------------------------------ backend + mesh
_DEFAULT_BACKEND: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "pallas_kernels_backend", default=None
)


@contextlib.contextmanager
def default_backend(backend: str):
  """Within this context, ops called without `backend=` trace for `backend` (e.g. "tpu" when compiling
  ahead of time for TPU devices on a CPU host, whose `jax.default_backend()` is "cpu").
  """
  token = _DEFAULT_BACKEND.set(resolve_backend(backend))
  try:
    yield
  finally:
    _DEFAULT_BACKEND.reset(token)


def resolve_backend(backend):
  backend = backend or _DEFAULT_BACKEND.get() or jax.default_backend()
  if backend not in BACKENDS:
    raise ValueError(
        f"backend must be one of {BACKENDS} (or None for the default), got {backend!r}"
    )
  return backend


def interpret_mode(backend):
  if backend == "tpu":
    return False
  if backend == "cpu_tpu_interpret":
    return pltpu.InterpretParams()
  return True


def active_mesh():
  """The mesh set by `jax.set_mesh` (abstract inside jit), else the legacy `with mesh:` one."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    return mesh
  try:  # legacy context manager; private and deprecated, hence guarded
    from jax._src import mesh as mesh_lib

    mesh = mesh_lib.thread_resources.env.physical_mesh
    return None if mesh.empty else mesh
  except (ImportError, AttributeError):
    return None


def sharded(fn, q, pairs, segment_ids, gate):
  """Run fn(q, pairs, segment_ids, gate) per shard under the active mesh (batch, heads)."""
  mesh = active_mesh()
  if mesh is None:
    return fn(q, pairs, segment_ids, gate)
  names = mesh.axis_names
  batch = tuple(a for a in ("data", "fsdp") if a in names) or None
  nb = math.prod(mesh.shape[a] for a in batch) if batch else 1
  if q.shape[0] % nb:
    raise ValueError(
        f"batch {q.shape[0]} is not divisible by the mesh's batch axes {batch} (size {nb})"
    )
  tp = mesh.shape["tensor"] if "tensor" in names else 1
  heads = (
      "tensor"
      if tp > 1
      and all(x.shape[2] % tp == 0 for x in [q] + [k for k, _ in pairs])
      else None
  )
  spec4 = P(batch, None, heads, None)
  in_specs = (
      spec4,
      tuple((spec4, spec4) for _ in pairs),
      None if segment_ids is None else P(batch, None),
      None if gate is None else P(batch, None, heads),
  )
  return jax.shard_map(
      fn, mesh=mesh, in_specs=in_specs, out_specs=spec4, check_vma=False
  )(q, pairs, segment_ids, gate)


def attention(
    q, pairs, segment_ids, gate, *, lefts, block_q, blocks_kv, backend
):
  """Entry point of both public ops (validated inputs)."""
  backend = resolve_backend(backend)
  if backend == "gpu":
    outs = [
        gpu_attention(q, k, v, segment_ids, left)
        for (k, v), left in zip(pairs, lefts)
    ]
    if gate is None:
      return outs[0]
    return blend(gate, outs[0], outs[1])
  fn = functools.partial(
      run_kernels,
      lefts=lefts,
      block_q=block_q,
      blocks_kv=blocks_kv,
      interpret=interpret_mode(backend),
  )
  return sharded(fn, q, pairs, segment_ids, gate)
