"""The exported PyTorch model (hf_modeling/, loaded through auto_map) against our JAX model, and its
PLT cache against the uncached forward. R = 1 exports are plain Llama directories (transformers'
LlamaForCausalLM loads them); the cache tests run our modeling file at R = 1 too.
"""

import copy
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopcoder_jax.checkpoints import hf_io, hf_names
from loopcoder_jax.inference import decode
from loopcoder_jax.inference.sampling import Greedy, StopRule
from loopcoder_jax.interop import convert
from loopcoder_jax.model.config import PLTConfig
from loopcoder_jax.model.transformer import (
    PLTForCausalLM,
    abstract_params,
    rope_tables,
)
from tests import helpers

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

B, S = 2, 16  # S > window + 1, so the local branch's boundary matters
CONFIGS = {
    "R1": dict(loops=1),
    "R2-hidden": dict(loops=2),
    "R2-query-tied": dict(
        loops=2, plt_gate_use_hidden_states=False, tie_word_embeddings=True
    ),
    "R3-hidden-scaled": dict(
        loops=3,
        plt_emb_scale=0.5,
        plt_hidden_scale=2.0,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    ),
    "R3-query-unnormalized": dict(
        loops=3,
        plt_gate_use_hidden_states=False,
        plt_normalize_per_loop=False,
        plt_hidden_scale=0.3,
    ),
    "R4-hidden": dict(loops=4, plt_window_size=(2, 0)),
    # no original_max_position_embeddings: HF's convention takes
    # max_position_embeddings, which here puts the head's frequencies in all
    # three llama3 bands (kept, smoothed, divided)
    "R2-llama3": dict(
        loops=2,
        max_position_embeddings=1024,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
        },
    ),
}


def random_params(cfg, seed=0):
  """Every param random (gates included, norms around 1), so no term can hide behind a zero init."""
  rng = np.random.default_rng(seed)
  flat = {}
  for path, a in hf_names.flatten(abstract_params(cfg)).items():
    noise = rng.standard_normal(a.shape).astype(np.float32)
    flat[path] = 1 + 0.2 * noise if path.endswith("scale") else 0.3 * noise
  flat[
      "embed_tokens/embedding"
  ] *= 3  # well separated logits: greedy ties cannot flip
  return hf_names.unflatten(flat)


@pytest.fixture(scope="module")
def build(tmp_path_factory):
  """name -> (cfg, jitted JAX forward on [B, S], the exported PyTorch model), built once per module."""
  cache = {}

  def get(name):
    if name not in cache:
      cfg = PLTConfig.tiny(**CONFIGS[name])
      params = random_params(cfg)
      path = str(tmp_path_factory.mktemp(name) / "hf")
      convert.save_hf(cfg, params, path, shard_size="16KB")
      model, info = transformers.AutoModelForCausalLM.from_pretrained(
          path, trust_remote_code=True, output_loading_info=True
      )
      assert not (
          info["missing_keys"]
          or info["unexpected_keys"]
          or info["mismatched_keys"]
      ), info
      assert model.dtype == torch.float32
      # the JAX side runs what load_hf reads from the same files
      cfg2, params2 = hf_io.load_hf(path)
      for k, v in hf_names.flatten(params).items():
        np.testing.assert_array_equal(hf_names.flatten(params2)[k], v)
      forward = jax.jit(
          lambda t: PLTForCausalLM(cfg2).apply({"params": params2}, t)
      )
      cache[name] = cfg2, forward, model.eval()
    return cache[name]

  return get


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_jax(build, name):
  cfg, forward, model = build(name)
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (B, S))
  ours = np.asarray(forward(jnp.asarray(tokens)))
  with torch.no_grad():
    theirs = model(torch.tensor(tokens)).logits.numpy()
  assert theirs.shape == ours.shape == (B, S, cfg.vocab_size)
  helpers.assert_close(theirs, ours, ops=helpers.forward_ops(cfg, S), what=name)


def greedy_jax(forward, prompt, new_tokens, eos_ids):
  """Greedy decoding over the full forward: one jitted [B, S] shape, causal so right padding is inert."""
  seq = list(prompt)
  while len(seq) < len(prompt) + new_tokens:
    buf = np.zeros((B, S), np.int32)
    buf[0, : len(seq)] = seq
    nxt = int(np.argmax(np.asarray(forward(jnp.asarray(buf)))[0, len(seq) - 1]))
    seq.append(nxt)
    if nxt in eos_ids:
      break
  return seq


