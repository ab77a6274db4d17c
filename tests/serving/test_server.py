"""The OpenAI-compatible server, queried with the official `openai` client on 127.0.0.1."""

import json
import threading
import time

import httpx
import openai
import pytest

from loopcoder_jax import interop, serving
from loopcoder_jax.inference import batching, engine

MODEL = "tiny-plt"


@pytest.fixture(scope="module")
def running(serve_model, tmp_path_factory):
  """A server over a tiny checkpoint on disk (loaded as scripts/serve.py loads it)."""
  cfg, params, _, tok_dir = serve_model
  ckpt = str(tmp_path_factory.mktemp("ckpt") / "hf")
  interop.save_hf(cfg, params, ckpt, tokenizer_dir=tok_dir)
  built = serving.build(
      ckpt, model_name=MODEL, slots=4, prefill_chunk=8, max_queue=8
  )
  with serving.Running(built.app) as run:
    yield built, run
  built.scheduler.stop()


@pytest.fixture(scope="module")
def client(running):
  return openai.OpenAI(base_url=running[1].url, api_key="none", max_retries=0)


def test_models_and_health(client, running):
  assert [m.id for m in client.models.list().data] == [MODEL]
  health = httpx.get(running[1].url.removesuffix("/v1") + "/health").json()
  assert health["status"] == "ok"


def test_completion_stream_and_whole_agree(client, running):
  built = running[0]
  whole = client.completions.create(
      model=MODEL, prompt="def add(", max_tokens=8, temperature=0
  )
  choice = whole.choices[0]
  assert choice.finish_reason in ("stop", "length")
  assert whole.usage.completion_tokens >= 1
  pieces, reasons = [], []
  for chunk in client.completions.create(
      model=MODEL, prompt="def add(", max_tokens=8, temperature=0, stream=True
  ):
    pieces.append(chunk.choices[0].text)
    reasons.append(chunk.choices[0].finish_reason)
  assert "".join(pieces) == choice.text
  assert reasons[-1] == choice.finish_reason
  # the engine's own greedy completion of the same prompt (same prefill chunks)
  eng = engine.Engine(
      built.engine.cfg,
      built.engine.params,
      built.engine.tokenizer,
      prefill_chunk=8,
  )
  assert choice.text == eng.complete(["def add("], max_new_tokens=8)[0]


def test_chat_completion_whole_and_streamed(client):
  messages = [{"role": "user", "content": "add two numbers"}]
  whole = client.chat.completions.create(
      model=MODEL, messages=messages, max_tokens=6, temperature=0
  )
  assert whole.choices[0].message.role == "assistant"
  stream = client.chat.completions.create(
      model=MODEL, messages=messages, max_tokens=6, temperature=0, stream=True
  )
  text = "".join(c.choices[0].delta.content or "" for c in stream)
  assert text == whole.choices[0].message.content


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"model": MODEL}, 400, "prompt"),
        (
            {"model": MODEL, "prompt": "def", "max_tokens": -1},
            400,
            "max_tokens",
        ),
        ({"model": MODEL, "prompt": "def", "max_tokens": 10**9}, 400, None),
        ({"model": MODEL, "prompt": "def " * 200}, 400, None),
        ({"model": "gpt-4", "prompt": "def"}, 404, "model"),
        ({"model": MODEL, "prompt": "def", "temperature": -1}, 400, None),
        ({"model": MODEL, "messages": []}, 400, None),
    ],
)
def test_bad_input_is_a_4xx_and_the_next_request_is_served(
    client, running, body, status, param
):
  url = running[1].url + (
      "/chat/completions" if "messages" in body else "/completions"
  )
  r = httpx.post(url, json=body, timeout=30)
  assert r.status_code == status, r.text
  error = r.json()["error"]
  assert error["message"] and error["type"]
  if param:
    assert param in (error["param"] or "")
  ok = client.completions.create(model=MODEL, prompt="x", max_tokens=2)
  assert ok.choices[0].finish_reason in ("stop", "length")


def test_malformed_json_is_a_400(client, running):
  r = httpx.post(
      running[1].url + "/completions",
      content=b'{"model": "tiny-plt", "prompt": ',
      headers={"content-type": "application/json"},
  )
  assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_the_openai_client_sees_errors_as_its_exceptions(client):
  with pytest.raises(openai.NotFoundError):
    client.completions.create(model="nope", prompt="def", max_tokens=2)
  with pytest.raises(openai.BadRequestError):
    client.completions.create(model=MODEL, prompt="def", max_tokens=10**6)


