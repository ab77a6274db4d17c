"""The sharded train step: a 2x2x2 mesh (with gradient accumulation) equals one device; targets
outside the loss mask (chat prompts) have no effect at all."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from loopcoder_jax.model import loss
from loopcoder_jax.model import sharding as shd
from loopcoder_jax.model.config import PLTConfig
from loopcoder_jax.model.transformer import PLTForCausalLM
from loopcoder_jax.train import optim
from loopcoder_jax.train import step as ts
from tests import helpers

CFG = PLTConfig.tiny(loops=2)
B, S = 8, 16
# a step: forward, backward (twice the chain), weight gradients summed over the
# tokens
STEP_OPS = 3 * helpers.forward_ops(CFG, S) + B * S


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  seg = np.repeat(np.array([[1] * 10 + [2] * 6]), B, 0).astype(np.int32)
  pos = np.tile(np.concatenate([np.arange(10), np.arange(6)]), (B, 1)).astype(
      np.int32
  )
  mask = np.ones((B, S), np.float32)
  mask[:, -1] = 0.0
  return {
      "inputs": rng.integers(0, CFG.vocab_size, (B, S), dtype=np.int32),
      "targets": rng.integers(0, CFG.vocab_size, (B, S), dtype=np.int32),
      "segment_ids": seg,
      "positions": pos,
      "loss_mask": mask,
  }


def _run(mesh, grad_accum, steps=2):
  tx, sched = optim.make_optimizer({}, 10)
  init_fn, step_fn, state_sh = ts.make_train_fns(
      CFG, tx, mesh, shd.DEFAULT_RULES, grad_accum=grad_accum, schedule=sched
  )
  state = init_fn(jax.random.key(0))
  metrics = []
  for i in range(steps):
    state, m = step_fn(state, ts.global_batch(_batch(i), mesh))
    metrics.append(jax.device_get(m))
  return state, state_sh, metrics


@pytest.fixture(scope="module")
def runs():
  single = _run(shd.make_mesh({"data": -1}, jax.devices()[:1]), grad_accum=1)
  mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  return single, _run(mesh, grad_accum=2), mesh


def test_sharded_accumulated_step_equals_single_device(runs):
  (s1, _, m1), (s8, _, m8), _ = runs
  for a, b in zip(m1, m8):
    for k in a:
      helpers.assert_close(b[k], a[k], ops=STEP_OPS, what=k)
  # Adam's moments are sums of (squared) clipped gradients: a step's rounding
  # apart.
  mu, nu = (optax.tree_utils.tree_get(s1.opt_state, k) for k in ("mu", "nu"))
  for name, tree in (("mu", mu), ("nu", nu)):
    jax.tree.map(
        lambda a, b, name=name: helpers.assert_close(
            b, a, ops=STEP_OPS, what=name
        ),
        tree,
        optax.tree_utils.tree_get(s8.opt_state, name),
    )
  # The params moved once (the first step's lr is 0), by lr * mu^ / (sqrt(nu^) +
  # eps) plus the decay. That update normalises each gradient entry: an error d
  # in mu^ (and the matching one in nu^) moves it by ~2 d / sqrt(nu^), unbounded
  # where the entry itself is at rounding level, so the tolerance is per entry.
  c = optim.default_optim_config()
  lr = float(m1[1]["lr"])

  def params_close(p1, p8, mu, nu):
    p1, p8 = np.asarray(p1, np.float64), np.asarray(p8, np.float64)
    mu_hat = np.asarray(mu, np.float64) / (1 - c.b1**2)
    nu_hat = np.asarray(nu, np.float64) / (1 - c.b2**2)
    d = helpers.tolerance(mu_hat, ops=STEP_OPS)
    tol = 2 * lr * d / (np.sqrt(nu_hat) + c.eps) + helpers.tolerance(
        p1, ops=STEP_OPS
    )
    bad = np.abs(p8 - p1) > tol
    assert not bad.any(), (p8[bad], p1[bad], tol[bad])

  jax.tree.map(params_close, s1.params, s8.params, mu, nu)
  assert int(s8.step) == 2


def plain_loss(params, batch):
  """Mean next-token CE over the loss mask from the model's logits (not the
  fused loss).
  """
  logits = PLTForCausalLM(CFG).apply(
      {"params": params},
      batch["inputs"],
      batch["segment_ids"],
      batch["positions"],
  )
  logp = jax.nn.log_softmax(logits)
  ce = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  return jnp.sum(ce * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])


def test_metrics(runs):
  (_, _, m1), _, _ = runs
  first = m1[0]
  assert first["tokens"] == B * (S - 1)
  # zero-init gate: exactly 0.5 everywhere
  np.testing.assert_array_equal(first["gate_mean"], [0.5])
  # warmup starts at lr 0: the first step leaves the params as initialised
  assert first["lr"] == 0.0
  helpers.assert_close(
      m1[1]["lr"], optim.make_schedule({}, 10)(1), ops=8, what="lr"
  )
  tx, _ = optim.make_optimizer({}, 10)
  init_fn, _, _ = ts.make_train_fns(
      CFG, tx, shd.make_mesh({"data": -1}, jax.devices()[:1])
  )
  p0 = init_fn(jax.random.key(0)).params
  loss, grads = jax.value_and_grad(plain_loss)(p0, _batch(0))
  helpers.assert_close(first["loss"], loss, ops=STEP_OPS, what="loss")
  helpers.assert_close(
      first["grad_norm"], optax.global_norm(grads), ops=STEP_OPS, what="norm"
  )
  helpers.assert_close(
      m1[1]["loss"], plain_loss(p0, _batch(1)), ops=STEP_OPS, what="loss 2"
  )


def test_state_is_sharded_by_the_rules(runs):
  _, (s8, sh, _), mesh = runs
  q = s8.params["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding.spec == jax.sharding.PartitionSpec(
      None, "fsdp", "tensor", None
  )
  assert q.sharding.mesh.shape == mesh.shape
  jax.tree.map(
      lambda x, s: x.sharding.is_equivalent_to(s, x.ndim)
      or pytest.fail(f"{x.sharding} != {s}"),
      s8,
      sh,
  )
  # Adam moments follow their params (not left on one device)
  mu = [x for x in jax.tree.leaves(s8.opt_state) if x.shape == q.shape]
  # q's two Adam moments (mu and nu)
  assert len(mu) == 2
  assert all(m.sharding.is_equivalent_to(q.sharding, q.ndim) for m in mu)


def test_eval_fn_matches_step_loss(runs):
  mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  tx, _ = optim.make_optimizer({}, 10)
  init_fn, _, _ = ts.make_train_fns(CFG, tx, mesh)
  state = init_fn(jax.random.key(0))
  ce, n = ts.make_eval_fn(CFG, mesh)(
      state.params, ts.global_batch(_batch(0), mesh)
  )
  (_, _, m1), _, _ = runs
  helpers.assert_close(float(ce) / float(n), m1[0]["loss"], ops=STEP_OPS)


def test_bad_batch_and_accum():
  mesh = shd.make_mesh({"data": -1}, jax.devices()[:1])
  with pytest.raises(ValueError, match="lacks keys"):
    ts.global_batch({"inputs": np.zeros((2, 2), np.int32)}, mesh)
  with pytest.raises(ValueError, match="grad_accum"):
    ts.make_train_fns(CFG, optim.make_optimizer({}, 2)[0], mesh, grad_accum=0)


def _chat_mask():
  """Loss only on each packed conversation's answer, as chat data gives it (prompts are 0)."""
  mask = np.zeros((B, S), np.float32)
  mask[:, 6:10] = 1.0  # segment 1: 6 prompt targets, then 4 answer targets
  mask[:, 13:15] = 1.0  # segment 2: 3 prompt targets, 2 answer targets, padding
  return mask