@pytest.mark.parametrize("name", ["R2-hidden", "R3-query-unnormalized"])
def test_greedy_generate_matches_jax(build, name):
  cfg, forward, model = build(name)
  rng = np.random.default_rng(2)
  for _ in range(2):
    prompt = rng.integers(3, cfg.vocab_size, 6).tolist()
    ours = greedy_jax(forward, prompt, S - len(prompt), cfg.eos_ids)
    with torch.no_grad():
      theirs = model.generate(
          torch.tensor([prompt]),
          max_new_tokens=S - len(prompt),
          do_sample=False,
      )
    assert theirs[0].tolist() == ours, name


def test_kv_cached_decoder_matches_hf_generate(build):
  """Our KV-cached, loop-batched decoder (loopcoder_jax.inference) against transformers' greedy generate."""

  cfg, _, model = build("R2-hidden")
  params = hf_io.load_hf(model.name_or_path)[1]
  prompts = np.random.default_rng(4).integers(3, cfg.vocab_size, (B, 5))
  new = S - prompts.shape[1]

  @jax.jit
  def run(tokens):
    logits, cache = decode.prefill(
        cfg, params, tokens, jnp.full((B,), tokens.shape[1]), S
    )
    return decode.generate(
        cfg,
        params,
        cache,
        logits,
        jax.random.key(0),
        Greedy(),
        StopRule(new, cfg.eos_ids),
    )[:2]

  ids, counts = run(jnp.asarray(prompts))
  for row in range(B):
    with torch.no_grad():
      theirs = model.generate(
          torch.tensor(prompts[row : row + 1]),
          max_new_tokens=new,
          do_sample=False,
      )
    assert (
        theirs[0, prompts.shape[1] :].tolist()
        == np.asarray(ids)[row, : int(counts[row])].tolist()
    )


def test_left_padding_is_a_segment_boundary(build):
  cfg, _, model = build("R3-hidden-scaled")
  tokens = torch.tensor(
      np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 9))
  )
  padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), tokens], dim=1)
  mask = torch.cat(
      [torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)],
      dim=1,
  )
  with torch.no_grad():
    plain = model(tokens).logits
    pad = model(padded, attention_mask=mask).logits[:, 3:]
  helpers.assert_close(
      pad, plain, ops=helpers.forward_ops(cfg, padded.shape[1])
  )


def test_llama3_rope_follows_transformers(build):
  """llama3 RoPE without original_max_position_embeddings: JAX and the exported
  file take max_position_embeddings, as transformers' Llama does; inv_freq
  equals transformers' own.
  """
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  cfg, _, model = build("R2-llama3")
  assert "original_max_position_embeddings" not in cfg.rope_scaling
  llama = transformers.LlamaConfig(
      hidden_size=cfg.hidden_size,
      num_attention_heads=cfg.num_attention_heads,
      head_dim=cfg.head_size,
      max_position_embeddings=cfg.max_position_embeddings,
      rope_theta=cfg.rope_theta,
      rope_scaling=dict(cfg.rope_scaling),
  )
  want = ROPE_INIT_FUNCTIONS["llama3"](llama, "cpu")[0].double().numpy()
  # the three bands (wavelengths 2 pi 10^(2i/D) against 1024/4 and 1024): kept,
  # kept, smoothed, divided by the factor
  d = cfg.head_size
  ratio = np.round(want * cfg.rope_theta ** (np.arange(0, d, 2) / d), 6)
  assert ratio[[0, 1, 3]].tolist() == [1, 1, 1 / 8] and 1 / 8 < ratio[2] < 1
  # the exported file, on a config whose rope_parameters lack the key
  # (transformers fills it in on load, so the fallback shows only without it)
  bare = copy.deepcopy(model.config)
  del bare.rope_parameters["original_max_position_embeddings"]
  modeling = sys.modules[type(model).__module__]
  ops = 8  # theta ** x, 1 / ., the band scaling; position 1 and atan2 below
  helpers.assert_close(
      modeling._inv_freq(bare, "cpu"), want, ops=ops, what="torch"
  )
  # JAX: at position 1 the angle is inv_freq
  cos, sin = rope_tables(cfg, jnp.ones((1, 1), jnp.int32))
  angle = np.arctan2(np.asarray(sin, np.float64), np.asarray(cos, np.float64))
  helpers.assert_close(
      angle[0, 0, : cfg.head_size // 2], want, ops=ops, what="jax"
  )


def test_exported_directory_is_self_contained(build):
  _, _, model = build("R2-hidden")
  src = os.path.dirname(convert.__file__)
  for f in convert.MODELING_FILES:
    text = open(os.path.join(src, "hf_modeling", f)).read()
    # imports only torch/transformers
    assert "loopcoder_jax" not in text.replace("loopcoder-jax", "")
    assert os.path.isfile(os.path.join(model.name_or_path, f))
  assert type(model).__name__ == "IQuestPLTCoderForCausalLM"
  assert model.config.model_type == "iquestpltcoder"
  assert model.config.architectures == ["IQuestPLTCoderForCausalLM"]
  _, _, llama = build("R1")  # R = 1: a plain Llama, no remote code
  assert type(llama) is transformers.LlamaForCausalLM
  assert llama.config.model_type == "llama"
  assert not any(
      os.path.exists(os.path.join(llama.name_or_path, f))
      for f in convert.MODELING_FILES
  )


def test_bf16_export_loads_in_bf16(tmp_path):
  cfg = PLTConfig.tiny(loops=2)
  convert.save_hf(cfg, random_params(cfg), tmp_path / "hf", dtype="bfloat16")
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path / "hf"), trust_remote_code=True
  )
  # config.json says bfloat16: no silent upcast on load
  assert model.dtype == torch.bfloat16
  with torch.no_grad():
    out = model.generate(
        torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False
    )
  # three new tokens (none of them EOS for these weights) after the prompt
  assert out.shape == (1, 6) and out[0, :3].tolist() == [5, 6, 7]


