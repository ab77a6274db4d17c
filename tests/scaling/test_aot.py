"""AOT compilation for a TPU slice on this CPU host (libtpu compile-only devices, no TPU needed)."""

import importlib.util
import os

import pytest

from loopcoder_jax.scaling import aot
from tests.helpers import ROOT

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install 'jax[tpu]', the [tpu] extra)",
)
_CONFIG = os.path.join(ROOT, "configs", "tiny_cpu.py")


def _tiny_config(**model_overrides):
  spec = importlib.util.spec_from_file_location("tiny_cpu_config", _CONFIG)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config()
  config.mesh = dict(data=-1, fsdp=1, tensor=1)
  config.train.global_batch_size = 8
  config.data.seq_len = 64
  for k, v in model_overrides.items():
    config.model[k] = v
  return config


def test_parse_topology():
  assert aot.parse_topology("v5p:4x4x4") == ("v5p", (4, 4, 4))
  assert aot.parse_topology("v6e:2x4") == ("v6e", (2, 4))
  assert aot.parse_topology("v2:2x2") == ("v2", (2, 2))
  for bad in ("v5p:4x4", "v5e:2x2x2", "v4:2x2", "v2:2x2x1", "2x2", ""):
    with pytest.raises(ValueError, match="topology"):
      aot.parse_topology(bad)


@pytest.mark.tpu_compile
@needs_libtpu
@pytest.mark.parametrize(
    "extra, topology",
    [
        ({"data.seq_len": 2048}, "v5e:2x2"),
        ({"model.loops": 0}, "v5e:2x2"),
        # 8 chips on 2 hosts, as the trainer's 8 test devices: the same 8 batch shards
        ({"train.global_batch_size": 4}, "v5p:2x2x2"),
    ],
)
def test_refuses_a_bad_config_with_the_trainers_message(
    extra, topology, tmp_path
):
  from loopcoder_jax.train import trainer

  config = _tiny_config()
  for key, value in extra.items():
    section, leaf = key.split(".")
    config[section][leaf] = value
  with pytest.raises(ValueError) as by_trainer:
    trainer.train(config, str(tmp_path / "run"))
  with pytest.raises(ValueError) as by_aot:
    aot.compile_train(config, topology)
  assert str(by_aot.value) == str(by_trainer.value)
  assert not os.path.exists(tmp_path / "run")


