"""Continuous batching over the PLT cache: a fixed number of slots, requests join and leave at step
boundaries.

    scheduler = Scheduler(engine, slots=8, max_len=2048)
    scheduler.start()
    handle = scheduler.submit(Request(ids, max_tokens=64, emit=events.append))

The slots are the rows of one cache (`max_len` positions each). A request waits in a bounded queue
until a slot is free; then its prompt is prefilled straight into its slot's rows, `prefill_chunk`
tokens at a time, one piece between two decode steps of the running slots (a long prompt delays
the others by one piece per step, never by the whole prompt). The pieces of several requests go
through one admission call, as many as fit in `prefill_budget` tokens (rows x width, in compiled
buckets), so a burst of requests joins in a few steps rather than one per step. Each decode step
runs all slots at once (one pass over the weights for every loop of every slot in batched mode);
free slots compute too but keep their length, and whatever they write is replaced when a request
takes them. A round (admission, step) waits for the device once. Rows never mix: a slot's tokens
equal its request decoded alone (with greedy sampling; a seeded request's samples are its own too,
from its seed and token index).

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
  generated: int = 0
  last: int = 0  # the last sampled token (the next step's input)
  cancelled: bool = False


# ------------------------------------------------------------------------------------- programs
def _ladder(top: int, smallest: int = 1) -> list[int]:
  """Bucket sizes: `smallest` times powers of four below `top`, then `top` (few programs to
  compile; a batch pads to at most about four times its size)."""
  out, n = [], smallest
  while n < top:
    out.append(n)
    n *= 4
  return out + [top]


class SlotPrograms:
  """The compiled programs of continuous batching, for `slots` rows of `max_len` positions.

  init_slots()                          -> the slots' cache (all free)
  admit(params, cache, slot [A], tokens [A, C], n [A], fresh [A], temperature [A], top_p [A],
        seed [A])                       -> (first tokens [A], cache) (cache donated)
  step(params, cache, tokens [B], active [B], temperature [B], top_p [B], seed [B], count [B])
                                        -> (next tokens [B], cache) (cache donated)
  `admit` prefills the next `n` prompt tokens of A requests into their slots' rows (a `fresh` row
  starts empty; a slot of `slots` is a padding row: nothing is written) and samples each row's
  token after its last one. Its shapes come in buckets (`shapes`): widths C from `min(16, chunk)`
  by factors of four up to `chunk`, and for each width rows A from 1 by factors of four up to the
  most that fit `budget` tokens (A * C, at least one row; at most `slots`). `step` has one shape.
  On a mesh, the cache carries `cache_shardings`.
  """

  def __init__(self, engine, slots: int, max_len: int, chunk: int, budget: int):
    cfg, mode, layout = engine.cfg, engine.mode, engine.layout
    self.slots, self.max_len, self.chunk = slots, max_len, chunk
    self.widths = _ladder(chunk, min(16, chunk))
    self.max_rows = {c: min(slots, max(1, budget // c)) for c in self.widths}
    self.shapes = [
        (a, c) for c in self.widths for a in _ladder(self.max_rows[c])
    ]
    mesh = engine.mesh
    slot_sh = None
    if mesh is not None:
      slot_sh = cache_shardings(cfg, mesh, slots, engine.rules)

    def pin(cache):
      if slot_sh is None:
        return cache
      return jax.lax.with_sharding_constraint(cache, slot_sh)

    @jax.jit
    def init_slots():
      return pin(init_cache(cfg, slots, max_len, layout))

    @functools.partial(jax.jit, donate_argnums=1)
    def admit(
        params,
        cache,
        slot_A,
        tokens_AxC,
        n_A,
        fresh_A,
        temperature,
        top_p,
        seed,
    ):
      rows = _start_rows(_take_rows(cache, slot_A), fresh_A)
      with decode.mesh_context(slot_sh):
        logits, rows = decode.extend(
            cfg,
            params,
            rows,
            tokens_AxC,
            n_A,
            logits_at=jnp.maximum(n_A - 1, 0),
        )
      keys = sampling.request_keys(seed, jnp.zeros_like(n_A))
      first = sampling.sample_rows(logits, temperature, top_p, keys)
      return first, pin(_put_rows(cache, rows, slot_A))

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
      return tokens, pin(new)

    self.init_slots, self.admit, self.step = init_slots, admit, step

  def width(self, longest: int) -> int:
    """The admission width bucket of a batch whose longest piece has `longest` tokens."""
    return next(c for c in self.widths if c >= longest)


# Rows of the slots' cache: an A-row cache taken out (`_take_rows`) and put back (`_put_rows`);
# slot `slots` (a padding row) reads any row and writes nothing.
def _row_index(cache: Cache, slot_A):
  """Per-layer buffers hold row b of kv head k at k*B + b: the buffer rows of the A slots
  (kv head major), a padding slot's pointing past the end."""
  b = cache.lengths.shape[0]
  kv = cache.k1[0].shape[0] // b
  idx = jnp.arange(kv)[:, None] * b + slot_A[None, :]
  return jnp.where(slot_A[None, :] < b, idx, kv * b).reshape(-1)


