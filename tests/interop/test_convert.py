"""HF safetensors <-> Orbax conversion: bit-exact round trip, aliases, dtypes, staged outputs, bad input."""

import io
import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from loopcoder_jax.data import tokenizer
from loopcoder_jax.interop import convert, hf_names
from loopcoder_jax.interop import safetensors_io as st
from loopcoder_jax.model.config import PLTConfig
from loopcoder_jax.train import checkpoint
from tests import helpers
from tests.helpers import ROOT, SCRIPTS

BF16 = np.dtype(ml_dtypes.bfloat16)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# ------------------------------------------------------------------------------------- helpers
def random_hf_tensors(cfg, dtype=BF16, seed=0):
  rng = np.random.default_rng(seed)
  return {
      s.key: (rng.standard_normal(s.hf_shape) * 0.5).astype(dtype)
      for s in hf_names.plan(cfg)
  }


def write_hf(path, cfg, tensors, shard_bytes=3000, extra_config=None):
  """An HF directory written with safetensors' own writer (independent of ours), sharded + index."""
  n_shards = helpers.write_safetensors_dir(path, tensors, shard_bytes)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({**cfg.to_hf_dict(), **(extra_config or {})}, f, indent=2)
  return n_shards


def read_hf(path):
  files = st.weight_files(path)
  out = {}
  for k, fname in files.items():
    with safe_open(fname, "numpy") as f:
      out[k] = f.get_tensor(k)
  return out


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
  cfg_hf, p_hf = convert.load_hf(trip["src"])
  cfg_o, p_o = checkpoint.load_params(trip["orbax"], param_dtype="bfloat16")
  assert cfg_hf.runtime.param_dtype == "bfloat16"
  assert cfg_o.to_hf_dict() == cfg_hf.to_hf_dict()
  assert checkpoint.stored_dtypes(trip["orbax"]) == {"bfloat16"}
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
  cfg, params = convert.load_hf(trip["src"], dtype="float32")
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
  _, params = convert.load_hf(_hf_dir(tmp_path / "hf", cfg, dtype=np.float32))
  params["norm"]["scale"] = params["norm"]["scale"].astype(BF16)
  convert.save_orbax(cfg, params, str(tmp_path / "o"))
  with pytest.raises(ValueError, match="mixed dtypes"):
    convert.load_orbax(str(tmp_path / "o"))
  _, p32 = convert.load_orbax(str(tmp_path / "o"), "float32")
  assert np.asarray(p32["norm"]["scale"]).dtype == np.float32
  convert.save_orbax(cfg, params, str(tmp_path / "o32"), dtype="float32")
  assert checkpoint.stored_dtypes(tmp_path / "o32") == {"float32"}
  assert (
      json.load(open(tmp_path / "o32" / "config.json"))["torch_dtype"]
      == "float32"
  )


# ------------------------------------------------------------------------------------- aliases, tied weights
def _hf_dir(path, cfg, rename=None, dtype=BF16, **kw):
  tensors = random_hf_tensors(cfg, dtype)
  for old, new in (rename or {}).items():
    tensors[new] = tensors.pop(old)
  write_hf(path, cfg, tensors, **kw)
  return str(path)


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
  _, want = convert.load_hf(_hf_dir(tmp_path / "canon", cfg))
  _, got = convert.load_hf(_hf_dir(tmp_path / "alias", cfg, rename))
  for k, v in hf_names.flatten(want).items():
    np.testing.assert_array_equal(hf_names.flatten(got)[k], v)
  shape = (cfg.num_hidden_layers,) + (
      (cfg.hidden_size, 4) if hidden else (4, cfg.head_size)
  )
  assert want["layers"]["self_attn"]["plt_gate"]["kernel"].shape == shape


def test_tied_embeddings_round_trip(tmp_path):
  cfg = PLTConfig.tiny(loops=2, tie_word_embeddings=True, torch_dtype="float16")
  src = _hf_dir(tmp_path / "hf", cfg, dtype=np.float16)
  cfg2, params = convert.load_hf(src)
  assert "lm_head" not in params
  convert.save_hf(cfg2, params, tmp_path / "out", shard_size=2048)
  back, orig = read_hf(tmp_path / "out"), read_hf(src)
  assert sorted(back) == sorted(orig) and all(
      back[k].tobytes() == orig[k].tobytes() for k in orig
  )


# ------------------------------------------------------------------------------------- bad input
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
    convert.load_hf(tmp_path / "hf")


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
    convert.load_hf(tmp_path / "hf")


def test_save_hf_checks_params(tmp_path):
  cfg = PLTConfig.tiny(loops=2)
  _, params = convert.load_hf(_hf_dir(tmp_path / "hf", cfg))
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
  real, calls = st.write_safetensors, []

  def fail_second_shard(fname, entries):
    calls.append(fname)
    if len(calls) == 2:
      raise OSError("disk full (simulated)")
    real(fname, entries)

  monkeypatch.setattr(st, "write_safetensors", fail_second_shard)
  dst = tmp_path / "dst"
  if existing:
    convert.convert_checkpoint(trip["orbax"], str(dst), "orbax")
    before = sorted(os.listdir(dst))
  with pytest.raises(OSError, match="simulated"):
    convert.convert_checkpoint(
        trip["orbax"], str(dst), "hf", shard_size=3000, overwrite=existing
    )
  assert len(calls) == 2
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
