"""The HF <-> our params name table (spec section 5), and the key matching on top of it.

`TABLE` maps each HF key pattern (`{i}` = layer index, stacked on our axis 0) to our param path, the
HF shape, and whether the linear is transposed (HF `[out, in]`, ours `[in, ...out]`; reshapes come
from comparing the HF shape with `abstract_params`). Both directions read the same rows; an input
alias is one more string in a row's `aliases`; `when` drops a row for configs without that param.
`Rule.read_ours` maps a block of our layout back to the HF region it comes from, so a sharded load
reads only each device's slice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
import dataclasses
import math
import re
from typing import Any

import numpy as np

from loopcoder_jax.model.config import PLTConfig


@dataclasses.dataclass(frozen=True)
class Rule:
  hf: str  # HF key; "{i}" = layer index
  path: str  # our param path ("/"-separated); layer rules are stacked on axis 0
  hf_shape: Callable[[PLTConfig], tuple[int, ...]]
  transpose: bool = False  # HF [out, in] linear <-> our [in, out] kernel
  aliases: tuple[str, ...] = ()  # accepted on input, never written
  when: Callable[[PLTConfig], bool] = lambda c: True

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.hf

  def into_ours(self, w, out, start: int = 0):
    """Rows `start .. start + len(w)` of an HF tensor written into `out` (the whole param in our
    contiguous layout, cast to its dtype) without a temporary. Transposed rules are 2-D linears,
    whose HF rows are our columns.
    """
    if self.transpose:
      out.reshape(w.shape[1], -1)[:, start : start + len(w)] = w.T
    else:
      out.reshape((-1,) + w.shape[1:])[start : start + len(w)] = w

  def to_hf(self, x, cfg: PLTConfig):
    shape = self.hf_shape(cfg)
    x = x.reshape(shape[::-1] if self.transpose else shape)
    return x.T if self.transpose else x

  def read_ours(
      self,
      read: Callable[[tuple[slice, ...]], np.ndarray],
      hf_shape: tuple[int, ...],
      our_shape: tuple[int, ...],
      block: tuple[slice, ...],
  ) -> np.ndarray:
    """`block` of the HF tensor `w` in our layout (what `into_ours` writes), reading only the region
    of `w` it comes from.

    `read(hf_block)` returns that block of the HF tensor (e.g. a safetensors slice). Our axes split
    HF axes (`[in, H*D]` -> `[in, H, D]`): a block that takes whole inner axes (D, never sharded)
    is one contiguous HF range; otherwise the range of whole inner rows around it is read.
    """
    src = tuple(hf_shape[::-1] if self.transpose else hf_shape)
    groups = _split_groups(src, our_shape, self.hf)
    bounds = [b.indices(n)[:2] for b, n in zip(block, our_shape)]
    region, expanded, inner_block = [], [], []
    for axes in groups:
      (lo, hi), inner = bounds[axes[0]], math.prod(
          our_shape[a] for a in axes[1:]
      )
      region.append(slice(lo * inner, hi * inner))
      expanded += [hi - lo] + [our_shape[a] for a in axes[1:]]
      inner_block += [slice(None)] + [slice(*bounds[a]) for a in axes[1:]]
    w = read(tuple(region[::-1]) if self.transpose else tuple(region))
    w = w.T if self.transpose else w
    return w.reshape(expanded)[tuple(inner_block)]


def _split_groups(
    src: tuple[int, ...], dst: tuple[int, ...], what: str
) -> list[list[int]]:
  """Per axis of `src`, the axes of `dst` it is split into (a reshape that only splits axes)."""
  groups, j = [], 0
  for n in src:
    group: list[int] = []
    size = 1
    while j < len(dst) and (not group or size < n):
      group.append(j)
      size *= dst[j]
      j += 1
    if size != n:
      raise ValueError(
          f"hf_names.TABLE: {what} maps {src} to {dst}, which is not a split of axes"
      )
    groups.append(group)
  groups[-1] += range(j, len(dst))  # trailing size-1 axes
  if math.prod(dst[j:]) != 1:
    raise ValueError(
        f"hf_names.TABLE: {what} maps {src} to {dst}, which is not a split of axes"
    )
  return groups


_L, _A = "model.layers.{i}.", "layers/self_attn/"
_LOOP_GATE, _GATE_PROJECTIONS = (
    "model.layers.{i}.self_attn.loop_gate_proj.",
    "model.gate_projections.{i}.",
)

TABLE: tuple[Rule, ...] = (
    Rule(
        "model.embed_tokens.weight",
        "embed_tokens/embedding",
        lambda c: (c.vocab_size, c.hidden_size),
    ),
    Rule(
        _L + "input_layernorm.weight",
        "layers/input_layernorm/scale",
        lambda c: (c.hidden_size,),
    ),
    Rule(
        _L + "self_attn.q_proj.weight",
        _A + "q_proj/kernel",
        lambda c: (c.num_attention_heads * c.head_size, c.hidden_size),
        transpose=True,
    ),
    Rule(
        _L + "self_attn.k_proj.weight",
        _A + "k_proj/kernel",
        lambda c: (c.num_key_value_heads * c.head_size, c.hidden_size),
        transpose=True,
    ),
    Rule(
        _L + "self_attn.v_proj.weight",
        _A + "v_proj/kernel",
        lambda c: (c.num_key_value_heads * c.head_size, c.hidden_size),
        transpose=True,
    ),
    Rule(
        _L + "self_attn.o_proj.weight",
        _A + "o_proj/kernel",
        lambda c: (c.hidden_size, c.num_attention_heads * c.head_size),
        transpose=True,
    ),
    # The gate reads the hidden states ([H, d] linear) or each head's query ([H, D], per head).
    Rule(
        _L + "self_attn.plt_gate.weight",
        _A + "plt_gate/kernel",
        lambda c: (c.num_attention_heads, c.hidden_size),
        transpose=True,
        aliases=(_LOOP_GATE + "weight", _GATE_PROJECTIONS + "weight"),
        when=lambda c: c.plt_gate_use_hidden_states,
    ),
    Rule(
        _L + "self_attn.plt_gate.weight",
        _A + "plt_gate/kernel",
        lambda c: (c.num_attention_heads, c.head_size),
        aliases=(_LOOP_GATE + "weight", _GATE_PROJECTIONS + "weight"),
        when=lambda c: not c.plt_gate_use_hidden_states,
    ),
    Rule(
        _L + "self_attn.plt_gate.bias",
        _A + "plt_gate/bias",
        lambda c: (c.num_attention_heads,),
        aliases=(_LOOP_GATE + "bias", _GATE_PROJECTIONS + "bias"),
    ),
    Rule(
        _L + "self_attn.plt_gate.gate_norm.weight",
        _A + "plt_gate/gate_norm/scale",
        lambda c: (c.hidden_size,),
        aliases=(_LOOP_GATE + "gate_norm.weight",),
    ),
    Rule(
        _L + "post_attention_layernorm.weight",
        "layers/post_attention_layernorm/scale",
        lambda c: (c.hidden_size,),
    ),
    Rule(
        _L + "mlp.gate_proj.weight",
        "layers/mlp/gate_proj/kernel",
        lambda c: (c.intermediate_size, c.hidden_size),
        transpose=True,
    ),
    Rule(
        _L + "mlp.up_proj.weight",
        "layers/mlp/up_proj/kernel",
        lambda c: (c.intermediate_size, c.hidden_size),
        transpose=True,
    ),
    Rule(
        _L + "mlp.down_proj.weight",
        "layers/mlp/down_proj/kernel",
        lambda c: (c.hidden_size, c.intermediate_size),
        transpose=True,
    ),
    Rule("model.norm.weight", "norm/scale", lambda c: (c.hidden_size,)),
    Rule(
        "lm_head.weight",
        "lm_head/kernel",
        lambda c: (c.vocab_size, c.hidden_size),
        transpose=True,
    ),
)


@dataclasses.dataclass(frozen=True)
class Slot:
  """One HF tensor: rule, layer (None for unstacked), HF key/shape, our per-layer shape."""

  rule: Rule
  layer: int | None
  key: str
  hf_shape: tuple[int, ...]
  our_shape: tuple[int, ...]


def flatten(tree, prefix=()) -> dict[str, Any]:
  """A params tree as {"a/b/c": leaf}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) or hasattr(v, "items"):
      out.update(flatten(v, prefix + (k,)))
    else:
      out["/".join(prefix + (k,))] = v
  return out


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
  """The inverse of `flatten`."""
  tree: dict[str, Any] = {}
  for path, v in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def param_shapes(cfg: PLTConfig) -> dict[str, tuple[int, ...]]:
  """Our param path -> shape (layers stacked), for a model with this config."""
  from loopcoder_jax.model.transformer import (
      abstract_params,  # local: model imports are heavy
  )

  return {p: tuple(a.shape) for p, a in flatten(abstract_params(cfg)).items()}