def _take_rows(cache: Cache, slot_A) -> Cache:
  def take(axis):
    return lambda x: jnp.take(x, slot_A, axis=axis, mode="clip")

  if cache.layout is PER_LAYER:
    idx = _row_index(cache, slot_A)
    k1 = tuple(jnp.take(x, idx, axis=0, mode="clip") for x in cache.k1)
    v1 = tuple(jnp.take(x, idx, axis=0, mode="clip") for x in cache.v1)
  else:  # [L, B, S, K, D]
    k1, v1 = take(1)(cache.k1), take(1)(cache.v1)
  return Cache(
      k1=k1,
      v1=v1,
      ring_k=take(2)(cache.ring_k),
      ring_v=take(2)(cache.ring_v),
      ring_pos=take(0)(cache.ring_pos),
      carry=take(1)(cache.carry),
      lengths=take(0)(cache.lengths),
  )


def _start_rows(rows: Cache, fresh_A) -> Cache:
  """Fresh rows as `init_cache` makes them where it shows: no tokens, an empty ring, a zero
  carry (loop-1 K/V past a row's length are never read)."""
  return rows.replace(
      lengths=jnp.where(fresh_A, 0, rows.lengths),
      ring_pos=jnp.where(fresh_A[:, None], -1, rows.ring_pos),
      carry=jnp.where(fresh_A[None, :, None], 0, rows.carry).astype(
          rows.carry.dtype
      ),
  )


def _put_rows(cache: Cache, rows: Cache, slot_A) -> Cache:
  def put(axis):
    def f(full, part):
      at = (slice(None),) * axis + (slot_A,)
      return full.at[at].set(part, mode="drop")

    return f

  if cache.layout is PER_LAYER:
    idx = _row_index(cache, slot_A)
    k1 = tuple(x.at[idx].set(y, mode="drop") for x, y in zip(cache.k1, rows.k1))
    v1 = tuple(x.at[idx].set(y, mode="drop") for x, y in zip(cache.v1, rows.v1))
  else:
    k1, v1 = put(1)(cache.k1, rows.k1), put(1)(cache.v1, rows.v1)
  return Cache(
      k1=k1,
      v1=v1,
      ring_k=put(2)(cache.ring_k, rows.ring_k),
      ring_v=put(2)(cache.ring_v, rows.ring_v),
      ring_pos=put(0)(cache.ring_pos, rows.ring_pos),
      carry=put(1)(cache.carry, rows.carry),
      lengths=put(0)(cache.lengths, rows.lengths),
  )


# ------------------------------------------------------------------------------------- scheduler
WHEN_FULL = ("reject", "wait")


