"""Fused G-SWA Pallas kernel (interpret mode on CPU, jitted) vs its reference, and the model-level
check: PLTForCausalLM gives the same logits and gradients with attention_impl "reference" and "pallas".
"""

from hypothesis import given, settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopcoder_jax.model import attention as model_attention
from loopcoder_jax.model.config import PLTConfig
from loopcoder_jax.model.transformer import PLTForCausalLM
from pallas_kernels import gswa_attention, gswa_reference
from tests.helpers import (
    NO_SHRINK,
    assert_close,
    assert_kernel_close,
    check,
    forward_ops,
    inputs,
    random_segments,
)


def gate_like(seed, shape):
  return jax.nn.sigmoid(
      2.0 * jax.random.normal(jax.random.key(seed + 99), shape)
  )


@settings(max_examples=4, phases=NO_SHRINK)
@given(
    b=st.integers(1, 2),
    kv_heads=st.sampled_from([1, 2]),
    groups=st.sampled_from([1, 2]),
    seq=st.integers(1, 40),
    head_dim=st.sampled_from([8, 16]),
    window=st.sampled_from([0, 1, 5, 64, "long"]),
    n_seg=st.sampled_from([0, 1, 3]),
    dtype=st.sampled_from(["float32", "bfloat16"]),
    block_q=st.sampled_from([8, 16]),
    block_global=st.sampled_from([8, 16]),
    block_local=st.sampled_from([8, 16]),
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
    block_global,
    block_local,
    seed,
):
  left = seq + 7 if window == "long" else window
  h = kv_heads * groups
  qs, kvs = (b, seq, h, head_dim), (b, seq, kv_heads, head_dim)
  q, k1, v1, k, v, ct = inputs(seed, [qs, kvs, kvs, kvs, kvs, qs], dtype)
  gate = gate_like(seed, (b, seq, h))
  seg = (
      random_segments(np.random.default_rng(seed), b, seq, n_seg)
      if n_seg
      else None
  )

  def kernel(q, k1, v1, k, v, g):
    return gswa_attention(
        q,
        k1,
        v1,
        k,
        v,
        g.astype(jnp.float32),
        seg,
        left=left,
        block_q=block_q,
        block_kv_global=block_global,
        block_kv_local=block_local,
    )

  def reference(*a):
    return gswa_reference(*a, seg, left=left)

  check(
      kernel,
      reference,
      [q, k1, v1, k, v, gate.astype(dtype)],
      ct,
      dtype,
      ["q", "k1", "v1", "k", "v", "gate"],
  )


def test_matches_model_reference_and_errors():
  qs, kvs = (2, 29, 4, 8), (2, 29, 2, 8)
  q, k1, v1, k, v = inputs(3, [qs, kvs, kvs, kvs, kvs], jnp.float32)
  gate = gate_like(3, qs[:3])
  seg = random_segments(np.random.default_rng(3), 2, 29, 2)
  got = jax.jit(lambda *a: gswa_attention(*a, seg, left=4))(
      q, k1, v1, k, v, gate
  )
  want = model_attention.gswa_attention(
      q, k1, v1, k, v, gate, seg, left=4, impl="reference"
  )
  assert_kernel_close(got, want, qs, "float32", "output", "gswa vs model")
  with pytest.raises(ValueError, match="gate must be"):
    gswa_attention(q, k1, v1, k, v, gate[..., :2], left=4)
  with pytest.raises(ValueError, match="int window"):
    gswa_attention(q, k1, v1, k, v, gate, left=None)


@pytest.mark.parametrize("loops", [1, 2])
def test_model_reference_vs_pallas(loops):
  """Logits and parameter gradients agree between attention_impl="reference" and "pallas"."""
  cfg = PLTConfig.tiny(loops=loops)
  tokens = jax.random.randint(jax.random.key(0), (2, 24), 0, cfg.vocab_size)
  seg = jnp.asarray(np.repeat([[0] * 10 + [1] * 14], 2, axis=0), jnp.int32)
  params = PLTForCausalLM(cfg).init(jax.random.key(1), tokens)["params"]
  # Non-zero gates, so the blend and the gate gradient are exercised away from g = 0.5.
  params = jax.tree.map(
      lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), params
  )

  def logits_and_grads(impl):
    model = PLTForCausalLM(cfg.with_runtime(attention_impl=impl))

    def loss(p):
      logits = model.apply({"params": p}, tokens, segment_ids=seg)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (_, ref_logits), ref_grads = logits_and_grads("reference")
  (_, logits), grads = logits_and_grads("pallas")
  ops = forward_ops(cfg, tokens.shape[1])
  assert_close(logits, ref_logits, ops=ops, what="logits")
  flat_ref = jax.tree_util.tree_leaves_with_path(ref_grads)
  # the backward walks the chain twice, then sums weight gradients over the
  # tokens
  for (path, g), r in zip(
      jax.tree_util.tree_leaves_with_path(grads), [x for _, x in flat_ref]
  ):
    assert_close(
        g,
        r,
        ops=2 * ops + tokens.size,
        what=f"grad {jax.tree_util.keystr(path)}",
    )


def test_under_abstract_mesh_like_the_trainer():
  """The trainer traces under `use_abstract_mesh` (sharding.logical_context): shard_map on 8 devices."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = jax.make_mesh(
      (2, 2, 2),
      ("data", "fsdp", "tensor"),
      axis_types=(jax.sharding.AxisType.Auto,) * 3,
  )
  qs, kvs = (4, 24, 4, 8), (4, 24, 2, 8)
  q, k1, v1, k, v, ct = inputs(5, [qs, kvs, kvs, kvs, kvs, qs], jnp.float32)
  gate = gate_like(5, qs[:3])

  def grads(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):

      def fn(*a):
        return jnp.sum(
            ct
            * gswa_attention(
                *a, left=3, block_q=8, block_kv_global=8, block_kv_local=8
            )
        )

      return jax.grad(fn, argnums=tuple(range(6)))(*args)

  batch_heads = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
  run = jax.jit(
      grads,
      in_shardings=(batch_heads,) * 5
      + (NamedSharding(mesh, P(("data", "fsdp"), None, "tensor")),),
  )
  # the kernels run per shard
  assert "sdy.manual_computation" in run.lower(q, k1, v1, k, v, gate).as_text()
  got = run(q, k1, v1, k, v, gate)
  want = jax.grad(
      lambda *a: jnp.sum(ct * gswa_reference(*a, left=3)),
      argnums=tuple(range(6)),
  )(q, k1, v1, k, v, gate)
  for name, g, w in zip(["q", "k1", "v1", "k", "v", "gate"], got, want):
    assert_kernel_close(g, w, qs, "float32", "grad", f"sharded d{name}")


def test_gpu_path_runs_xla_attention():
  """backend="gpu" (cuDNN/XLA dot_product_attention, no Pallas) gives the same numbers; on CPU the
  XLA implementation runs, which checks the window/segment arguments of that path.
  """
  qs, kvs = (2, 21, 4, 8), (2, 21, 2, 8)
  q, k1, v1, k, v = inputs(6, [qs, kvs, kvs, kvs, kvs], jnp.float32)
  gate = gate_like(6, qs[:3])
  seg = random_segments(np.random.default_rng(6), 2, 21, 2)
  got = jax.jit(lambda *a: gswa_attention(*a, seg, left=2, backend="gpu"))(
      q, k1, v1, k, v, gate
  )
  assert_kernel_close(
      got,
      gswa_reference(q, k1, v1, k, v, gate, seg, left=2),
      qs,
      "float32",
      "output",
      "gpu path",
  )
