"""Blocked flash-attention kernels (Pallas, written for Mosaic TPU) shared by both public ops.

One forward kernel and one dq kernel handle a list of *branches*: each branch is a (k, v) pair with
its own window (`left=None` is plain causal) and KV block size. Per query block the grid's last
axis walks branch 0's visited KV blocks, then branch 1's, ...; q (and dO) are read once per query
block. Two branches + a gate give the fused G-SWA; one branch gives the sliding-window op.
The dkv kernel handles one branch (its K/V are its own), reducing over the query heads of a KV
group and the query blocks that see each KV block.

Layouts inside: head-major `[B, H, S, D]` (D = lanes), S padded to a multiple of every block.
Segment ids come in two broadcast layouts so that no in-kernel transpose is needed:
column `[B, S, 128]` (lane-replicated) and row `[B, 8, S]` (sublane-replicated). Row statistics
(lse, di, gate) are passed as rows `[B, H, 1, S]`. Only KV blocks that intersect a query block's
window are visited (the index maps clamp, so skipped steps re-use the resident block and issue no
DMA); steps past a query block's last visible KV block are skipped with `pl.when`.

Masked scores are a finite -1e30: every query sees at least its own key, so a row that is fully
masked in an early block is corrected by the rescale `exp(m_prev - m_new) = 0` once a visible key
arrives (the flash-attention argument), with no inf - inf.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np

from pallas_kernels.reference import MASK_VALUE, window_visible

LANES, SUBLANES = 128, 8
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


def _static(x):
  return isinstance(x, (int, np.integer, np.ndarray))


def _div(a, b):
  return a // b if _static(a) else lax.div(a, b)


def _max(a, b):
  return np.maximum(a, b) if _static(a) else jnp.maximum(a, b)


def _min(a, b):
  return np.minimum(a, b) if _static(a) else jnp.minimum(a, b)


@dataclasses.dataclass(frozen=True)
class Branch:
  """One attention branch: keys `t-left .. t` (`left=None`: `0 .. t`), KV blocks of `block_kv`."""

  left: int | None
  block_kv: int

  # Query block i (rows i*bq .. i*bq+bq-1) visits KV blocks kv_first(i) .. kv_last(i). These work on
  # numpy ints (static step counts) and on traced int32 scalars (index maps, kernels); all operands
  # are non-negative, so truncating division is floor division.
  def kv_first(self, i, bq):
    if self.left is None:
      return i * 0
    return _div(_max(i * bq - self.left, 0), self.block_kv)

  def kv_last(self, i, bq):
    return _div(i * bq + bq - 1, self.block_kv)

  # KV block j is seen by query blocks q_first(j) .. q_last(j).
  def q_first(self, j, bq):
    return _div(j * self.block_kv, bq)

  def q_last(self, j, bq, nq):
    if self.left is None:
      return j * 0 + (nq - 1)
    return _min(
        _div(j * self.block_kv + self.block_kv - 1 + self.left, bq), nq - 1
    )

  def kv_steps(self, bq, nq):
    i = np.arange(nq)
    return int(np.max(self.kv_last(i, bq) - self.kv_first(i, bq) + 1))

  def q_steps(self, bq, nq, nk):
    j = np.arange(nk)
    return int(np.max(self.q_last(j, bq, nq) - self.q_first(j, bq) + 1))


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static description of one call: branches, query block, gate blend, how to run."""

  branches: tuple[Branch, ...]
  block_q: int
  gated: bool  # two branches blended as g * out0 + (1 - g) * out1
  interpret: object = False  # False (Mosaic), True, or pltpu.InterpretParams()

  def __post_init__(self):
    assert not self.gated or len(self.branches) == 2


def _masked_scores(q, k, scale, q_start, k_start, left, segs):
  """Scaled q @ k.T `[bq, bk]` (f32) for a query block at q_start and a key block at k_start, with
  MASK_VALUE where a key is not visible; `segs` = (q segment ref, kv segment ref) or None.
  """
  bq, bk = q.shape[0], k.shape[0]
  scores = (
      lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
  )
  q_pos = q_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  k_pos = k_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
  mask = window_visible(q_pos, k_pos, left)
  if segs is not None:
    mask &= segs[0][:, :1] == segs[1][:1, :]
  return jnp.where(mask, scores, MASK_VALUE)


