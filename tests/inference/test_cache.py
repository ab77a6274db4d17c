"""The PLT cache: sizes by the formula, layouts, the layout check, shardings on a mesh."""

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from loopcoder_jax import inference
from loopcoder_jax.inference import decode
from loopcoder_jax.model import sharding
from loopcoder_jax.model.config import PLTConfig
from loopcoder_jax.model.transformer import init_params, unstack_layers


def test_cache_size_formula():
  cfg = PLTConfig.tiny(loops=2, num_hidden_layers=3, plt_window_size=(6, 0))
  s, batch = 64, 2
  assert inference.cache_entries_per_sequence(cfg, s) == 3 * s + 1 * 3 * 7
  shapes = inference.cache_shapes(cfg, batch, s)
  per_entry = cfg.num_key_value_heads * cfg.head_size
  kv_entries = (shapes.k1.size + shapes.ring_k.size) // (batch * per_entry)
  assert kv_entries == inference.cache_entries_per_sequence(cfg, s)
  r1 = inference.cache_entries_per_sequence(cfg.replace(plt_num_loops=1), s)
  assert r1 == 3 * s
  assert (
      inference.cache_entries_per_sequence(cfg.replace(plt_num_loops=3), s)
      < 3 * r1
  )
  cache = inference.init_cache(cfg, batch, s)
  assert inference.cache_bytes(cache) == sum(
      x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes)
  )
  assert (np.asarray(cache.ring_pos) == -1).all()
  per_layer = inference.cache_shapes(cfg, batch, s, inference.PER_LAYER)
  assert len(per_layer.k1) == 3 and per_layer.k1[0].shape == (
      cfg.num_key_value_heads * batch,
      s,
      cfg.head_size,
  )
  assert inference.cache_bytes(
      inference.init_cache(cfg, batch, s, inference.PER_LAYER)
  ) == inference.cache_bytes(cache)


def test_cache_layout_must_match_params():
  cfg = PLTConfig.tiny(loops=2)
  params = init_params(cfg, jax.random.key(0))
  tokens = np.zeros((3, 1), np.int32)
  cache = inference.init_cache(cfg, 3, 16)
  with pytest.raises(ValueError, match="cache layout"):
    jax.eval_shape(
        lambda p, c: decode.decode_step(cfg, p, c, tokens[:, 0]),
        unstack_layers(params),
        cache,
    )


def test_cache_shardings_split_rows_and_kv_heads():
  """Rows over the data axes, kv heads over `tensor`; what the rules cannot split stays whole."""
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  cfg = PLTConfig.tiny(loops=2, num_key_value_heads=2)
  sh = inference.cache_shardings(cfg, mesh, 4)
  rows = ("data", "fsdp")
  assert sh.k1.spec == sh.v1.spec == P(None, rows, None, "tensor", None)
  assert (
      sh.ring_k.spec
      == sh.ring_v.spec
      == P(None, None, rows, None, "tensor", None)
  )
  assert sh.ring_pos.spec == P(rows, None)
  assert sh.carry.spec == P(None, rows, None)
  assert sh.lengths.spec == P(rows)
  # 3 rows, 1 kv head: neither splits
  sh = inference.cache_shardings(cfg.replace(num_key_value_heads=1), mesh, 3)
  assert sh.k1.spec == P(None, None, None, None, None)
  assert sh.lengths.spec == P(None)
