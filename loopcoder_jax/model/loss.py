"""Next-token cross-entropy fused with the output projection.

`cross_entropy_sum(x, w, targets, weights, chunk=C)` = sum over tokens of `weights * (logsumexp(x @ w)
- (x @ w)[target])`. With C > 0 the float32 logits never exist for the whole batch at once: the sequence is cut
into chunks of `chunk` positions and a `lax.scan` visits them. Under differentiation each chunk also
forms its softmax gradient and folds it straight into `dx` and `dw` (two matmuls), so the backward
pass only scales those by the incoming cotangent. Versus `logits -> log_softmax -> gather` (C = 0)
this drops the `[B, S, V]` float32 logits and their gradient from memory: on a 7B model at 8k context
they outweigh a layer's activations.

Chunks are taken along the sequence, so a batch sharded over devices stays sharded in every chunk;
a vocabulary sharded over `tensor` costs one all-reduce for the logsumexp and one for the target logit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _chunks(x_BxS, chunk: int):
  """[B, S, ...] -> [S/chunk, B, chunk, ...] (zero-padded along S to a multiple of chunk)."""
  b, s = x_BxS.shape[:2]
  pad = -s % chunk
  if pad:
    x_BxS = jnp.pad(x_BxS, [(0, 0), (0, pad)] + [(0, 0)] * (x_BxS.ndim - 2))
  x = x_BxS.reshape(b, (s + pad) // chunk, chunk, *x_BxS.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _unchunk(x_NxBxC, s: int):
  n, b, c = x_NxBxC.shape[:3]
  return jnp.moveaxis(x_NxBxC, 0, 1).reshape(b, n * c, *x_NxBxC.shape[3:])[
      :, :s
  ]


def _chunk_loss(x_BxCxd, w_dxV, t_BxC, m_BxC):
  """(masked CE sum, logits, lse, one-hot target mask) of one chunk."""
  b, c, d = x_BxCxd.shape
  logits = jnp.dot(
      x_BxCxd.reshape(b * c, d), w_dxV, preferred_element_type=jnp.float32
  ).reshape(b, c, -1)
  lse = jax.nn.logsumexp(logits, axis=-1)
  is_target = jnp.arange(logits.shape[-1], dtype=jnp.int32) == t_BxC[..., None]
  target_logit = jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1)
  return jnp.sum((lse - target_logit) * m_BxC), logits, lse, is_target


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ce_sum(x_BxSxd, w_dxV, targets_BxS, weights_BxS, chunk):
  def body(total, xs):
    loss, *_ = _chunk_loss(*xs[:1], w_dxV, *xs[1:])
    return total + loss, None

  xs = (
      _chunks(x_BxSxd, chunk),
      _chunks(targets_BxS, chunk),
      _chunks(weights_BxS, chunk),
  )
  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
  return total


def _ce_sum_fwd(x_BxSxd, w_dxV, targets_BxS, weights_BxS, chunk):
  def body(carry, xs):
    total, dw_dxV = carry
    x_BxCxd, t_BxC, m_BxC = xs
    b, c, d = x_BxCxd.shape
    loss, logits, lse, is_target = _chunk_loss(x_BxCxd, w_dxV, t_BxC, m_BxC)
    # d loss / d logits = weight * (softmax - onehot(target)), in the matmul dtype.
    g = (jnp.exp(logits - lse[..., None]) - is_target) * m_BxC[..., None]
    g_NxV = g.astype(x_BxCxd.dtype).reshape(b * c, -1)
    x_Nxd = x_BxCxd.reshape(b * c, d)
    dx = jnp.dot(g_NxV, w_dxV.T, preferred_element_type=jnp.float32).astype(
        x_BxCxd.dtype
    )
    dw_dxV = dw_dxV + jnp.dot(
        x_Nxd.T, g_NxV, preferred_element_type=jnp.float32
    )
    return (total + loss, dw_dxV), dx.reshape(b, c, d)

  xs = (
      _chunks(x_BxSxd, chunk),
      _chunks(targets_BxS, chunk),
      _chunks(weights_BxS, chunk),
  )
  init = (jnp.zeros((), jnp.float32), jnp.zeros(w_dxV.shape, jnp.float32))
  (total, dw), dx = jax.lax.scan(body, init, xs)
  return total, (_unchunk(dx, x_BxSxd.shape[1]), dw.astype(w_dxV.dtype))


def _ce_sum_bwd(chunk, residuals, g):
  dx, dw = residuals
  return (g * dx).astype(dx.dtype), (g * dw).astype(dw.dtype), None, None


_ce_sum.defvjp(_ce_sum_fwd, _ce_sum_bwd)


def cross_entropy_sum(
    x_BxSxd, w_dxV, targets_BxS, weights_BxS, *, chunk: int = 0
) -> jax.Array:
  """Sum of `weights * CE(softmax(x @ w), targets)` in float32; differentiable in x and w.

  x: final normed hidden states `[B, S, d]` (compute dtype); w: output projection `[d, V]`, cast to
  x's dtype here; targets int `[B, S]`; weights float `[B, S]` (the loss mask; not differentiated).
  `chunk`: sequence positions per step of the fused scan; 0 = the plain path (whole `[B, S, V]`
  logits, autodiff), which is a little faster on CPU where memory is plentiful.
  """
  if (
      x_BxSxd.ndim != 3
      or targets_BxS.shape != x_BxSxd.shape[:2]
      or weights_BxS.shape != targets_BxS.shape
  ):
    raise ValueError(
        f"cross_entropy_sum: x {x_BxSxd.shape}, targets {targets_BxS.shape} and weights "
        f"{weights_BxS.shape} must be [B, S, d], [B, S], [B, S]"
    )
  if chunk < 0:
    raise ValueError(f"cross_entropy_sum: chunk must be >= 0, got {chunk}")
  w_dxV = w_dxV.astype(x_BxSxd.dtype)
  targets_BxS = targets_BxS.astype(jnp.int32)
  weights_BxS = jax.lax.stop_gradient(weights_BxS.astype(jnp.float32))
  if chunk == 0:
    loss, *_ = _chunk_loss(x_BxSxd, w_dxV, targets_BxS, weights_BxS)
    return loss
  return _ce_sum(
      x_BxSxd, w_dxV, targets_BxS, weights_BxS, min(chunk, x_BxSxd.shape[1])
  )
