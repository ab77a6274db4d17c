"""The local-window boundary check shared by the model's and the kernels' tests.

Convention (spec section 3): query t sees keys t-left .. t of its own loop. The check reads the
influence of every value vector on every output position off the Jacobian, so it fails both for
a window one key too short and one key too long.
"""
import jax
import jax.numpy as jnp
import numpy as np


def influence(attn_fn, seq_len: int, *, segment_ids=None, heads=2, kv_heads=1, head_dim=4, seed=0):
  """I[t, j] = True when value j changes output t. `attn_fn(q, k, v, segment_ids) -> out`."""
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(kq, (1, seq_len, heads, head_dim))
  k = jax.random.normal(kk, (1, seq_len, kv_heads, head_dim))
  v = jax.random.normal(kv, (1, seq_len, kv_heads, head_dim))
  seg = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)[None]
  jac = jax.jit(jax.jacrev(lambda v_: attn_fn(q, k, v_, seg)))(v)  # [1,S,H,D, 1,S,K,D]
  return np.asarray(jnp.abs(jac).sum(axis=(0, 2, 3, 4, 6, 7)) > 0)


def expected_window(seq_len: int, left: int | None, segment_ids=None):
  t = np.arange(seq_len)[:, None]
  j = np.arange(seq_len)[None, :]
  ok = j <= t
  if left is not None:
    ok &= j >= t - left
  if segment_ids is not None:
    seg = np.asarray(segment_ids)
    ok &= seg[:, None] == seg[None, :]
  return ok


def assert_window(attn_fn, seq_len: int, left: int | None, segment_ids=None):
  got = influence(attn_fn, seq_len, segment_ids=segment_ids)
  want = expected_window(seq_len, left, segment_ids)
  bad = np.argwhere(got != want)
  assert not len(bad), (f"window mismatch (left={left}) at (query, key) {bad[:5].tolist()}: "
                        f"got {got[tuple(bad[0])]} want {want[tuple(bad[0])]}")
