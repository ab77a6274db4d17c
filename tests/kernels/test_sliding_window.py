"""Sliding-window Pallas kernel (interpret mode on CPU, always jitted) vs its jnp reference.

Property test over batch, heads/kv heads, lengths (incl. non-multiples of the block), head dims,
windows (0, 1, 64, longer than the sequence, None = causal), segment layouts and dtypes, for the
output and the q/k/v gradients; the shared window-boundary check; the model's references; and a
run under an 8-device mesh (shard_map).
"""

from hypothesis import given, settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopcoder_jax.model import attention as model_attention
from pallas_kernels import sliding_window_attention, sliding_window_reference
from tests.helpers import (
    NO_SHRINK,
    assert_kernel_close,
    assert_window,
    check,
    inputs,
    random_segments,
    value_and_grads,
)


@settings(max_examples=6, phases=NO_SHRINK)
@given(
    b=st.integers(1, 2),
    kv_heads=st.sampled_from([1, 2]),
    groups=st.sampled_from([1, 2]),
    seq=st.integers(1, 40),
    head_dim=st.sampled_from([8, 16]),
    window=st.sampled_from(["none", 0, 1, 5, 64, "long"]),
    n_seg=st.sampled_from([0, 1, 3]),
    dtype=st.sampled_from(["float32", "bfloat16"]),
    block_q=st.sampled_from([8, 16]),
    block_kv=st.sampled_from([8, 16]),
    seed=st.integers(0, 2**16),
)
def test_matches_reference(
    b,
    kv_heads,
    groups,
    seq,
    head_dim,
    window,
    n_seg,
    dtype,
    block_q,
    block_kv,
    seed,
):
  left = {"none": None, "long": seq + 7}.get(window, window)
  h = kv_heads * groups
  q, k, v, ct = inputs(
      seed,
      [
          (b, seq, h, head_dim),
          (b, seq, kv_heads, head_dim),
          (b, seq, kv_heads, head_dim),
          (b, seq, h, head_dim),
      ],
      dtype,
  )
  seg = (
      random_segments(np.random.default_rng(seed), b, seq, n_seg)
      if n_seg
      else None
  )

  def kernel(q, k, v):
    return sliding_window_attention(
        q, k, v, seg, left=left, block_q=block_q, block_kv=block_kv
    )

  def reference(q, k, v):
    return sliding_window_reference(q, k, v, seg, left=left)

  check(kernel, reference, [q, k, v], ct, dtype, "qkv")


@pytest.mark.parametrize("left", [None, 3])
def test_window_boundary(left):
  """Shared with the model tests: value j influences output t exactly when the formula says so."""
  seg = [0] * 5 + [1] * 14
  assert_window(
      lambda q, k, v, s: sliding_window_attention(
          q, k, v, s, left=left, block_q=8, block_kv=8
      ),
      len(seg),
      left,
      seg,
  )


def test_matches_model_references():
  """Same answers as loopcoder_jax.attention's references (causal and blocked local), default blocks."""
  q, k, v = inputs(
      1, [(2, 37, 4, 8), (2, 37, 2, 8), (2, 37, 2, 8)], jnp.float32
  )
  seg = random_segments(np.random.default_rng(1), 2, 37, 3)
  run = jax.jit(
      lambda q, k, v, seg: (
          sliding_window_attention(q, k, v, seg, left=None),
          sliding_window_attention(q, k, v, seg, left=6),
      )
  )
  glob, loc = run(q, k, v, seg)
  assert_kernel_close(
      glob,
      model_attention.causal_attention(q, k, v, seg),
      q.shape,
      "float32",
      "output",
      "causal",
  )
  assert_kernel_close(
      loc,
      model_attention.local_attention_reference(
          q, k, v, seg, left=6, block_size=8
      ),
      q.shape,
      "float32",
      "output",
      "local",
  )


def test_bad_input_errors():
  q, k = jnp.zeros((1, 8, 4, 8)), jnp.zeros((1, 8, 3, 8))
  with pytest.raises(ValueError, match="multiple of kv heads"):
    sliding_window_attention(q, k, k, left=2)
  with pytest.raises(ValueError, match="left must be"):
    sliding_window_attention(q, q, q, left=-1)
  with pytest.raises(ValueError, match="power of two"):
    sliding_window_attention(q, q, q, left=2, block_q=24)
  with pytest.raises(ValueError, match="backend must be"):
    sliding_window_attention(q, q, q, left=2, backend="metal")


def test_under_mesh_matches_unsharded():
  """Batch over (data, fsdp), heads over tensor on 8 fake CPU devices: shard_map, same numbers."""
  mesh = jax.make_mesh(
      (2, 2, 2),
      ("data", "fsdp", "tensor"),
      axis_types=(jax.sharding.AxisType.Auto,) * 3,
  )
  q, k, v, ct = inputs(
      2,
      [(4, 24, 4, 8), (4, 24, 2, 8), (4, 24, 2, 8), (4, 24, 4, 8)],
      jnp.float32,
  )
  seg = random_segments(np.random.default_rng(2), 4, 24, 2)

  def fn(q, k, v):
    return sliding_window_attention(q, k, v, seg, left=5, block_q=8, block_kv=8)

  want, want_grads = value_and_grads(fn, [q, k, v], ct)
  with jax.set_mesh(mesh):
    hlo = jax.jit(fn).lower(q, k, v).as_text()
    got, grads = value_and_grads(fn, [q, k, v], ct)
  assert "sdy.manual_computation" in hlo  # shard_map under Shardy
  assert_kernel_close(got, want, q.shape, "float32", "output", "sharded")
  for name, g, w in zip("qkv", grads, want_grads):
    assert_kernel_close(g, w, q.shape, "float32", "grad", f"sharded d{name}")


def test_tpu_interpret_params():
  """`pltpu.InterpretParams()` (TPU semantics: DMAs, semaphores, uninitialised VMEM = NaN) agrees."""
  q, k, v, ct = inputs(
      4,
      [(1, 24, 4, 8), (1, 24, 2, 8), (1, 24, 2, 8), (1, 24, 4, 8)],
      jnp.float32,
  )
  seg = random_segments(np.random.default_rng(4), 1, 24, 2)

  def kernel(q, k, v):
    return sliding_window_attention(
        q, k, v, seg, left=3, block_q=8, block_kv=8, backend="cpu_tpu_interpret"
    )

  check(
      kernel,
      lambda q, k, v: sliding_window_reference(q, k, v, seg, left=3),
      [q, k, v],
      ct,
      "float32",
      "qkv",
  )