@pytest.mark.parametrize("loss_chunk", [0, 4])
def test_targets_outside_the_loss_mask_get_exactly_zero_gradient(loss_chunk):
  cfg = CFG.with_runtime(loss_chunk=loss_chunk)
  mesh = shd.make_mesh({"data": -1}, jax.devices()[:1])
  tx, _ = optim.make_optimizer({}, 10)
  init_fn, step_fn, _ = ts.make_train_fns(cfg, tx, mesh)
  batch = dict(_batch(0), loss_mask=_chat_mask())
  rng = np.random.default_rng(1)
  off = batch["loss_mask"] == 0
  perturbed = dict(batch, targets=batch["targets"].copy())
  perturbed["targets"][off] = (
      batch["targets"][off] + rng.integers(1, cfg.vocab_size, off.sum())
  ) % cfg.vocab_size
  assert (perturbed["targets"] != batch["targets"]).sum() == off.sum()

  def one_step(b):
    state, m = step_fn(init_fn(jax.random.key(0)), ts.global_batch(b, mesh))
    return jax.device_get((state.params, m))

  params, m = one_step(batch)
  params_p, m_p = one_step(perturbed)
  assert m["tokens"] == _chat_mask().sum()
  for k in ("loss", "grad_norm"):
    assert m[k] == m_p[k], k
  jax.tree.map(np.testing.assert_array_equal, params, params_p)
  # the check can fail: an answer target does move the loss
  answer = dict(batch, targets=batch["targets"].copy())
  answer["targets"][0, 7] = (answer["targets"][0, 7] + 1) % cfg.vocab_size
  assert one_step(answer)[1]["loss"] != m["loss"]

  # and the loss's gradient at a non-answer position is exactly zero
  x_BxSxd = jax.random.normal(jax.random.key(2), (B, S, cfg.hidden_size))
  w_dxV = jax.random.normal(
      jax.random.key(3), (cfg.hidden_size, cfg.vocab_size)
  )
  g_BxSxd = jax.grad(
      lambda x: loss.cross_entropy_sum(
          x, w_dxV, batch["targets"], batch["loss_mask"], chunk=loss_chunk
      )
  )(x_BxSxd)
  g_BxS = np.abs(np.asarray(g_BxSxd)).max(-1)
  assert (g_BxS[off] == 0).all() and (g_BxS[~off] > 0).all()


