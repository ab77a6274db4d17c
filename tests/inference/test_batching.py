"""Continuous batching: a request's tokens do not depend on the others in the batch."""

import threading

import pytest

from loopcoder_jax.inference import batching, engine
from loopcoder_jax.inference.cache import PER_LAYER, STACKED
from loopcoder_jax.model import sharding
from tests.inference.compiles import compiles

CHUNK = 8
OTHERS = [
    "for i in range(10):\n" * (1 + i % 3) + "x" * (i % 5) for i in range(16)
]


def _run(scheduler, tok, prompts, max_tokens=10, start=None, **kw):
  """Submit every prompt at once (then `start()`, if given); their texts and Finished events, in
  order."""
  out = {i: [] for i in range(len(prompts))}
  done = threading.Event()
  ended = []

  def emitter(i):
    def emit(e):
      out[i].append(e)
      if not isinstance(e, batching.Delta):
        ended.append(i)
        if len(ended) == len(prompts):
          done.set()

    return emit

  for i, p in enumerate(prompts):
    ids = tok.encode(p, add_bos=tok.add_bos_token)
    scheduler.submit(batching.Request(ids, max_tokens, emitter(i), **kw))
  if start is not None:
    start()
  assert done.wait(300)
  texts = [
      "".join(e.text for e in out[i] if isinstance(e, batching.Delta))
      for i in range(len(prompts))
  ]
  return texts, [out[i][-1] for i in range(len(prompts))]


def _scheduler(serve_model, layout=None, mesh=None, slots=4):
  cfg, params, tok, _ = serve_model
  eng = engine.Engine(
      cfg, params, tok, layout=layout, mesh=mesh, prefill_chunk=CHUNK
  )
  sched = batching.Scheduler(eng, slots=slots, prefill_chunk=CHUNK)
  sched.start()
  return eng, sched


@pytest.fixture(scope="module", params=[PER_LAYER, STACKED], ids=str)
def served(serve_model, request):
  eng, sched = _scheduler(serve_model, request.param)
  yield eng, sched
  sched.stop()


def test_greedy_text_alone_equals_among_16_others(served, serve_model):
  eng, sched = served
  tok = serve_model[2]
  prompt = (
      "def add(a, b):\n    return"  # longer than a chunk: prefilled in pieces
  )
  alone, ends = _run(sched, tok, [prompt])
  crowd, _ = _run(sched, tok, OTHERS[:7] + [prompt] + OTHERS[7:])
  assert crowd[7] == alone[0]
  assert ends[0].reason in ("stop", "length") and ends[0].completion_tokens > 0
  # and the same text as the engine's batch program (same prefill chunks)
  assert alone[0] == eng.complete([prompt], max_new_tokens=10)[0]


def test_requests_admitted_in_one_call_equal_alone(served, serve_model):
  """Queued before the loop starts, four prompts (one longer than a chunk) join through one
  admission call per piece, each in its own slot row, and each decodes as it does alone.
  """
  eng, alone_sched = served
  tok = serve_model[2]
  prompts = [
      "def add(",
      "for i in range(",
      "x = 1",
      "def add(a, b):\n    return",
  ]
  sched = batching.Scheduler(
      eng, slots=4, prefill_chunk=CHUNK, max_len=alone_sched.max_len
  )
  try:
    together, _ = _run(sched, tok, prompts, start=sched.start)
  finally:
    sched.stop()
  pieces = -(
      -max(len(tok.encode(p, add_bos=tok.add_bos_token)) for p in prompts)
      // CHUNK
  )
  assert pieces == 2 and sched.admissions == pieces
  alone = [_run(alone_sched, tok, [p])[0][0] for p in prompts]
  assert together == alone


