"""An OpenAI-compatible HTTP server over continuous batching (`batching.Scheduler`).

    app = create_app(scheduler, model="loopcoder")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: POST /v1/completions, POST /v1/chat/completions (the tokenizer's chat template, else
`data.chat.DEFAULT_TEMPLATE`), both with `stream: true` (server-sent events ending in
`data: [DONE]`); GET /v1/models; GET /health. Bad input is answered before any work with a 4xx and
an OpenAI-style body `{"error": {"message", "type", "param", "code"}}`: malformed JSON or fields
(400), an unknown model (404), a prompt that does not fit the context with its max_tokens (400), a
full queue (429, when the scheduler rejects rather than waits). A streaming client that goes away
frees its slot at once (its request is cancelled).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
import json
import random
import time
from typing import Any, Literal
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
import pydantic
from starlette.concurrency import run_in_threadpool

from loopcoder_jax.data import chat as chat_lib
from loopcoder_jax.inference import batching

_STOPS_MAX = 4  # as OpenAI


async def _submit_waiting(
    scheduler: batching.Scheduler, request: batching.Request
):
  """`scheduler.submit` on a worker thread (it may wait for queue room). A client that leaves
  meanwhile cannot stop the thread, so its request is cancelled as soon as it is queued.
  """
  submitted = asyncio.ensure_future(
      run_in_threadpool(scheduler.submit, request)
  )
  try:
    return await asyncio.shield(submitted)
  except asyncio.CancelledError:

    def cancel_queued(f: asyncio.Future) -> None:
      if not f.cancelled() and f.exception() is None:
        scheduler.cancel(f.result())

    submitted.add_done_callback(cancel_queued)
    raise


# ------------------------------------------------------------------------------------- requests
class _Sampling(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="ignore")

  model: str
  max_tokens: int | None = pydantic.Field(default=None, ge=1)
  temperature: float = pydantic.Field(default=1.0, ge=0.0, le=2.0)
  top_p: float = pydantic.Field(default=1.0, gt=0.0, le=1.0)
  stop: str | list[str] | None = None
  seed: int | None = None
  n: int = 1
  stream: bool = False

  @pydantic.field_validator("n")
  @classmethod
  def _one(cls, n):
    if n != 1:
      raise ValueError("only n = 1 is served")
    return n

  @pydantic.field_validator("stop")
  @classmethod
  def _stops(cls, stop):
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > _STOPS_MAX or not all(stops):
      raise ValueError(f"stop takes up to {_STOPS_MAX} non-empty strings")
    return stops


class CompletionRequest(_Sampling):
  prompt: str | list[int]
  max_tokens: int | None = pydantic.Field(default=16, ge=1)


class Message(pydantic.BaseModel):
  role: Literal["system", "user", "assistant"]
  content: str


class ChatRequest(_Sampling):
  messages: list[Message] = pydantic.Field(min_length=1)
  max_completion_tokens: int | None = pydantic.Field(default=None, ge=1)


class ApiError(Exception):

  def __init__(
      self, status: int, message: str, kind: str, param=None, code=None
  ):
    super().__init__(message)
    self.status, self.message, self.kind = status, message, kind
    self.param, self.code = param, code


def _error_body(message: str, kind: str, param=None, code=None) -> dict:
  return {
      "error": {"message": message, "type": kind, "param": param, "code": code}
  }


# ------------------------------------------------------------------------------------- the app
def create_app(
    scheduler: batching.Scheduler, model: str, *, owned_by: str = "loopcoder"
) -> FastAPI:
  """The FastAPI app serving `scheduler`'s model under the name `model`."""
  app = FastAPI(title="loopcoder-jax", docs_url=None, redoc_url=None)
  routes = _Routes(scheduler, model, owned_by)
  app.exception_handler(RequestValidationError)(_invalid)
  app.exception_handler(ApiError)(_api_error)
  app.get("/health")(routes.health)
  app.get("/v1/models")(routes.models)
  app.post("/v1/completions")(routes.completions)
  app.post("/v1/chat/completions")(routes.chat_completions)
  return app


async def _invalid(request: Request, e: RequestValidationError):
  first = e.errors()[0] if e.errors() else {}
  loc = [str(x) for x in first.get("loc", ()) if x != "body"]
  if first.get("type") == "json_invalid":
    message = "the request body is not valid JSON"
  else:
    message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid')}"
  return JSONResponse(
      _error_body(message, "invalid_request_error", ".".join(loc) or None),
      status_code=400,
  )


async def _api_error(request: Request, e: ApiError):
  return JSONResponse(
      _error_body(e.message, e.kind, e.param, e.code), status_code=e.status
  )


def _usage(done: batching.Finished) -> dict:
  return {
      "prompt_tokens": done.prompt_tokens,
      "completion_tokens": done.completion_tokens,
      "total_tokens": done.prompt_tokens + done.completion_tokens,
  }


def _choice(kind: str, text: str | None, reason: str | None, first=False):
  """One choice of a response: a chat delta (streaming) or a text completion."""
  if kind == "chat":
    delta: dict[str, Any] = {}
    if first:
      delta["role"] = "assistant"
    if text is not None:
      delta["content"] = text
    return {"index": 0, "delta": delta, "finish_reason": reason}
  return {
      "index": 0,
      "text": text or "",
      "logprobs": None,
      "finish_reason": reason,
  }


