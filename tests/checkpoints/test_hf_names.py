"""The HF name table: coverage of every config, key matching (aliases, duplicates, unexpected and
missing keys) and the transforms both ways."""

from hypothesis import given
from hypothesis import strategies as hst
import numpy as np
import pytest

from loopcoder_jax.checkpoints import hf_names
from loopcoder_jax.model.config import PLTConfig


def _keys(cfg):
  return [s.key for s in hf_names.plan(cfg)]


@pytest.mark.parametrize("loops", [1, 2, 3, 4])
@pytest.mark.parametrize("hidden", [True, False])
def test_table_covers_every_config(loops, hidden):
  for tied in (False, True):
    cfg = PLTConfig.tiny(
        loops=loops, plt_gate_use_hidden_states=hidden, tie_word_embeddings=tied
    )
    keys = _keys(cfg)
    per_layer = 9 + (0 if loops == 1 else (3 if hidden else 2))
    assert (
        len(keys)
        == len(set(keys))
        == 2 + (0 if tied else 1) + per_layer * cfg.num_hidden_layers
    )
    assert ("lm_head.weight" in keys) != tied
    # layer-major: every key of layer 0 before any key of layer 1
    layers = [s.layer for s in hf_names.plan(cfg) if s.layer is not None]
    assert layers == sorted(layers)


def test_flatten_unflatten_round_trip():
  tree = {"a": {"b": 1, "c": {"d": 2}}, "e": 3}
  assert hf_names.flatten(tree) == {"a/b": 1, "a/c/d": 2, "e": 3}
  assert hf_names.unflatten(hf_names.flatten(tree)) == tree


# ------------------------------------------------------------------------------------- matching
def test_canonical_keys_match_themselves():
  cfg = PLTConfig.tiny(loops=2)
  slots = hf_names.plan(cfg)
  keys = _keys(cfg)
  assert hf_names.match(cfg, slots, keys) == {k: k for k in keys}


@pytest.mark.parametrize(
    "hidden,alias",
    [
        (True, "model.layers.{i}.self_attn.loop_gate_proj."),
        (False, "model.gate_projections.{i}."),
        (False, "model.layers.{i}.self_attn.loop_gate_proj."),
    ],
)
def test_gate_aliases_match(hidden, alias):
  cfg = PLTConfig.tiny(loops=2, plt_gate_use_hidden_states=hidden)
  suffixes = ("weight", "bias") + (("gate_norm.weight",) if hidden else ())
  rename = {
      f"model.layers.{i}.self_attn.plt_gate.{s}": alias.format(i=i) + s
      for i in range(cfg.num_hidden_layers)
      for s in suffixes
  }
  keys = [rename.get(k, k) for k in _keys(cfg)]
  found = hf_names.match(cfg, hf_names.plan(cfg), keys)
  assert found == {k: rename.get(k, k) for k in _keys(cfg)}


def test_alias_and_canonical_together_rejected():
  cfg = PLTConfig.tiny(loops=2)
  keys = _keys(cfg) + ["model.layers.0.self_attn.loop_gate_proj.bias"]
  with pytest.raises(
      ValueError, match="model.layers.0.self_attn.plt_gate.bias twice"
  ):
    hf_names.match(cfg, hf_names.plan(cfg), keys)


def test_missing_key():
  cfg = PLTConfig.tiny(loops=2)
  keys = _keys(cfg)
  keys.remove("model.layers.1.mlp.up_proj.weight")
  keys.remove("model.norm.weight")
  with pytest.raises(
      ValueError,
      match=r"missing key model\.layers\.1\.mlp\.up_proj\.weight \(and 1 more\)",
  ):
    hf_names.match(cfg, hf_names.plan(cfg), keys)


@pytest.mark.parametrize(
    "extra",
    [
        "model.layers.2.mlp.up_proj.weight",
        "lm_head.bias",
        "model.layers.0.self_attn.plt_gate.gate_norm.weight",
    ],
)
def test_unexpected_key(extra):
  # query mode has no gate_norm
  cfg = PLTConfig.tiny(loops=2, plt_gate_use_hidden_states=False)
  with pytest.raises(
      ValueError, match=f"unexpected key {extra.replace('.', '[.]')}"
  ):
    hf_names.match(cfg, hf_names.plan(cfg), _keys(cfg) + [extra])


def test_rope_tables_and_a_tied_head_are_skipped():
  keys = [
      "model.rotary_emb.inv_freq",
      "model.layers.1.self_attn.rotary_emb.inv_freq",
  ]
  cfg = PLTConfig.tiny(loops=2)
  found = hf_names.match(cfg, hf_names.plan(cfg), _keys(cfg) + keys)
  assert sorted(found) == sorted(_keys(cfg))
  tied = PLTConfig.tiny(loops=2, tie_word_embeddings=True)
  found = hf_names.match(
      tied, hf_names.plan(tied), _keys(tied) + [hf_names.TIED_HEAD]
  )
  assert hf_names.TIED_HEAD not in found.values()


def test_r1_checkpoint_with_gate_is_unexpected():
  cfg = PLTConfig.tiny(loops=1)
  with pytest.raises(
      ValueError, match="unexpected key .*plt_gate.* plt_num_loops=1"
  ):
    hf_names.match(cfg, hf_names.plan(cfg), _keys(PLTConfig.tiny(loops=2)))


