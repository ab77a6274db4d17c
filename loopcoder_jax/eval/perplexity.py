"""Held-out perplexity: bits per byte and per-token loss of a checkpoint on text it never trained on.

    held_out_perplexity(cfg, params, tok, "stdlib:heldout")   # or globs: "data/*.py,more/**/*.jsonl"

Sources are the training pipeline's (`data.pipeline.load_documents`): the built-in corpus's
held-out split, files, globs, JSONL. Documents are tokenized unshuffled (BOS/EOS as training adds
them) and packed into rows of `seq_len`; every token after a document's first is predicted
(EOS included). Loss per token is the mean next-token cross-entropy in nats over those targets;
bits per byte divides the summed loss by ln 2 and the UTF-8 bytes of the predicted text (EOS
carries no bytes), which compares across tokenizers.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import tqdm

from loopcoder_jax.data import pipeline
from loopcoder_jax.data.tokenizer import Tokenizer
from loopcoder_jax.model import loss
from loopcoder_jax.model.config import PLTConfig
from loopcoder_jax.model.transformer import PLTForCausalLM, head_weight


@functools.partial(jax.jit, static_argnums=0)
def _nll_sum(cfg: PLTConfig, params, batch):
  """(summed next-token NLL in nats, number of predicted tokens) of one packed batch."""
  x_BxSxd = PLTForCausalLM(cfg).apply(
      {"params": params},
      batch["inputs"],
      segment_ids=batch["segment_ids"],
      positions=batch["positions"],
      head=False,
  )
  mask_BxS = batch["loss_mask"].astype(jnp.float32)
  total = loss.cross_entropy_sum(
      x_BxSxd,
      head_weight(cfg, params),
      batch["targets"],
      mask_BxS,
      chunk=cfg.runtime.loss_chunk,
  )
  return total, jnp.sum(mask_BxS)


def held_out_perplexity(
    cfg: PLTConfig,
    params,
    tok: Tokenizer,
    source: str = "stdlib:heldout",
    *,
    text_key: str = "text",
    seq_len: int = 1024,
    batch_size: int = 4,
    max_tokens: int = 65536,
    progress: bool = False,
) -> dict[str, float]:
  """{"bits_per_byte", "loss_per_token", "perplexity", "tokens", "bytes"} over at most
  `max_tokens` predicted tokens of `source` (documents in order)."""
  if seq_len > cfg.max_position_embeddings:
    raise ValueError(
        f"seq_len={seq_len} exceeds the model's max_position_embeddings="
        f"{cfg.max_position_embeddings}"
    )
  data_cfg = pipeline.default_data_config()
  data_cfg.source = data_cfg.eval_source = source
  data_cfg.text_key = text_key
  batches, num_bytes = pipeline.make_eval_batches(
      data_cfg,
      tok,
      seq_len=seq_len,
      batch_size=batch_size,
      max_tokens=max_tokens,
  )
  total, count = 0.0, 0.0
  for batch in tqdm.tqdm(
      batches, desc="perplexity", unit="batch", disable=not progress
  ):
    nll, n = _nll_sum(cfg, params, batch)
    total, count = total + float(nll), count + float(n)
  per_token = total / count
  return {
      "bits_per_byte": total / (math.log(2) * num_bytes),
      "loss_per_token": per_token,
      "perplexity": math.exp(per_token),
      "tokens": int(count),
      "bytes": num_bytes,
  }
