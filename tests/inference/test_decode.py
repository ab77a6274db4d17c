"""Prefill + cached decoding reproduce the full forward; batched-loop decode equals serial decode;
greedy decoding on a mesh equals one device."""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from loopcoder_jax import inference
from loopcoder_jax.inference import cache as cache_lib
from loopcoder_jax.inference import decode, sampling
from loopcoder_jax.model import sharding
from loopcoder_jax.model.config import PLTConfig
from loopcoder_jax.model.transformer import (
    PLTForCausalLM,
    init_params,
    unstack_layers,
)
from tests import helpers

SEQ = 14  # > window (left=4, 5 ring slots): the ring wraps for every row
PROMPT = 9  # padded prompt width; row lengths below mix short and long prompts
LENGTHS = (6, 2, 9)
CHUNK = 4  # chunk boundaries at 4 and 8 fall inside the prompts
MAX_LEN = 16


def close(got, want, loops, what=""):
  """Decoding recomputes the forward in pieces: a forward's rounding apart."""
  ops = helpers.forward_ops(PLTConfig.tiny(loops=loops), SEQ)
  helpers.assert_close(got, want, ops=ops, what=what)


@functools.cache
def _setup(loops, cross_loop=True):
  cfg = PLTConfig.tiny(loops=loops, plt_cross_loop=cross_loop)
  params = helpers.perturbed(init_params(cfg, jax.random.key(0)))
  tokens = jax.random.randint(
      jax.random.key(1), (len(LENGTHS), SEQ), 0, cfg.vocab_size
  )
  full = jax.jit(lambda p, t: PLTForCausalLM(cfg).apply({"params": p}, t))(
      params, tokens
  )
  return cfg, params, tokens, np.asarray(full)


@functools.cache
def _teacher_forced(loops, mode, chunk, per_layer=False, cross_loop=True):
  """Chunked prefill of the prompts, then one decode step per remaining token (teacher forcing)."""
  cfg, params, tokens, _ = _setup(loops, cross_loop)
  params = unstack_layers(params) if per_layer else params
  lengths = jnp.array(LENGTHS)
  steps = SEQ - min(LENGTHS)

  @jax.jit
  def run(params, tokens):
    logits, cache = decode.prefill(
        cfg,
        params,
        tokens[:, :PROMPT],
        lengths,
        MAX_LEN,
        chunk,
        return_all_logits=True,
    )

    def step(cache, _):
      pos = jnp.minimum(cache.lengths, SEQ - 1)
      tok = jnp.take_along_axis(tokens, pos[:, None], axis=1)[:, 0]
      out, cache = decode.decode_step(cfg, params, cache, tok, mode)
      return cache, (out, pos)

    cache, (step_logits, pos) = jax.lax.scan(step, cache, None, length=steps)
    return logits, step_logits, pos, cache

  return jax.tree.map(np.asarray, run(params, tokens))


@pytest.mark.parametrize(
    "loops, mode, cross_loop",
    [
        (1, "batched", True),
        (2, "batched", True),
        (2, "serial", True),
        (3, "batched", True),
        (3, "serial", True),
        (3, "serial", False),  # serial looping without CLP decodes serially
    ],
)
def test_prefill_and_decode_match_forward(loops, mode, cross_loop):
  _, _, _, full = _setup(loops, cross_loop)
  prompt_logits, step_logits, pos, cache = _teacher_forced(
      loops, mode, CHUNK, cross_loop=cross_loop
  )
  for b, n in enumerate(LENGTHS):
    close(prompt_logits[b, :n], full[b, :n], loops, f"prompt {b}")
  # step i of row b predicts after position pos[i, b]; rows reach the end of the sequence at
  # different steps (then their extra steps are ignored)
  checked = 0
  for i in range(step_logits.shape[0]):
    for b in range(len(LENGTHS)):
      if LENGTHS[b] + i < SEQ:
        assert pos[i, b] == LENGTHS[b] + i
        close(step_logits[i, b], full[b, pos[i, b]], loops, f"step {i}, {b}")
        checked += 1
  assert checked == sum(SEQ - n for n in LENGTHS)
  w = cache_lib.ring_slots(PLTConfig.tiny(loops=loops))
  # the ring holds exactly the last W positions of each row, whatever wrapped
  if loops > 1:
    for b in range(len(LENGTHS)):
      n = int(cache.lengths[b])
      assert sorted(cache.ring_pos[b]) == list(range(n - w, n))


