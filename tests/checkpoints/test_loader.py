"""`interop.load`: every checkpoint format, placement on a mesh, tokenizer discovery, dtype and
loop-count rules."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopcoder_jax import interop
from loopcoder_jax.checkpoints import hf_names, params_io
from loopcoder_jax.data import corpus, tokenizer
from loopcoder_jax.interop import convert
from loopcoder_jax.model import sharding
from loopcoder_jax.model.config import PLTConfig
from loopcoder_jax.model.transformer import (
    PLTForCausalLM,
    abstract_params,
    init_params,
)


def _texts():
  return [t for _, t in corpus.stdlib_files("train")[:8]]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  """One tiny random R=2 model as a training workdir, a params dir and an HF dir, with tokenizers."""
  root = tmp_path_factory.mktemp("loader")
  tok = tokenizer.train_bpe(_texts(), 290, str(root / "work" / "tokenizer"))
  cfg = PLTConfig.tiny(loops=2, vocab_size=tok.vocab_size)
  params = init_params(cfg, jax.random.key(0))
  work = root / "work"
  params_io.save_params(str(work / "params"), cfg, params)  # no tokenizer
  os.makedirs(work / "checkpoints")
  shutil.copytree(work / "params", root / "params")
  tok.save(str(root / "params"))
  convert.save_hf(cfg, params, root / "hf", tokenizer_dir=work / "tokenizer")
  return dict(
      root=root,
      work=str(work),
      params_dir=str(root / "params"),
      hf=str(root / "hf"),
      cfg=cfg,
      params=params,
      tok=tok,
  )


def _assert_same_params(got, want, dtype=np.float32):
  got, want = hf_names.flatten(got), hf_names.flatten(want)
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    assert isinstance(got[k], jax.Array), k
    assert got[k].dtype == dtype, k
    np.testing.assert_array_equal(
        np.asarray(got[k]), np.asarray(jnp.asarray(v, dtype)), err_msg=k
    )


@pytest.mark.parametrize("fmt", ["work", "params_dir", "hf"])
def test_every_format_loads_the_same_model(ckpts, fmt):
  cfg, params, tok = interop.load(ckpts[fmt])
  assert cfg.to_hf_dict()["hidden_size"] == ckpts["cfg"].hidden_size
  assert cfg.plt_num_loops == 2 and cfg.runtime.param_dtype == "float32"
  _assert_same_params(params, ckpts["params"])
  assert tok.vocab_size == ckpts["tok"].vocab_size
  assert tok.encode("def f(x):") == ckpts["tok"].encode("def f(x):")


@pytest.mark.parametrize("fmt", ["params_dir", "hf"])
def test_params_go_onto_the_mesh_by_the_rules(ckpts, fmt):
  mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
  cfg, params, _ = interop.load(ckpts[fmt], mesh=mesh)
  want = hf_names.flatten(sharding.param_shardings(abstract_params(cfg), mesh))
  for path, x in hf_names.flatten(params).items():
    assert x.sharding == want[path], path
  _assert_same_params(params, ckpts["params"])
  # without a mesh: every param on the first device
  _, params, _ = interop.load(ckpts[fmt])
  assert {d for x in jax.tree.leaves(params) for d in x.devices()} == {
      jax.local_devices()[0]
  }


def test_not_a_checkpoint(ckpts, tmp_path):
  with pytest.raises(ValueError, match="is not a directory"):
    interop.load(tmp_path / "missing")
  with pytest.raises(
      ValueError,
      match=r"is not a checkpoint: expected a params directory \(config.json "
      r"\+ params/\), a finished training workdir .* or an HF directory",
  ):
    interop.load(tmp_path)
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(
      ValueError, match="training workdir without a final params/ export"
  ):
    interop.load(tmp_path)
  hf = tmp_path / "hf"
  shutil.copytree(ckpts["hf"], hf)
  for name in os.listdir(hf):
    if name.endswith(".safetensors") or name.endswith(".index.json"):
      os.remove(hf / name)
  with pytest.raises(ValueError, match="has no model.safetensors.index.json"):
    interop.load(hf)


# ------------------------------------------------------------------------------------- tokenizer
def test_explicit_tokenizer_wins(ckpts, tmp_path):
  small = tokenizer.train_bpe(_texts(), 270, str(tmp_path / "tok.json"))
  for path in (ckpts["work"], ckpts["hf"]):
    _, _, tok = interop.load(path, tokenizer=tmp_path / "tok.json")
    assert tok.vocab_size == small.vocab_size == 270


def test_missing_tokenizer_and_vocab_mismatch(ckpts, tmp_path):
  bare = tmp_path / "bare"
  shutil.copytree(ckpts["work"] + "/params", bare)
  with pytest.raises(ValueError, match="no tokenizer"):
    interop.load(bare)
  tokenizer.train_bpe(_texts(), 300, str(tmp_path / "big.json"))
  with pytest.raises(
      ValueError,
      match="tokenizer vocab size 300 .* larger than the model's vocab_size 290",
  ):
    interop.load(bare, tokenizer=tmp_path / "big.json")
  with pytest.raises(ValueError, match="tokenizer path .* does not exist"):
    interop.load(bare, tokenizer=tmp_path / "nope.json")


# ------------------------------------------------------------------------------------- dtype
@pytest.mark.parametrize("fmt", ["params_dir", "hf"])
def test_dtype_casts_params_and_compute(ckpts, fmt):
  cfg, params, _ = interop.load(ckpts[fmt], dtype="bfloat16")
  assert cfg.runtime.dtype == cfg.runtime.param_dtype == "bfloat16"
  _assert_same_params(params, ckpts["params"], jnp.bfloat16)
  tokens = jnp.arange(8, dtype=jnp.int32)[None]
  got = PLTForCausalLM(cfg).apply({"params": params}, tokens)
  f32 = PLTForCausalLM(cfg.with_runtime(dtype="float32")).apply(
      {"params": params}, tokens
  )
  # Same bf16 weights, bf16 activations: each op rounds (eps 2^-8) and the tiny model's logits
  # carry a few such relative errors, so they move, but by a few eps of their scale at most.
  err = float(jnp.max(jnp.abs(got - f32)))
  assert 0 < err <= 8 * 2**-8 * float(jnp.max(jnp.abs(f32)))


def test_stored_dtype_is_kept_and_bad_dtype_refused(ckpts):
  cfg, params, _ = interop.load(ckpts["params_dir"])
  assert cfg.runtime.param_dtype == "float32"
  assert cfg.runtime.dtype == ckpts["cfg"].runtime.dtype
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
  with pytest.raises(ValueError, match="unknown dtype 'int8'"):
    interop.load(ckpts["params_dir"], dtype="int8")


# ------------------------------------------------------------------------------------- loops
@pytest.mark.parametrize("loops", [1, 3])
def test_other_loop_counts_on_the_shared_weights(ckpts, loops):
  cfg, params, _ = interop.load(ckpts["hf"], loops=loops)
  assert cfg.plt_num_loops == loops
  logits = PLTForCausalLM(cfg).apply(
      {"params": params}, jnp.zeros((1, 4), jnp.int32)
  )
  assert logits.shape == (1, 4, cfg.vocab_size)
  assert bool(jnp.isfinite(logits).all())


@pytest.mark.parametrize("loops", [0, -2, 1.5, True])
def test_loops_below_one_refused(ckpts, loops):
  with pytest.raises(ValueError, match="loops must be an integer >= 1"):
    interop.load(ckpts["params_dir"], loops=loops)


def test_more_loops_need_a_gate(ckpts, tmp_path):
  # an R=1 config.json and a tokenizer, no weights: the rule is checked before any weight is read
  PLTConfig.tiny(loops=1, vocab_size=290).to_hf_file(tmp_path / "config.json")
  ckpts["tok"].save(str(tmp_path))
  with pytest.raises(
      ValueError,
      match=r"loops=2: the checkpoint has no PLT gate \(trained with 1 loop\)",
  ):
    interop.load(tmp_path, loops=2)


# ------------------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("per_loop", [False, True])
def test_a_lora_export_loads_as_base_plus_adapters(ckpts, tmp_path, per_loop):
  from loopcoder_jax.model import lora
  from loopcoder_jax.model.transformer import PLTForCausalLM
  from tests import helpers

  lcfg, base, adapters, _, ad_dir = helpers.lora_export(
      str(tmp_path), per_loop, vocab_size=ckpts["tok"].vocab_size
  )
  cfg, params, tok = interop.load(ad_dir, tokenizer=ckpts["params_dir"])
  assert tok.vocab_size == ckpts["tok"].vocab_size
  tokens = jnp.arange(10, dtype=jnp.int32)[None] % lcfg.vocab_size
  want = PLTForCausalLM(lcfg).apply(
      {"params": lora.combine(base, adapters)}, tokens
  )
  got = PLTForCausalLM(cfg).apply({"params": params}, tokens)
  if per_loop:  # applied as trained: the same program
    assert cfg.lora == lcfg.lora
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  else:  # merged into the base kernels: a plain model, a rounding per projection apart
    assert cfg.lora is None
    assert sorted(hf_names.flatten(params)) == sorted(hf_names.flatten(base))
    helpers.assert_close(
        got, want, ops=helpers.forward_ops(lcfg, 10), what="merged"
    )


def test_a_lora_export_without_its_base_is_refused(ckpts, tmp_path):
  from tests import helpers

  lcfg, base, _, base_dir, ad_dir = helpers.lora_export(
      str(tmp_path), vocab_size=ckpts["tok"].vocab_size
  )
  # another model under the base's path
  shutil.rmtree(base_dir)
  params_io.save_params(
      base_dir, lcfg.replace(lora=None), helpers.perturbed(base)
  )
  with pytest.raises(
      ValueError, match="is not the one they were trained on"
  ) as e:
    interop.load(ad_dir, tokenizer=ckpts["params_dir"])
  assert "\n" not in str(e.value)
  shutil.rmtree(base_dir)
  with pytest.raises(
      ValueError, match=f"base checkpoint {base_dir}, which is missing"
  ) as e:
    interop.load(ad_dir, tokenizer=ckpts["params_dir"])
  assert "\n" not in str(e.value)
