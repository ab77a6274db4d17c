"""The decode roofline: the bytes floor by hand, and the compiled counts on a TPU slice (libtpu)."""

import importlib.util
import math

import jax
import pytest

from loopcoder_jax import inference
from loopcoder_jax.inference import decode
from loopcoder_jax.model import flops, sharding
from loopcoder_jax.model.config import PLTConfig
from loopcoder_jax.model.transformer import abstract_params
from loopcoder_jax.scaling import roofline

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install 'jax[tpu]', the [tpu] extra)",
)
# 16 query and 8 kv heads: a tensor axis of 8 splits every projection and the cache.
CFG = PLTConfig.tiny(
    loops=3, num_attention_heads=16, num_key_value_heads=8, head_dim=8
)


def _nbytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_variants_share_the_weights():
  names = [(n, c.plt_num_loops, m) for n, c, m in roofline.variants(CFG)]
  assert names == [
      ("R1", 1, "batched"),
      ("PLT3", 3, "batched"),
      ("serial3", 3, "serial"),
  ]
  with pytest.raises(ValueError, match="compares R = 1 with a PLT model"):
    roofline.variants(CFG.replace(plt_num_loops=1))


def test_floor_bytes_on_one_device():
  """Weights: the layers once per pass, the head once, B rows of the embedding; cache: loop 1's
  K/V once per pass (all R passes read it when serial), each later loop's ring once.
  """
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  batch, max_len = 2, 64
  sh = decode.serving_shardings(CFG, mesh, batch)
  params = abstract_params(CFG)
  layers = _nbytes(params["layers"])
  head = _nbytes(params["norm"]) + _nbytes(params["lm_head"])
  rows = batch * CFG.hidden_size * 4
  cache = inference.cache_shapes(CFG, batch, max_len)
  kv1, ring = _nbytes((cache.k1, cache.v1)), _nbytes(
      (cache.ring_k, cache.ring_v)
  )
  batched = roofline.floor_bytes(CFG, batch, max_len, "batched", sh)
  serial = roofline.floor_bytes(CFG, batch, max_len, "serial", sh)
  assert batched == {"weights": layers + head + rows, "kv_cache": kv1 + ring}
  assert serial == {
      "weights": 3 * layers + head + rows,
      "kv_cache": 3 * kv1 + ring,
  }


def test_floor_bytes_split_over_a_tensor_mesh():
  """On tensor=8 each device reads its eighth of every split weight and of the cache; the
  replicated norms and gate whole."""
  batch, max_len = 2, 64
  one = decode.serving_shardings(
      CFG, sharding.make_mesh({"data": 1}, jax.devices()[:1]), batch
  )
  eight = decode.serving_shardings(
      CFG, sharding.make_mesh({"tensor": 8}), batch
  )
  a = roofline.floor_bytes(CFG, batch, max_len, "batched", one)
  b = roofline.floor_bytes(CFG, batch, max_len, "batched", eight)
  assert b["kv_cache"] * 8 == a["kv_cache"]
  layers = abstract_params(CFG)["layers"]
  whole = _nbytes(
      [layers["input_layernorm"], layers["post_attention_layernorm"]]
      + [layers["self_attn"]["plt_gate"]]
  )
  split = _nbytes(layers) - whole
  norm_and_head = (
      CFG.hidden_size * 4 + _nbytes(abstract_params(CFG)["lm_head"]) / 8
  )
  rows = batch * CFG.hidden_size * 4
  assert b["weights"] == split / 8 + whole + norm_and_head + rows


@pytest.mark.tpu_compile
@needs_libtpu
def test_decode_step_on_v5e_2x2():
  """XLA's count of the unrolled step matches the FLOP formula; the served (scanned) program's own
  count holds one layer of L; PLT-2's floor is one pass over the weights like R = 1's.
  """
  # small, with TPU-sized head dims (a head_dim of 8 would be padded to the 128-lane tile)
  cfg = PLTConfig.tiny(
      loops=2,
      hidden_size=512,
      intermediate_size=1024,
      num_hidden_layers=4,
      num_attention_heads=4,
      num_key_value_heads=4,
      head_dim=128,
      vocab_size=1024,
      max_position_embeddings=4096,
      dtype="bfloat16",
      param_dtype="bfloat16",
  )
  batch, ctx, devices = 8, 1024, 4
  [point] = roofline.table(cfg, "v5e:2x2", [batch], [ctx])
  rows = point["variants"]
  # Besides the matmuls XLA counts elementwise work (norms, RoPE, softmax, SiLU: a few FLOPs per
  # element of vectors of d, I and S) and may count a FLOP per element of the layer's cache slice
  # that each pass's attention copies to write the new token in (the stacked layout).
  cache = inference.cache_shapes(cfg, batch, ctx)
  copied = (cache.k1.size + cache.v1.size) / devices
  for name, r in rows.items():
    assert r["fits"] and r["devices"] == devices, name
    loops = r["loops"]
    model = (
        flops.decode_flops_per_token(cfg.replace(plt_num_loops=loops), ctx)
        * batch
        / devices
    )
    assert r["floor"]["flops"] == pytest.approx(model)
    passes = loops if r["mode"] == "serial" else 1
    assert model <= r["xla"]["flops"] <= 1.05 * model + passes * copied, name
    assert r["served_xla_flops"] < r["xla"]["flops"] / 2, name
    assert r["collectives"] > 0 and r["xla"]["step_s"] > 0
  r1, plt, serial = rows["R1"], rows["PLT2"], rows["serial2"]
  assert plt["floor"]["bytes_by_part"]["weights"] == pytest.approx(
      r1["floor"]["bytes_by_part"]["weights"], rel=0.01
  )
  assert serial["floor"]["bytes"] > plt["floor"]["bytes"]
  ratios = point["ratios"]
  assert set(ratios) == {"xla", "floor"}
  assert math.isclose(
      ratios["floor"]["PLT2/R1"],
      plt["floor"]["step_s"] / r1["floor"]["step_s"],
  )