# ------------------------------------------------------------------------------------- transforms
@given(
    loops=hst.integers(1, 3),
    hidden=hst.booleans(),
    tied=hst.booleans(),
    kv_heads=hst.sampled_from([1, 2, 4]),
)
def test_transforms_invert_each_other(loops, hidden, tied, kv_heads):
  cfg = PLTConfig.tiny(
      loops=loops,
      plt_gate_use_hidden_states=hidden,
      tie_word_embeddings=tied,
      num_key_value_heads=kv_heads,
  )
  rng = np.random.default_rng(0)
  for s in hf_names.plan(cfg):
    w = rng.standard_normal(s.hf_shape).astype(np.float32)
    ours = np.empty(s.our_shape, np.float32)
    s.rule.into_ours(w, ours)
    back = s.rule.to_hf(ours, cfg)
    assert back.shape == s.hf_shape and np.array_equal(back, w), s.key


def test_linear_layouts():
  """Ours are [in, ...out] kernels of HF's [out, in] linears: q_proj [d, H, D] = HF [H*D, d].T."""
  cfg = PLTConfig.tiny(loops=2)
  slots = {s.key: s for s in hf_names.plan(cfg)}
  q = slots["model.layers.1.self_attn.q_proj.weight"]
  assert q.our_shape == (
      cfg.hidden_size,
      cfg.num_attention_heads,
      cfg.head_size,
  )
  w = np.arange(np.prod(q.hf_shape), dtype=np.float32).reshape(q.hf_shape)
  ours = np.empty(q.our_shape, np.float32)
  q.rule.into_ours(w, ours)
  np.testing.assert_array_equal(ours.reshape(cfg.hidden_size, -1), w.T)
  norm = slots["model.norm.weight"]
  assert not norm.rule.transpose and norm.our_shape == (cfg.hidden_size,)


def _inner_axes(s):
  """Our axes that split an HF axis after its first part: head_dim of [d, H, D] and [H, D, d]."""
  if len(s.our_shape) == len(s.hf_shape):
    return ()
  return (1,) if s.rule.path.endswith("o_proj/kernel") else (2,)


@hst.composite
def _blocks(draw, shape, whole=()):
  """One contiguous block per axis of `shape` (all of the axes in `whole`)."""
  out = []
  for a, n in enumerate(shape):
    lo = 0 if a in whole else draw(hst.integers(0, n - 1))
    hi = n if a in whole else draw(hst.integers(lo + 1, n))
    out.append(slice(lo, hi))
  return tuple(out)


@given(
    loops=hst.integers(1, 3),
    hidden=hst.booleans(),
    kv_heads=hst.sampled_from([1, 2, 4]),
    whole_inner=hst.booleans(),
    data=hst.data(),
)
def test_read_ours_is_the_block_of_the_converted_tensor(
    loops, hidden, kv_heads, whole_inner, data
):
  """A block of our layout read through `read_ours` equals that block of the whole converted
  tensor; a block that takes whole head dims is read from exactly its own HF elements.
  """
  cfg = PLTConfig.tiny(
      loops=loops,
      plt_gate_use_hidden_states=hidden,
      num_key_value_heads=kv_heads,
  )
  rng = np.random.default_rng(0)
  for s in hf_names.plan(cfg):
    if s.layer not in (None, 0):
      continue
    w = rng.standard_normal(s.hf_shape).astype(np.float32)
    whole = _inner_axes(s) if whole_inner else ()
    block = data.draw(_blocks(s.our_shape, whole), label=s.key)
    regions = []

    def read(region, w=w, regions=regions):
      regions.append(region)
      return w[region]

    got = s.rule.read_ours(read, s.hf_shape, s.our_shape, block)
    converted = np.empty(s.our_shape, w.dtype)
    s.rule.into_ours(w, converted)
    np.testing.assert_array_equal(got, converted[block], err_msg=s.key)
    [region] = regions
    if whole_inner:
      assert w[region].size == got.size, (s.key, block, region)


def test_read_ours_of_a_head_block_is_one_contiguous_range():
  """q_proj [d, H, D] sharded on heads: the HF rows of those heads, all columns of d."""
  cfg = PLTConfig.tiny(loops=2)
  q = next(
      s
      for s in hf_names.plan(cfg)
      if s.key.endswith("0.self_attn.q_proj.weight")
  )
  d, h, hd = q.our_shape
  regions = []
  w = np.zeros(q.hf_shape, np.float32)
  q.rule.read_ours(
      lambda r: regions.append(r) or w[r],
      q.hf_shape,
      q.our_shape,
      (slice(0, d), slice(1, 3), slice(0, hd)),
  )
  assert regions == [(slice(1 * hd, 3 * hd), slice(0, d))]


def test_read_ours_refuses_a_merge():
  rule = hf_names.Rule("x", "x", lambda c: (4, 6))
  with pytest.raises(ValueError, match="not a split of axes"):
    rule.read_ours(
        lambda r: np.zeros((4, 6))[r], (4, 6), (24,), (slice(0, 24),)
    )