def test_the_budget_bounds_each_admission(served, serve_model):
  """With a budget of one chunk, requests join one per admission call, to the same texts."""
  eng, _ = served
  tok = serve_model[2]
  prompts = ["def add(", "for i in range(", "x = 1"]
  sched = batching.Scheduler(
      eng, slots=4, prefill_chunk=CHUNK, prefill_budget=CHUNK
  )
  assert sched.programs.shapes == [(1, CHUNK)]
  try:
    texts, _ = _run(sched, tok, prompts, start=sched.start)
  finally:
    sched.stop()
  lengths = [len(tok.encode(p, add_bos=tok.add_bos_token)) for p in prompts]
  assert sched.admissions == sum(-(-n // CHUNK) for n in lengths)
  assert texts == [eng.complete([p], max_new_tokens=10)[0] for p in prompts]


def test_started_means_compiled(served, serve_model):
  """`start` compiled every program: requests of any shape compile nothing."""
  _, sched = served
  tok = serve_model[2]
  _, n = compiles(
      lambda: _run(sched, tok, OTHERS[:6], max_tokens=3, seed=3, top_p=0.5)
  )
  assert n == 0


def test_seeded_sampling_is_the_requests_own(served, serve_model):
  _, sched = served
  tok = serve_model[2]
  kw = dict(temperature=1.0, top_p=0.9, seed=1234)
  alone, _ = _run(sched, tok, ["for i"], max_tokens=12, **kw)
  crowd, _ = _run(sched, tok, OTHERS[:5] + ["for i"], max_tokens=12, **kw)
  other_seed, _ = _run(sched, tok, ["for i"], max_tokens=12, seed=7)
  assert crowd[5] == alone[0]
  assert other_seed[0] != alone[0]


def test_a_stop_string_ends_the_request(served, serve_model):
  _, sched = served
  tok = serve_model[2]
  (full,), _ = _run(sched, tok, ["def add("], max_tokens=12)
  stop = full[3:5]
  (cut,), (end,) = _run(sched, tok, ["def add("], max_tokens=12, stop=[stop])
  assert cut == full[: full.find(stop)] and end.reason == "stop"


def test_cancel_frees_the_slot(served, serve_model):
  _, sched = served
  tok = serve_model[2]
  seen = threading.Event()
  handle = sched.submit(
      batching.Request(
          tok.encode("def"), 50, lambda e: seen.set(), temperature=1.0
      )
  )
  assert seen.wait(60)
  sched.cancel(handle)
  texts, _ = _run(sched, tok, ["for"], max_tokens=3)
  assert len(texts) == 1 and sched.busy == 0


def test_bad_requests_are_refused_before_queueing(served, serve_model):
  _, sched = served
  tok = serve_model[2]
  ids = tok.encode("def")
  for bad, match in [
      (dict(max_tokens=0), "max_tokens"),
      (dict(max_tokens=sched.max_len), "context"),
      (dict(max_tokens=2, temperature=-1.0), "temperature"),
      (dict(max_tokens=2, top_p=0.0), "top_p"),
  ]:
    with pytest.raises(ValueError, match=match):
      sched.submit(batching.Request(ids, emit=print, **bad))
  with pytest.raises(ValueError, match="empty"):
    sched.submit(batching.Request([], 2, print))


def test_bad_settings_are_refused(serve_model):
  cfg, params, tok, _ = serve_model
  eng = engine.Engine(cfg, params, tok)
  with pytest.raises(ValueError, match="prefill_budget"):
    batching.Scheduler(eng, prefill_chunk=32, prefill_budget=16)
  with pytest.raises(ValueError, match="slots"):
    batching.Scheduler(eng, slots=0)


def test_admission_buckets(serve_model):
  """Widths grow by four up to the chunk; rows by four up to what fits the budget."""
  cfg, params, tok, _ = serve_model
  eng = engine.Engine(cfg, params, tok)
  p = batching.Scheduler(
      eng, slots=8, max_len=64, prefill_chunk=48, prefill_budget=192
  ).programs
  assert p.widths == [16, 48]
  assert p.max_rows == {16: 8, 48: 4}
  assert p.shapes == [(1, 16), (4, 16), (8, 16), (1, 48), (4, 48)]
  assert [p.width(n) for n in (1, 16, 17, 48)] == [16, 16, 48, 48]


def test_a_full_queue_rejects(serve_model):
  cfg, params, tok, _ = serve_model
  eng = engine.Engine(cfg, params, tok)
  # never started: requests stay queued
  sched = batching.Scheduler(eng, slots=1, max_queue=2)
  for _ in range(2):
    sched.submit(batching.Request(tok.encode("def"), 4, print))
  with pytest.raises(batching.QueueFull):
    sched.submit(batching.Request(tok.encode("def"), 4, print))


def test_detokenizer_holds_back_what_may_begin_a_stop(serve_model):
  tok = serve_model[2]
  text = "def add(a, b):\n    return a + b\n"
  ids = tok.encode(text)
  d = batching.Detokenizer(tok, ["return a -"])
  shown = "".join(d.push(t)[0] for t in ids) + d.flush()
  assert shown == text
  d = batching.Detokenizer(tok, ["urn"])
  pieces, stopped = [], False
  for t in ids:
    piece, stopped = d.push(t)
    pieces.append(piece)
    if stopped:
      break
  assert stopped and "".join(pieces) == "def add(a, b):\n    ret"


@pytest.mark.slow
def test_on_a_mesh_alone_equals_among_others(serve_model):
  mesh = sharding.make_mesh({"tensor": 2, "data": 4})
  _, sched = _scheduler(serve_model, STACKED, mesh=mesh, slots=4)
  try:
    tok = serve_model[2]
    alone, _ = _run(sched, tok, ["def add("])
    crowd, _ = _run(sched, tok, OTHERS[:6] + ["def add("])
    assert crowd[6] == alone[0]
  finally:
    sched.stop()