def _kv_visit(branch, i, j, off: int, bq: int):
  """(start position of the key block, whether grid step j visits one) for query block i in one
  branch: the branch's key blocks for i occupy steps off .. off + count - 1."""
  s = j - off
  first = branch.kv_first(i, bq)
  count = branch.kv_last(i, bq) - first + 1
  return (first + s) * branch.block_kv, (s >= 0) & (s < count)


def _col(row_ref):
  """A `(1, n)` row block as an `(n, 1)` column (splash-attention's relayout)."""
  return jnp.expand_dims(row_ref[0], -1)


# Mosaic scoped-VMEM limit (None: the chip's default). The TPU compile test sets it to 1 byte so the
# compiler's out-of-VMEM error states what each kernel needs.
VMEM_LIMIT_BYTES = None


def _params(interpret):
  sem = ("parallel", "parallel", "parallel", "arbitrary")
  return dict(
      interpret=interpret,
      compiler_params=None
      if interpret
      else pltpu.CompilerParams(
          dimension_semantics=sem, vmem_limit_bytes=VMEM_LIMIT_BYTES
      ),
  )


# ------------------------------------------------------------------------------------ forward
def _fwd_kernel(*refs, plan, offs, scale, seg, residuals):
  it = iter(refs)
  q_ref = next(it)
  qseg_ref = next(it) if seg else None
  gate_ref = next(it) if plan.gated else None
  br = [(next(it), next(it), next(it) if seg else None) for _ in plan.branches]
  o_ref = next(it)
  lse_refs = [next(it) for _ in plan.branches] if residuals else []
  delta_ref = next(it) if residuals and plan.gated else None
  scratch = [(next(it), next(it), next(it)) for _ in plan.branches]

  bq = plan.block_q
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    for m_ref, l_ref, acc_ref in scratch:
      m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
      l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
      acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  for b, branch in enumerate(plan.branches):
    k_ref, v_ref, kvseg_ref = br[b]
    m_ref, l_ref, acc_ref = scratch[b]
    k_start, visits = _kv_visit(branch, i, j, offs[b], bq)

    @pl.when(visits)
    def _step(
        left=branch.left,
        segs=(qseg_ref, kvseg_ref) if seg else None,
        k_ref=k_ref,
        v_ref=v_ref,
        m_ref=m_ref,
        l_ref=l_ref,
        acc_ref=acc_ref,
        k_start=k_start,
    ):
      q, k, v = q_ref[...], k_ref[...], v_ref[...]
      scores = _masked_scores(q, k, scale, i * bq, k_start, left, segs)
      m_prev = m_ref[...]
      # [bq, 128]
      m_next = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))
      alpha = jnp.exp(m_prev - m_next)
      p = jnp.exp(scores - m_next[:, :1])
      l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
      pv = lax.dot_general(
          p.astype(v.dtype), v, _NN, preferred_element_type=jnp.float32
      )
      acc_ref[...] = acc_ref[...] * alpha[:, :1] + pv
      m_ref[...] = m_next

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    outs = []
    for b, (m_ref, l_ref, acc_ref) in enumerate(scratch):
      denom = l_ref[...]
      outs.append(acc_ref[...] / denom[:, :1])
      # lane-replicated [bq, 128] -> the row [1, bq] the backward reads
      if residuals:
        lse_refs[b][...] = jnp.transpose(m_ref[...] + jnp.log(denom))[:1, :]
    if plan.gated:
      g = _col(gate_ref)
      o_ref[...] = (g * outs[0] + (1.0 - g) * outs[1]).astype(o_ref.dtype)
      if residuals:
        delta_ref[...] = (outs[0] - outs[1]).astype(delta_ref.dtype)
    else:
      o_ref[...] = outs[0].astype(o_ref.dtype)


