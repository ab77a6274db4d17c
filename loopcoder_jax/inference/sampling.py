"""Token samplers and stopping rules as small jittable value objects (after gemma `_sampling.py`).

A sampler is a frozen (hashable) dataclass: pass it as a static argument to `jax.jit`.
`sampler(logits_BxV, key) -> ids_B int32`. Temperature 0 means greedy everywhere.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

_NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class Greedy:

  def __call__(self, logits_BxV, key=None):
    del key
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Temperature:
  """Sample from softmax(logits / temperature)."""

  temperature: float = 1.0

  def __post_init__(self):
    if not self.temperature > 0:
      raise ValueError(
          f"temperature must be > 0 (use Greedy for 0), got {self.temperature}"
      )

  def filter(self, logits_BxV):
    return logits_BxV.astype(jnp.float32) / self.temperature

  def __call__(self, logits_BxV, key):
    return jax.random.categorical(key, self.filter(logits_BxV), axis=-1).astype(
        jnp.int32
    )


@dataclasses.dataclass(frozen=True)
class TopK(Temperature):
  """Sample among the k most likely tokens (ties at the k-th logit are kept)."""

  k: int = 40

  def __post_init__(self):
    super().__post_init__()
    if self.k < 1:
      raise ValueError(f"top_k must be >= 1, got {self.k}")

  def filter(self, logits_BxV):
    x = super().filter(logits_BxV)
    kth = jax.lax.top_k(x, min(self.k, x.shape[-1]))[0][..., -1:]
    return jnp.where(x >= kth, x, _NEG_INF)


@dataclasses.dataclass(frozen=True)
class TopP(Temperature):
  """Nucleus sampling: the smallest set of most likely tokens whose probability reaches p.

  `k > 0` applies a top-k cut first.
  """

  p: float = 0.9
  k: int = 0

  def __post_init__(self):
    super().__post_init__()
    if not 0 < self.p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.p}")
    if self.k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.k}")

  def filter(self, logits_BxV):
    x = (
        TopK(self.temperature, self.k).filter(logits_BxV)
        if self.k
        else super().filter(logits_BxV)
    )
    sorted_x = jnp.sort(x, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_x, axis=-1)
    # mass of strictly more likely tokens
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = before < self.p  # the most likely token always stays
    cutoff = jnp.min(jnp.where(keep, sorted_x, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(x >= cutoff, x, _NEG_INF)


def make_sampler(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
  """The sampler the usual CLI flags describe (temperature 0 = greedy, whatever k and p say)."""
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if top_k < 0:
    raise ValueError(f"top_k must be >= 0, got {top_k}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  if temperature == 0:
    return Greedy()
  if top_p < 1:
    return TopP(temperature, top_p, top_k)
  if top_k:
    return TopK(temperature, top_k)
  return Temperature(temperature)


@dataclasses.dataclass(frozen=True)
class StopRule:
  """When generation ends: `max_new_tokens` per row, or a row's first token in `stop_ids`."""

  max_new_tokens: int
  stop_ids: tuple[int, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
    if self.max_new_tokens < 1:
      raise ValueError(
          f"max_new_tokens must be >= 1, got {self.max_new_tokens}"
      )

  def is_stop(self, ids_B):
    if not self.stop_ids:
      return jnp.zeros(ids_B.shape, bool)
    return jnp.isin(ids_B, jnp.asarray(self.stop_ids, ids_B.dtype))


def sample_rows(logits_BxV, temperature_B, top_p_B, keys_B):
  """One token per row, each row by its own settings (continuous batching mixes requests).

  Row b is greedy where `temperature_B[b] == 0`, else nucleus sampling (`top_p_B[b]`, 1 = off)
  from softmax(logits / temperature) with its own key (`keys_B[b]`), so a row's token never
  depends on the other rows. A batch of greedy rows only takes the argmax.
  """
  greedy = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

  def sample(_):
    t_Bx1 = jnp.maximum(temperature_B.astype(jnp.float32), 1e-6)[:, None]
    x = logits_BxV.astype(jnp.float32) / t_Bx1
    sorted_x = jnp.sort(x, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_x, axis=-1)
    before = (
        jnp.cumsum(probs, axis=-1) - probs
    )  # mass of strictly more likely tokens
    keep = before < top_p_B.astype(jnp.float32)[:, None]
    cutoff = jnp.min(jnp.where(keep, sorted_x, jnp.inf), axis=-1, keepdims=True)
    x = jnp.where(x >= cutoff, x, _NEG_INF)
    sampled = jax.vmap(jax.random.categorical)(keys_B, x).astype(jnp.int32)
    return jnp.where(temperature_B > 0, sampled, greedy)

  # an all-greedy batch skips the sort over the vocabulary (as costly as a small model's step)
  return jax.lax.cond(
      jnp.any(temperature_B > 0), sample, lambda _: greedy, None
  )


def request_keys(seeds_B, counts_B):
  """Key of each row's next token: its request's seed folded with the tokens it has sampled."""
  return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(
      seeds_B.astype(jnp.uint32), counts_B
  )