def test_without_clp_the_loops_as_rows_decode_is_refused():
  cfg, params, tokens, _ = _setup(2, cross_loop=False)
  _, cache = decode.prefill(
      cfg, params, tokens[:, :PROMPT], jnp.array(LENGTHS), MAX_LEN
  )
  with pytest.raises(ValueError, match="plt_cross_loop=False.*mode='serial'"):
    decode.decode_step(cfg, params, cache, tokens[:, 0], "batched")


@pytest.mark.parametrize("loops", [2, 3])
def test_batched_equals_serial(loops):
  _, batched, _, cache_b = _teacher_forced(loops, "batched", CHUNK)
  _, serial, _, cache_s = _teacher_forced(loops, "serial", CHUNK)
  close(batched, serial, loops, "logits")
  close(cache_b.carry, cache_s.carry, loops, "carry")
  np.testing.assert_array_equal(cache_b.ring_pos, cache_s.ring_pos)


@pytest.mark.parametrize(
    "mode, chunk", [("batched", CHUNK), ("serial", CHUNK), ("batched", 0)]
)
def test_per_layer_params_give_the_same_numbers(mode, chunk):
  """`unstack_layers` (L weight and cache buffers, a Python loop over layers) changes no number."""
  prompt, steps, pos, cache = _teacher_forced(2, mode, chunk, per_layer=True)
  prompt_w, steps_w, pos_w, cache_w = _teacher_forced(2, mode, chunk)
  close(prompt, prompt_w, 2, "prompt")
  np.testing.assert_array_equal(pos, pos_w)
  # steps of a row past the cache's end (ignored by the other tests too) may differ: there the
  # per-layer cache drops the new key before attending, the stacked one attends to it unstored
  valid = np.array(LENGTHS)[None, :] + np.arange(steps.shape[0])[:, None] < SEQ
  close(steps[valid], steps_w[valid], 2, "steps")
  assert cache.layout is inference.PER_LAYER
  assert len(cache.k1) == PLTConfig.tiny().num_hidden_layers
  # per-layer buffers are [K*B, S, D], rows k*B + b
  n_layers, b, s, k, d = cache_w.k1.shape

  def stacked(layers):
    return (
        np.stack(layers).reshape(n_layers, k, b, s, d).transpose(0, 2, 3, 1, 4)
    )

  close(stacked(cache.k1), cache_w.k1, 2, "k1")
  close(stacked(cache.v1), cache_w.v1, 2, "v1")
  np.testing.assert_array_equal(cache.lengths, cache_w.lengths)


def test_whole_prompt_prefill_matches_chunked():
  """The training forward (a recording source) fills the same cache as chunked prefill."""
  cfg, params, tokens, full = _setup(2)
  lengths = jnp.array(LENGTHS)
  run = jax.jit(lambda p, t: decode.prefill(cfg, p, t, lengths, MAX_LEN))
  last, cache = run(params, tokens[:, :PROMPT])
  last_c, cache_c = jax.jit(
      lambda p, t: decode.prefill(cfg, p, t, lengths, MAX_LEN, CHUNK)
  )(params, tokens[:, :PROMPT])
  for b, n in enumerate(LENGTHS):
    close(last[b], full[b, n - 1], 2, f"last {b}")
    close(cache.k1[:, b, :n], cache_c.k1[:, b, :n], 2, f"k1 {b}")
  close(last, last_c, 2, "last")
  np.testing.assert_array_equal(cache.ring_pos, cache_c.ring_pos)
  np.testing.assert_array_equal(cache.lengths, np.array(LENGTHS))
  for name in ("ring_k", "ring_v", "carry"):
    close(getattr(cache, name), getattr(cache_c, name), 2, name)


@functools.cache
def _generate(mode, stop_ids=()):
  cfg, params, tokens, _ = _setup(2)
  streamed = []

  def on_token(step, ids, live):
    streamed.append((int(step), np.asarray(ids), np.asarray(live)))

  @jax.jit
  def run(params, tokens):
    logits, cache = decode.prefill(
        cfg, params, tokens, jnp.array(LENGTHS), MAX_LEN
    )
    return decode.generate(
        cfg,
        params,
        cache,
        logits,
        jax.random.key(0),
        sampling.Greedy(),
        sampling.StopRule(6, stop_ids),
        mode,
        callback=on_token,
        pad_id=0,
    )

  ids, counts, _ = run(params, tokens[:, :PROMPT])
  jax.effects_barrier()
  return np.asarray(ids), np.asarray(counts), streamed