class Scheduler:
  """Continuous batching of `Request`s over `slots` rows of one cache (see the module docstring).

  max_len: positions per slot (prompt + max_tokens of a request must fit; default the model's
    max_position_embeddings).
  prefill_chunk: prompt tokens of one request prefilled between two decode steps at most.
  prefill_budget: prompt tokens of all requests prefilled between two decode steps at most (at
    least `prefill_chunk`): how many waiting prompts join at once, and how long the running
    requests wait for them.
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
      prefill_budget: int = 512,
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
    if prefill_budget < prefill_chunk:
      raise ValueError(
          f"prefill_budget ({prefill_budget}) must be >= prefill_chunk ({prefill_chunk})"
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
        engine, slots, max_len, min(prefill_chunk, max_len), prefill_budget
    )
    self._cond = threading.Condition()
    self._waiting: deque[_Live] = deque()
    self._admitting: list[_Live] = []  # holding a slot, prompt being prefilled
    self._active: dict[int, _Live] = {}
    self._free = list(range(slots - 1, -1, -1))
    self._thread: threading.Thread | None = None
    self._stopping = False
    self.steps = 0  # decode steps run
    self.admissions = (
        0  # admission calls run (each prefills one piece of up to A prompts)
    )
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
          and handle not in self._admitting
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
      return len(self._waiting) + len(self._admitting) + len(self._active)

  # ----------------------------------------------------------------------------------- the loop
  def start(self) -> None:
    """Compile every program (each admission bucket, the step), then run the loop on its own
    thread."""
    p, params = self.programs, self.engine.params
    cache = p.init_slots()
    for a, c in p.shapes:  # padding rows only: nothing is written
      first, cache = p.admit(
          params, cache, *self._admission_args([], a, c), *_settings([], a)
      )
    b = self.slots
    zeros = np.zeros(b, np.int32)
    out, cache = p.step(
        params, cache, zeros, np.zeros(b, bool), *_settings([], b), zeros
    )
    jax.block_until_ready((first, out))
    self._cache = cache
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
        everyone = list(self._waiting) + self._admitting
        everyone += list(self._active.values())
        self._waiting.clear()
        self._admitting = []
        self._active.clear()
        self._stopping = True
        self._cond.notify_all()
      for live in everyone:
        live.request.emit(Failed(f"the engine failed: {e}"))
      raise

  def _next(self) -> bool:
    """One round: drop cancelled requests, give free slots to waiting ones, prefill the next
    piece of as many prompts as the budget allows, one decode step of the running ones.
    """
    with self._cond:
      self._drop_cancelled()
      while not (
          self._stopping
          or self._active
          or self._admitting
          or (self._waiting and self._free)
      ):
        self._cond.wait()
        self._drop_cancelled()
      if self._stopping:
        return False
      if self._waiting and self._free:
        while self._waiting and self._free:
          live = self._waiting.popleft()
          live.slot = self._free.pop()
          self._admitting.append(live)
        self._cond.notify_all()  # room in the queue
      joining, active = self._admission_batch(), dict(self._active)
    firsts = outs = None
    if joining:
      firsts = self._admit(joining)
    if active:
      outs = self._step(active)
    firsts, outs = jax.device_get((firsts, outs))  # the round's one wait
    if joining:
      self._joined(joining, firsts)
    if active:
      self.steps += 1
      for s in active:
        if not active[s].cancelled:
          self._accept(active[s], int(outs[s]))
    return True

  def _drop_cancelled(self) -> None:
    self._waiting = deque(x for x in self._waiting if not x.cancelled)
    for live in [x for x in self._admitting if x.cancelled]:
      self._admitting.remove(live)
      self._free.append(live.slot)
    for slot, live in list(self._active.items()):
      if live.cancelled:
        del self._active[slot]
        self._free.append(slot)

  def _piece(self, live: _Live) -> int:
    return min(
        self.programs.chunk, len(live.request.prompt_ids) - live.prefilled
    )

  def _admission_batch(self) -> list[_Live]:
    """The admitting requests whose next piece is prefilled this round: first come first, while
    the batch's bucket (rows x the longest piece's width) stays within the budget.
    """
    p, longest = self.programs, 0
    batch: list[_Live] = []
    for live in self._admitting:
      width = p.width(max(longest, self._piece(live)))
      if len(batch) + 1 > p.max_rows[width]:
        break
      batch.append(live)
      longest = max(longest, self._piece(live))
    return batch

  def _admission_args(self, lives: list[_Live], rows: int, width: int):
    """slot, tokens, n and fresh of an admission bucket (padding rows: slot `slots`, n 0)."""
    slot = np.full(rows, self.slots, np.int32)
    tokens = np.full((rows, width), self.engine.pad_id, np.int32)
    n, fresh = np.zeros(rows, np.int32), np.zeros(rows, bool)
    for i, live in enumerate(lives):
      piece = live.request.prompt_ids[live.prefilled :][: self._piece(live)]
      slot[i], n[i], fresh[i] = live.slot, len(piece), live.prefilled == 0
      tokens[i, : len(piece)] = piece
    return slot, tokens, n, fresh

  def _admit(self, lives: list[_Live]):
    """Dispatch one admission call for `lives` (their next pieces); its first tokens (on device)."""
    p = self.programs
    width = p.width(max(self._piece(x) for x in lives))
    rows = next(a for a, c in p.shapes if c == width and a >= len(lives))
    first, self._cache = p.admit(
        self.engine.params,
        self._cache,
        *self._admission_args(lives, rows, width),
        *_settings(lives, rows),
    )
    self.admissions += 1
    return first

  def _joined(self, lives: list[_Live], firsts) -> None:
    """After an admission call: requests whose prompt is in their slot now start decoding."""
    for i, live in enumerate(lives):
      live.prefilled += self._piece(live)
      if live.prefilled < len(live.request.prompt_ids):
        continue
      with self._cond:
        self._admitting.remove(live)
        if live.cancelled:
          self._free.append(live.slot)
          continue
        self._active[live.slot] = live
      self._accept(live, int(firsts[i]))

  def _step(self, active: dict[int, _Live]):
    """Dispatch one decode step of the slots in `active`; the next tokens (on device)."""
    b = self.slots
    tokens, on = np.zeros(b, np.int32), np.zeros(b, bool)
    count = np.zeros(b, np.int32)
    slots = list(active)
    tokens[slots] = [active[s].last for s in slots]
    on[slots] = True
    count[slots] = [active[s].generated for s in slots]
    temperature, top_p, seed = _settings([], b)
    temperature[slots], top_p[slots], seed[slots] = _settings(
        [active[s] for s in slots], len(slots)
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
    return out

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


def _settings(lives: list[_Live], rows: int):
  """temperature, top_p and seed of `rows` rows: the requests' in the first ones, greedy after."""
  temperature, top_p = np.zeros(rows, np.float32), np.ones(rows, np.float32)
  seed = np.zeros(rows, np.uint32)
  for i, live in enumerate(lives):
    r = live.request
    temperature[i], top_p[i], seed[i] = (
        r.temperature,
        r.top_p,
        r.seed & 0xFFFFFFFF,
    )
  return temperature, top_p, seed
