"""Reading HF directories: aliases, block-wise sharded reads, table and reader errors, other
exporters' extras (RoPE tables, a stored tied head)."""

import numpy as np
import pytest

from loopcoder_jax.checkpoints import hf_io, hf_names
from loopcoder_jax.checkpoints import safetensors_io as st
from loopcoder_jax.model import sharding
from loopcoder_jax.model.config import PLTConfig
from loopcoder_jax.model.transformer import abstract_params
from tests.helpers import BF16, hf_dir, random_hf_tensors, write_hf


@pytest.mark.parametrize(
    "hidden,alias",
    [
        (True, "model.layers.{i}.self_attn.loop_gate_proj."),
        (False, "model.gate_projections.{i}."),
    ],
)
def test_gate_aliases(tmp_path, hidden, alias):
  cfg = PLTConfig.tiny(loops=2, plt_gate_use_hidden_states=hidden)
  suffixes = (
      ("weight", "bias", "gate_norm.weight") if hidden else ("weight", "bias")
  )
  rename = {
      f"model.layers.{i}.self_attn.plt_gate.{s}": alias.format(i=i) + s
      for i in range(cfg.num_hidden_layers)
      for s in suffixes
  }
  _, want = hf_io.load_hf(hf_dir(tmp_path / "canon", cfg))
  _, got = hf_io.load_hf(hf_dir(tmp_path / "alias", cfg, rename))
  for k, v in hf_names.flatten(want).items():
    np.testing.assert_array_equal(hf_names.flatten(got)[k], v)
  shape = (cfg.num_hidden_layers,) + (
      (cfg.hidden_size, 4) if hidden else (4, cfg.head_size)
  )
  assert want["layers"]["self_attn"]["plt_gate"]["kernel"].shape == shape


@pytest.mark.parametrize(
    "mesh_cfg", [{"tensor": 8}, {"fsdp": 2, "tensor": 4}, {"data": 8}]
)
def test_sharded_read_places_each_block_reading_each_byte_once(
    tmp_path, mesh_cfg, monkeypatch
):
  """Every device holds exactly its block of `load_hf`'s arrays, and the files' bytes are read
  once in all: no device reads another's block, replicas share one read."""
  # 8 query and kv heads: tensor=8 splits every projection (a tiny config's 4 / 2 would stay whole)
  cfg = PLTConfig.tiny(
      loops=2,
      num_attention_heads=8,
      num_key_value_heads=8,
      torch_dtype="bfloat16",
  )
  src = hf_dir(tmp_path / "hf", cfg)
  _, want = hf_io.load_hf(src)
  mesh = sharding.make_mesh(mesh_cfg)
  shardings = sharding.param_shardings(abstract_params(cfg), mesh)
  read_bytes = []
  real = st.read_block

  def counting(fname, key, block):
    x = real(fname, key, block)
    read_bytes.append(x.nbytes)
    return x

  monkeypatch.setattr(st, "read_block", counting)
  got_cfg, got = hf_io.load_hf_sharded(src, shardings)
  assert got_cfg.runtime.param_dtype == "bfloat16"
  flat_sh, flat_want = hf_names.flatten(shardings), hf_names.flatten(want)
  assert sorted(hf_names.flatten(got)) == sorted(flat_want)
  for path, x in hf_names.flatten(got).items():
    assert x.sharding == flat_sh[path] and x.dtype == BF16, path
    assert len(x.addressable_shards) == 8
    for shard in x.addressable_shards:
      block = np.asarray(shard.data)
      assert block.tobytes() == flat_want[path][shard.index].tobytes(), path
  stored = sum(v.nbytes for v in random_hf_tensors(cfg).values())
  assert sum(read_bytes) == stored


def test_sharded_read_casts_on_request(tmp_path):
  cfg = PLTConfig.tiny(loops=2, torch_dtype="bfloat16")
  src = hf_dir(tmp_path / "hf", cfg)
  _, want = hf_io.load_hf(src, "float32")
  mesh = sharding.make_mesh({"tensor": 8})
  shardings = sharding.param_shardings(abstract_params(cfg), mesh)
  got_cfg, got = hf_io.load_hf_sharded(src, shardings, "float32")
  assert got_cfg.runtime.param_dtype == got_cfg.torch_dtype == "float32"
  for path, x in hf_names.flatten(got).items():
    assert x.dtype == np.float32, path
    np.testing.assert_array_equal(np.asarray(x), hf_names.flatten(want)[path])


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
            r"missing key model\.layers\.1\.mlp\.up_proj\.weight",
        ),
        (
            lambda t: t.update(
                {
                    "model.layers.0.self_attn.loop_gate_proj.bias": np.zeros(
                        4, BF16
                    )
                }
            ),
            "model.layers.0.self_attn.plt_gate.bias twice",
        ),
        (
            lambda t: t.update(
                {"model.norm.weight": t["model.norm.weight"].astype(np.float64)}
            ),
            "model.norm.weight: unsupported tensor dtype F64",
        ),
    ],
)
def test_table_and_reader_errors_reach_load_hf(tmp_path, edit, match):
  cfg = PLTConfig.tiny(loops=2)
  tensors = random_hf_tensors(cfg)
  edit(tensors)
  write_hf(tmp_path / "hf", cfg, tensors)
  with pytest.raises(ValueError, match=match):
    hf_io.load_hf(tmp_path / "hf")


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
  cfg = PLTConfig.tiny(loops=2)
  tensors = random_hf_tensors(cfg)
  tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 32), BF16)
  write_hf(tmp_path / "hf", cfg, tensors)
  with pytest.raises(
      ValueError,
      match=r"model\.layers\.0\.self_attn\.k_proj\.weight: checkpoint shape \(8, 32\) "
      r"does not match the config's \(16, 32\)",
  ):
    hf_io.load_hf(tmp_path / "hf")


def test_rope_tables_are_ignored(tmp_path):
  cfg = PLTConfig.tiny(loops=2)
  tensors = random_hf_tensors(cfg)
  write_hf(tmp_path / "plain", cfg, tensors)
  tensors |= {
      f"model.layers.{i}.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)
      for i in range(cfg.num_hidden_layers)
  }
  write_hf(tmp_path / "inv", cfg, tensors)
  want, got = (
      hf_names.flatten(hf_io.load_hf(tmp_path / n)[1]) for n in ("plain", "inv")
  )
  assert all(got[k].tobytes() == v.tobytes() for k, v in want.items())


def test_tied_checkpoint_that_stores_the_head(tmp_path):
  cfg = PLTConfig.tiny(loops=2, tie_word_embeddings=True)
  tensors = random_hf_tensors(cfg)
  emb = tensors["model.embed_tokens.weight"]
  write_hf(tmp_path / "same", cfg, {**tensors, "lm_head.weight": emb.copy()})
  _, params = hf_io.load_hf(tmp_path / "same")
  assert "lm_head" not in params
  assert params["embed_tokens"]["embedding"].tobytes() == emb.tobytes()
  other = emb.copy()
  other[3, 5] += 1
  write_hf(tmp_path / "differs", cfg, {**tensors, "lm_head.weight": other})
  with pytest.raises(ValueError, match="lm_head.weight differs from"):
    hf_io.load_hf(tmp_path / "differs")