def test_greedy_generation_batched_equals_serial_and_streams():
  ids, counts, streamed = _generate("batched")
  ids_s, counts_s, _ = _generate("serial")
  np.testing.assert_array_equal(ids, ids_s)
  np.testing.assert_array_equal(counts, [6, 6, 6])
  np.testing.assert_array_equal(counts_s, counts)
  assert [s for s, _, _ in streamed] == list(range(6))
  np.testing.assert_array_equal(
      np.stack([t for _, t, _ in streamed], axis=1), ids
  )
  # the first generated token is the greedy pick after each full prompt
  _, _, _, full = _setup(2)
  np.testing.assert_array_equal(
      ids[:, 0], [full[b, n - 1].argmax() for b, n in enumerate(LENGTHS)]
  )


def test_stop_ids_end_rows():
  ids, _, _ = _generate("batched")
  stop = int(ids[0, 2])
  ids_stop, counts, streamed = _generate("batched", (stop,))
  for b in range(len(LENGTHS)):
    hits = np.flatnonzero(ids[b] == stop)
    n = hits[0] + 1 if hits.size else ids.shape[1]
    assert counts[b] == n
    np.testing.assert_array_equal(ids_stop[b, :n], ids[b, :n])
    assert (ids_stop[b, n:] == 0).all()
  # the loop ends once every row has stopped
  assert len(streamed) == max(counts)


def test_serving_fns_shapes():
  cfg = PLTConfig.tiny(loops=2)
  prefill_fn, step_fn, args = decode.make_serving_fns(
      cfg, batch=2, max_len=32, prefill_len=8
  )
  logits, cache = jax.eval_shape(prefill_fn, *args["prefill"])
  assert logits.shape == (2, cfg.vocab_size)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), cache) == jax.tree.map(
      lambda a: (a.shape, a.dtype), args["decode"][1]
  )
  logits, cache2 = jax.eval_shape(step_fn, *args["decode"])
  assert logits.shape == (2, cfg.vocab_size)
  assert jax.tree.structure(cache2) == jax.tree.structure(cache)
  with pytest.raises(ValueError, match="prefill_len"):
    decode.make_serving_fns(cfg, batch=2, max_len=8, prefill_len=9)
  with pytest.raises(ValueError, match="mode"):
    decode.make_serving_fns(cfg, batch=2, max_len=8, prefill_len=4, mode="fast")


def _sub_jaxprs(value):
  """Jaxprs held by an equation's param (scan bodies, calls, cond branches), found by their
  shape (jax moves the helpers and types that name them between versions)."""
  if hasattr(value, "eqns"):
    yield value
  elif hasattr(getattr(value, "jaxpr", None), "eqns"):
    yield value.jaxpr
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def _primitive_count(jaxpr, name, pred=lambda eqn: True):
  """Equations of a primitive in a jaxpr and every sub-jaxpr (scan bodies, calls)."""
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == name and pred(eqn)
    for sub in (j for v in eqn.params.values() for j in _sub_jaxprs(v)):
      n += _primitive_count(sub, name, pred)
  return n


@pytest.mark.parametrize("loops", [2, 3])
def test_batched_decode_step_is_one_pass_over_the_layers(loops):
  """PLT decoding runs all R loops of a token in ONE pass over the L layers: each layer's weights
  are multiplied once per step (serial decoding multiplies them R times)."""
  cfg, params, tokens, _ = _setup(loops)
  n_layers = cfg.num_hidden_layers
  down_proj = (
      cfg.intermediate_size,
      cfg.hidden_size,
  )  # no other weight has this shape

  def passes(params, mode):
    cache = inference.init_cache(
        cfg, len(LENGTHS), MAX_LEN, inference.params_layout(params)
    )
    jaxpr = jax.make_jaxpr(
        lambda p, c: decode.decode_step(cfg, p, c, tokens[:, 0], mode)
    )(params, cache).jaxpr
    layer_scans = _primitive_count(
        jaxpr, "scan", lambda e: e.params["length"] == n_layers
    )
    mlp_matmuls = (
        _primitive_count(  # a projection's matmul takes the 2-D weight
            jaxpr,
            "dot_general",
            lambda e: any(v.aval.shape == down_proj for v in e.invars),
        )
    )
    return layer_scans, mlp_matmuls

  # Stacked params: one scanned layer, one MLP down projection in its body.
  assert passes(params, "batched") == (1, 1)
  assert passes(params, "serial") == (loops, loops)
  # Per-layer params: a Python loop, L down projections per pass.
  per_layer = unstack_layers(params)
  assert passes(per_layer, "batched") == (0, n_layers)
  assert passes(per_layer, "serial") == (0, loops * n_layers)


