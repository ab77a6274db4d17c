"""The held-out score of a run, before and after training.

Text data is scored in bits per byte of the held-out documents; chat data in mean loss per
assistant token (nats), the only tokens it trains on.
"""

from __future__ import annotations

import math

import jax

from loopcoder_jax.train import step as train_step


def _local_rows(batch: dict, process_index: int, process_count: int) -> dict:
  n = next(iter(batch.values())).shape[0] // process_count
  return {
      k: v[process_index * n : (process_index + 1) * n]
      for k, v in batch.items()
  }


def _eval_sums(eval_fn, params, batches, mesh, rules) -> tuple[float, float]:
  """(summed token NLL in nats, number of scored tokens) over held-out batches."""
  pi, pc = jax.process_index(), jax.process_count()
  total, count = 0.0, 0.0
  for b in batches:
    ce, n = eval_fn(
        params, train_step.global_batch(_local_rows(b, pi, pc), mesh, rules)
    )
    total, count = total + float(ce), count + float(n)
  return total, count


def bits_per_byte(
    eval_fn, params, batches, num_bytes: int, mesh, rules
) -> float:
  total, _ = _eval_sums(eval_fn, params, batches, mesh, rules)
  return total / (math.log(2) * num_bytes)


def token_loss(eval_fn, params, batches, mesh, rules) -> float:
  """Mean NLL (nats) per scored token: per assistant token for chat batches."""
  total, count = _eval_sums(eval_fn, params, batches, mesh, rules)
  return total / count


class HeldOut:
  """Scores params on the held-out batches and reports it: `summary["<key>_before"]` at the start,
  `summary["<key>_after"]` at the end, where key is "loss" (chat) or "bpb" (text). No batches
  (`eval.max_tokens = 0`): nothing is scored.
  """

  def __init__(self, batches, num_bytes: int, chat: bool, eval_fn, mesh, rules):
    self.batches, self.num_bytes, self.chat = batches, num_bytes, chat
    self._eval = (eval_fn, mesh, rules)
    self.key = "loss" if chat else "bpb"
    self._what = "assistant-token loss" if chat else "bits per byte"

  def score(self, params) -> float:
    eval_fn, mesh, rules = self._eval
    if self.chat:
      return token_loss(eval_fn, params, self.batches, mesh, rules)
    return bits_per_byte(
        eval_fn, params, self.batches, self.num_bytes, mesh, rules
    )

  def before(self, params, step: int, summary: dict, log) -> None:
    if not self.batches:
      return
    v = summary[f"{self.key}_before"] = self.score(params)
    if self.chat:
      n = int(sum(b["loss_mask"].sum() for b in self.batches))
      size = f"nats ({n} tokens)"
    else:
      size = f"({self.num_bytes} bytes)"
    log.info(f"held-out {self._what} at step {step}: {v:.4f} {size}")

  def after(self, params, step: int, summary: dict, log) -> None:
    if not self.batches:
      return
    v = summary[f"{self.key}_after"] = self.score(params)
    was = summary.get(f"{self.key}_before", float("nan"))
    unit = ", nats per token" if self.chat else ""
    log.info(
        f"held-out {self._what}: {was:.4f} before -> {v:.4f} after (step {step}{unit})"
    )
