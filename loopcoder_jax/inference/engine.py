"""One generation engine for every caller, built once, compiling once per shape bucket.

    engine = Engine(cfg, params, tok)            # places params (per-layer on CPU, mesh shards)
    texts = engine.complete(["def fib(n):"], max_new_tokens=64)
    texts = engine.complete(["def add("], max_new_tokens=40)   # same bucket: nothing compiles

A batch is padded to a bucket: rows to the next power of two, prompt length to the next power of
two (at least `min_prompt_bucket`), the decode loop to the next power of two of `max_new_tokens`
(each row stops at its own budget inside it). One compiled program (`decode.generation_program`)
per bucket and sampler is kept in `programs`; a call in a known bucket only runs. The host sides of
the loop (streaming, stop strings) are routed through engine-owned callbacks to the running call,
so they never change a program. Calls are serialized (one device program at a time).

`generation.complete` uses a cached engine per (cfg, params, tokenizer, mesh, mode), so repeated
calls from notebooks, the trainer or scripts compile once. `batching.Scheduler` runs continuous
batching for a server over the same engine's params.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

from loopcoder_jax.data.tokenizer import Tokenizer
from loopcoder_jax.inference import decode, sampling
from loopcoder_jax.inference.cache import Layout, params_layout
from loopcoder_jax.inference.generation import (
    StopWatch,
    TextStop,
    encode_prompts,
    truncate,
)
from loopcoder_jax.model import sharding
from loopcoder_jax.model.config import PLTConfig


def bucket(n: int, smallest: int = 1) -> int:
  """The bucket of a size: the next power of two >= n, at least `smallest`."""
  return max(smallest, 1 << max(0, int(n) - 1).bit_length())


class _Host:
  """The host callbacks compiled into the programs, forwarding to the running call's handlers."""

  def __init__(self):
    self.on_token: Callable[..., Any] | None = None
    self.watch: StopWatch | None = None

  def token(self, step, ids_B, live_B):
    if self.on_token is not None:
      self.on_token(step, ids_B, live_B)

  def check(self, ids_B) -> np.ndarray:
    if self.watch is None:
      return np.zeros(np.shape(ids_B), bool)
    return self.watch(ids_B)


