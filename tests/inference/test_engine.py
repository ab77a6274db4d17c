"""The engine: compiled once per shape bucket, the same completions as the one-off program."""

import jax
import pytest

from loopcoder_jax.inference import decode, engine, generation, sampling
from tests.inference.compiles import compiles


def test_bucket_rounds_up_to_powers_of_two():
  assert [engine.bucket(n) for n in (1, 2, 3, 5, 16, 17)] == [
      1,
      2,
      4,
      8,
      16,
      32,
  ]
  assert engine.bucket(3, smallest=16) == 16


def test_a_second_call_in_the_bucket_compiles_nothing(serve_model):
  cfg, params, tok, _ = serve_model
  eng = engine.Engine(cfg, params, tok)
  first, n_first = compiles(
      lambda: eng.complete(["def add("], max_new_tokens=5)
  )
  assert n_first > 0 and len(eng.programs) == 1
  # another prompt length and budget within the same buckets
  again, n_again = compiles(
      lambda: eng.complete(["for i in range"], max_new_tokens=7)
  )
  assert n_again == 0 and len(eng.programs) == 1 and len(again) == 1
  same, n_same = compiles(lambda: eng.complete(["def add("], max_new_tokens=5))
  assert n_same == 0 and same == first
  # two rows: a new bucket, one more program
  _, n_rows = compiles(lambda: eng.complete(["a", "b"], max_new_tokens=5))
  assert n_rows > 0 and len(eng.programs) == 2


def test_generation_complete_reuses_its_engine(serve_model):
  cfg, params, tok, _ = serve_model
  generation.clear_engines()
  first = generation.complete(cfg, params, tok, ["def add("], max_new_tokens=6)
  again, n = compiles(
      lambda: generation.complete(cfg, params, tok, ["for i"], max_new_tokens=7)
  )
  assert n == 0 and len(again) == 1 and isinstance(first[0], str)


def test_engine_equals_the_one_off_program(serve_model):
  """Bucket padding (rows, prompt width, loop length) changes no token."""
  cfg, params, tok, _ = serve_model
  eng = engine.Engine(cfg, params, tok)
  prompts = ["def add(a", "for"]
  ids = [tok.encode(p, add_bos=tok.add_bos_token) for p in prompts]
  got, counts = eng.generate_ids(ids, max_new_tokens=6)
  width = max(map(len, ids))
  tokens = jax.numpy.asarray([i + [0] * (width - len(i)) for i in ids])
  lengths = jax.numpy.asarray([len(i) for i in ids])
  want, want_counts = decode.prefill_and_generate(
      cfg,
      params,
      tokens,
      lengths,
      jax.random.key(0),
      sampling.Greedy(),
      sampling.StopRule(6, eng.stop_ids),
      max_len=width + 6,
  )
  assert (counts == want_counts).all()
  for row, n, w in zip(got, counts, want):
    assert list(row[:n]) == list(w[:n])


def test_stop_strings_and_streaming_share_programs(serve_model):
  cfg, params, tok, _ = serve_model
  eng = engine.Engine(cfg, params, tok)
  full = eng.complete(["def add("], max_new_tokens=8)[0]
  assert len(full) > 2
  stop = full[2:4]
  pieces = []
  cut = eng.complete(
      ["def add("], max_new_tokens=8, stop=[stop], on_text=pieces.append
  )[0]
  assert cut == full[: full.find(stop)] and "".join(pieces) == cut
  _, n = compiles(
      lambda: eng.complete(["for"], max_new_tokens=8, stop=["x"], on_text=len)
  )
  assert n == 0


def test_bad_requests_raise_before_compiling(serve_model):
  cfg, params, tok, _ = serve_model
  eng = engine.Engine(cfg, params, tok)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    eng.complete(["def"], max_new_tokens=cfg.max_position_embeddings)
  with pytest.raises(ValueError, match="max_new_tokens"):
    eng.complete(["def"], max_new_tokens=0)
  assert not eng.programs
