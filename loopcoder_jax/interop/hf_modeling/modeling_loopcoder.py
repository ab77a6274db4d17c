"""PyTorch LoopCoder-V2 / Parallel Loop Transformer (`IQuestPLTCoderForCausalLM`), self-contained.

Exported next to the weights by loopcoder-jax and loaded with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`. Semantics (loopcoder-jax
docs/plt-spec.md sections 2-4):

- loop 1: an ordinary causal pass over the embeddings E; each layer keeps its post-RoPE K1, V1;
- loop r >= 2 input (cross-loop parallelism): a * E_t + b * P(r-1)_{t-1}, P = norm(h) when
  `plt_normalize_per_loop` (else h), zero at the first position of each sequence;
- layers of loops >= 2 (G-SWA): g * global + (1 - g) * local per head, global = causal attention
  over loop 1's K1/V1 of the same layer, local = this loop's own keys t-left..t, g = sigmoid of the
  gate (hidden mode: from RMSNorm_gate(layer input); query mode: from the post-RoPE query);
- logits = lm_head(norm(h(R))).

Decoding keeps the PLT state in a `PLTCache` (the transformers `Cache` interface): loop 1's K/V of
every column, a ring of left + 1 slots per layer for each loop >= 2, and the R - 1 carries P(r) of
the last column. A chunk of several new tokens (the prompt) runs the loops one after another, each
over the chunk; one new token runs all R loops as R rows of a single pass over the weights, row 1
writing its K/V into the cache before rows >= 2 read it. Without a cache the forward is the same
computation on a cache that is dropped afterwards. `attention_mask` is read as a document boundary:
padding is never attended and the first real token gets a zero CLP state. Softmax, RMSNorm and gate
statistics are computed in float32.
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
)

from .configuration_loopcoder import IQuestPLTCoderConfig

_ACT = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}
_NEG = -1e30  # finite: a fully masked (padding) query row stays NaN-free
# transformers renamed the output's `past_key_values` to `cache`; write whichever this one has
_CACHE_FIELD = (
    "cache"
    if "cache" in CausalLMOutputWithPast.__dataclass_fields__
    else "past_key_values"
)


class PLTCacheLayer(CacheLayerMixin):
  """One layer's part of the PLT state: loop 1's post-RoPE K/V of every cached column (`keys`,
  `values`: [B, T, Hkv, D]) and, for loops >= 2, a ring of W = left + 1 slots
  (`ring_keys`, `ring_values`: [R-1, B, W, Hkv, D]; slot w holds column `PLTCache.ring_cols[w]`).
  """

  def __init__(self):
    super().__init__()
    self.ring_keys = self.ring_values = None

  def lazy_initialization(self, key_states, value_states):
    self.dtype, self.device = key_states.dtype, key_states.device
    self.keys = key_states.new_empty(
        (key_states.shape[0], 0) + key_states.shape[2:]
    )
    self.values = value_states.new_empty(self.keys.shape)
    self.is_initialized = True

  def update(self, key_states, value_states, *args, **kwargs):
    """Appends loop 1's K/V of the new columns ([B, s, Hkv, D]); returns every cached column's."""
    if not self.is_initialized:
      self.lazy_initialization(key_states, value_states)
    self.keys = torch.cat([self.keys, key_states], dim=1)
    self.values = torch.cat([self.values, value_states], dim=1)
    return self.keys, self.values

  def update_ring(self, ring, key_states, value_states, slots, rings_window):
    """Ring `ring` (of loop ring + 2) takes the K/V of the last len(slots) new columns at `slots`;
    the rings are made on first use: `rings_window` = (R - 1, W).
    """
    if self.ring_keys is None:
      b, _, k, d = key_states.shape
      shape = (rings_window[0], b, rings_window[1], k, d)
      self.ring_keys = key_states.new_zeros(shape)
      self.ring_values = value_states.new_zeros(shape)
    n = len(slots)
    self.ring_keys[ring].index_copy_(1, slots, key_states[:, -n:])
    self.ring_values[ring].index_copy_(1, slots, value_states[:, -n:])

  def get_seq_length(self):
    return self.keys.shape[1] if self.is_initialized else 0

  def get_mask_sizes(self, query_length):
    return self.get_seq_length() + query_length, 0

  def get_max_length(self):
    return -1

  def map_batch(self, fn):
    """Applies `fn(tensor, batch_dim)` to every tensor of this layer."""
    if self.is_initialized:
      self.keys, self.values = fn(self.keys, 0), fn(self.values, 0)
    if self.ring_keys is not None:
      self.ring_keys = fn(self.ring_keys, 1)
      self.ring_values = fn(self.ring_values, 1)


class PLTCache(Cache):
  """The PLT decode state (loopcoder-jax docs/plt-spec.md section 4), not R full caches.

  Per layer (`PLTCacheLayer`): loop 1's K/V of every column, and a ring of left + 1 slots for each
  loop >= 2. Shared: `valid` [B, T] (which columns are tokens, not padding), `ring_cols` [W] (the
  column each ring slot holds, -1 when empty; every loop and layer writes the same columns) and
  `carry` [R-1, B, d] (P(r) of the last column, r = 1..R-1). Columns are those of
  `attention_mask`. Beam search reorders all of it together. The ring and the carries keep only the
  latest state, so the cache cannot drop tokens (`crop`) and assisted decoding is not supported.
  """

  def __init__(self, config):
    super().__init__(
        layers=[PLTCacheLayer() for _ in range(config.num_hidden_layers)]
    )
    self.window = config.plt_window_size[0] + 1
    self.valid = self.ring_cols = self.carry = None

  def get_seq_length(self, layer_idx=0):
    return 0 if self.valid is None else self.valid.shape[1]

  def get_mask_sizes(self, query_length, layer_idx=0):
    return self.get_seq_length() + query_length, 0

  def _map_batch(self, fn):
    for layer in self.layers:
      layer.map_batch(fn)
    if self.valid is not None:
      self.valid = fn(self.valid, 0)
    if self.carry is not None:
      self.carry = fn(self.carry, 1)

  def reorder_cache(self, beam_idx):
    self._map_batch(lambda x, dim: x.index_select(dim, beam_idx.to(x.device)))

  def batch_repeat_interleave(self, repeats):
    self._map_batch(lambda x, dim: x.repeat_interleave(repeats, dim=dim))

  def batch_select_indices(self, indices):
    self._map_batch(
        lambda x, dim: x[(slice(None),) * dim + (indices.to(x.device),)]
    )

  def crop(self, tokens_to_remove):
    if tokens_to_remove:
      raise ValueError(
          "the PLT cache cannot drop tokens: its rings and carries keep only the latest state"
      )

  def reset(self):
    self.layers = [PLTCacheLayer() for _ in self.layers]
    self.valid = self.ring_cols = self.carry = None


class RMSNorm(nn.Module):

  def __init__(self, size: int, eps: float):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(size))
    self.eps = eps

  def forward(self, x, out_dtype=None):
    y = x.float()
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
    return (y * self.weight.float()).to(out_dtype or x.dtype)


def _inv_freq(config, device):
  rp = getattr(config, "rope_parameters", None) or {}
  theta = float(rp.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
  d = config.head_dim
  inv = 1.0 / (
      theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)
  )
  kind = rp.get("rope_type", rp.get("type", "default"))
  if kind == "linear":
    inv = inv / float(rp["factor"])
  elif kind == "llama3":
    factor = float(rp["factor"])
    low, high = float(rp.get("low_freq_factor", 1.0)), float(
        rp.get("high_freq_factor", 4.0)
    )
    # absent key: max_position_embeddings, as transformers'
    # standardize_rope_params fills it in
    old_ctx = float(
        rp.get(
            "original_max_position_embeddings", config.max_position_embeddings
        )
    )
    wavelen = 2 * math.pi / inv
    smooth = (old_ctx / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_ctx / low, inv / factor, inv)
    mid = (1 - smooth) * inv / factor + smooth * inv
    is_mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
    inv = torch.where(is_mid, mid, scaled)
  elif kind != "default":
    raise ValueError(
        f"unsupported rope_type {kind!r} (default, linear, llama3)"
    )
  return inv


def _rope(x_BxNxSxHxD, cos_BxSxD, sin_BxSxD):
  """Rotate-half (Llama/NeoX) RoPE; every row N shares the columns' positions."""
  x = x_BxNxSxHxD.float()
  half = x.shape[-1] // 2
  rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
  cos, sin = cos_BxSxD[:, None, :, None], sin_BxSxD[:, None, :, None]
  return (x * cos + rotated * sin).to(x_BxNxSxHxD.dtype)