def test_a_client_leaving_mid_stream_frees_its_slot(
    client, running, monkeypatch
):
  built, run = running
  step = built.scheduler._step
  cancelled = built.scheduler.cancelled
  has_first_line = threading.Event()
  steps = 0
  # after a minute steps run freely: a lost cancel fails below, not by hanging
  held_until = time.monotonic() + 60

  def held_step(active):
    # the request must not end by itself (at max_tokens, or on EOS) before its client leaves,
    # which CI under load once saw: a few steps for the first line, then none until the client
    # has read it and its disconnect has reached the server
    nonlocal steps
    while (
        built.scheduler.cancelled == cancelled
        and (has_first_line.is_set() or steps >= 8)
        and time.monotonic() < held_until
    ):
      time.sleep(0.01)
    steps += 1
    return step(active)

  monkeypatch.setattr(built.scheduler, "_step", held_step)
  room = built.scheduler.max_len - 4
  body = {
      "model": MODEL,
      "prompt": "def",
      "max_tokens": room,
      "temperature": 0,
      "stream": True,
  }
  with httpx.stream("POST", run.url + "/completions", json=body) as r:
    first = next(r.iter_lines())
    assert first.startswith("data: ") and json.loads(first[6:])["choices"]
    has_first_line.set()
  deadline = time.monotonic() + 30
  while built.scheduler.busy and time.monotonic() < deadline:
    time.sleep(0.01)
  assert built.scheduler.busy == 0
  assert built.scheduler.cancelled == cancelled + 1
  ok = client.completions.create(model=MODEL, prompt="x", max_tokens=2)
  assert ok.usage.completion_tokens >= 1


def _unstarted(serve_model, **kw):
  """An app over a scheduler whose loop never runs: requests stay queued."""
  cfg, params, tok, _ = serve_model
  sched = batching.Scheduler(engine.Engine(cfg, params, tok), **kw)
  return sched, serving.create_app(sched, MODEL)


def test_a_client_leaving_the_queue_leaves_it_at_once(serve_model):
  sched, app = _unstarted(serve_model, slots=1, max_queue=4)
  with serving.Running(app) as run:
    body = {"model": MODEL, "prompt": "def", "max_tokens": 2, "stream": True}
    with httpx.stream("POST", run.url + "/completions", json=body):
      assert sched.busy == 1
    deadline = time.monotonic() + 30
    while sched.busy and time.monotonic() < deadline:
      time.sleep(0.01)
    assert sched.busy == 0 and sched.cancelled == 1


def test_a_full_queue_answers_429(serve_model):
  sched, app = _unstarted(serve_model, slots=1, max_queue=1)
  with serving.Running(app) as run:
    body = {"model": MODEL, "prompt": "def", "max_tokens": 2, "stream": True}
    with httpx.stream("POST", run.url + "/completions", json=body):
      assert sched.busy == 1
      r = httpx.post(run.url + "/completions", json=body, timeout=30)
      assert r.status_code == 429
      assert r.json()["error"]["type"] == "rate_limit_error"


def test_a_lora_export_with_per_loop_adapters_serves(serve_model, tmp_path):
  """The server loads a LoRA run's export (per-loop adapters: applied, loop by loop) and answers
  as the engine over base + adapters does."""
  from loopcoder_jax.model import lora
  from tests import helpers

  cfg, _, tok, tok_dir = serve_model
  lcfg, base, adapters, _, ad_dir = helpers.lora_export(
      str(tmp_path),
      per_loop=True,
      vocab_size=cfg.vocab_size,
      eos_token_id=cfg.eos_token_id,
      max_position_embeddings=cfg.max_position_embeddings,
  )
  built = serving.build(
      ad_dir,
      model_name=MODEL,
      slots=2,
      prefill_chunk=8,
      max_queue=4,
      tokenizer=tok_dir,
  )
  try:
    assert built.engine.cfg.lora == lcfg.lora
    with serving.Running(built.app) as run:
      client = openai.OpenAI(base_url=run.url, api_key="none", max_retries=0)
      got = client.completions.create(
          model=MODEL, prompt="def add(", max_tokens=6, temperature=0
      )
  finally:
    built.scheduler.stop()
  eng = engine.Engine(lcfg, lora.combine(base, adapters), tok, prefill_chunk=8)
  assert got.choices[0].text == eng.complete(["def add("], max_new_tokens=6)[0]