def _offsets(plan, nq):
  steps = [br.kv_steps(plan.block_q, nq) for br in plan.branches]
  return tuple(int(x) for x in np.cumsum([0] + steps[:-1])), int(sum(steps))


def _kv_index(branch, off, bq, groups):
  def index_map(b, h, i, j):
    first = branch.kv_first(i, bq)
    last = branch.kv_last(i, bq)
    return b, lax.div(h, groups), jnp.clip(first + j - off, first, last), 0

  return index_map


def _kvseg_index(branch, off, bq):
  def index_map(b, h, i, j):
    first = branch.kv_first(i, bq)
    return b, 0, jnp.clip(first + j - off, first, branch.kv_last(i, bq))

  return index_map


def _branch_specs(plan, offs, groups, d, seg):
  bq = plan.block_q
  specs = []
  for branch, off in zip(plan.branches, offs):
    kv = pl.BlockSpec(
        (None, None, branch.block_kv, d), _kv_index(branch, off, bq, groups)
    )
    specs += [kv, kv]
    if seg:
      specs.append(
          pl.BlockSpec(
              (None, SUBLANES, branch.block_kv), _kvseg_index(branch, off, bq)
          )
      )
  return specs


def _branch_args(ks, vs, seg):
  args = []
  for k, v in zip(ks, vs):
    args += [k, v] + ([seg[1]] if seg is not None else [])
  return args


def _query_side(plan, per_query, seg, gate):
  """The query side of the forward and dq calls (grid: batch, head, query block i, step j):
  (q block spec, row spec, in_specs, args, branch offsets, steps), the in_specs and args holding
  the `per_query` arrays (shaped like q), the segment column and the gate."""
  _, _, sp, d = per_query[0].shape
  bq = plan.block_q
  offs, steps = _offsets(plan, sp // bq)
  q_spec = pl.BlockSpec(
      (None, None, bq, d), lambda b_, h_, i, j: (b_, h_, i, 0)
  )
  row_spec = pl.BlockSpec(
      (None, None, 1, bq), lambda b_, h_, i, j: (b_, h_, 0, i)
  )
  in_specs, args = [q_spec] * len(per_query), list(per_query)
  if seg is not None:
    in_specs.append(
        pl.BlockSpec((None, bq, LANES), lambda b_, h_, i, j: (b_, i, 0))
    )
    args.append(seg[0])
  if plan.gated:
    in_specs.append(row_spec)
    args.append(gate)
  return q_spec, row_spec, in_specs, args, offs, steps


def forward(plan, q, ks, vs, seg, gate, *, residuals):
  """q [B,H,Sp,D], ks/vs per branch [B,Hkv,Sp,D], seg (col [B,Sp,128], row [B,8,Sp]) or None,
  gate [B,H,1,Sp] f32 or None. Returns out (and lse per branch as rows [B,H,1,Sp], delta when
  residuals)."""
  b, h, sp, d = q.shape
  bq, groups, nq = plan.block_q, h // ks[0].shape[1], sp // plan.block_q
  q_spec, row_spec, in_specs, args, offs, steps = _query_side(
      plan, [q], seg, gate
  )
  in_specs += _branch_specs(plan, offs, groups, d, seg is not None)
  args += _branch_args(ks, vs, seg)

  out_shape, out_specs = [jax.ShapeDtypeStruct(q.shape, q.dtype)], [q_spec]
  if residuals:
    for _ in plan.branches:
      out_shape.append(jax.ShapeDtypeStruct((b, h, 1, sp), jnp.float32))
      out_specs.append(row_spec)
    if plan.gated:
      out_shape.append(jax.ShapeDtypeStruct(q.shape, q.dtype))
      out_specs.append(q_spec)
  scratch = []
  for _ in plan.branches:
    scratch += [
        pltpu.VMEM((bq, LANES), jnp.float32),
        pltpu.VMEM((bq, LANES), jnp.float32),
        pltpu.VMEM((bq, d), jnp.float32),
    ]
  kernel = functools.partial(
      _fwd_kernel,
      plan=plan,
      offs=offs,
      scale=1.0 / math.sqrt(d),
      seg=seg is not None,
      residuals=residuals,
  )
  outs = pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=(b, h, nq, steps),
      in_specs=in_specs,
      out_specs=out_specs,
      scratch_shapes=scratch,
      name="plt_attention_fwd",
      **_params(plan.interpret),
  )(*args)
  if not residuals:
    return outs[0]
  n = len(plan.branches)
  lses = tuple(outs[1 : 1 + n])
  return outs[0], lses, (outs[1 + n] if plan.gated else None)