def test_torch_save_pretrained_converts_back(build, tmp_path):
  """PyTorch -> JAX: a transformers-5 `save_pretrained` directory (rope_parameters, dtype) loads back."""
  cfg, _, model = build("R3-hidden-scaled")
  model.save_pretrained(tmp_path / "pt")
  cfg2, params = hf_io.load_hf(tmp_path / "pt")
  assert cfg2.to_hf_dict() == {
      **cfg.to_hf_dict(),
      "transformers_version": transformers.__version__,
      "initializer_range": 0.02,
  }
  state = model.state_dict()
  q = params["layers"]["self_attn"]["q_proj"]["kernel"][1]  # [d, H, D]
  want = state["model.layers.1.self_attn.q_proj.weight"].numpy()
  np.testing.assert_array_equal(q.reshape(cfg.hidden_size, -1).T, want)


# ----------------------------------------------------------------------------- the PLT cache
def plt_model(build, name):
  """(cfg, the export of `name` run by our modeling file): R = 1 exports load as Llama otherwise."""
  cfg, _, model = build(name)
  if cfg.plt_num_loops == 1:
    from loopcoder_jax.interop.hf_modeling import modeling_loopcoder

    model = modeling_loopcoder.IQuestPLTCoderForCausalLM.from_pretrained(
        model.name_or_path
    ).eval()
  return cfg, model


def padded_prompts(cfg, lengths=(7, 3, 5), seed=5):
  """Left-padded prompts (pad 0) and their attention mask."""
  rng = np.random.default_rng(seed)
  width = max(lengths)
  ids = np.zeros((len(lengths), width), np.int64)
  mask = np.zeros_like(ids)
  for row, n in enumerate(lengths):
    ids[row, width - n :] = rng.integers(3, cfg.vocab_size, n)
    mask[row, width - n :] = 1
  return torch.tensor(ids), torch.tensor(mask)


@pytest.mark.parametrize(
    "name", ["R1", "R2-query-tied", "R3-hidden-scaled", "R4-hidden"]
)
def test_cached_generate_equals_uncached(build, name):
  """Prompts longer than the window, so every ring wraps; whole and chunked prefill (which needs
  the cache passed in)."""
  cfg, model = plt_model(build, name)
  ids, mask = padded_prompts(cfg)
  kw = dict(
      attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0
  )
  fresh = sys.modules[type(model).__module__].PLTCache(model.config)
  with torch.no_grad():
    plain = model.generate(ids, use_cache=False, **kw)
    cached = model.generate(ids, use_cache=True, **kw)
    chunked = model.generate(ids, cache=fresh, prefill_chunk_size=3, **kw)
  assert plain.shape[1] > ids.shape[1] + cfg.window_left + 1
  assert cached.tolist() == plain.tolist(), name
  assert chunked.tolist() == plain.tolist(), name