class _Routes:
  """The routes over one scheduler and model name."""

  def __init__(self, scheduler: batching.Scheduler, model: str, owned_by: str):
    self.scheduler, self.model, self.owned_by = scheduler, model, owned_by
    self.tok = scheduler.tokenizer
    self.chat_tok = chat_lib.with_template(self.tok)
    self.created = int(time.time())

  async def health(self):
    return {"status": "ok", "busy": self.scheduler.busy}

  async def models(self):
    card = {
        "id": self.model,
        "object": "model",
        "created": self.created,
        "owned_by": self.owned_by,
        "max_model_len": self.scheduler.max_len,
    }
    return {"object": "list", "data": [card]}

  async def completions(self, body: CompletionRequest):
    self._check_model(body.model)
    if isinstance(body.prompt, str):
      if not body.prompt:
        raise ApiError(
            400, "prompt is empty", "invalid_request_error", "prompt"
        )
      ids = self.tok.encode(body.prompt, add_bos=bool(self.tok.add_bos_token))
    else:
      ids = list(body.prompt)
    request = self._request(body, ids, body.max_tokens)
    return await self._respond(body, request, "text")

  async def chat_completions(self, body: ChatRequest):
    self._check_model(body.model)
    messages = [m.model_dump() for m in body.messages]
    try:
      text = self.chat_tok.apply_chat_template(messages)
    except Exception as e:  # noqa: BLE001 - the template's own refusal
      raise ApiError(
          400,
          f"the chat template refused the messages: {e}",
          "invalid_request_error",
          "messages",
      ) from None
    ids = self.chat_tok.encode(text, add_bos=False)  # templates carry their BOS
    limit = body.max_completion_tokens or body.max_tokens
    return await self._respond(body, self._request(body, ids, limit), "chat")

  def _check_model(self, name: str) -> None:
    if name != self.model:
      raise ApiError(
          404,
          f"the model {name!r} does not exist; this server serves {self.model!r}",
          "invalid_request_error",
          "model",
          "model_not_found",
      )

  def _request(self, body: _Sampling, ids: list[int], max_tokens: int | None):
    room = self.scheduler.max_len - len(ids)
    if max_tokens is None:  # as much as the context leaves
      max_tokens = max(room, 1)
    request = batching.Request(
        prompt_ids=ids,
        max_tokens=max_tokens,
        emit=lambda e: None,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=tuple(body.stop or ()),
        # unseeded requests differ from one another, as OpenAI's do
        seed=random.getrandbits(32) if body.seed is None else body.seed,
    )
    try:
      self.scheduler.check(request)
    except ValueError as e:
      param = "max_tokens" if "max_tokens" in str(e) else "prompt"
      raise ApiError(400, str(e), "invalid_request_error", param) from None
    return request

  async def _submit(self, request: batching.Request):
    """Submit; the request's handle and the queue its events arrive on."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def emit(e: batching.Event) -> None:  # on the scheduler's thread
      loop.call_soon_threadsafe(events.put_nowait, e)

    request.emit = emit
    try:
      if self.scheduler.when_full == "wait":
        handle = await _submit_waiting(self.scheduler, request)
      else:
        handle = self.scheduler.submit(request)
    except batching.QueueFull as e:
      raise ApiError(
          429, f"the server is busy: {e}", "rate_limit_error"
      ) from None
    except RuntimeError as e:
      raise ApiError(503, str(e), "server_error") from None
    return handle, events

  async def _events(self, handle, events) -> AsyncIterator[Any]:
    try:
      while True:
        e = await events.get()
        yield e
        if not isinstance(e, batching.Delta):
          return
    finally:  # done, or the client went away: free the slot now
      self.scheduler.cancel(handle)

  async def _respond(self, body: _Sampling, request, kind: str):
    handle, events = await self._submit(request)
    rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    head = {"id": rid, "created": int(time.time()), "model": self.model}
    events_of = self._events(handle, events)
    if body.stream:
      return StreamingResponse(
          self._stream(events_of, head, kind), media_type="text/event-stream"
      )
    return await self._whole(events_of, head, kind)

  @staticmethod
  async def _stream(events_of, head: dict, kind: str):
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    if kind == "chat":
      first = {
          **head,
          "object": obj,
          "choices": [_choice(kind, "", None, True)],
      }
      yield f"data: {json.dumps(first)}\n\n"
    async for e in events_of:
      if isinstance(e, batching.Delta):
        chunk = {
            **head,
            "object": obj,
            "choices": [_choice(kind, e.text, None)],
        }
      elif isinstance(e, batching.Finished):
        end = _choice(kind, None, e.reason)
        chunk = {**head, "object": obj, "choices": [end], "usage": _usage(e)}
      else:
        chunk = _error_body(e.message, "server_error")
      yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"

  @staticmethod
  async def _whole(events_of, head: dict, kind: str) -> dict:
    pieces, done = [], None
    async for e in events_of:
      if isinstance(e, batching.Delta):
        pieces.append(e.text)
      elif isinstance(e, batching.Finished):
        done = e
      else:
        raise ApiError(500, e.message, "server_error")
    assert done is not None
    text = "".join(pieces)
    if kind == "chat":
      out = {
          "index": 0,
          "message": {"role": "assistant", "content": text},
          "finish_reason": done.reason,
      }
      return {
          **head,
          "object": "chat.completion",
          "choices": [out],
          "usage": _usage(done),
      }
    choice = _choice(kind, text, done.reason)
    return {
        **head,
        "object": "text_completion",
        "choices": [choice],
        "usage": _usage(done),
    }