# ------------------------------------------------------------------------------------ dq
def _dq_kernel(*refs, plan, offs, scale, seg):
  it = iter(refs)
  q_ref, do_ref = next(it), next(it)
  qseg_ref = next(it) if seg else None
  gate_ref = next(it) if plan.gated else None
  br = [
      (next(it), next(it), next(it) if seg else None, next(it), next(it))
      for _ in plan.branches
  ]
  dq_ref, acc_ref = next(it), next(it)

  bq = plan.block_q
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  for b, branch in enumerate(plan.branches):
    k_ref, v_ref, kvseg_ref, lse_ref, di_ref = br[b]
    k_start, visits = _kv_visit(branch, i, j, offs[b], bq)

    @pl.when(visits)
    def _step(
        b=b,
        left=branch.left,
        segs=(qseg_ref, kvseg_ref) if seg else None,
        k_ref=k_ref,
        v_ref=v_ref,
        lse_ref=lse_ref,
        di_ref=di_ref,
        k_start=k_start,
    ):
      q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
      scores = _masked_scores(q, k, scale, i * bq, k_start, left, segs)
      p = jnp.exp(scores - _col(lse_ref))
      dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
      ds = p * (dp - _col(di_ref))
      if plan.gated:
        g = _col(gate_ref)
        ds = ds * (g if b == 0 else 1.0 - g)
      acc_ref[...] += lax.dot_general(
          ds.astype(k.dtype), k, _NN, preferred_element_type=jnp.float32
      )

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (acc_ref[...] * scale).astype(dq_ref.dtype)


def backward_dq(plan, q, do, ks, vs, seg, gate, lses, dis):
  """dq [B,H,Sp,D] for all branches; lses/dis per branch as rows [B,H,1,Sp] f32."""
  b, h, sp, d = q.shape
  bq, groups, nq = plan.block_q, h // ks[0].shape[1], sp // plan.block_q
  q_spec, row_spec, in_specs, args, offs, steps = _query_side(
      plan, [q, do], seg, gate
  )
  kv_specs = _branch_specs(plan, offs, groups, d, seg is not None)
  kv_args = _branch_args(ks, vs, seg)
  per = len(kv_specs) // len(plan.branches)
  for n in range(len(plan.branches)):
    in_specs += kv_specs[n * per : (n + 1) * per] + [row_spec, row_spec]
    args += kv_args[n * per : (n + 1) * per] + [lses[n], dis[n]]
  kernel = functools.partial(
      _dq_kernel,
      plan=plan,
      offs=offs,
      scale=1.0 / math.sqrt(d),
      seg=seg is not None,
  )
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      grid=(b, h, nq, steps),
      in_specs=in_specs,
      out_specs=q_spec,
      scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
      name="plt_attention_dq",
      **_params(plan.interpret),
  )(*args)