def plan(cfg: PLTConfig) -> list[Slot]:
  """Every HF tensor of a model with this config, in the order written (layer-major)."""
  shapes = param_shapes(cfg)
  active = [r for r in TABLE if r.when(cfg) and r.path in shapes]
  uncovered = set(shapes) - {r.path for r in active}
  if uncovered:  # the table must cover the model; a new param needs a row
    raise ValueError(
        f"hf_names.TABLE has no row for param(s) {sorted(uncovered)}"
    )

  def slot(r, i):
    our = shapes[r.path][1:] if r.per_layer else shapes[r.path]
    return Slot(r, i, r.hf.format(i=i), tuple(r.hf_shape(cfg)), our)

  layer_rules = [r for r in active if r.per_layer]
  out = []
  for r in active:
    if not r.per_layer:
      out.append(slot(r, None))
    elif r is layer_rules[0]:
      out += [
          slot(lr, i)
          for i in range(cfg.num_hidden_layers)
          for lr in layer_rules
      ]
  for s in out:
    if int(np.prod(s.hf_shape)) != int(np.prod(s.our_shape)):
      raise ValueError(
          f"hf_names.TABLE: {s.key} HF shape {s.hf_shape} does not fit param {s.rule.path} "
          f"shape {s.our_shape}"
      )
  return out