def _attend(q_BxNxSxHxD, k_BxMxTxKxD, v_BxMxTxKxD, mask_BxSxT):
  """Attention of each row's queries over keys of that row (M = N) or shared by all (M = 1).

  Query head h reads K/V head h // G without copying K/V per head. Returns float32.
  """
  b, n, s, h, d = q_BxNxSxHxD.shape
  kh = k_BxMxTxKxD.shape[-2]
  q = (
      q_BxNxSxHxD.float()
      .view(b, n, s, kh, h // kh, d)
      .permute(0, 1, 3, 4, 2, 5)
  )
  # k: [B, M, K, 1, D, T], v: [B, M, K, 1, T, D]
  k = k_BxMxTxKxD.float().permute(0, 1, 3, 4, 2).unsqueeze(3)
  v = v_BxMxTxKxD.float().permute(0, 1, 3, 2, 4).unsqueeze(3)
  scores = (q @ k) / math.sqrt(d)  # [B, N, K, G, S, T]
  scores = scores.masked_fill(~mask_BxSxT[:, None, None, None], _NEG)
  y = scores.softmax(-1) @ v  # [B, N, K, G, S, D]
  return y.permute(0, 1, 4, 2, 3, 5).reshape(b, n, s, h, d)


class PLTGate(nn.Module):
  """Per-head weight on the global branch, shared by all loops >= 2 of a layer."""

  def __init__(self, config):
    super().__init__()
    self.hidden_mode = config.plt_gate_use_hidden_states
    in_size = config.hidden_size if self.hidden_mode else config.head_dim
    self.weight = nn.Parameter(torch.zeros(config.num_attention_heads, in_size))
    self.bias = nn.Parameter(torch.zeros(config.num_attention_heads))
    if self.hidden_mode:
      self.gate_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

  def forward(self, h_in_BxNxSxd, q_BxNxSxHxD):
    if self.hidden_mode:
      logits = (
          self.gate_norm(h_in_BxNxSxd, torch.float32) @ self.weight.float().T
      )
    else:
      logits = (q_BxNxSxHxD.float() * self.weight.float()).sum(-1)
    return torch.sigmoid(logits + self.bias.float())  # [B, N, S, H]


class _Step:
  """What every layer of one forward shares: RoPE tables, masks, the new columns' ring slots."""

  def __init__(self, cache, valid_BxT, positions_BxS, config, device):
    t = valid_BxT.shape[1]
    s = positions_BxS.shape[1]
    past, left = t - s, config.plt_window_size[0]
    freqs = positions_BxS.float()[..., None] * _inv_freq(config, device)
    emb = torch.cat([freqs, freqs], dim=-1)
    self.cos, self.sin = emb.cos(), emb.sin()
    cols = torch.arange(past, t, device=device)
    keys = torch.arange(t, device=device)
    # loop 1 and the global branch: causal over every cached and new column, padding excluded
    self.causal = (keys[None, :] <= cols[:, None])[None] & valid_BxT[:, None]
    # local branch: the ring (past columns) then the new columns, inside the window
    new = self.causal[:, :, past:] & (keys[None, past:] >= cols[:, None] - left)
    if cache.ring_cols is None:
      self.local = new
    else:
      # slot w holds column rc[w] < past: in the window when rc[w] >= col - left
      rc = cache.ring_cols
      ring = (rc >= 0) & (rc >= cols[:, None] - left)
      ring = ring[None] & valid_BxT[:, rc.clamp(min=0)][:, None]
      self.local = torch.cat([ring, new], dim=-1)
    self.cache, self.num_loops = cache, config.plt_num_loops
    window = left + 1
    self.new_cols = cols[-window:]
    self.slots = self.new_cols % window


class PLTAttention(nn.Module):

  def __init__(self, config):
    super().__init__()
    h, k, d, hd = (
        config.num_attention_heads,
        config.num_key_value_heads,
        config.hidden_size,
        config.head_dim,
    )
    self.num_heads, self.num_kv_heads, self.head_dim = h, k, hd
    self.q_proj = nn.Linear(d, h * hd, bias=False)
    self.k_proj = nn.Linear(d, k * hd, bias=False)
    self.v_proj = nn.Linear(d, k * hd, bias=False)
    self.o_proj = nn.Linear(h * hd, d, bias=False)
    if config.plt_num_loops > 1:
      self.plt_gate = PLTGate(config)

  def forward(self, h_in, x, loops, layer_cache, step):
    """Rows N of `x` (normed layer input [B, N, S, d]) are the loops in `loops` (0 = loop 1)."""
    b, n, s, _ = x.shape
    q = self.q_proj(x).view(b, n, s, self.num_heads, self.head_dim)
    k = self.k_proj(x).view(b, n, s, self.num_kv_heads, self.head_dim)
    q, k = _rope(q, step.cos, step.sin), _rope(k, step.cos, step.sin)
    v = self.v_proj(x).view(b, n, s, self.num_kv_heads, self.head_dim)
    if loops[0] == 0:  # loop 1's K/V go into the cache before any row reads it
      k1, v1 = layer_cache.update(k[:, 0], v[:, 0])
    else:
      k1, v1 = layer_cache.keys, layer_cache.values
    y = _attend(q, k1[:, None], v1[:, None], step.causal)
    later = [i for i, loop in enumerate(loops) if loop > 0]
    if later:
      rows = slice(later[0], None)  # loops >= 2 come after loop 1
      k_loc, v_loc = k[:, rows], v[:, rows]
      if step.cache.ring_cols is not None:
        rk, rv = layer_cache.ring_keys, layer_cache.ring_values
        idx = torch.tensor([loops[i] - 1 for i in later], device=x.device)
        k_loc = torch.cat([rk[idx].transpose(0, 1), k_loc], dim=2)
        v_loc = torch.cat([rv[idx].transpose(0, 1), v_loc], dim=2)
      local = _attend(q[:, rows], k_loc, v_loc, step.local)
      g = self.plt_gate(h_in[:, rows], q[:, rows])[..., None]
      y = torch.cat([y[:, : later[0]], g * y[:, rows] + (1 - g) * local], dim=1)
      for i in later:
        layer_cache.update_ring(
            loops[i] - 1,
            k[:, i],
            v[:, i],
            step.slots,
            (step.num_loops - 1, step.cache.window),
        )
    return self.o_proj(y.to(x.dtype).reshape(b, n, s, -1))


class PLTMLP(nn.Module):

  def __init__(self, config):
    super().__init__()
    d, i = config.hidden_size, config.intermediate_size
    self.gate_proj = nn.Linear(d, i, bias=False)
    self.up_proj = nn.Linear(d, i, bias=False)
    self.down_proj = nn.Linear(i, d, bias=False)
    self.act = _ACT[config.hidden_act]

  def forward(self, x):
    return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class PLTDecoderLayer(nn.Module):

  def __init__(self, config):
    super().__init__()
    self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
    self.self_attn = PLTAttention(config)
    self.post_attention_layernorm = RMSNorm(
        config.hidden_size, config.rms_norm_eps
    )
    self.mlp = PLTMLP(config)

  def forward(self, h, loops, layer_cache, step):
    h = h + self.self_attn(h, self.input_layernorm(h), loops, layer_cache, step)
    return h + self.mlp(self.post_attention_layernorm(h))


class IQuestPLTCoderPreTrainedModel(PreTrainedModel):
  config_class = IQuestPLTCoderConfig
  config: IQuestPLTCoderConfig
  base_model_prefix = "model"
  _no_split_modules = ["PLTDecoderLayer"]
  supports_gradient_checkpointing = False
  _is_stateful = True  # the PLT cache cannot rewind (no assisted decoding)

  @classmethod
  def _supports_default_dynamic_cache(cls) -> bool:
    return False  # the model makes its own PLTCache

  @torch.no_grad()
  def _init_weights(self, module):
    std = self.config.initializer_range
    if isinstance(module, nn.Linear):
      module.weight.normal_(0.0, std)
    elif isinstance(module, nn.Embedding):
      module.weight.normal_(0.0, std)
    elif isinstance(module, RMSNorm):
      module.weight.fill_(1.0)
    elif isinstance(module, PLTGate):  # zero-initialised: g = 0.5 at start
      module.weight.zero_()
      module.bias.zero_()


class IQuestPLTCoderModel(IQuestPLTCoderPreTrainedModel):

  def __init__(self, config: IQuestPLTCoderConfig):
    super().__init__(config)
    self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
    self.layers = nn.ModuleList(
        [PLTDecoderLayer(config) for _ in range(config.num_hidden_layers)]
    )
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
    self.post_init()

  def get_input_embeddings(self):
    return self.embed_tokens

  def set_input_embeddings(self, value):
    self.embed_tokens = value

  def _pass(self, h_BxNxSxd, loops, step):
    """The L layers once, rows N being the loops in `loops`."""
    for layer, layer_cache in zip(self.layers, step.cache.layers):
      h_BxNxSxd = layer(h_BxNxSxd, loops, layer_cache, step)
    return h_BxNxSxd

  def _clp_state(self, h):
    return self.norm(h) if self.config.plt_normalize_per_loop else h

  def forward(
      self,
      input_ids=None,
      attention_mask=None,
      position_ids=None,
      inputs_embeds=None,
      cache=None,
      use_cache=None,
      output_hidden_states=None,
      return_dict=None,
      **kwargs,
  ):
    """Runs the new columns (`input_ids` [B, S]) on top of `cache` (a `PLTCache`; None: empty).

    `attention_mask` (1 = token, 0 = padding) covers the cached and the new columns, or the new
    ones only. With `use_cache` (default: the config's, else True) the cache, created if needed, is
    returned holding every column; otherwise nothing is kept.
    """
    cfg = self.config
    if cache is None:
      cache = kwargs.pop("past_key_values", None)
    if use_cache is None:
      use_cache = getattr(cfg, "use_cache", True)
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids or inputs_embeds")
    e = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
    b, s, _ = e.shape
    if cache is None:
      cache = PLTCache(cfg)
    elif not isinstance(cache, PLTCache):
      raise ValueError(
          f"this model keeps its state in a PLTCache, got {type(cache).__name__}"
      )
    past = cache.get_seq_length()
    new = torch.ones(b, s, dtype=torch.bool, device=e.device)
    if attention_mask is not None:
      if attention_mask.shape[1] not in (s, past + s):
        raise ValueError(
            f"attention_mask has {attention_mask.shape[1]} columns; expected {s} (new) or "
            f"{past + s} (cached + new)"
        )
      new = attention_mask[:, -s:].to(e.device).bool()
    valid = new if cache.valid is None else torch.cat([cache.valid, new], 1)
    if position_ids is None:
      position_ids = (valid.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
    step = _Step(cache, valid, position_ids, cfg, e.device)
    # CLP: zero state at the start of the row and right after padding
    before = valid[:, past - 1 : past] if past else torch.zeros_like(new[:, :1])
    prev_ok = torch.cat([before, new[:, :-1]], dim=1)[..., None]

    n = cfg.plt_num_loops
    a = 1.0 if cfg.plt_emb_scale is None else float(cfg.plt_emb_scale)
    c = 1.0 if cfg.plt_hidden_scale is None else float(cfg.plt_hidden_scale)
    carry = (
        cache.carry
        if cache.carry is not None
        else e.new_zeros((n - 1, b, cfg.hidden_size))
    )
    if s == 1:  # one new token: the R loops as R rows of one pass
      rows = [e] + [
          (a * e + c * carry[r - 1, :, None].masked_fill(~prev_ok, 0.0)).to(
              e.dtype
          )
          for r in range(1, n)
      ]
      h_rows = self._pass(torch.stack(rows, 1), tuple(range(n)), step)
      hiddens = list(h_rows.unbind(1))
      new_carry = self._clp_state(h_rows[:, : n - 1, 0]).transpose(0, 1)
    else:  # a chunk: loop after loop, each over the chunk
      hiddens = [self._pass(e[:, None], (0,), step)[:, 0]]
      new_carry = []
      for r in range(1, n):
        p = self._clp_state(hiddens[-1])
        shifted = torch.cat([carry[r - 1, :, None].to(p.dtype), p[:, :-1]], 1)
        x = (a * e + c * shifted.masked_fill(~prev_ok, 0.0)).to(e.dtype)
        hiddens.append(self._pass(x[:, None], (r,), step)[:, 0])
        new_carry.append(p[:, -1])
      new_carry = torch.stack(new_carry) if new_carry else None
    if n > 1:
      if cache.ring_cols is None:
        cache.ring_cols = torch.full(
            (cache.window,), -1, dtype=torch.long, device=e.device
        )
      cache.ring_cols[step.slots] = step.new_cols
      cache.carry = new_carry
    cache.valid = valid
    return BaseModelOutputWithPast(
        last_hidden_state=self.norm(hiddens[-1]),
        hidden_states=tuple(hiddens) if output_hidden_states else None,
        **{_CACHE_FIELD: cache if use_cache else None},
    )


class IQuestPLTCoderForCausalLM(IQuestPLTCoderPreTrainedModel, GenerationMixin):
  _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

  def __init__(self, config: IQuestPLTCoderConfig):
    super().__init__(config)
    self.model = IQuestPLTCoderModel(config)
    self.vocab_size = config.vocab_size
    self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    self.post_init()

  def get_input_embeddings(self):
    return self.model.embed_tokens

  def set_input_embeddings(self, value):
    self.model.embed_tokens = value

  def get_output_embeddings(self):
    return self.lm_head

  def set_output_embeddings(self, value):
    self.lm_head = value

  def forward(
      self,
      input_ids=None,
      attention_mask=None,
      position_ids=None,
      inputs_embeds=None,
      cache=None,
      use_cache=None,
      labels=None,
      output_hidden_states=None,
      return_dict=None,
      logits_to_keep=0,
      **kwargs,
  ):
    out = self.model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        inputs_embeds=inputs_embeds,
        cache=cache if cache is not None else kwargs.get("past_key_values"),
        use_cache=use_cache,
        output_hidden_states=output_hidden_states,
    )
    h = out.last_hidden_state
    if logits_to_keep:
      h = h[:, -logits_to_keep:]
    logits = self.lm_head(h).float()
    loss = None
    if labels is not None:
      loss = F.cross_entropy(
          logits[:, :-1].reshape(-1, logits.shape[-1]),
          labels[:, 1:].reshape(-1),
          ignore_index=-100,
      )
    return CausalLMOutputWithPast(
        loss=loss,
        logits=logits,
        hidden_states=out.hidden_states,
        **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)},
    )


__all__ = [
    "IQuestPLTCoderConfig",
    "IQuestPLTCoderModel",
    "IQuestPLTCoderForCausalLM",
    "PLTCache",
]