# ------------------------------------------------------------------------------------ dk, dv
def _dkv_kernel(
    *refs, branch, bq, nq, qsteps, scale, seg, weighted, complement
):
  it = iter(refs)
  q_ref, do_ref, k_ref, v_ref = next(it), next(it), next(it), next(it)
  qseg_ref, kvseg_ref = (next(it), next(it)) if seg else (None, None)
  lse_ref, di_ref = next(it), next(it)
  w_ref = next(it) if weighted else None
  dk_ref, dv_ref, dk_acc, dv_acc = next(it), next(it), next(it), next(it)

  bk = branch.block_kv
  j, t = pl.program_id(2), pl.program_id(3)
  s = lax.rem(t, qsteps)
  first = branch.q_first(j, bq)
  count = branch.q_last(j, bq, nq) - first + 1

  @pl.when(t == 0)
  def _init():
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

  @pl.when(s < count)
  def _step():
    q, do, k, v = q_ref[...], do_ref[...], k_ref[...], v_ref[...]
    # [bk, bq]
    scores_t = (
        lax.dot_general(k, q, _NT, preferred_element_type=jnp.float32) * scale
    )
    k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (bk, bq), 0)
    q_pos = (first + s) * bq + lax.broadcasted_iota(jnp.int32, (bk, bq), 1)
    mask = window_visible(q_pos, k_pos, branch.left)
    if seg:
      mask &= kvseg_ref[:, :1] == qseg_ref[:1, :]
    p_t = jnp.exp(jnp.where(mask, scores_t, MASK_VALUE) - lse_ref[...])
    if weighted:
      w = w_ref[...]
      p_t = p_t * (1.0 - w if complement else w)
    dv_acc[...] += lax.dot_general(
        p_t.astype(do.dtype), do, _NN, preferred_element_type=jnp.float32
    )
    dp_t = lax.dot_general(v, do, _NT, preferred_element_type=jnp.float32)
    ds_t = p_t * (dp_t - di_ref[...])
    dk_acc[...] += lax.dot_general(
        ds_t.astype(q.dtype), q, _NN, preferred_element_type=jnp.float32
    )

  @pl.when(t == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def backward_dkv(
    plan, branch, q, do, k, v, seg, lse, di, weight=None, complement=False
):
  """dk, dv [B,Hkv,Sp,D] of one branch. `weight` [B,H,1,Sp] scales that branch's dO rows
  (the gate; `complement` uses 1 - weight)."""
  b, h, sp, d = q.shape
  hkv, bq, bk = k.shape[1], plan.block_q, branch.block_kv
  groups, nq, nk = h // hkv, sp // bq, sp // bk
  qsteps = branch.q_steps(bq, nq, nk)

  def q_block(j, t):
    first = branch.q_first(j, bq)
    return jnp.clip(first + lax.rem(t, qsteps), first, branch.q_last(j, bq, nq))

  def head(kh, t):
    return kh * groups + lax.div(t, qsteps)

  q_spec = pl.BlockSpec(
      (None, None, bq, d),
      lambda b_, kh, j, t: (b_, head(kh, t), q_block(j, t), 0),
  )
  kv_spec = pl.BlockSpec(
      (None, None, bk, d), lambda b_, kh, j, t: (b_, kh, j, 0)
  )
  row_spec = pl.BlockSpec(
      (None, None, 1, bq),
      lambda b_, kh, j, t: (b_, head(kh, t), 0, q_block(j, t)),
  )
  in_specs, args = [q_spec, q_spec, kv_spec, kv_spec], [q, do, k, v]
  if seg is not None:
    in_specs += [
        pl.BlockSpec(
            (None, SUBLANES, bq), lambda b_, kh, j, t: (b_, 0, q_block(j, t))
        ),
        pl.BlockSpec((None, bk, LANES), lambda b_, kh, j, t: (b_, j, 0)),
    ]
    args += [seg[1], seg[0]]
  in_specs += [row_spec, row_spec]
  args += [lse, di]
  if weight is not None:
    in_specs.append(row_spec)
    args.append(weight)
  kernel = functools.partial(
      _dkv_kernel,
      branch=branch,
      bq=bq,
      nq=nq,
      qsteps=qsteps,
      scale=1.0 / math.sqrt(d),
      seg=seg is not None,
      weighted=weight is not None,
      complement=complement,
  )
  shape = jax.ShapeDtypeStruct(k.shape, k.dtype)
  return pl.pallas_call(
      kernel,
      out_shape=[shape, shape],
      grid=(b, hkv, nk, groups * qsteps),
      in_specs=in_specs,
      out_specs=[kv_spec, kv_spec],
      scratch_shapes=[
          pltpu.VMEM((bk, d), jnp.float32),
          pltpu.VMEM((bk, d), jnp.float32),
      ],
      name="plt_attention_dkv",
      **_params(plan.interpret),
  )(*args)