def test_cached_beam_search_equals_uncached(build):
  cfg, model = plt_model(build, "R3-hidden-scaled")
  ids, mask = padded_prompts(cfg, (6, 4))
  kw = dict(
      attention_mask=mask,
      max_new_tokens=8,
      num_beams=3,
      do_sample=False,
      pad_token_id=0,
  )
  with torch.no_grad():
    plain = model.generate(ids, use_cache=False, **kw)
    cached = model.generate(ids, use_cache=True, **kw)
  assert cached.tolist() == plain.tolist()


@pytest.mark.parametrize("name", ["R1", "R3-query-unnormalized"])
def test_cached_logits_match_the_full_forward(build, name):
  """Prefill 5 columns, then one column at a time: every column's logits as in one full forward."""
  cfg, model = plt_model(build, name)
  ids, mask = padded_prompts(cfg, (12, 9, 10))
  with torch.no_grad():
    full = model(ids, attention_mask=mask, use_cache=False).logits
    out = model(ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
    steps = [out.logits]
    for t in range(5, ids.shape[1]):
      out = model(
          ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=out.cache
      )
      steps.append(out.logits)
  got = torch.cat(steps, 1)[mask.bool()]
  want = full[mask.bool()]
  # float32 sums over at most S keys and d features, reordered: a few ulps of the logits' scale
  assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_cache_holds_the_plt_state(build):
  cfg, model = plt_model(build, "R3-hidden-scaled")
  ids, mask = padded_prompts(cfg, (9, 6))
  b, t = ids.shape
  window = cfg.window_left + 1
  with torch.no_grad():
    out = model(
        ids, attention_mask=mask, use_cache=True, output_hidden_states=True
    )
  cache = out.cache
  assert type(cache).__name__ == "PLTCache" and cache.get_seq_length() == t
  kv = (cfg.num_key_value_heads, cfg.head_size)
  for layer in cache.layers:  # loop 1: every column; loops >= 2: W slots
    assert tuple(layer.keys.shape) == (b, t) + kv
    assert (
        tuple(layer.ring_keys.shape) == (cfg.plt_num_loops - 1, b, window) + kv
    )
  assert sorted(cache.ring_cols.tolist()) == list(range(t - window, t))
  assert tuple(cache.carry.shape) == (cfg.plt_num_loops - 1, b, cfg.hidden_size)
  for r in range(
      cfg.plt_num_loops - 1
  ):  # carry[r] = P(r + 1) at the last column
    p = model.model.norm(out.hidden_states[r])[:, -1]
    torch.testing.assert_close(cache.carry[r], p, rtol=0, atol=0)
  before = [cache.layers[0].ring_keys.clone(), cache.carry.clone()]
  cache.reorder_cache(torch.tensor([1, 0]))  # beams move every part together
  assert torch.equal(cache.layers[0].ring_keys, before[0][:, [1, 0]])
  assert torch.equal(cache.carry, before[1][:, [1, 0]])
  assert torch.equal(cache.valid, mask.bool()[[1, 0]])
  cache.batch_repeat_interleave(2)  # rows 1, 1, 0, 0
  cache.batch_select_indices(torch.tensor([0, 3]))  # rows 1, 0
  assert torch.equal(cache.layers[0].ring_keys, before[0][:, [1, 0]])
  assert torch.equal(cache.carry, before[1][:, [1, 0]])
  with pytest.raises(ValueError, match="cannot drop tokens"):
    cache.crop(-1)


def test_decode_step_is_one_pass_over_the_weights(build):
  """A prompt runs the loops in turn (R passes); each new token runs them as R rows of one pass."""
  cfg, model = plt_model(build, "R3-hidden-scaled")
  seen = []
  hooks = [
      layer.self_attn.q_proj.register_forward_hook(
          lambda m, args, out: seen.append(tuple(args[0].shape))
      )
      for layer in model.model.layers
  ]
  try:
    with torch.no_grad():
      out = model(torch.tensor([[5, 6, 7, 8, 9, 10]]), use_cache=True)
      passes = len(seen)
      seen.clear()
      model(torch.tensor([[11]]), cache=out.cache)
  finally:
    for h in hooks:
      h.remove()
  n, layers = cfg.plt_num_loops, cfg.num_hidden_layers
  assert passes == n * layers
  assert seen == [(1, n, 1, cfg.hidden_size)] * layers
