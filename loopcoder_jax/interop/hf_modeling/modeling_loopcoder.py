"""PyTorch LoopCoder-V2 / Parallel Loop Transformer (`IQuestPLTCoderForCausalLM`), self-contained.

Exported next to the weights by loopcoder-jax and loaded with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`. Semantics (loopcoder-jax
docs/plt-spec.md sections 2-3):

- loop 1: an ordinary causal pass over the embeddings E; each layer keeps its post-RoPE K1, V1;
- loop r >= 2 input (cross-loop parallelism): a * E_t + b * P(r-1)_{t-1}, P = norm(h) when
  `plt_normalize_per_loop` (else h), zero at the first position of each sequence;
- layers of loops >= 2 (G-SWA): g * global + (1 - g) * local per head, global = causal attention
  over loop 1's K1/V1 of the same layer, local = this loop's own keys t-left..t, g = sigmoid of the
  gate (hidden mode: from RMSNorm_gate(layer input); query mode: from the post-RoPE query);
- logits = lm_head(norm(h(R))).

Each forward recomputes the whole sequence for every loop (no KV cache): `generate` works, feeding
the full prefix each step. Softmax, RMSNorm and gate statistics are computed in float32.
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
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


def _rope(x_BxSxNxD, cos_BxSxD, sin_BxSxD):
  """Rotate-half (Llama/NeoX) RoPE."""
  x = x_BxSxNxD.float()
  half = x.shape[-1] // 2
  rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
  return (x * cos_BxSxD[:, :, None] + rotated * sin_BxSxD[:, :, None]).to(
      x_BxSxNxD.dtype
  )


def _attend(q_BxSxHxD, k_BxTxKxD, v_BxTxKxD, mask_BxSxT):
  groups = q_BxSxHxD.shape[2] // k_BxTxKxD.shape[2]
  k = k_BxTxKxD.repeat_interleave(groups, dim=2).float()
  v = v_BxTxKxD.repeat_interleave(groups, dim=2).float()
  scores = torch.einsum("bshd,bthd->bhst", q_BxSxHxD.float(), k) / math.sqrt(
      q_BxSxHxD.shape[-1]
  )
  scores = scores.masked_fill(~mask_BxSxT[:, None], _NEG)
  return torch.einsum("bhst,bthd->bshd", scores.softmax(-1), v)  # float32


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

  def forward(self, h_in_BxSxd, q_BxSxHxD):
    if self.hidden_mode:
      logits = self.gate_norm(h_in_BxSxd, torch.float32) @ self.weight.float().T
    else:
      logits = (q_BxSxHxD.float() * self.weight.float()).sum(-1)
    return torch.sigmoid(logits + self.bias.float())  # [B, S, H]


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

  def forward(self, h_in, x, cos, sin, masks, kv1=None):
    """`x` = normed layer input. Returns (o_proj output, (k, v) post-RoPE)."""
    b, s, _ = x.shape
    q = _rope(
        self.q_proj(x).view(b, s, self.num_heads, self.head_dim), cos, sin
    )
    k = _rope(
        self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim), cos, sin
    )
    v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
    causal, local = masks
    if kv1 is None:
      y = _attend(q, k, v, causal)
    else:
      g = self.plt_gate(h_in, q)[..., None]
      y = g * _attend(q, kv1[0], kv1[1], causal) + (1 - g) * _attend(
          q, k, v, local
      )
    return self.o_proj(y.to(x.dtype).reshape(b, s, -1)), (k, v)


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

  def forward(self, h, cos, sin, masks, kv1=None):
    attn, kv = self.self_attn(h, self.input_layernorm(h), cos, sin, masks, kv1)
    h = h + attn
    return h + self.mlp(self.post_attention_layernorm(h)), kv


class IQuestPLTCoderPreTrainedModel(PreTrainedModel):
  config_class = IQuestPLTCoderConfig
  config: IQuestPLTCoderConfig
  base_model_prefix = "model"
  _no_split_modules = ["PLTDecoderLayer"]
  supports_gradient_checkpointing = False

  @classmethod
  def _supports_default_dynamic_cache(cls) -> bool:
    return False  # no KV cache: every step recomputes the full prefix

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

  def _stack(self, h, cos, sin, masks, kv1):
    kvs = []
    for i, layer in enumerate(self.layers):
      h, kv = layer(h, cos, sin, masks, None if kv1 is None else kv1[i])
      kvs.append(kv)
    return h, kvs

  def forward(
      self,
      input_ids=None,
      attention_mask=None,
      position_ids=None,
      inputs_embeds=None,
      output_hidden_states=None,
      return_dict=None,
      **kwargs,
  ):
    """`attention_mask` [B, S] (1 = token, 0 = padding) is honoured like a segment boundary:
    padding is never attended to and the first real token gets a zero CLP state.
    """
    cfg = self.config
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids or inputs_embeds")
    e = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
    b, s, _ = e.shape
    valid = (
        torch.ones(b, s, dtype=torch.bool, device=e.device)
        if attention_mask is None
        else attention_mask.to(e.device).bool()
    )
    if position_ids is None:
      position_ids = (valid.long().cumsum(-1) - 1).clamp(min=0)
    freqs = position_ids.float()[..., None] * _inv_freq(cfg, e.device)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    idx = torch.arange(s, device=e.device)
    causal = (idx[None, :] <= idx[:, None])[None] & valid[:, None, :]
    local = (
        causal & (idx[None, :] >= idx[:, None] - cfg.plt_window_size[0])[None]
    )
    masks = (causal, local)
    # CLP: zero state at the start of the row and right after padding.
    starts = torch.cat([torch.ones_like(valid[:, :1]), ~valid[:, :-1]], dim=1)[
        ..., None
    ]

    h, kv1 = self._stack(e, cos, sin, masks, None)
    hiddens = [h]
    a = 1.0 if cfg.plt_emb_scale is None else float(cfg.plt_emb_scale)
    c = 1.0 if cfg.plt_hidden_scale is None else float(cfg.plt_hidden_scale)
    for _ in range(cfg.plt_num_loops - 1):
      p = self.norm(h) if cfg.plt_normalize_per_loop else h
      shifted = torch.cat(
          [torch.zeros_like(p[:, :1]), p[:, :-1]], dim=1
      ).masked_fill(starts, 0.0)
      h, _ = self._stack(
          (a * e + c * shifted).to(e.dtype), cos, sin, masks, kv1
      )
      hiddens.append(h)
    return BaseModelOutputWithPast(
        last_hidden_state=self.norm(h),
        hidden_states=tuple(hiddens) if output_hidden_states else None,
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

  def prepare_inputs_for_generation(
      self, input_ids, next_sequence_length=None, **kwargs
  ):
    kwargs.pop("cache", None)
    kwargs.pop("past_key_values", None)
    return super().prepare_inputs_for_generation(
        input_ids, next_sequence_length=None, **kwargs
    )

  def forward(
      self,
      input_ids=None,
      attention_mask=None,
      position_ids=None,
      inputs_embeds=None,
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
        loss=loss, logits=logits, hidden_states=out.hidden_states
    )


__all__ = [
    "IQuestPLTCoderConfig",
    "IQuestPLTCoderModel",
    "IQuestPLTCoderForCausalLM",
]