class Engine:
  """Generation over one model: params placed once, programs compiled once per bucket.

  mode: "batched" (PLT: all loops of a token in one pass) or "serial" (one pass per loop).
  layout: the cache/params layout; default per-layer on CPU without a mesh, else stacked.
  mesh: shard params, cache and rows over it (`decode.serving_shardings`).
  """

  def __init__(
      self,
      cfg: PLTConfig,
      params,
      tokenizer: Tokenizer,
      *,
      mesh: Mesh | None = None,
      rules=sharding.DEFAULT_RULES,
      mode: str = "batched",
      prefill_chunk: int = 0,
      layout: Layout | None = None,
      min_prompt_bucket: int = 16,
  ):
    if mode not in decode.MODES:
      raise ValueError(f"mode must be one of {decode.MODES}, got {mode!r}")
    if prefill_chunk < 0:
      raise ValueError(f"prefill_chunk must be >= 0, got {prefill_chunk}")
    self.cfg, self.tokenizer, self.mode = cfg, tokenizer, mode
    self.mesh = mesh if mesh is not None and mesh.size > 1 else None
    self.rules, self.prefill_chunk = rules, prefill_chunk
    self.min_prompt_bucket = min_prompt_bucket
    self.params = decode.serving_params(params, self.mesh, layout)
    self.layout = params_layout(self.params)
    if self.mesh is not None:
      self.params = jax.device_put(
          self.params,
          sharding.param_shardings(self.params, self.mesh, rules),
      )
    self.stop_ids = tuple(sorted(set(tokenizer.eos_ids) | set(cfg.eos_ids)))
    self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    self.programs: dict[tuple, Any] = {}
    self.compile_s = 0.0
    self._host = _Host()
    self._lock = threading.Lock()

  # ----------------------------------------------------------------------------------- buckets
  def _program(self, sampler, rows: int, width: int, steps: int, stops: bool):
    max_len = min(width + steps, self.cfg.max_position_embeddings)
    key = (rows, width, max_len, steps, sampler, stops)
    if key in self.programs:
      return self.programs[key]
    rule = TextStop(steps, self.stop_ids, self._host.check if stops else None)
    cache_sharding, jit_kw = decode.program_shardings(
        self.cfg, self.mesh, rows, self.rules
    )
    program = decode.generation_program(
        self.cfg,
        sampler,
        rule,
        max_len=max_len,
        mode=self.mode,
        prefill_chunk=self.prefill_chunk,
        callback=self._host.token,
        pad_id=self.pad_id,
        cache_sharding=cache_sharding,
    )
    sds = jax.ShapeDtypeStruct
    t = time.perf_counter()
    compiled = (
        jax.jit(program, **jit_kw)
        .lower(
            self.params,
            sds((rows, width), jnp.int32),
            sds((rows,), jnp.int32),
            sds((rows,), jnp.int32),
            jax.eval_shape(lambda: jax.random.key(0)),
        )
        .compile()
    )
    self.compile_s += time.perf_counter() - t
    self.programs[key] = compiled
    return compiled

  # ----------------------------------------------------------------------------------- calls
  def generate_ids(
      self,
      ids: Sequence[Sequence[int]],
      *,
      max_new_tokens: int,
      sampler=None,
      seed: int = 0,
      key: jax.Array | None = None,
      stop: Sequence[str] = (),
      on_token: Callable[..., Any] | None = None,
  ) -> tuple[np.ndarray, np.ndarray]:
    """Token ids after each prompt: (ids `[B, max_new_tokens]`, counts `[B]` of real tokens,
    a stop id included). Sampling draws from `key` (default `jax.random.key(seed)`).
    `on_token(step, ids_B, live_B)` sees each step's tokens (padding rows included: only the
    first B are real)."""
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not ids or min(len(i) for i in ids) == 0:
      raise ValueError("a prompt encodes to no tokens")
    plen = max(len(i) for i in ids)
    limit = self.cfg.max_position_embeddings
    if plen + max_new_tokens > limit:
      raise ValueError(
          f"prompt ({plen} tokens) + max_new_tokens={max_new_tokens} exceed the model's "
          f"max_position_embeddings={limit}"
      )
    sampler = sampler or sampling.Greedy()
    rows = bucket(len(ids))
    width = min(bucket(plen, self.min_prompt_bucket), limit - max_new_tokens)
    steps = bucket(max_new_tokens)
    tokens = np.full((rows, width), self.pad_id, np.int32)
    lengths = np.ones((rows,), np.int32)  # padding rows: one token, one step
    limits = np.ones((rows,), np.int32)
    for b, row in enumerate(ids):
      tokens[b, : len(row)] = row
      lengths[b], limits[b] = len(row), max_new_tokens
    with self._lock:
      program = self._program(sampler, rows, width, steps, bool(stop))
      watch = StopWatch(self.tokenizer, stop, self.stop_ids) if stop else None
      if watch is not None:
        watch.reset(rows)
      if on_token is not None and self.mesh is not None:
        on_token = decode.in_step_order(on_token)  # unordered on a mesh
      self._host.watch, self._host.on_token = watch, on_token
      try:
        args = (tokens, lengths, limits)
        if self.mesh is not None:
          _, _, rows_sh = decode.serving_shardings(
              self.cfg, self.mesh, rows, self.rules
          )
          args = jax.device_put(args, rows_sh)
        out, counts = jax.device_get(
            program(
                self.params,
                *args,
                jax.random.key(seed) if key is None else key,
            )
        )
        jax.effects_barrier()
      finally:
        self._host.watch, self._host.on_token = None, None
    n = len(ids)
    return out[:n, :max_new_tokens], counts[:n]

  def complete(
      self,
      prompts: Sequence[str],
      *,
      max_new_tokens: int = 128,
      sampler=None,
      chat: bool = False,
      seed: int = 0,
      add_bos: bool | None = None,
      on_text: Callable[[str], None] | None = None,
      stop: Sequence[str] = (),
  ) -> list[str]:
    """Completions (without the prompt, stop tokens removed) of a batch of prompts.

    With `stop` strings each completion ends before the first one it produces. With `on_text`
    and one prompt, the completion is streamed: `on_text` receives each new piece of text (a
    piece that may begin a stop string is held back until it cannot).
    """
    _, ids = encode_prompts(self.tokenizer, prompts, chat, add_bos)
    stream = _TextStream(self.tokenizer, self.stop_ids, stop, on_text)
    out, counts = self.generate_ids(
        ids,
        max_new_tokens=max_new_tokens,
        sampler=sampler,
        seed=seed,
        stop=stop,
        on_token=stream if on_text is not None and len(ids) == 1 else None,
    )
    texts = [
        truncate(
            self.tokenizer.decode(
                [int(t) for t in row[:n] if int(t) not in self.stop_ids]
            ),
            stop,
        )
        for row, n in zip(out, counts)
    ]
    if on_text is not None and len(ids) == 1:
      stream.finish(texts[0])
    return texts


class _TextStream:
  """Row 0's tokens as text pieces for `on_text`, holding back what may begin a stop string."""

  def __init__(self, tok, stop_ids, stops, on_text):
    self.tok, self.stop_ids, self.stops, self.on_text = (
        tok,
        set(stop_ids),
        stops,
        on_text,
    )
    self.hold = max((len(s) for s in stops), default=1) - 1
    self.ids: list[int] = []
    self.shown = ""

  def __call__(self, step, ids_B, live_B):
    del step
    if not live_B[0] or int(ids_B[0]) in self.stop_ids:
      return
    self.ids.append(int(ids_B[0]))
    text = self.tok.decode(self.ids)
    if text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
      return
    cut = truncate(text, self.stops)
    safe = cut if len(cut) < len(text) else text[: len(text) - self.hold]
    self._show(safe)

  def _show(self, text):
    if len(text) > len(self.shown):
      self.on_text(text[len(self.shown) :])
      self.shown = text

  def finish(self, text):
    self._show(text)
