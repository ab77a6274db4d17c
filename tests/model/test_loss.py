"""Fused output projection + cross-entropy: value and gradients equal the plain logits path."""

from hypothesis import given, settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopcoder_jax.model import loss
from loopcoder_jax.model.sharding import make_mesh
from tests import helpers


def loss_ops(x, w):
  """The logits' dot (d), logsumexp and the gradient's dot over the vocabulary
  (2 V), the sum over the tokens (B S).
  """
  b, s, d = x.shape
  return d + 2 * w.shape[1] + b * s


def plain_ce_sum(x, w, targets, weights):
  logits = jnp.einsum(
      "bsd,dv->bsv", x.astype(jnp.float32), w.astype(jnp.float32)
  )
  target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - target) * weights)


def problem(seed, b, s, d, v, dtype=jnp.float32):
  k = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(k[0], (b, s, d)).astype(dtype)
  w = (jax.random.normal(k[1], (d, v)) / d**0.5).astype(dtype)
  targets = jax.random.randint(k[2], (b, s), 0, v)
  weights = (jax.random.uniform(k[3], (b, s)) > 0.3).astype(jnp.float32)
  return x, w, targets, weights


@settings(max_examples=8)
@given(
    b=st.integers(1, 3),
    s=st.integers(1, 20),
    v=st.sampled_from([7, 64, 130]),
    chunk=st.integers(0, 24),
    seed=st.integers(0, 2**16),
)
def test_value_and_grads_equal_the_plain_path(b, s, v, chunk, seed):
  x, w, t, m = problem(seed, b, s, 16, v)
  # Scaled cotangent: the backward must multiply the saved gradients by it.
  fused = jax.value_and_grad(
      lambda x, w: 3.0 * loss.cross_entropy_sum(x, w, t, m, chunk=chunk), (0, 1)
  )(x, w)
  plain = jax.value_and_grad(
      lambda x, w: 3.0 * plain_ce_sum(x, w, t, m), (0, 1)
  )(x, w)
  ops = loss_ops(x, w)
  helpers.assert_close(fused[0], plain[0], ops=ops, what="value")
  for got, want, name in zip(fused[1], plain[1], "xw"):
    helpers.assert_close(got, want, ops=ops, what=f"d{name}")
  # Undifferentiated (evaluation) path gives the same value.
  helpers.assert_close(
      loss.cross_entropy_sum(x, w, t, m, chunk=chunk),
      plain[0] / 3.0,
      ops=ops,
      what="eval value",
  )


def test_masked_tokens_contribute_nothing():
  x, w, t, m = problem(0, 2, 9, 8, 33)
  g = jax.grad(lambda x: loss.cross_entropy_sum(x, w, t, m, chunk=4))(x)
  assert np.all(np.asarray(g)[np.asarray(m) == 0] == 0)
  # targets under the mask do not matter
  t2 = jnp.where(m == 0, (t + 5) % 33, t)
  assert float(loss.cross_entropy_sum(x, w, t, m, chunk=4)) == float(
      loss.cross_entropy_sum(x, w, t2, m, chunk=4)
  )


def test_bfloat16_grads_keep_dtypes_and_track_float32():
  x, w, t, m = problem(1, 2, 16, 32, 64, jnp.bfloat16)
  gx, gw = jax.grad(
      lambda x, w: loss.cross_entropy_sum(x, w, t, m, chunk=8), (0, 1)
  )(x, w)
  assert gx.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
  rx, rw = jax.grad(plain_ce_sum, (0, 1))(
      x.astype(jnp.float32), w.astype(jnp.float32), t, m
  )
  # f32 inside: bf16 ops count the gradients' own rounding (see helpers)
  for got, want, name in ((gx, rx, "dx"), (gw, rw, "dw")):
    helpers.assert_close(got, want, ops=1, dtype="bfloat16", what=name)


def test_sharded_batch_and_vocab_equal_single_device():
  mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
  x, w, t, m = problem(2, 4, 12, 16, 64)
  P = jax.sharding.PartitionSpec

  def put(a, *spec):
    return jax.device_put(a, jax.sharding.NamedSharding(mesh, P(*spec)))

  f = jax.jit(
      jax.value_and_grad(
          lambda x, w, t, m: loss.cross_entropy_sum(x, w, t, m, chunk=4), (0, 1)
      )
  )
  sharded = f(
      put(x, "data"), put(w, None, "tensor"), put(t, "data"), put(m, "data")
  )
  single = f(x, w, t, m)
  for got, want in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
    helpers.assert_close(got, want, ops=loss_ops(x, w))


def test_bad_shapes_and_chunk_fail_in_one_line():
  x, w, t, m = problem(0, 2, 4, 8, 16)
  with pytest.raises(ValueError, match="must be \\[B, S, d\\]"):
    loss.cross_entropy_sum(x, w, t[:, :3], m)
  with pytest.raises(ValueError, match="chunk must be >= 0"):
    loss.cross_entropy_sum(x, w, t, m, chunk=-1)
