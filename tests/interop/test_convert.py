"""HF safetensors <-> Orbax conversion: bit-exact round trip, aliases, dtypes, staged outputs, bad input."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from loopcoder_jax.checkpoints import formats, hf_io, hf_names, params_io
from loopcoder_jax.checkpoints import safetensors_io as st
from loopcoder_jax.data import tokenizer
from loopcoder_jax.interop import convert
from loopcoder_jax.model.config import PLTConfig
from tests.helpers import (
    BF16,
    ROOT,
    SCRIPTS,
    hf_dir,
    random_hf_tensors,
    read_hf,
    subprocess_env,
    write_hf,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# ------------------------------------------------------------------------------------- helpers


def train_sentencepiece(path):
  import sentencepiece as spm

  words = [
      "def",
      "return",
      "import",
      "class",
      "self",
      "value",
      "print",
      "for",
      "in",
      "range",
      "if",
      "else",
      "lambda",
      "yield",
      "with",
      "open",
      "while",
      "True",
      "None",
      "list",
      "dict",
      "loop",
      "token",
  ]
  rng = np.random.default_rng(0)
  # a few KB
  lines = [
      " ".join(rng.choice(words, 8)) + f" {i} (x) = [y];" for i in range(300)
  ]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines),
      model_writer=model,
      vocab_size=90,
      model_type="bpe",
      unk_id=0,
      bos_id=1,
      eos_id=2,
      pad_id=-1,
      user_defined_symbols=["<|user|>", "<|assistant|>"],
      minloglevel=2,
  )
  files = {
      "tokenizer.model": model.getvalue(),
      "chat_template.jinja": CHAT_TEMPLATE.encode(),
      "tokenizer_config.json": json.dumps(
          {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
      ).encode(),
      "special_tokens_map.json": json.dumps(
          {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
      ).encode(),
      "generation_config.json": json.dumps(
          {"bos_token_id": 1, "eos_token_id": [2, 4]}
      ).encode(),
  }
  for name, data in files.items():
    with open(os.path.join(path, name), "wb") as f:
      f.write(data)
  return files


# ------------------------------------------------------------------------------------- round trip
CFG = PLTConfig.tiny(loops=2, torch_dtype="bfloat16")


@pytest.fixture(scope="module")
def trip(tmp_path_factory):
  """HF (bf16, 3-KB shards, tokenizer) -> Orbax (library) -> HF (the CLI, once) -> Orbax -> HF again."""
  base = tmp_path_factory.mktemp("trip")
  src, orbax, hf, orbax2, hf2 = (
      str(base / n) for n in ("src", "orbax", "hf", "orbax2", "hf2")
  )
  tensors = random_hf_tensors(CFG)
  n_shards = write_hf(
      src, CFG, tensors, extra_config={"transformers_version": "5.24.0"}
  )
  tok_files = train_sentencepiece(src)
  assert convert.convert_checkpoint(src, orbax, "orbax") == "hf"
  cli = subprocess.run(
      [
          sys.executable,
          os.path.join(SCRIPTS, "convert_checkpoint.py"),
          f"--src={orbax}",
          f"--dst={hf}",
          "--to=hf",
          "--shard_size=3000",
      ],
      capture_output=True,
      text=True,
      env={
          **os.environ,
          "PYTHONPATH": os.pathsep.join(
              [ROOT, os.environ.get("PYTHONPATH", "")]
          ),
      },
  )
  assert cli.returncode == 0, cli.stderr
  convert.convert_checkpoint(hf, orbax2, "orbax")
  convert.convert_checkpoint(orbax2, hf2, "hf", shard_size=3000)
  return dict(
      src=src,
      orbax=orbax,
      hf=hf,
      hf2=hf2,
      tensors=tensors,
      n_shards=n_shards,
      tok_files=tok_files,
  )


def test_round_trip_tensors_bit_identical_bf16(trip):
  back = read_hf(trip["hf"])
  assert sorted(back) == sorted(trip["tensors"])
  for k, v in trip["tensors"].items():
    assert back[k].dtype == BF16, k
    assert back[k].tobytes() == v.tobytes(), k
  assert trip["n_shards"] > 1
  assert os.path.isfile(os.path.join(trip["hf"], st.INDEX_FILE))


def test_round_trip_config_and_files(trip):
  with open(os.path.join(trip["src"], "config.json")) as f:
    src_cfg = json.load(f)
  with open(os.path.join(trip["hf"], "config.json")) as f:
    out_cfg = json.load(f)
  assert out_cfg == {**src_cfg, "auto_map": convert.AUTO_MAP}
  for name in convert.MODELING_FILES:
    assert os.path.isfile(os.path.join(trip["hf"], name))
  # Our own output converts to exactly the same bytes, file by file (shards, index, config, tokenizer).
  names = sorted(os.listdir(trip["hf"]))
  assert names == sorted(os.listdir(trip["hf2"]))
  for name in names:
    with (
        open(os.path.join(trip["hf"], name), "rb") as a,
        open(os.path.join(trip["hf2"], name), "rb") as b,
    ):
      assert a.read() == b.read(), name


def test_orbax_side_matches_load_hf(trip):
  cfg_hf, p_hf = hf_io.load_hf(trip["src"])
  cfg_o, p_o = params_io.load_params(trip["orbax"], param_dtype="bfloat16")
  assert cfg_hf.runtime.param_dtype == "bfloat16"
  assert cfg_o.to_hf_dict() == cfg_hf.to_hf_dict()
  assert params_io.stored_dtypes(trip["orbax"]) == {"bfloat16"}
  flat_hf, flat_o = hf_names.flatten(p_hf), hf_names.flatten(p_o)
  assert sorted(flat_hf) == sorted(flat_o)
  for k in flat_hf:
    assert np.asarray(flat_o[k]).dtype == BF16
    assert np.asarray(flat_o[k]).tobytes() == flat_hf[k].tobytes(), k
  # Our layouts: q_proj [L, d, H, D] holds HF [H*D, d] transposed.
  q = trip["tensors"]["model.layers.1.self_attn.q_proj.weight"]
  np.testing.assert_array_equal(
      flat_hf["layers/self_attn/q_proj/kernel"][1].reshape(CFG.hidden_size, -1),
      q.T,
  )


def test_tokenizer_files_copied_and_load(trip):
  for d in (trip["orbax"], trip["hf"]):
    for name, data in trip["tok_files"].items():
      with open(os.path.join(d, name), "rb") as f:
        assert f.read() == data, (d, name)
  import sentencepiece as spm

  tok = tokenizer.load_tokenizer(trip["hf"])
  sp = spm.SentencePieceProcessor(
      model_proto=trip["tok_files"]["tokenizer.model"]
  )
  text = "def loop(x) = [y]; return value"
  assert tok.encode(text) == sp.encode(text)
  assert tok.bos_id == 1 and set(tok.eos_ids) == {2, 4}
  chat = tok.apply_chat_template([{"role": "user", "content": "hi"}])
  assert chat == "<|user|>hi</s><|assistant|>"


def test_cli_reports_bad_input(tmp_path):
  (tmp_path / "src").mkdir()
  cli = subprocess.run(
      [
          sys.executable,
          os.path.join(SCRIPTS, "convert_checkpoint.py"),
          f"--src={tmp_path / 'src'}",
          f"--dst={tmp_path / 'out'}",
          "--to=hf",
      ],
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert (
      cli.returncode == 2
      and "is not a checkpoint" in cli.stderr.strip().splitlines()[-1]
  )
  assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------- dtypes
def test_dtype_flag_casts_explicitly(trip, tmp_path):
  cfg, params = hf_io.load_hf(trip["src"], dtype="float32")
  assert cfg.torch_dtype == "float32" and cfg.runtime.param_dtype == "float32"
  emb = params["embed_tokens"]["embedding"]
  assert emb.dtype == np.float32
  np.testing.assert_array_equal(
      emb, trip["tensors"]["model.embed_tokens.weight"].astype(np.float32)
  )
  convert.save_hf(
      cfg, params, tmp_path / "bf", dtype="bfloat16", shard_size="1MB"
  )
  back = read_hf(tmp_path / "bf")
  # f32 of bf16 -> same bf16
  assert all(
      back[k].tobytes() == v.tobytes() for k, v in trip["tensors"].items()
  )
  assert (
      json.load(open(tmp_path / "bf" / "config.json"))["torch_dtype"]
      == "bfloat16"
  )
  # fits one shard: no index
  assert os.path.isfile(tmp_path / "bf" / st.SINGLE_FILE)


def test_mixed_orbax_dtypes_need_a_flag(tmp_path):
  cfg = PLTConfig.tiny(loops=1)
  _, params = hf_io.load_hf(hf_dir(tmp_path / "hf", cfg, dtype=np.float32))
  params["norm"]["scale"] = params["norm"]["scale"].astype(BF16)
  formats.save_orbax(cfg, params, str(tmp_path / "o"))
  with pytest.raises(ValueError, match="mixed dtypes"):
    formats.load_orbax(str(tmp_path / "o"))
  _, p32 = formats.load_orbax(str(tmp_path / "o"), "float32")
  assert np.asarray(p32["norm"]["scale"]).dtype == np.float32
  formats.save_orbax(cfg, params, str(tmp_path / "o32"), dtype="float32")
  assert params_io.stored_dtypes(tmp_path / "o32") == {"float32"}
  assert (
      json.load(open(tmp_path / "o32" / "config.json"))["torch_dtype"]
      == "float32"
  )


# ------------------------------------------------------------------------------------- aliases, tied weights


def test_tied_embeddings_round_trip(tmp_path):
  cfg = PLTConfig.tiny(loops=2, tie_word_embeddings=True, torch_dtype="float16")
  src = hf_dir(tmp_path / "hf", cfg, dtype=np.float16)
  cfg2, params = hf_io.load_hf(src)
  assert "lm_head" not in params
  convert.save_hf(cfg2, params, tmp_path / "out", shard_size=2048)
  back, orig = read_hf(tmp_path / "out"), read_hf(src)
  assert sorted(back) == sorted(orig) and all(
      back[k].tobytes() == orig[k].tobytes() for k in orig
  )


# ------------------------------------------------------------------------------------- bad input


def test_save_hf_checks_params(tmp_path):
  cfg = PLTConfig.tiny(loops=2)
  _, params = hf_io.load_hf(hf_dir(tmp_path / "hf", cfg))
  params["norm"]["scale"] = np.zeros(7, BF16)
  with pytest.raises(
      ValueError,
      match=r"params norm/scale: shape \(7,\) does not match the config's \(32,\)",
  ):
    convert.save_hf(cfg, params, tmp_path / "out")
  del params["norm"]
  with pytest.raises(ValueError, match="params are missing norm/scale"):
    convert.save_hf(cfg, params, tmp_path / "out")
  assert not os.path.exists(tmp_path / "out")


def test_serial_looping_has_no_hf_export(tmp_path):
  """The HF modeling files run CLP only: a model without it is refused before anything is written."""
  cfg = PLTConfig.tiny(loops=2)
  _, params = hf_io.load_hf(hf_dir(tmp_path / "hf", cfg))
  serial = cfg.replace(plt_cross_loop=False)
  with pytest.raises(ValueError, match="plt_cross_loop=False.*no HF export"):
    convert.save_hf(serial, params, tmp_path / "out")
  params_io.save_params(tmp_path / "orbax", serial, params)
  with pytest.raises(ValueError, match="plt_cross_loop=False.*no HF export"):
    convert.convert_checkpoint(
        str(tmp_path / "orbax"), str(tmp_path / "out"), "hf"
    )
  assert not os.path.exists(tmp_path / "out")
  # our own params directory keeps the option
  assert not params_io.read_config(str(tmp_path / "orbax")).plt_cross_loop


def test_nonempty_destination_needs_overwrite(trip, tmp_path):
  dst = tmp_path / "dst"
  dst.mkdir()
  (dst / "keep.txt").write_text("x")
  with pytest.raises(ValueError, match="is not empty; pass overwrite"):
    convert.convert_checkpoint(trip["src"], str(dst), "hf")
  # --overwrite replaces a checkpoint only, never any directory it is given
  with pytest.raises(ValueError, match="holds keep.txt, not a checkpoint"):
    convert.convert_checkpoint(trip["src"], str(dst), "hf", overwrite=True)
  assert os.listdir(dst) == ["keep.txt"]
  convert.convert_checkpoint(trip["src"], str(tmp_path / "ckpt"), "orbax")
  convert.convert_checkpoint(
      trip["src"],
      str(tmp_path / "ckpt"),
      "hf",
      overwrite=True,
      shard_size="1MB",
  )
  assert "params" not in os.listdir(tmp_path / "ckpt") and os.path.isfile(
      tmp_path / "ckpt" / st.SINGLE_FILE
  )
  (tmp_path / "empty").mkdir()  # an empty directory is fine
  convert.convert_checkpoint(trip["src"], str(tmp_path / "empty"), "hf")


@pytest.mark.parametrize("existing", [False, True])
def test_failed_conversion_leaves_nothing(
    trip, tmp_path, monkeypatch, existing
):
  real, calls = st.SafetensorsFile.write, []

  def fail_midway(self, key, x):
    calls.append(key)
    if len(calls) == 5:
      raise OSError("disk full (simulated)")
    real(self, key, x)

  monkeypatch.setattr(st.SafetensorsFile, "write", fail_midway)
  dst = tmp_path / "dst"
  if existing:
    convert.convert_checkpoint(trip["orbax"], str(dst), "orbax")
    before = sorted(os.listdir(dst))
  with pytest.raises(OSError, match="simulated"):
    convert.convert_checkpoint(
        trip["orbax"], str(dst), "hf", shard_size=3000, overwrite=existing
    )
  assert len(calls) == 5
  # no temp sibling left
  assert sorted(os.listdir(tmp_path)) == (["dst"] if existing else [])
  if existing:
    assert sorted(os.listdir(dst)) == before


def test_bad_arguments(trip, tmp_path):
  with pytest.raises(ValueError, match="shard size 'lots'"):
    convert.convert_checkpoint(
        trip["src"], str(tmp_path / "o"), "hf", shard_size="lots"
    )
  with pytest.raises(ValueError, match="unknown dtype 'int8'"):
    convert.convert_checkpoint(
        trip["src"], str(tmp_path / "o"), "hf", dtype="int8"
    )
  with pytest.raises(ValueError, match="--to must be"):
    convert.convert_checkpoint(trip["src"], str(tmp_path / "o"), "pt")
  with pytest.raises(ValueError, match="must not contain each other"):
    convert.convert_checkpoint(
        trip["src"], os.path.join(trip["src"], "sub"), "orbax"
    )
  assert not os.path.exists(tmp_path / "o")


# ------------------------------------------------------------------------------------- serving
def publisher_vllm_params(cfg):
  """name -> shape of the decoder parameters the publisher's vLLM model builds for a PLT config.

  Restated from its source: it takes the head dimension as hidden_size / num_attention_heads, fuses
  q/k/v_proj into `qkv_proj` and gate/up_proj into `gate_up_proj`, and builds one gate per layer
  under `gate_projections.{i}`: a `gate_proj` linear with bias, [H, d] reading a `gate_norm`-ed
  hidden state (hidden mode) or [H, d / H] reading each head's query (query mode).
  """
  d, h, kv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
  hd, inter = d // h, cfg.intermediate_size
  out = {"embed_tokens.weight": (cfg.vocab_size, d), "norm.weight": (d,)}
  for i in range(cfg.num_hidden_layers):
    lay, gate = f"layers.{i}.", f"gate_projections.{i}."
    out |= {
        lay + "self_attn.qkv_proj.weight": ((h + 2 * kv) * hd, d),
        lay + "self_attn.o_proj.weight": (d, h * hd),
        lay + "mlp.gate_up_proj.weight": (2 * inter, d),
        lay + "mlp.down_proj.weight": (d, inter),
        lay + "input_layernorm.weight": (d,),
        lay + "post_attention_layernorm.weight": (d,),
        gate
        + "gate_proj.weight": (h, d if cfg.plt_gate_use_hidden_states else hd),
        gate + "gate_proj.bias": (h,),
    }
    if cfg.plt_gate_use_hidden_states:
      out[gate + "gate_norm.weight"] = (d,)
  return out


def publisher_vllm_name(name):
  """Where the publisher's vLLM loader puts a checkpoint tensor (its `model.` prefix removed), as
  (param, rows it fills), or None when it skips the tensor. Restated from its `load_weights`.
  """
  if "rotary_emb.inv_freq" in name:
    return None
  fused = [
      ("qkv_proj", "q_proj"),
      ("qkv_proj", "k_proj"),
      ("qkv_proj", "v_proj"),
      ("gate_up_proj", "gate_proj"),
      ("gate_up_proj", "up_proj"),
  ]
  for param, part in fused:
    if "gate_projections" in name or part not in name or "loop" in name:
      continue
    return name.replace(part, param), part
  if name.startswith("gate_projections."):
    base, leaf = name.rsplit(".", 1)
    return f"{base}.gate_proj.{leaf}", None
  if "loop_gate_proj" in name or "plt_gate" in name:
    parts = name.split(".")
    if "gate_norm" in name:
      return f"gate_projections.{parts[1]}.{'.'.join(parts[4:])}", None
    return f"gate_projections.{parts[1]}.gate_proj.{parts[4]}", None
  return name, None


@pytest.mark.parametrize(
    "hidden, tied", [(True, False), (False, True)], ids=["hidden", "query-tied"]
)
def test_export_satisfies_the_publishers_vllm_loader(tmp_path, hidden, tied):
  """What the publisher's vLLM fork reads from an R >= 2 export: the registered architecture name,
  the plt_* keys with the meanings it gives them, and tensors that fill each of its parameters.
  """
  cfg = PLTConfig.tiny(
      loops=2, plt_gate_use_hidden_states=hidden, tie_word_embeddings=tied
  )
  _, params = hf_io.load_hf(hf_dir(tmp_path / "src", cfg))
  convert.save_hf(cfg, params, tmp_path / "hf")
  config = json.load(open(tmp_path / "hf" / "config.json"))
  # its registry serves these names with its PLT model
  assert config["architectures"] == ["IQuestPLTCoderForCausalLM"]
  assert config["model_type"] == "iquestpltcoder"
  # it reads left from plt_window_size = [left, 0] and attends to left + 1 keys; missing keys would
  # default to values that are not ours (0 loops, no normalisation, query mode)
  assert config["plt_window_size"] == [cfg.window_left, 0]
  for key in (
      "plt_num_loops",
      "plt_normalize_per_loop",
      "plt_gate_use_hidden_states",
      "plt_emb_scale",
      "plt_hidden_scale",
  ):
    assert config[key] == getattr(cfg, key), key
  assert cfg.hidden_size // cfg.num_attention_heads == cfg.head_size
  want = publisher_vllm_params(cfg)
  filled: dict[str, list] = {}
  tensors = read_hf(tmp_path / "hf")
  for key, w in tensors.items():
    if key == "lm_head.weight":
      assert not tied and w.shape == (cfg.vocab_size, cfg.hidden_size)
      continue
    assert key.startswith("model."), key
    param, part = publisher_vllm_name(key[len("model.") :])
    assert param in want, key  # anything else is a KeyError in its loader
    filled.setdefault(param, []).append((part, w.shape))
  # its loader refuses a checkpoint that leaves a parameter unset
  assert sorted(filled) == sorted(want)
  for param, parts in filled.items():
    rows = sum(shape[0] for _, shape in parts)
    assert (rows,) + parts[0][1][1:] == want[param], param


# ----------------------------------------------------------------------------- other exporters


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  """A tiny random LlamaForCausalLM saved by transformers (no plt_* keys), and its logits."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  path = tmp_path_factory.mktemp("llama") / "hf"
  config = transformers.LlamaConfig(
      vocab_size=128,
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      max_position_embeddings=64,
      rope_theta=10000.0,
  )
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for (
        p
    ) in (
        model.parameters()
    ):  # well away from the 0.02 init: logits of unit scale
      p.normal_(0.0, 0.3)
  model.save_pretrained(path)
  tokens = np.random.default_rng(0).integers(0, 128, (2, 12))
  with torch.no_grad():
    logits = model(torch.tensor(tokens)).logits.numpy()
  return str(path), tokens, logits