# ------------------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("per_loop", [False, True])
def test_a_lora_step_trains_the_adapters_only(per_loop):
  """The state is the adapters and their Adam moments; the base is an input the step leaves as it
  is; the LoRA gradient is the full model's gradient with respect to the adapter leaves.
  """
  from loopcoder_jax.model import lora
  from loopcoder_jax.model.config import LoraConfig
  from loopcoder_jax.model.transformer import init_params

  lcfg = CFG.replace(lora=LoraConfig(rank=4, per_loop=per_loop, dropout=0.1))
  mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  tx, sched = optim.make_optimizer({}, 10)
  init_fn, step_fn, _ = ts.make_train_fns(
      lcfg, tx, mesh, grad_accum=2, schedule=sched
  )
  base = helpers.perturbed(init_params(CFG, jax.random.key(1)))
  base_copy = jax.tree.map(np.asarray, base)
  _, base_sh = ts.base_shardings(lcfg, mesh)
  base = jax.device_put(base, base_sh)
  state = init_fn(jax.random.key(0))
  adapter_paths = set(
      hf_paths(lora.split(init_params(lcfg, jax.random.key(0)))[1])
  )
  assert set(hf_paths(state.params)) == adapter_paths
  mu = optax.tree_utils.tree_get(state.opt_state, "mu")
  assert set(hf_paths(mu)) == adapter_paths
  before = jax.tree.map(np.asarray, state.params)
  for i in range(3):
    state, m = step_fn(state, ts.global_batch(_batch(i), mesh), base)
    assert np.isfinite(m["loss"])
  for x, y in zip(jax.tree.leaves(base), jax.tree.leaves(base_copy)):
    np.testing.assert_array_equal(np.asarray(x), y)
  changed = jax.tree.map(
      lambda a, b: bool(np.any(np.asarray(a) != b)), state.params, before
  )
  # the rate is 0 at step 1 (warm-up), step 2 moves B (A's gradient is 0 while B is), step 3 A
  assert all(jax.tree.leaves(changed)), changed


