"""Weight-only int8 (`model/quant.py`, the `Kernel`/`proj` seam in `model/layers.py`).

The error bound. Per output channel c, scale_c = max_i |w_ic| / 127 and q = round(w / scale), so
each weight moves by |dw| <= scale_c / 2. To first order the logits move by J dw (J: their Jacobian
in the quantized weights), so each logit is within
    sum_i |dlogit/dw_i| * scale_i / 2
of the float model's, the worst case over every rounding pattern; the second-order remainder is
smaller by about the relative weight change (<= 1/254 of a channel's largest weight), and 10% is
allowed for it. The int8 model computes (x @ q) * scale, which is the float model at the
dequantised weights q * scale up to float32 rounding: that identity is checked on its own, with
the float32 tolerance, so a scale on the wrong axis or applied twice fails far outside it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopcoder_jax.model import (
    PLTConfig,
    PLTForCausalLM,
    init_params,
    quant,
    sharding,
)
from loopcoder_jax.model.layers import Int8Kernel
from tests import helpers

B, S = 2, 8


@pytest.fixture(scope="module")
def model():
  cfg = PLTConfig.tiny(loops=2)
  params = helpers.perturbed(init_params(cfg, jax.random.key(1)))
  tokens = jax.random.randint(
      jax.random.key(0), (B, S), 0, cfg.vocab_size, dtype=jnp.int32
  )
  qcfg, qparams = quant.quantize_params(cfg, params)
  return cfg, params, qcfg, qparams, tokens


def _get(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


def _with(params, weights):
  """params with each `path/kernel` replaced by weights[path] (float layout)."""
  out = jax.tree.map(lambda x: x, params)
  for path, w in weights.items():
    _get(out, path)["kernel"] = w
  return out


def _dequantized(cfg, qparams):
  return {
      p: Int8Kernel(
          _get(qparams, p)["kernel"], _get(qparams, p)["scale"]
      ).dequantize(jnp.float32)
      if p == "lm_head"
      # stacked [L, in..., out...] with scale [L, out...]: the layer axis leads both
      else jax.vmap(lambda v, s: Int8Kernel(v, s).dequantize(jnp.float32))(
          _get(qparams, p)["kernel"], _get(qparams, p)["scale"]
      )
      for p in quant.targets(cfg)
  }


def test_each_weight_is_within_half_its_channel_scale(model):
  cfg, params, _, qparams, _ = model
  deq = _dequantized(cfg, qparams)
  for path, n_in in quant.targets(cfg).items():
    w = np.asarray(_get(params, path)["kernel"], np.float64)
    q = _get(qparams, path)
    assert q["kernel"].dtype == jnp.int8, path
    lead = 1 if path.startswith("layers/") else 0
    axes = tuple(range(lead, lead + n_in))
    scale = np.asarray(q["scale"], np.float64)
    np.testing.assert_allclose(
        scale, np.max(np.abs(w), axis=axes) / 127, rtol=1e-6, err_msg=path
    )
    err = np.abs(w - np.asarray(deq[path], np.float64))
    half = np.expand_dims(scale, axes) / 2
    # float32 rounding of w / scale and of q * scale: a few ulps of |w|
    assert (err <= half * (1 + 1e-5) + 4 * 2.0**-24 * np.abs(w)).all(), path
    assert np.abs(np.asarray(q["kernel"])).max() == 127, path


def test_a_zero_channel_gets_scale_zero():
  w = jnp.zeros((3, 4)).at[:, 1].set(jnp.array([0.5, -1.0, 0.25]))
  q, scale = quant.quantize(w, (0,))
  assert scale.tolist() == [0.0, np.float32(1.0) / np.float32(127), 0.0, 0.0]
  assert q[:, 1].tolist() == [64, -127, 32] and not q[:, 0].any()


def test_int8_model_is_the_float_model_at_the_dequantised_weights(model):
  cfg, params, qcfg, qparams, tokens = model
  got = PLTForCausalLM(qcfg).apply({"params": qparams}, tokens)
  want = PLTForCausalLM(cfg).apply(
      {"params": _with(params, _dequantized(cfg, qparams))}, tokens
  )
  helpers.assert_close(
      got, want, ops=helpers.forward_ops(cfg, S), what="int8 vs dequantised"
  )


def test_int8_logits_within_the_first_order_bound(model):
  cfg, params, qcfg, qparams, tokens = model
  weights = {p: _get(params, p)["kernel"] for p in quant.targets(cfg)}

  def last_logits(ws):  # [B, V] at the last position
    logits = PLTForCausalLM(cfg).apply({"params": _with(params, ws)}, tokens)
    return logits[:, -1]

  jac = jax.jit(jax.jacrev(last_logits))(weights)  # path -> [B, V, *w.shape]
  bound = 0.0
  for path, n_in in quant.targets(cfg).items():
    lead = 1 if path.startswith("layers/") else 0
    axes = tuple(range(lead, lead + n_in))
    half = jnp.expand_dims(_get(qparams, path)["scale"], axes) / 2
    bound = bound + jnp.sum(
        jnp.abs(jac[path]) * half, axis=tuple(range(2, jac[path].ndim))
    )
  got = PLTForCausalLM(qcfg).apply({"params": qparams}, tokens)[:, -1]
  want = last_logits(weights)
  err = np.abs(np.asarray(got - want, np.float64))
  tol = helpers.tolerance(want, ops=helpers.forward_ops(cfg, S))
  assert (err <= 1.1 * np.asarray(bound) + tol).all(), float(
      np.max(err / np.asarray(bound))
  )
  assert err.max() > tol  # the weights did change


def test_quantize_on_a_mesh_places_values_and_scales_by_the_rules(model):
  cfg, params, qcfg, qparams, tokens = model
  mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
  placed = jax.device_put(params, sharding.param_shardings(params, mesh))
  mcfg, mparams = quant.quantize_params(cfg, placed, mesh)
  assert mcfg == qcfg
  want = sharding.param_shardings(mparams, mesh)
  for path in quant.targets(cfg):
    for leaf in ("kernel", "scale"):
      got = _get(mparams, path)[leaf]
      assert got.sharding.is_equivalent_to(_get(want, path)[leaf], got.ndim), (
          path,
          leaf,
      )
      np.testing.assert_array_equal(got, _get(qparams, path)[leaf])
  # q_proj's values are split over heads (tensor) and the model dim (fsdp)
  spec = _get(mparams, "layers/self_attn/q_proj")["kernel"].sharding.spec
  assert tuple(spec) == (None, "fsdp", "tensor", None)


def test_bad_weights_are_refused_with_one_line(model):
  cfg, params, _, qparams, _ = model
  mlp = params["layers"]["mlp"]
  no_up = {
      **params,
      "layers": {**params["layers"], "mlp": {"gate_proj": mlp["gate_proj"]}},
  }
  with pytest.raises(ValueError, match="no linear weight layers/mlp/up_proj"):
    quant.quantize_params(cfg, no_up)
  wrong = _with(params, {"lm_head": jnp.zeros((3, 5))})
  with pytest.raises(ValueError, match=r"lm_head/kernel has shape \(3, 5\)"):
    quant.quantize_params(cfg, wrong)
  with pytest.raises(ValueError, match="already quantized"):
    quant.quantize_params(cfg, qparams)
  with pytest.raises(ValueError, match="runtime.quantize"):
    cfg.with_runtime(quantize="int4")