def test_llama_checkpoint_loads_as_one_loop(llama):
  import jax.numpy as jnp

  from loopcoder_jax.model.transformer import PLTForCausalLM

  path, tokens, want = llama
  assert "plt_num_loops" not in json.load(
      open(os.path.join(path, "config.json"))
  )
  cfg, params = hf_io.load_hf(path)
  assert (
      cfg.plt_num_loops == 1 and "plt_gate" not in params["layers"]["self_attn"]
  )
  got = np.asarray(
      PLTForCausalLM(cfg).apply({"params": params}, jnp.asarray(tokens))
  )
  # float32 sums of d = 32 and I = 64 terms in another order: a few ulps of the logits' scale
  assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_one_loop_exports_are_llama_directories(llama, tmp_path):
  path, _, _ = llama
  convert.convert_checkpoint(path, str(tmp_path / "o"), "orbax")
  convert.convert_checkpoint(str(tmp_path / "o"), str(tmp_path / "hf"), "hf")
  config = json.load(open(tmp_path / "hf" / "config.json"))
  assert config["model_type"] == "llama"
  assert config["architectures"] == ["LlamaForCausalLM"]
  assert "auto_map" not in config
  assert not any((tmp_path / "hf" / f).exists() for f in convert.MODELING_FILES)
  src, out = read_hf(path), read_hf(tmp_path / "hf")
  assert sorted(src) == sorted(out)
  assert all(src[k].tobytes() == out[k].tobytes() for k in src)