def hf_paths(tree):
  return [
      "/".join(str(getattr(k, "key", k)) for k in p)
      for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
  ]


def _eqn_outputs(jaxpr):
  """Every value an equation of `jaxpr` makes, in sub-jaxprs too (scan bodies, calls)."""
  for eqn in jaxpr.eqns:
    yield from eqn.outvars
    for v in eqn.params.values():
      for sub in v if isinstance(v, (tuple, list)) else [v]:
        sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
        if hasattr(sub, "eqns"):
          yield from _eqn_outputs(sub)


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_the_lora_step_makes_no_copy_of_the_stacked_base_weights(quantize):
  """Differentiating a scan, JAX computes before it what its body computes from loop-invariant
  inputs alone; the later loops' scan has the stacked base weights as such inputs. The step must
  not turn them into float copies of all layers at once (the int8 -> bf16 casts and the 2-D
  reshapes of the projections: 13 GB of the 7B's LoRA step on one chip): the layers convert one
  layer's weights at a time (`layers.tie`)."""
  from loopcoder_jax.model.config import LoraConfig
  from loopcoder_jax.model.lora import TARGETS

  cfg = PLTConfig.tiny(
      loops=3,
      hidden_size=48,
      intermediate_size=80,
      num_hidden_layers=3,
      head_dim=12,
      dtype="bfloat16",
      param_dtype="bfloat16",
      remat_policy="full",
      quantize=quantize,
  ).replace(lora=LoraConfig(rank=4))
  mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
  tx = optax.adam(1e-3)
  _, step_fn, _ = ts.make_train_fns(cfg, tx, mesh)
  abs_state, _ = ts.state_shardings_for(cfg, tx, mesh, shd.DEFAULT_RULES)
  abs_base, _ = ts.base_shardings(cfg, mesh)
  jaxpr = step_fn.trace(abs_state, ts.batch_spec(1, 16), abs_base).jaxpr
  # every projection's stacked kernel shape, as stored and as a 2-D matmul operand
  stacked = set()
  for scope, name, n_in in TARGETS.values():
    shape = abs_base["layers"][scope][name]["kernel"].shape
    k_in = int(np.prod(shape[1 : 1 + n_in]))
    stacked |= {shape, (shape[0], k_in, int(np.prod(shape[1:])) // k_in)}
  copies = [
      v.aval.str_short()
      for v in _eqn_outputs(jaxpr.jaxpr)
      if v.aval.shape in stacked and jnp.issubdtype(v.aval.dtype, jnp.floating)
  ]
  assert not copies, copies


def test_tie_bars_only_frozen_weights():
  """`layers.tie` adds its barrier where a weight has no tangent (a LoRA base), and nowhere else: a
  trained weight's step (full training) and a forward without differentiation keep their program.
  """
  from loopcoder_jax.model.layers import tie

  w, x = jnp.ones((4, 3)), jnp.ones((2, 4))

  def barriers(f):
    return str(jax.make_jaxpr(f)(w, x)).count("optimization_barrier")

  assert barriers(tie) == 0

  def trained(w, x):  # w has a tangent: a weight being trained
    return jax.jvp(tie, (w, x), (w, x))

  def frozen(w, x):  # only x has one: a LoRA base weight
    return jax.jvp(lambda x: tie(w, x), (x,), (x,))

  assert barriers(trained) == 0
  assert barriers(frozen) == 1
  assert jnp.array_equal(frozen(w, x)[0], w)