# Accepted and skipped on input: RoPE tables some exporters store (recomputed from rope_theta here).
IGNORED = re.compile(r"(.+\.)?rotary_emb\.inv_freq\Z")
# A tied checkpoint may still store the head; `match` leaves it to the caller to check it equals E.
TIED_HEAD = "lm_head.weight"


def _pattern(hf: str) -> re.Pattern:
  return re.compile(re.escape(hf).replace(re.escape("{i}"), r"(\d+)") + r"\Z")


def match(
    cfg: PLTConfig, slots: list[Slot], keys: Iterable[str]
) -> dict[str, str]:
  """Slot key -> the checkpoint key holding it (canonical or alias); raises on any mismatch.

  `IGNORED` keys are skipped, and so is `TIED_HEAD` in a tied config.
  """
  by_rule_layer = {(id(s.rule), s.layer): s for s in slots}
  patterns = [
      (_pattern(name), r)
      for r in TABLE
      if r.when(cfg)
      for name in (r.hf,) + r.aliases
  ]
  found: dict[str, str] = {}
  unexpected = []
  for key in sorted(keys):
    if IGNORED.match(key) or (cfg.tie_word_embeddings and key == TIED_HEAD):
      continue
    hit = None
    for pat, r in patterns:
      m = pat.match(key)
      if m:
        layer = int(m.group(1)) if r.per_layer else None
        hit = by_rule_layer.get((id(r), layer))
        if hit is not None:
          break
    if hit is None:
      unexpected.append(key)
    elif hit.key in found:
      raise ValueError(
          f"checkpoint holds {hit.key} twice: as {found[hit.key]} and as {key}"
      )
    else:
      found[hit.key] = key
  if unexpected:
    more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
    raise ValueError(
        f"unexpected key {unexpected[0]}{more} for this config (num_hidden_layers="
        f"{cfg.num_hidden_layers}, plt_num_loops={cfg.plt_num_loops}, "
        f"plt_gate_use_hidden_states={cfg.plt_gate_use_hidden_states}, "
        f"tie_word_embeddings={cfg.tie_word_embeddings})"
    )
  missing = [s.key for s in slots if s.key not in found]
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise ValueError(f"missing key {missing[0]}{more}")
  return found
