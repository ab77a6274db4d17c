import json

import pytest

from loopcoder_jax import PLTConfig, RuntimeConfig


def test_7b_preset_matches_released_shape():
  cfg = PLTConfig.loopcoder_v2_7b()
  assert (
      cfg.hidden_size,
      cfg.num_hidden_layers,
      cfg.num_attention_heads,
      cfg.num_key_value_heads,
  ) == (5120, 14, 40, 8)
  assert (cfg.head_size, cfg.intermediate_size, cfg.vocab_size) == (
      128,
      27648,
      76800,
  )
  assert (
      cfg.plt_num_loops == 2
      and cfg.plt_window_size == (64, 0)
      and cfg.window_left == 64
  )
  assert cfg.plt_gate_use_hidden_states and not cfg.tie_word_embeddings
  assert 7.5e9 < cfg.num_params() < 7.7e9
  assert [
      PLTConfig.loopcoder_v2_7b(loops=r).plt_num_loops for r in (1, 3, 4)
  ] == [1, 3, 4]


def test_param_count_differs_across_loops_only_by_gates():
  r1 = PLTConfig.loopcoder_v2_7b(loops=1)
  for r in (2, 3, 4):
    cfg = PLTConfig.loopcoder_v2_7b(loops=r)
    assert cfg.num_params() - r1.num_params() == cfg.num_hidden_layers * (
        40 * 5120 + 40 + 5120
    )


def test_hf_round_trip_keeps_unknown_keys(tmp_path):
  hf = PLTConfig.tiny(
      loops=3,
      plt_emb_scale=0.5,
      rope_scaling={"rope_type": "linear", "factor": 2.0},
  ).to_hf_dict()
  hf["some_future_key"] = {"nested": [1, 2]}
  hf["transformers_version"] = "5.0.0"
  cfg = PLTConfig.from_hf_dict(hf)
  assert cfg.extra_hf["some_future_key"] == {"nested": [1, 2]}
  assert cfg.to_hf_dict() == hf
  path = tmp_path / "config.json"
  cfg.to_hf_file(path)
  again = PLTConfig.from_hf_file(path)
  assert again == cfg and json.loads(path.read_text()) == hf
  assert PLTConfig.from_hf_file(tmp_path) == cfg  # a directory works too
  hash(cfg)  # configs are Flax module attributes: must stay hashable


def test_model_type_follows_the_loop_count():
  """R >= 2: the publisher's names; R = 1 is a plain Llama. Never read back (a Llama upcycled to
  R = 2 must say it is a PLT)."""
  r2, r1 = (
      PLTConfig.tiny(loops=2).to_hf_dict(),
      PLTConfig.tiny(loops=1).to_hf_dict(),
  )
  assert (r2["model_type"], r2["architectures"]) == (
      "iquestpltcoder",
      ["IQuestPLTCoderForCausalLM"],
  )
  assert (r1["model_type"], r1["architectures"]) == (
      "llama",
      ["LlamaForCausalLM"],
  )
  old = {**r2, "model_type": "iquest_plt"}  # an earlier export's spelling
  assert PLTConfig.from_hf_dict(old).to_hf_dict() == r2
  assert PLTConfig.from_hf_dict(r1).replace(plt_num_loops=2).to_hf_dict() == r2


