"""Continuous batching over the PLT cache: a fixed number of slots, requests join and leave at step
boundaries.

    scheduler = Scheduler(engine, slots=8, max_len=2048)
    scheduler.start()
    handle = scheduler.submit(Request(ids, max_tokens=64, emit=events.append))

The slots are the rows of one cache (`max_len` positions each). A request waits in a bounded queue
until a slot is free, then its prompt is prefilled into a one-row cache `prefill_chunk` tokens at a
time, one chunk between two decode steps of the running slots (a long prompt delays the others by
one chunk per step, never by the whole prompt), and the row is copied into its slot. Each decode
step runs all slots at once (one pass over the weights for every loop of every slot in batched
mode); free slots compute too but keep their length, and whatever they write is replaced when a
request takes them. Rows never mix: a slot's tokens equal its request decoded alone (with greedy
sampling; a seeded request's samples are its own too, from its seed and token index).

A request leaves at `max_tokens`, a stop id (EOS), a stop string (host side, on decoded text) or
`cancel` (a client that went away): its slot is free for the next step. Events go to the request's
`emit` on the scheduler's thread: `Delta(text)` pieces of text (a piece that could begin a stop
string is held back until it cannot), then one `Finished(reason, prompt_tokens, completion_tokens)`
or `Failed(message)`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
import dataclasses
import functools
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from loopcoder_jax.data.tokenizer import Tokenizer
from loopcoder_jax.inference import decode, sampling
from loopcoder_jax.inference.cache import (
    PER_LAYER,
    Cache,
    cache_shardings,
    init_cache,
)


# ------------------------------------------------------------------------------------- requests
@dataclasses.dataclass(frozen=True)
class Delta:
  text: str


@dataclasses.dataclass(frozen=True)
class Finished:
  reason: str  # "stop" (EOS or a stop string) | "length" (max_tokens)
  prompt_tokens: int
  completion_tokens: int


@dataclasses.dataclass(frozen=True)
class Failed:
  message: str


Event = Delta | Finished | Failed


@dataclasses.dataclass
class Request:
  """One completion: prompt ids and its own sampling settings; `emit` receives its events."""

  prompt_ids: Sequence[int]
  max_tokens: int
  emit: Callable[[Event], None]
  temperature: float = 0.0
  top_p: float = 1.0
  stop: Sequence[str] = ()
  seed: int = 0


class QueueFull(Exception):
  """The waiting queue holds `max_queue` requests already."""


class Detokenizer:
  """A request's tokens as text, incrementally, with its stop strings.

  `push(id)` returns (new text safe to show, stopped). Text is decoded from a few tokens back (a
  tokenizer needs the context at a token boundary) and waits for a whole character; a stop string
  ends the text where it begins, and the last `longest stop - 1` characters are held back until
  they cannot begin one. `flush()` returns what is held back once the request ends otherwise.
  """

  def __init__(self, tok: Tokenizer, stops: Sequence[str]):
    self.tok, self.stops = tok, tuple(s for s in stops if s)
    self.hold = max((len(s) for s in self.stops), default=1) - 1
    self.ids: list[int] = []
    self.start = self.done = (
        0  # ids[start:done] decoded; ids[done:] await a whole character
    )
    self.text, self.shown = "", 0

  def push(self, token: int) -> tuple[str, bool]:
    self.ids.append(token)
    before = self.tok.decode(self.ids[self.start : self.done])
    now = self.tok.decode(self.ids[self.start :])
    if now.endswith("\ufffd"):
      return "", False
    new = now[len(before) :]
    self.start, self.done = self.done, len(self.ids)
    look = max(0, len(self.text) - self.hold)
    self.text += new
    cut = min(
        (i for i in (self.text.find(s, look) for s in self.stops) if i >= 0),
        default=-1,
    )
    if cut >= 0:
      self.text = self.text[:cut]
      return self.flush(), True
    return self._show(len(self.text) - self.hold), False

  def _show(self, upto: int) -> str:
    if upto <= self.shown:
      return ""
    piece, self.shown = self.text[self.shown : upto], upto
    return piece

  def flush(self) -> str:
    """All text not shown yet (the request ends): held-back text, and a last character still
    missing bytes as the tokenizer decodes it."""
    self.text += self.tok.decode(self.ids[self.start :])[
        len(self.tok.decode(self.ids[self.start : self.done])) :
    ]
    self.start = self.done = len(self.ids)
    return self._show(len(self.text))


@dataclasses.dataclass(eq=False)
class _Live:
  """A request in the scheduler: where it is and what it has produced."""

  request: Request
  text: Detokenizer
  slot: int = -1
  prefilled: int = 0  # prompt tokens in its row cache so far
  row: Any = None  # its one-row cache while prefilling
  generated: int = 0
  last: int = 0  # the last sampled token (the next step's input)
  cancelled: bool = False


# ------------------------------------------------------------------------------------- programs
class SlotPrograms:
  """The compiled programs of continuous batching, for `slots` rows of `max_len` positions.

  init_slots()                          -> the slots' cache (all free)
  init_row()                            -> a fresh one-row cache
  prefill(params, row, tokens [1, C], n [1], sampling [3] arrays) -> (token [1], row)
  insert(cache, row, slot)              -> cache with the row in slot `slot` (cache donated)
  step(params, cache, tokens [B], active [B], temperature [B], top_p [B], seed [B], count [B])
                                        -> (next tokens [B], cache) (cache donated)
  Each compiles once (fixed shapes); on a mesh, caches carry `cache_shardings`.
  """

  def __init__(self, engine, slots: int, max_len: int, chunk: int):
    cfg, mode, layout = engine.cfg, engine.mode, engine.layout
    self.slots, self.max_len, self.chunk = slots, max_len, chunk
    mesh = engine.mesh
    slot_sh = row_sh = None
    if mesh is not None:
      slot_sh = cache_shardings(cfg, mesh, slots, engine.rules)
      row_sh = cache_shardings(cfg, mesh, 1, engine.rules)

    def pin(cache, shardings):
      if shardings is None:
        return cache
      return jax.lax.with_sharding_constraint(cache, shardings)

    def first_token(logits_1xV, temperature, top_p, seed):
      keys = sampling.request_keys(seed, jnp.zeros_like(seed, jnp.int32))
      return sampling.sample_rows(logits_1xV, temperature, top_p, keys)

    @jax.jit
    def init_row():
      return pin(init_cache(cfg, 1, max_len, layout), row_sh)

    @functools.partial(jax.jit, donate_argnums=1)
    def prefill(params, row, tokens_1xC, n_1, temperature, top_p, seed):
      with decode.mesh_context(row_sh):
        logits, row = decode.extend(
            cfg, params, row, tokens_1xC, n_1, logits_at=n_1 - 1
        )
      return first_token(logits, temperature, top_p, seed), pin(row, row_sh)

    @jax.jit
    def init_slots():
      return pin(init_cache(cfg, slots, max_len, layout), slot_sh)

    @functools.partial(jax.jit, donate_argnums=0)
    def insert(cache: Cache, row: Cache, slot):
      return pin(_insert_row(cache, row, slot), slot_sh)

    @functools.partial(jax.jit, donate_argnums=1)
    def step(
        params, cache, tokens_B, active_B, temperature, top_p, seed, count
    ):
      with decode.mesh_context(slot_sh):
        # a free slot keeps its state: it never runs past the cache
        logits, new = decode.decode_step(
            cfg, params, cache, tokens_B, mode, active_B
        )
      keys = sampling.request_keys(seed, count)
      tokens = sampling.sample_rows(logits, temperature, top_p, keys)
      return tokens, pin(new, slot_sh)

    self.init_row, self.init_slots = init_row, init_slots
    self.prefill, self.insert, self.step = prefill, insert, step


def _insert_row(cache: Cache, row: Cache, slot) -> Cache:
  """`cache` with one-row cache `row` copied into row `slot` (every array of the row)."""

  def put(axis):
    def f(full, one):
      return jax.lax.dynamic_update_slice_in_dim(full, one, slot, axis)

    return f

  if cache.layout is PER_LAYER:  # rows k*B + b of [K*B, S, D] buffers
    b = cache.lengths.shape[0]

    def rows(full, one):
      kv = one.shape[0]
      return full.at[jnp.arange(kv) * b + slot].set(one)

    k1 = tuple(map(rows, cache.k1, row.k1))
    v1 = tuple(map(rows, cache.v1, row.v1))
  else:  # [L, B, S, K, D]
    k1, v1 = put(1)(cache.k1, row.k1), put(1)(cache.v1, row.v1)
  return Cache(
      k1=k1,
      v1=v1,
      ring_k=put(2)(cache.ring_k, row.ring_k),
      ring_v=put(2)(cache.ring_v, row.ring_v),
      ring_pos=put(0)(cache.ring_pos, row.ring_pos),
      carry=put(1)(cache.carry, row.carry),
      lengths=put(0)(cache.lengths, row.lengths),
  )


# ------------------------------------------------------------------------------------- scheduler
WHEN_FULL = ("reject", "wait")


class Scheduler:
  """Continuous batching of `Request`s over `slots` rows of one cache (see the module docstring).

  max_len: positions per slot (prompt + max_tokens of a request must fit; default the model's
    max_position_embeddings).
  prefill_chunk: prompt tokens prefilled between two decode steps.
  max_queue / when_full: requests waiting for a slot at most; a submit beyond raises `QueueFull`
    ("reject") or blocks until one leaves the queue ("wait").
  """

  def __init__(
      self,
      engine,
      *,
      slots: int = 8,
      max_len: int | None = None,
      prefill_chunk: int = 64,
      max_queue: int = 64,
      when_full: str = "reject",
  ):
    limit = engine.cfg.max_position_embeddings
    max_len = limit if max_len is None else max_len
    if not 1 <= max_len <= limit:
      raise ValueError(
          f"max_len must be in [1, {limit}] (max_position_embeddings), got {max_len}"
      )
    if slots < 1 or prefill_chunk < 1 or max_queue < 1:
      raise ValueError(
          f"slots ({slots}), prefill_chunk ({prefill_chunk}) and max_queue ({max_queue}) "
          "must be >= 1"
      )
    if when_full not in WHEN_FULL:
      raise ValueError(
          f"when_full must be one of {WHEN_FULL}, got {when_full!r}"
      )
    self.engine, self.tokenizer = engine, engine.tokenizer
    self.slots, self.max_len, self.max_queue = slots, max_len, max_queue
    self.when_full = when_full
    self.stop_ids = frozenset(engine.stop_ids)
    self.programs = SlotPrograms(
        engine, slots, max_len, min(prefill_chunk, max_len)
    )
    self._cond = threading.Condition()
    self._waiting: deque[_Live] = deque()
    self._prefilling: _Live | None = None
    self._active: dict[int, _Live] = {}
    self._free = list(range(slots - 1, -1, -1))
    self._thread: threading.Thread | None = None
    self._stopping = False
    self.steps = 0  # decode steps run
    self.cancelled = 0  # requests ended by `cancel`

  # ----------------------------------------------------------------------------------- clients
  def check(self, request: Request) -> None:
    """ValueError naming what is wrong with a request, before it is queued."""
    n = len(request.prompt_ids)
    if n == 0:
      raise ValueError("the prompt is empty")
    if request.max_tokens < 1:
      raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
    if n + request.max_tokens > self.max_len:
      raise ValueError(
          f"the prompt ({n} tokens) + max_tokens ({request.max_tokens}) exceed the "
          f"context of {self.max_len} tokens"
      )
    if not request.temperature >= 0:
      raise ValueError(f"temperature must be >= 0, got {request.temperature}")
    if not 0 < request.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {request.top_p}")
    vocab = self.engine.cfg.vocab_size
    if min(request.prompt_ids) < 0 or max(request.prompt_ids) >= vocab:
      raise ValueError(f"prompt token ids must be in [0, {vocab})")

  def submit(self, request: Request) -> _Live:
    """Queue a request (checked first); returns its handle for `cancel`."""
    self.check(request)
    live = _Live(request, Detokenizer(self.tokenizer, request.stop))
    with self._cond:
      if self._stopping:
        raise RuntimeError("the scheduler has stopped")
      if len(self._waiting) >= self.max_queue:
        if self.when_full == "reject":
          raise QueueFull(
              f"{len(self._waiting)} requests are waiting for a slot already"
          )
        self._cond.wait_for(
            lambda: len(self._waiting) < self.max_queue or self._stopping
        )
        if self._stopping:
          raise RuntimeError("the scheduler has stopped")
      self._waiting.append(live)
      self._cond.notify_all()
    return live

  def cancel(self, handle: _Live) -> None:
    """End a request now (its client went away): its slot is free for the next step."""
    with self._cond:
      ended = handle.cancelled or (
          handle not in self._waiting
          and self._prefilling is not handle
          and self._active.get(handle.slot) is not handle
      )
      if ended:  # finished already, or cancelled before
        return
      handle.cancelled = True
      self.cancelled += 1
      # a waiting request leaves the queue now; a slot is freed by the loop's next round
      self._waiting = deque(x for x in self._waiting if x is not handle)
      self._cond.notify_all()

  @property
  def busy(self) -> int:
    """Requests being served or waiting."""
    with self._cond:
      return (
          len(self._waiting)
          + len(self._active)
          + (self._prefilling is not None)
      )

  # ----------------------------------------------------------------------------------- the loop
  def start(self) -> None:
    """Compile every program (one dummy request's worth), then run the loop on its own thread."""
    p, params = self.programs, self.engine.params
    settings = (np.zeros(1, np.float32), np.ones(1, np.float32))
    row = p.init_row()
    one = np.ones(1, np.int32)
    seed = np.zeros(1, np.uint32)
    _, row = p.prefill(
        params, row, np.zeros((1, p.chunk), np.int32), one, *settings, seed
    )
    cache = p.insert(p.init_slots(), row, np.int32(0))
    b = self.slots
    zeros = np.zeros(b, np.int32)
    out, cache = p.step(
        params,
        cache,
        zeros,
        np.zeros(b, bool),
        np.zeros(b, np.float32),
        np.ones(b, np.float32),
        zeros.astype(np.uint32),
        zeros,
    )
    jax.block_until_ready(out)
    self._cache = p.init_slots()
    self._thread = threading.Thread(
        target=self._run, name="scheduler", daemon=True
    )
    self._thread.start()

  def stop(self) -> None:
    with self._cond:
      self._stopping = True
      self._cond.notify_all()
    if self._thread is not None:
      self._thread.join()

  def _run(self) -> None:
    try:
      while self._next():
        pass
    except Exception as e:  # noqa: BLE001 - every client hears of it
      with self._cond:
        everyone = list(self._waiting) + list(self._active.values())
        everyone += [self._prefilling] if self._prefilling else []
        self._waiting.clear()
        self._active.clear()
        self._prefilling = None
        self._stopping = True
        self._cond.notify_all()
      for live in everyone:
        live.request.emit(Failed(f"the engine failed: {e}"))
      raise

  def _next(self) -> bool:
    """One round: drop cancelled requests, admit one, one prefill chunk, one decode step."""
    with self._cond:
      self._drop_cancelled()
      while not (
          self._stopping
          or self._active
          or self._prefilling
          or (self._waiting and self._free)
      ):
        self._cond.wait()
        self._drop_cancelled()
      if self._stopping:
        return False
      if self._prefilling is None and self._waiting and self._free:
        self._prefilling = self._waiting.popleft()
        self._prefilling.slot = self._free.pop()
        self._cond.notify_all()  # room in the queue
      prefilling, active = self._prefilling, dict(self._active)
    if prefilling is not None:
      self._prefill_chunk(prefilling)
    if active:
      self._step(active)
    return True

  def _drop_cancelled(self) -> None:
    self._waiting = deque(x for x in self._waiting if not x.cancelled)
    if self._prefilling is not None and self._prefilling.cancelled:
      self._free.append(self._prefilling.slot)
      self._prefilling = None
    for slot, live in list(self._active.items()):
      if live.cancelled:
        del self._active[slot]
        self._free.append(slot)

  def _prefill_chunk(self, live: _Live) -> None:
    p = self.programs
    ids = live.request.prompt_ids
    if live.row is None:
      live.row = p.init_row()
    piece = list(ids[live.prefilled : live.prefilled + p.chunk])
    tokens = np.full((1, p.chunk), self.engine.pad_id, np.int32)
    tokens[0, : len(piece)] = piece
    tok, live.row = p.prefill(
        self.engine.params,
        live.row,
        tokens,
        np.asarray([len(piece)], np.int32),
        *self._settings([live]),
    )
    live.prefilled += len(piece)
    if live.prefilled < len(ids):
      return
    self._cache = p.insert(self._cache, live.row, np.int32(live.slot))
    live.row = None
    with self._cond:
      self._prefilling = None
      if live.cancelled:
        self._free.append(live.slot)
        return
      self._active[live.slot] = live
    self._accept(live, int(jax.device_get(tok)[0]))

  @staticmethod
  def _settings(lives):
    r = [x.request for x in lives]
    return (
        np.asarray([x.temperature for x in r], np.float32),
        np.asarray([x.top_p for x in r], np.float32),
        np.asarray([x.seed & 0xFFFFFFFF for x in r], np.uint32),
    )

  def _step(self, active: dict[int, _Live]) -> None:
    b = self.slots
    tokens, on = np.zeros(b, np.int32), np.zeros(b, bool)
    temperature, top_p = np.zeros(b, np.float32), np.ones(b, np.float32)
    seed, count = np.zeros(b, np.uint32), np.zeros(b, np.int32)
    slots = list(active)
    tokens[slots] = [active[s].last for s in slots]
    on[slots] = True
    count[slots] = [active[s].generated for s in slots]
    temperature[slots], top_p[slots], seed[slots] = self._settings(
        [active[s] for s in slots]
    )
    out, self._cache = self.programs.step(
        self.engine.params,
        self._cache,
        tokens,
        on,
        temperature,
        top_p,
        seed,
        count,
    )
    out = jax.device_get(out)
    self.steps += 1
    for s in slots:
      if not active[s].cancelled:
        self._accept(active[s], int(out[s]))

  def _accept(self, live: _Live, token: int) -> None:
    """A request's new token: its text to the client, and whether it ends here."""
    live.generated += 1
    live.last = token
    req = live.request
    reason = None
    if token in self.stop_ids:
      reason = "stop"
    else:
      piece, stopped = live.text.push(token)
      if piece:
        req.emit(Delta(piece))
      if stopped:
        reason = "stop"
    if reason is None and live.generated >= req.max_tokens:
      reason = "length"
    if reason is None:
      return
    rest = (
        live.text.flush()
    )  # text held back for a stop string that did not come
    if rest:
      req.emit(Delta(rest))
    with self._cond:
      if self._active.get(live.slot) is live:
        del self._active[live.slot]
        self._free.append(live.slot)
        self._cond.notify_all()
    req.emit(Finished(reason, len(req.prompt_ids), live.generated))