# ------------------------------------------------------------------------------------- on a mesh
# 16 query and 8 kv heads of 8: tensor=8 splits every head axis (a tiny config's 4 / 2 would stay
# whole), as well as the MLP (64) and the vocabulary (128).
MESH_HEADS = dict(num_attention_heads=16, num_key_value_heads=8, head_dim=8)
MESH_LENGTHS = (5, 2, 7, 3)
NEW_TOKENS = 6
# A mesh splits matmuls over heads, MLP width and vocabulary and all-reduces the parts: sums in
# another order, so each logit moves by at most a few hundred float32 roundings (eps 2^-23) of the
# logits' scale for this depth. A greedy pick is the same on every mesh when its lead over the
# runner-up exceeds that; 2^-13 of the scale leaves two orders of magnitude of room.
GREEDY_MARGIN = 2.0**-13


@functools.cache
def _mesh_setup(loops):
  cfg = PLTConfig.tiny(loops=loops, **MESH_HEADS)
  params = helpers.perturbed(init_params(cfg, jax.random.key(loops)))
  tokens = jax.random.randint(
      jax.random.key(10 + loops),
      (len(MESH_LENGTHS), max(MESH_LENGTHS)),
      0,
      cfg.vocab_size,
  )
  return cfg, params, tokens


@functools.cache
def _greedy(loops, mesh_axes=None, chunk=0):
  """Greedy ids `[B, NEW_TOKENS]` of `prefill_and_generate`, on one device or a mesh."""
  cfg, params, tokens = _mesh_setup(loops)
  mesh = None if mesh_axes is None else sharding.make_mesh(dict(mesh_axes))
  if mesh is not None:  # as the loader gives them: already on the mesh
    params = jax.device_put(
        params, decode.serving_shardings(cfg, mesh, len(MESH_LENGTHS))[0]
    )
  ids, counts = decode.prefill_and_generate(
      cfg,
      params,
      tokens,
      jnp.array(MESH_LENGTHS),
      jax.random.key(0),
      sampling.Greedy(),
      sampling.StopRule(NEW_TOKENS, ()),
      max_len=max(MESH_LENGTHS) + NEW_TOKENS,
      prefill_chunk=chunk,
      mesh=mesh,
  )
  np.testing.assert_array_equal(counts, NEW_TOKENS)
  return np.asarray(ids)


def _assert_picks_are_clear(loops, ids):
  """Each single-device pick leads the runner-up by GREEDY_MARGIN of the logits' scale (full
  forward over prompt + generated tokens), so no mesh may change it."""
  cfg, params, tokens = _mesh_setup(loops)
  fwd = jax.jit(lambda p, t: PLTForCausalLM(cfg).apply({"params": p}, t))
  for b, n in enumerate(MESH_LENGTHS):
    seq = np.concatenate([np.asarray(tokens[b, :n]), ids[b]])[None]
    logits = np.asarray(fwd(params, seq))[0, n - 1 : n - 1 + NEW_TOKENS]
    np.testing.assert_array_equal(logits.argmax(-1), ids[b])
    top2 = np.sort(logits, axis=-1)[:, -2:]
    gap = float(np.min(top2[:, 1] - top2[:, 0]))
    scale = float(np.max(np.abs(logits)))
    assert gap > GREEDY_MARGIN * scale, (b, gap, scale)


@pytest.mark.parametrize(
    "loops, mesh_axes, chunk",
    [
        (1, (("tensor", 8),), 0),
        (2, (("tensor", 8),), 0),
        (3, (("tensor", 8),), 0),
        # rows split over data x fsdp = 4, weights over fsdp and tensor; chunked prefill
        (2, (("data", 2), ("fsdp", 2), ("tensor", 2)), 3),
    ],
)
def test_greedy_tokens_on_a_mesh_equal_one_device(loops, mesh_axes, chunk):
  one = _greedy(loops)
  _assert_picks_are_clear(loops, one)
  np.testing.assert_array_equal(_greedy(loops, mesh_axes, chunk), one)


def test_in_step_order():
  seen = []
  call = decode.in_step_order(lambda step, x: seen.append((step, x)))
  for step in (1, 0, 3, 2):
    call(np.int32(step), step * 10)
  assert seen == [(0, 0), (1, 10), (2, 20), (3, 30)]


def test_serving_shardings_split_rows_like_the_cache():
  cfg = PLTConfig.tiny(loops=2, **MESH_HEADS)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  for batch, rows_spec in ((4, P(("data", "fsdp"))), (3, P(None))):
    p_sh, c_sh, rows = decode.serving_shardings(cfg, mesh, batch)
    assert rows.spec == rows_spec and c_sh.lengths.spec == rows_spec
    assert c_sh == inference.cache_shardings(cfg, mesh, batch)
  attn = p_sh["layers"]["self_attn"]
  assert attn["k_proj"]["kernel"].spec == P(None, "fsdp", "tensor", None)
