"""Text in, text out: prompts -> completions with the KV-cache decoder (`decode.py`).

    texts = complete(cfg, params, tokenizer, ["def fib(n):"], max_new_tokens=64)

One jitted program per call (`decode.prefill_and_generate`): prefill (whole prompt or chunks), then
the decode loop with static shapes, sharded over a `mesh` when one is given. With `on_text` set and a
single prompt, the completion is streamed: the loop's host callback hands over each token and
`on_text` receives each new piece of decoded text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from loopcoder_jax.data.tokenizer import Tokenizer
from loopcoder_jax.inference import decode, sampling
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
  bos = (
      tok.add_bos_token if add_bos is None else add_bos
  ) and not chat  # templates carry their own
  ids = [tok.encode(t, add_bos=bos) for t in texts]
  if not ids or min(len(i) for i in ids) == 0:
    raise ValueError("a prompt encodes to no tokens")
  return texts, ids


def complete(
    cfg: PLTConfig,
    params,
    tok: Tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 128,
    sampler: sampling.Sampler | None = None,
    chat: bool = False,
    mode: str = "batched",
    prefill_chunk: int = 0,
    seed: int = 0,
    add_bos: bool | None = None,
    on_text: Callable[[str], None] | None = None,
    mesh: Mesh | None = None,
    rules=sharding.DEFAULT_RULES,
) -> list[str]:
  """Completions (without the prompt, stop tokens removed) for a batch of prompts; `mesh` and
  `rules` as in `decode.prefill_and_generate`."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if prefill_chunk < 0:
    raise ValueError(f"prefill_chunk must be >= 0, got {prefill_chunk}")
  sampler = sampler or sampling.Greedy()
  _, ids = encode_prompts(tok, prompts, chat, add_bos)
  plen = max(len(i) for i in ids)
  max_len = plen + max_new_tokens
  if max_len > cfg.max_position_embeddings:
    raise ValueError(
        f"prompt ({plen} tokens) + max_new_tokens={max_new_tokens} exceed the model's "
        f"max_position_embeddings={cfg.max_position_embeddings}"
    )
  stop = sampling.StopRule(
      max_new_tokens, tuple(sorted(set(tok.eos_ids) | set(cfg.eos_ids)))
  )
  pad = tok.pad_id if tok.pad_id is not None else 0
  tokens = jnp.asarray([i + [pad] * (plen - len(i)) for i in ids], jnp.int32)
  lengths = jnp.asarray([len(i) for i in ids], jnp.int32)

  stream = on_text is not None and len(ids) == 1
  streamed: list[int] = []
  shown = [""]

  # host side: decode all so far, hand over the new suffix
  def on_token(step, ids_B, live_B):
    del step
    if live_B[0] and int(ids_B[0]) not in stop.stop_ids:
      streamed.append(int(ids_B[0]))
      text = tok.decode(streamed)
      # wait for the rest of a multi-byte character
      if not text.endswith("\ufffd"):
        on_text(text[len(shown[0]) :])
        shown[0] = text

  out_ids, counts = jax.device_get(
      decode.prefill_and_generate(
          cfg,
          params,
          tokens,
          lengths,
          jax.random.key(seed),
          sampler,
          stop,
          max_len=max_len,
          mode=mode,
          prefill_chunk=prefill_chunk,
          callback=on_token if stream else None,
          pad_id=pad,
          mesh=mesh,
          rules=rules,
      )
  )
  jax.effects_barrier()
  texts = [
      tok.decode([int(t) for t in row[:n] if int(t) not in stop.stop_ids])
      for row, n in zip(out_ids, counts)
  ]
  if stream and texts[0] != shown[0]:
    on_text(texts[0][len(shown[0]) :])
  return texts