def test_llama_config_has_one_loop():
  hf = {
      k: v for k, v in PLTConfig.tiny().to_hf_dict().items() if "plt_" not in k
  }
  hf |= {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
  cfg = PLTConfig.from_hf_dict(hf)
  assert cfg.plt_num_loops == 1 and cfg.num_gate_params_per_layer() == 0


def test_hf_dict_without_head_dim_derives_it():
  hf = PLTConfig.tiny().to_hf_dict()
  del hf["head_dim"]
  cfg = PLTConfig.from_hf_dict(hf)
  assert (
      cfg.head_dim is None
      and cfg.head_size == hf["hidden_size"] // hf["num_attention_heads"]
  )
  # written back as null (what transformers' config reads as "derive it")
  assert cfg.to_hf_dict() == {**hf, "head_dim": None}


def test_transformers5_key_spellings_are_read():
  hf = PLTConfig.tiny().to_hf_dict()
  del hf["rope_theta"], hf["rope_scaling"], hf["torch_dtype"]
  hf["rope_parameters"] = {
      "rope_type": "linear",
      "factor": 2.0,
      "rope_theta": 1234.0,
  }
  hf["dtype"] = "bfloat16"
  cfg = PLTConfig.from_hf_dict(hf)
  assert cfg.rope_theta == 1234.0 and dict(cfg.rope_scaling) == {
      "rope_type": "linear",
      "factor": 2.0,
  }
  assert cfg.torch_dtype == "bfloat16" and "rope_parameters" not in cfg.extra_hf
  hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 99.0}
  assert PLTConfig.from_hf_dict(hf).rope_scaling is None


def test_runtime_fields_stay_out_of_hf_dict():
  cfg = PLTConfig.tiny().with_runtime(
      dtype="bfloat16", remat_policy="full", attention_impl="xla"
  )
  hf = cfg.to_hf_dict()
  for key in (
      "runtime",
      "dtype",
      "remat_policy",
      "attention_impl",
      "scan_layers",
      "extra_hf",
  ):
    assert key not in hf
  assert cfg.runtime == RuntimeConfig(
      dtype="bfloat16", remat_policy="full", attention_impl="xla"
  )


BAD_CONFIGS = [
    (dict(num_attention_heads=6, num_key_value_heads=4), "num_key_value_heads"),
    (dict(hidden_size=30, head_dim=None, num_attention_heads=4), "head_dim"),
    (dict(head_dim=7), "head_dim"),
    (dict(plt_window_size=(64, 2)), "plt_window_size"),
    (dict(plt_window_size=(-1, 0)), "plt_window_size"),
    (dict(plt_window_size=(64,)), "plt_window_size"),
    (dict(plt_num_loops=0), "plt_num_loops"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(hidden_size=-8), "hidden_size"),
    (dict(num_hidden_layers=1.5), "num_hidden_layers"),
    (dict(hidden_act="swish2"), "hidden_act"),
    (dict(torch_dtype="float8"), "torch_dtype"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps"),
    (dict(rope_theta=-1.0), "rope_theta"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(eos_token_id=999), "eos_token_id"),
    (dict(bos_token_id=-1), "bos_token_id"),
    (dict(dtype="fp8"), "runtime.dtype"),
    (dict(remat_policy="sometimes"), "runtime.remat_policy"),
    (dict(attention_impl="flash"), "runtime.attention_impl"),
    (dict(loss_chunk=-1), "runtime.loss_chunk"),
]


@pytest.mark.parametrize(
    "overrides,field", BAD_CONFIGS, ids=[f for _, f in BAD_CONFIGS]
)
def test_bad_config_names_the_field(overrides, field):
  with pytest.raises(ValueError, match=f"PLTConfig.{field}"):
    PLTConfig.tiny(**overrides)


def test_bad_config_file(tmp_path):
  with pytest.raises(ValueError, match="not found"):
    PLTConfig.from_hf_file(tmp_path / "missing.json")
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    PLTConfig.from_hf_file(bad)


def test_remat_policy_names_match_the_model():
  from loopcoder_jax.model import config, layers

  assert set(config.REMAT_POLICIES) == set(layers.REMAT_POLICIES)


def test_serial_looping_is_written_only_when_set(tmp_path):
  clp = PLTConfig.tiny(loops=2)
  assert "plt_cross_loop" not in clp.to_hf_dict()  # HF configs stay as released
  serial = clp.replace(plt_cross_loop=False)
  assert serial.to_hf_dict()["plt_cross_loop"] is False
  serial.to_hf_file(tmp_path / "config.json")
  assert PLTConfig.from_hf_file(tmp_path / "config.json") == serial
  with pytest.raises(ValueError, match="PLTConfig.plt_cross_loop"):
    PLTConfig.tiny(plt_cross_loop=1)
