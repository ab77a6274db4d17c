"""Text in, text out: prompts -> completions with the KV-cache decoder (`decode.py`).

    texts = complete(cfg, params, tokenizer, ["def fib(n):"], max_new_tokens=64)

`complete` runs on a cached `engine.Engine` (compiled once per shape bucket): prefill (whole prompt
or chunks), then the decode loop with static shapes, sharded over a `mesh` when one is given. With
`on_text` set and a single prompt, the completion is streamed: the loop's host callback hands over
each token and `on_text` receives each new piece of decoded text.

Stop strings (`stop=("\ndef",)`) are text-level, so they are checked on the host: `TextStop` is a
`StopRule` whose `is_stop` also asks the host (an `io_callback` per decode step) whether a row's
decoded text now holds one; that row then ends like one that sampled EOS, the loop ends once every
row has, and the text is cut where the first stop string starts.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
import dataclasses

import jax
from jax.experimental import io_callback
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

from loopcoder_jax.data.tokenizer import Tokenizer
from loopcoder_jax.inference import sampling
from loopcoder_jax.model import sharding
from loopcoder_jax.model.config import PLTConfig


def encode_prompts(
    tok: Tokenizer,
    prompts: Sequence[str],
    chat: bool = False,
    add_bos: bool | None = None,
) -> tuple[list[str], list[list[int]]]:
  """Prompt texts (chat-templated if asked) and their ids; BOS as the tokenizer says unless given."""
  texts = [
      tok.apply_chat_template([{"role": "user", "content": p}]) if chat else p
      for p in prompts
  ]
  # Chat templates carry their own BOS.
  bos = bool(tok.add_bos_token if add_bos is None else add_bos) and not chat
  ids = [tok.encode(t, add_bos=bos) for t in texts]
  if not ids or min(len(i) for i in ids) == 0:
    raise ValueError("a prompt encodes to no tokens")
  return texts, ids


def truncate(text: str, stops: Sequence[str]) -> str:
  """`text` up to where the first of `stops` begins (all of it if none occurs)."""
  cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
  return text if cut < 0 else text[:cut]


class StopWatch:
  """Host side of stop strings: each row's text so far, and which rows' text holds a stop.

  `reset(rows)` before each batch; calling it with a step's sampled ids `[B]` returns `[B]` bool,
  True for rows that have stopped (stop id or stop string) by this token: the first token after
  which the row's decoded text holds a stop. Text is decoded incrementally (the few tokens since
  the last complete character), so a step costs the same at any length.
  """

  def __init__(self, tok: Tokenizer, stops: Sequence[str], stop_ids=()):
    if not stops or not all(stops):
      raise ValueError(f"stop strings must be non-empty, got {list(stops)!r}")
    self.tok, self.stops, self.stop_ids = tok, tuple(stops), set(stop_ids)
    self.longest = max(len(s) for s in self.stops)
    self.reset(0)

  def reset(self, rows: int) -> None:
    self.ids: list[list[int]] = [[] for _ in range(rows)]
    self.texts = [""] * rows
    # per row: ids[start:done] are decoded into `texts`; ids[done:] await a whole character
    self.marks = [(0, 0)] * rows
    self.stopped = np.zeros(rows, bool)

  def __call__(self, ids_B) -> np.ndarray:
    for b, t in enumerate(np.asarray(ids_B).tolist()):
      if self.stopped[b]:
        continue
      if t in self.stop_ids:
        self.stopped[b] = True
        continue
      ids = self.ids[b]
      ids.append(t)
      start, done = self.marks[b]
      # decoding from `start` keeps the context a tokenizer needs at a token boundary
      before = self.tok.decode(ids[start:done])
      now = self.tok.decode(ids[start:])
      new = now[len(before) :]
      # a stop may end just before a character still missing bytes: look before committing
      tail = (self.texts[b] + new)[-(len(new) + self.longest - 1) :]
      self.stopped[b] = any(s in tail for s in self.stops)
      if new and not now.endswith("\ufffd"):
        self.texts[b] += new
        self.marks[b] = (done, len(ids))
    return self.stopped.copy()


@dataclasses.dataclass(frozen=True)
class TextStop(sampling.StopRule):
  """A StopRule that also ends a row once `watch(ids_B)` (a `StopWatch`, or any host callable
  returning `[B]` bool) says its decoded text holds a stop string."""

  # compared by equality: a `StopWatch` by identity (each keeps its own host state), an engine's
  # bound method by its engine, so the engine's compiled programs keep one rule
  watch: Callable[..., np.ndarray] | None = None

  def is_stop(self, ids_B):
    hit = super().is_stop(ids_B)
    if self.watch is None:
      return hit
    host = io_callback(
        self.watch, jax.ShapeDtypeStruct(ids_B.shape, jnp.bool_), ids_B
    )
    return hit | host


_ENGINES: collections.OrderedDict = collections.OrderedDict()
_ENGINES_KEPT = (
    2  # the last engines' params stay referenced (and placed) while cached
)


def engine_for(
    cfg: PLTConfig,
    params,
    tok: Tokenizer,
    *,
    mode: str = "batched",
    prefill_chunk: int = 0,
    mesh: Mesh | None = None,
    rules=sharding.DEFAULT_RULES,
):
  """The cached `engine.Engine` of these arguments (params and tokenizer by identity): repeated
  calls with the same model reuse its compiled programs. `clear_engines()` drops them.
  """
  from loopcoder_jax.inference.engine import (
      Engine,  # engine imports this module
  )

  key = (cfg, id(params), id(tok), mode, prefill_chunk, mesh, rules)
  if key in _ENGINES:
    _ENGINES.move_to_end(key)
    return _ENGINES[key][0]
  engine = Engine(
      cfg,
      params,
      tok,
      mesh=mesh,
      rules=rules,
      mode=mode,
      prefill_chunk=prefill_chunk,
  )
  # the key's ids stay valid while `params` and `tok` are held here
  _ENGINES[key] = (engine, params, tok)
  while len(_ENGINES) > _ENGINES_KEPT:
    _ENGINES.popitem(last=False)
  return engine


def clear_engines() -> None:
  _ENGINES.clear()


def complete(
    cfg: PLTConfig,
    params,
    tok: Tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 128,
    sampler: Callable[..., jax.Array] | None = None,
    chat: bool = False,
    mode: str = "batched",
    prefill_chunk: int = 0,
    seed: int = 0,
    add_bos: bool | None = None,
    on_text: Callable[[str], None] | None = None,
    stop: Sequence[str] = (),
    mesh: Mesh | None = None,
    rules=sharding.DEFAULT_RULES,
) -> list[str]:
  """Completions (without the prompt, stop tokens removed) for a batch of prompts, by the cached
  engine of (cfg, params, tok, mode, prefill_chunk, mesh, rules): `engine.Engine.complete`.

  With `stop` strings, each completion ends before the first one it produces (and decoding of a
  row ends as soon as its text holds one). `mesh` and `rules` as in `decode.prefill_and_generate`.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  engine = engine_for(
      cfg,
      params,
      tok,
      mode=mode,
      prefill_chunk=prefill_chunk,
      mesh=mesh,
      rules=rules,
  )
  return engine.complete(
      prompts,
      max_new_tokens=max_new_tokens,
      sampler=sampler,
      chat=chat,
      seed=seed,
      add_bos=add_bos,
      on_text=on_text,
      stop=stop,
  )