@pytest.mark.tpu_compile
@needs_libtpu
def test_tiny_train_step_v5e_2x2():
  from loopcoder_jax import hardware
  from loopcoder_jax.model import flops
  from loopcoder_jax.train import config as train_config

  config = _tiny_config()
  r = aot.compile_train(config, "v5e:2x2")
  cfg = train_config.model_config_from(config)
  assert (
      r["chip"] == "v5e"
      and r["devices"] == 4
      and r["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  )
  assert r["fits"] is True
  assert r["hbm_bytes"] == hardware.PEAKS["v5e"]["hbm_bytes"]
  # Params, Adam moments (f32, replicated on a pure data mesh) and the step counter are arguments,
  # donated to the outputs.
  assert r["argument_bytes"] >= 3 * 4 * cfg.num_params()
  assert r["alias_bytes"] > 0.9 * r["argument_bytes"]
  assert 0 < r["peak_bytes"] < r["hbm_bytes"]
  # the same float64 products in the same order
  assert (
      r["flops_per_device"] == flops.train_flops_per_token(cfg, 64) * 8 * 64 / 4
  )
  assert r["compile_s"] > 0


@pytest.mark.tpu_compile
@needs_libtpu
def test_refusal_is_reported_not_raised():
  # ~4.3e9 embedding params (f32, replicated over a pure data mesh): far over a v5e's 16 GiB.
  config = _tiny_config(
      overrides=dict(
          vocab_size=2**25,
          hidden_size=128,
          intermediate_size=128,
          num_hidden_layers=1,
          num_attention_heads=4,
          num_key_value_heads=2,
          head_dim=32,
          max_position_embeddings=512,
      ),
      loops=1,
  )
  r = aot.compile_train(config, "v5e:2x2")
  assert r["fits"] is False
  assert "\n" not in r["error"] and r["error"]


@pytest.mark.tpu_compile
@needs_libtpu
def test_tiny_serving_v5e_2x2_keeps_the_cache_in_place():
  """Chunked prefill and the decode step compile for a slice with batch and kv heads sharded; the
  decode step writes the donated cache in place (its temporaries are a small part of the cache: a
  cache copy per step is what the cache layout and write order avoid)."""
  from loopcoder_jax.model.config import PLTConfig

  # small, but with TPU-sized head dims (a head_dim of 8 would be padded to the 128-lane tile)
  cfg = PLTConfig.tiny(
      loops=2,
      hidden_size=512,
      num_attention_heads=4,
      num_key_value_heads=4,
      head_dim=128,
      max_position_embeddings=4096,
  )
  prefill, step = aot.compile_serving(
      cfg,
      "v5e:2x2",
      batch=8,
      max_len=2048,
      prefill_len=256,
      chunk=64,
      mesh_cfg={"data": 2, "fsdp": 1, "tensor": 2},
  )
  assert prefill["what"] == "prefill" and prefill["fits"] and step["fits"]
  assert step["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2}
  assert step["alias_bytes"] >= step["cache_bytes_per_device"]
  assert step["temp_bytes"] < step["cache_bytes_per_device"] / 4, step


def _serving_cfg(**kw):
  from loopcoder_jax.model.config import PLTConfig

  # small, but with TPU-sized head dims (a head_dim of 8 would be padded to the 128-lane tile)
  return PLTConfig.tiny(
      loops=2,
      hidden_size=512,
      num_attention_heads=8,
      num_key_value_heads=8,
      head_dim=128,
      max_position_embeddings=4096,
      dtype="bfloat16",
      param_dtype="bfloat16",
      **kw,
  )


@pytest.mark.tpu_compile
@needs_libtpu
def test_whole_prompt_prefill_runs_the_kernels_per_shard():
  """Whole-prompt prefill with the Mosaic kernels compiles on a tensor mesh (they run under
  shard_map over the serving mesh; XLA cannot partition them itself)."""
  prefill, step = aot.compile_serving(
      _serving_cfg(attention_impl="pallas"),
      "v5e:2x2",
      batch=1,
      max_len=1024,
      prefill_len=512,
  )
  assert prefill["mesh"] == {"data": 1, "fsdp": 1, "tensor": 4}
  assert prefill["fits"] and step["fits"]


@pytest.mark.tpu_compile
@needs_libtpu
def test_v2_8_serves_on_eight_cores_of_8_gib():
  from loopcoder_jax import hardware

  prefill, step = aot.compile_serving(
      _serving_cfg(), "v2:2x2", batch=1, max_len=1024, prefill_len=512
  )
  assert prefill["chip"] == "v2" and prefill["devices"] == 8
  assert prefill["mesh"] == {"data": 1, "fsdp": 1, "tensor": 8}
  assert prefill["hbm_bytes"] == hardware.PEAKS["v2"]["hbm_bytes"] == 8 * 2**30
  assert prefill["fits"] and step["fits"]


@pytest.mark.tpu_compile
@needs_libtpu
def test_lora_step_on_one_chip_with_an_int8_base(tmp_path):
  """The LoRA config's step compiles for a single v5e chip (Colab's v5e-1) with the frozen base as
  its third argument; `lora.base_dtype=int8` stores each projection and the head at one byte per
  weight plus a float32 scale per output channel instead of two bytes (bf16), and the step's
  arguments shrink by that."""
  import json

  import numpy as np

  from loopcoder_jax.model import PLTConfig, abstract_params, quant
  from loopcoder_jax.train import config as train_config

  base = tmp_path / "base"
  base.mkdir()
  cfg = PLTConfig.tiny(loops=2, vocab_size=512, max_position_embeddings=128)
  (base / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
  reports = {}
  for dtype in ("float", "int8"):
    config = train_config.load_config(
        os.path.join(ROOT, "configs", "lora_loopcoder_v2_7b.py")
    )
    config.init.checkpoint = str(base)
    config.data.source = str(base / "config.json")
    config.data.seq_len = 64
    config.train.global_batch_size = 1
    config.train.grad_accum = 1
    config.lora.rank = 4
    config.lora.base_dtype = dtype
    config.model.runtime.attention_impl = "reference"
    reports[dtype] = aot.compile_train(config, "v5e:1x1")
  r = reports["int8"]
  assert (r["devices"], r["chip"], r["base"]) == (1, "v5e", "int8")
  assert r["fits"] and reports["float"]["fits"]
  assert reports["float"]["base"] == "bfloat16"
  bf16 = abstract_params(cfg.with_runtime(param_dtype="bfloat16"))
  saved = 0
  for module in quant.targets(cfg):
    node = bf16
    for k in module.split("/"):
      node = node[k]
    w = node["kernel"].shape
    lead = 1 if module.startswith("layers/") else 0
    scales = int(np.prod(w[:lead] + w[lead + quant.TARGETS[module] :]))
    saved += int(np.prod(w)) * (2 - 1) - 4 * scales
  # the compiler pads small arrays to its tiles: the saving as counted, within a factor of 2
  diff = reports["float"]["argument_bytes"] - r["argument_bytes"]
  assert saved / 2 <= diff <= 2 * saved, (diff, saved)