def test_orbax_to_hf_streams_each_param_once(trip, tmp_path, monkeypatch):
  """Orbax -> HF restores the params one at a time, never the tree."""
  restored = []
  real = params_io.iter_params

  def spy(path):
    for p, x in real(path):
      restored.append(p)
      yield p, x

  monkeypatch.setattr(params_io, "iter_params", spy)
  monkeypatch.setattr(
      formats, "load_orbax", None
  )  # the whole-tree path is not taken
  convert.convert_checkpoint(trip["orbax"], str(tmp_path / "hf"), "hf")
  assert sorted(restored) == sorted(hf_names.param_shapes(CFG))
  back = read_hf(tmp_path / "hf")
  assert all(
      back[k].tobytes() == v.tobytes() for k, v in trip["tensors"].items()
  )


# ------------------------------------------------------------------------------------- LoRA
def _lora_logits(lcfg, base, adapters, tokens):
  import jax

  from loopcoder_jax.model import lora
  from loopcoder_jax.model.transformer import PLTForCausalLM

  return np.asarray(
      jax.jit(lambda p, t: PLTForCausalLM(lcfg).apply({"params": p}, t))(
          lora.combine(base, adapters), tokens
      )
  )


def _torch_logits(model, tokens):
  import torch

  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def test_lora_exports_merged_hf_and_peft_adapters(tmp_path):
  torch = pytest.importorskip("torch")  # the interop extra: Python < 3.12 here
  import transformers

  from loopcoder_jax.interop import peft
  from tests import helpers

  lcfg, base, adapters, base_dir, ad_dir = helpers.lora_export(str(tmp_path))
  tokens = np.random.default_rng(0).integers(0, lcfg.vocab_size, (2, 10))
  want = _lora_logits(lcfg, base, adapters, tokens)
  ops = helpers.forward_ops(lcfg, 10)
  # --to=hf: the merged model, in transformers
  assert (
      convert.convert_checkpoint(ad_dir, str(tmp_path / "hf"), "hf") == "lora"
  )
  merged = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path / "hf"), trust_remote_code=True
  )
  helpers.assert_close(
      _torch_logits(merged, tokens), want, ops=ops, what="merged hf"
  )
  # --to=peft: adapters named after the modules of the base's HF export
  convert.convert_checkpoint(base_dir, str(tmp_path / "base_hf"), "hf")
  convert.convert_checkpoint(ad_dir, str(tmp_path / "peft"), "peft")
  with open(tmp_path / "peft" / peft.CONFIG_FILE) as f:
    config = json.load(f)
  assert config["peft_type"] == "LORA" and config["r"] == lcfg.lora.rank
  assert config["lora_alpha"] == lcfg.lora.alpha
  assert config["base_model_name_or_path"] == base_dir
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path / "base_hf"), trust_remote_code=True
  )
  modules = dict(model.named_modules())
  assert set(config["target_modules"]) == {
      "q_proj",
      "k_proj",
      "v_proj",
      "o_proj",
      "gate_proj",
      "up_proj",
      "down_proj",
  }
  from safetensors.numpy import load_file

  tensors = load_file(str(tmp_path / "peft" / peft.WEIGHTS_FILE))
  assert len(tensors) == 2 * 7 * lcfg.num_hidden_layers
  # what PEFT does: W += (alpha / r) * B @ A on each named module
  scale = config["lora_alpha"] / config["r"]
  for key in tensors:
    if not key.endswith(".lora_A.weight"):
      continue
    name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
    assert name in modules and name.split(".")[-1] in config["target_modules"]
    a, b = tensors[key], tensors[key.replace("lora_A", "lora_B")]
    weight = modules[name].weight
    assert a.shape == (config["r"], weight.shape[1])
    assert b.shape == (weight.shape[0], config["r"])
    with torch.no_grad():
      weight += torch.tensor(scale * (b @ a))
  helpers.assert_close(
      _torch_logits(model, tokens), want, ops=ops, what="peft applied"
  )


def test_lora_exports_refuse_per_loop_adapters_and_plain_models(tmp_path):
  from tests import helpers

  *_, base_dir, ad_dir = helpers.lora_export(str(tmp_path), per_loop=True)
  for to in ("hf", "peft"):
    with pytest.raises(
        ValueError, match="per-loop LoRA adapters, which have no"
    ) as e:
      convert.convert_checkpoint(ad_dir, str(tmp_path / to), to)
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / to)
  with pytest.raises(
      ValueError, match="--to=peft writes a LoRA run's adapters"
  ):
    convert.convert_checkpoint(base_dir, str(tmp_path / "p"), "peft")
  out = subprocess.run(
      [
          sys.executable,
          os.path.join(SCRIPTS, "convert_checkpoint.py"),
          f"--src={ad_dir}",
          f"--dst={tmp_path / 'cli'}",
          "--to=peft",
      ],
      capture_output=True,
      text=True,
      cwd=ROOT,
      env=subprocess_env(),
  )
  assert out.returncode == 2, out.stderr
  lines = out.stderr.strip().splitlines()
  assert (
      len(lines) == 1
      and lines[0].startswith("error:")
      and "per-loop" in lines[0]
  )
