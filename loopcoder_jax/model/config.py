"""Typed model configuration: HF `config.json` fields plus JAX-side runtime options.

`PLTConfig` fields are named exactly like the HF `config.json` keys of LoopCoder-V2, so a
checkpoint's config round-trips without a renaming table. Everything that only matters to
how *we* run the model (compute dtype, remat, scan, attention kernel) lives in `RuntimeConfig`
and never reaches `config.json`.

Window convention (stated once, used everywhere): `plt_window_size = [left, 0]` is flash-attn
style, query t sees its own loop's keys t-left .. t (left + 1 keys). See `window_left`.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import json
import os
from typing import Any

ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "relu")
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "save_attn_out", "save_qkv_proj")
ATTENTION_IMPLS = ("reference", "pallas", "xla")
QUANTIZE_MODES = (
    "none",
    "int8",
)  # the linear weights' storage (model/quant.py)
ROPE_SCALING_TYPES = ("linear", "llama3")
# LoRA target names -> the projection each adapts (`model/lora.py`).
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")

# Keys a config.json must give: the 7B defaults would silently stand in for them.
REQUIRED_HF_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
# Written by to_hf_dict from the loop count, never read back (a Llama read here and written with
# R >= 2 is a PLT). R >= 2 carries the publisher's names, which its serving code and HF tooling
# recognise; R = 1 is a plain Llama decoder (no gates), written as one so Llama loaders serve it.
_HF_META = {
    "architectures": ["IQuestPLTCoderForCausalLM"],
    "model_type": "iquestpltcoder",
}
_LLAMA_META = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
# PLTConfig fields that are not config.json keys.
_NOT_HF = ("extra_hf", "runtime", "lora")


def _fail(field: str, msg: str) -> None:
  raise ValueError(f"PLTConfig.{field}: {msg}")


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
  """How the model is computed here; not part of the checkpoint."""

  dtype: str = "float32"  # activation / matmul dtype
  param_dtype: str = "float32"
  remat_policy: str = "none"  # see REMAT_POLICIES
  scan_layers: bool = True  # False: Python loop over the same stacked params
  attention_impl: str = "reference"  # see ATTENTION_IMPLS
  # Block size of the O(S x window) reference local attention (0 = pick from window).
  local_block_size: int = 0
  # Sequence positions per step of the fused output projection + cross-entropy (0: plain logits path).
  loss_chunk: int = 0
  # "int8": the linear weights are int8 with a float32 scale per output channel (model/quant.py;
  # made from float weights by `quant.quantize_params`, frozen).
  quantize: str = "none"

  def __post_init__(self):
    if self.dtype not in DTYPES:
      _fail(
          "runtime.dtype",
          f"unknown dtype {self.dtype!r}; expected one of {DTYPES}",
      )
    if self.param_dtype not in DTYPES:
      _fail(
          "runtime.param_dtype",
          f"unknown dtype {self.param_dtype!r}; expected one of {DTYPES}",
      )
    if self.remat_policy not in REMAT_POLICIES:
      _fail(
          "runtime.remat_policy",
          f"unknown policy {self.remat_policy!r}; expected one of {REMAT_POLICIES}",
      )
    if self.attention_impl not in ATTENTION_IMPLS:
      _fail(
          "runtime.attention_impl",
          f"unknown implementation {self.attention_impl!r}; expected one of {ATTENTION_IMPLS}",
      )
    if self.quantize not in QUANTIZE_MODES:
      _fail(
          "runtime.quantize",
          f"unknown mode {self.quantize!r}; expected one of {QUANTIZE_MODES}",
      )
    if self.loss_chunk < 0:
      _fail("runtime.loss_chunk", f"must be >= 0, got {self.loss_chunk}")
    if self.local_block_size < 0:
      _fail(
          "runtime.local_block_size",
          f"must be >= 0, got {self.local_block_size}",
      )

  def replace(self, **kw) -> RuntimeConfig:
    return dataclasses.replace(self, **kw)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters on the shared layers' projections (`model/lora.py`); not part of config.json.

  Each targeted projection W gets `W + (alpha / rank) * A @ B` (B starts at zero). `per_loop`: loop
  r has its own A, B (an extra leading axis of size R) instead of one pair shared by all loops.
  """

  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0  # on the adapters' input, in training only
  targets: tuple[str, ...] = LORA_TARGETS
  per_loop: bool = False

  def __post_init__(self):
    targets = self.targets
    if isinstance(targets, str):
      targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    object.__setattr__(self, "targets", tuple(targets))
    if not isinstance(self.rank, int) or isinstance(self.rank, bool):
      raise ValueError(f"lora.rank must be an integer, got {self.rank!r}")
    if self.rank < 1:
      raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
    unknown = [t for t in self.targets if t not in LORA_TARGETS]
    if (
        unknown
        or not self.targets
        or len(set(self.targets)) != len(self.targets)
    ):
      raise ValueError(
          f"lora.targets {list(self.targets)}: "
          + (f"unknown {unknown}; " if unknown else "")
          + f"expected distinct names out of {list(LORA_TARGETS)}"
      )
    if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
      raise ValueError(f"lora.alpha must be > 0, got {self.alpha!r}")
    if not isinstance(self.dropout, (int, float)) or not (
        0 <= self.dropout < 1
    ):
      raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def to_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "targets": list(self.targets)}


@dataclasses.dataclass(frozen=True)
class PLTConfig:
  """LoopCoder-V2 / PLT model config. Field names are the HF `config.json` keys."""

  vocab_size: int = 76800
  hidden_size: int = 5120
  intermediate_size: int = 27648
  num_hidden_layers: int = 14
  num_attention_heads: int = 40
  num_key_value_heads: int = 8
  head_dim: int | None = 128
  hidden_act: str = "silu"
  rms_norm_eps: float = 1e-5
  rope_theta: float = 500000.0
  rope_scaling: Mapping[str, Any] | None = None
  max_position_embeddings: int = 131072
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  bos_token_id: int | None = 1
  eos_token_id: int | list[int] | None = 2
  pad_token_id: int | None = None
  torch_dtype: str = "bfloat16"
  plt_num_loops: int = 2
  plt_window_size: tuple[int, int] = (64, 0)
  plt_normalize_per_loop: bool = True
  plt_emb_scale: float | None = None
  plt_hidden_scale: float | None = None
  plt_gate_use_hidden_states: bool = True
  # False: serial looping without cross-loop parallelism (loop r at t reads P(r-1)_t, not
  # P(r-1)_{t-1}; IQuest-Coder-V1-Loop style). Ours, not an HF key: written to config.json only when
  # False, and refused by the HF export and the loops-as-rows (CLP) decode.
  plt_cross_loop: bool = True
  # HF keys we do not model (kept verbatim so to_hf_dict loses nothing).
  extra_hf: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)
  # Adapters on the projections (None: the plain model); like runtime, never in config.json.
  lora: LoraConfig | None = None

  # ---------------------------------------------------------------- validation
  def __post_init__(self):
    self._normalise()
    self._check_shapes()
    self._check_numerics()
    self._check_loops()
    self._check_token_ids()
    if not isinstance(self.runtime, RuntimeConfig):
      _fail(
          "runtime",
          f"must be a RuntimeConfig, got {type(self.runtime).__name__}",
      )
    self._check_lora()

  def _normalise(self) -> None:
    # Normalise JSON lists to tuples so the config stays hashable (it is a Flax attribute).
    object.__setattr__(self, "plt_window_size", tuple(self.plt_window_size))
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
    if isinstance(self.rope_scaling, dict):
      object.__setattr__(self, "rope_scaling", _FrozenDict(self.rope_scaling))
    if isinstance(self.extra_hf, dict) and not isinstance(
        self.extra_hf, _FrozenDict
    ):
      object.__setattr__(self, "extra_hf", _FrozenDict(self.extra_hf))

  def _check_shapes(self) -> None:
    """Sizes positive, heads and head_dim consistent."""
    for name in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
    ):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        _fail(name, f"must be a positive integer, got {value!r}")
    if self.head_dim is not None and (
        not isinstance(self.head_dim, int) or self.head_dim <= 0
    ):
      _fail(
          "head_dim",
          f"must be a positive integer or null, got {self.head_dim!r}",
      )
    if self.head_dim is None and self.hidden_size % self.num_attention_heads:
      _fail(
          "head_dim",
          f"is null but hidden_size={self.hidden_size} is not divisible by "
          f"num_attention_heads={self.num_attention_heads}",
      )
    if self.head_dim is not None and self.head_dim % 2:
      _fail(
          "head_dim", f"must be even for rotary embeddings, got {self.head_dim}"
      )
    if self.num_attention_heads % self.num_key_value_heads:
      _fail(
          "num_key_value_heads",
          f"num_attention_heads={self.num_attention_heads} is not "
          f"divisible by num_key_value_heads={self.num_key_value_heads}",
      )

  def _check_numerics(self) -> None:
    """Activation, dtype, norm epsilon, RoPE; no biases."""
    if self.hidden_act not in ACTIVATIONS:
      _fail(
          "hidden_act",
          f"unknown activation {self.hidden_act!r}; expected one of {ACTIVATIONS}",
      )
    if self.torch_dtype not in DTYPES:
      _fail(
          "torch_dtype",
          f"unknown dtype {self.torch_dtype!r}; expected one of {DTYPES}",
      )
    if not (self.rms_norm_eps > 0):
      _fail("rms_norm_eps", f"must be > 0, got {self.rms_norm_eps!r}")
    if not (self.rope_theta > 0):
      _fail("rope_theta", f"must be > 0, got {self.rope_theta!r}")
    if self.rope_scaling is not None:
      kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
      if kind not in ROPE_SCALING_TYPES:
        _fail(
            "rope_scaling",
            f"unsupported rope type {kind!r}; expected one of {ROPE_SCALING_TYPES} or null",
        )
      if not self.rope_scaling.get("factor", 0) > 0:
        _fail("rope_scaling", "needs a positive 'factor'")
    if self.attention_bias or self.mlp_bias:
      _fail(
          "attention_bias" if self.attention_bias else "mlp_bias",
          "biases are not part of LoopCoder-V2 and are not supported",
      )

  def _check_loops(self) -> None:
    """The PLT keys: loop count, window [left, 0], CLP scales."""
    if not isinstance(self.plt_num_loops, int) or self.plt_num_loops < 1:
      _fail(
          "plt_num_loops",
          f"must be an integer >= 1, got {self.plt_num_loops!r}",
      )
    ws = self.plt_window_size
    if len(ws) != 2 or not all(isinstance(w, int) for w in ws):
      _fail(
          "plt_window_size",
          f"must be [left, 0] with integer left, got {list(ws)}",
      )
    if ws[1] != 0:
      _fail(
          "plt_window_size", f"right context must be 0 (causal), got {list(ws)}"
      )
    if ws[0] < 0:
      _fail("plt_window_size", f"left must be >= 0, got {list(ws)}")
    if not isinstance(self.plt_cross_loop, bool):
      _fail(
          "plt_cross_loop",
          f"must be true or false, got {self.plt_cross_loop!r}",
      )
    for name in ("plt_emb_scale", "plt_hidden_scale"):
      value = getattr(self, name)
      if value is not None and not isinstance(value, (int, float)):
        _fail(name, f"must be a number or null, got {value!r}")

  def _check_lora(self) -> None:
    """A rank no wider than the targeted projections; per-loop adapters need loops."""
    lc = self.lora
    if lc is None:
      return
    if not isinstance(lc, LoraConfig):
      raise ValueError(f"lora must be a LoraConfig, got {type(lc).__name__}")
    widths = {t: min(self.lora_widths(t)) for t in lc.targets}
    target, width = min(widths.items(), key=lambda kv: kv[1])
    if lc.rank > width:
      raise ValueError(
          f"lora.rank {lc.rank} is above the width {width} of the {target} projection "
          f"({' x '.join(map(str, self.lora_widths(target)))})"
      )
    if lc.per_loop and self.plt_num_loops == 1:
      raise ValueError(
          "lora.per_loop needs a looped model (plt_num_loops >= 2); this one has 1 loop"
      )

  def lora_widths(self, target: str) -> tuple[int, int]:
    """(in, out) features of a LoRA target's projection."""
    d, i = self.hidden_size, self.intermediate_size
    q, kv = self.num_attention_heads * self.head_size, (
        self.num_key_value_heads * self.head_size
    )
    return {
        "q": (d, q),
        "k": (d, kv),
        "v": (d, kv),
        "o": (q, d),
        "gate": (d, i),
        "up": (d, i),
        "down": (i, d),
    }[target]

  def _check_token_ids(self) -> None:
    for name in ("bos_token_id", "pad_token_id"):
      value = getattr(self, name)
      if value is not None and not (0 <= value < self.vocab_size):
        _fail(name, f"{value} is outside the vocabulary [0, {self.vocab_size})")
    for eos in self.eos_ids:
      if not 0 <= eos < self.vocab_size:
        _fail(
            "eos_token_id",
            f"{eos} is outside the vocabulary [0, {self.vocab_size})",
        )

  # ---------------------------------------------------------------- derived
  @property
  def head_size(self) -> int:
    return (
        self.head_dim
        if self.head_dim is not None
        else self.hidden_size // self.num_attention_heads
    )

  @property
  def window_left(self) -> int:
    """Keys visible to query t in the local branch are t - window_left .. t."""
    return self.plt_window_size[0]

  @property
  def emb_scale(self) -> float:
    return 1.0 if self.plt_emb_scale is None else float(self.plt_emb_scale)

  @property
  def hidden_scale(self) -> float:
    return (
        1.0 if self.plt_hidden_scale is None else float(self.plt_hidden_scale)
    )

  @property
  def eos_ids(self) -> tuple[int, ...]:
    if self.eos_token_id is None:
      return ()
    if isinstance(self.eos_token_id, int):
      return (self.eos_token_id,)
    return tuple(self.eos_token_id)

  def replace(self, **kw) -> PLTConfig:
    return dataclasses.replace(self, **kw)

  def with_runtime(self, **kw) -> PLTConfig:
    return dataclasses.replace(self, runtime=self.runtime.replace(**kw))

  def num_params(self) -> int:
    """Parameter count from the formula (checked against `jax.eval_shape` in the tests)."""
    d, hd, inter = self.hidden_size, self.head_size, self.intermediate_size
    h, kvh, v = (
        self.num_attention_heads,
        self.num_key_value_heads,
        self.vocab_size,
    )
    attn = d * h * hd * 2 + d * kvh * hd * 2
    mlp = 3 * d * inter
    layer = attn + mlp + 2 * d + self.num_gate_params_per_layer()
    head = 0 if self.tie_word_embeddings else v * d
    return v * d + self.num_hidden_layers * layer + d + head

  def num_gate_params_per_layer(self) -> int:
    if self.plt_num_loops == 1:
      return 0
    h = self.num_attention_heads
    if self.plt_gate_use_hidden_states:
      return h * self.hidden_size + h + self.hidden_size
    return h * self.head_size + h

  # ---------------------------------------------------------------- HF I/O
  @property
  def hf_meta(self) -> dict[str, Any]:
    """`architectures` and `model_type` of this model's `config.json`."""
    meta = _HF_META if self.plt_num_loops > 1 else _LLAMA_META
    return {k: list(v) if isinstance(v, list) else v for k, v in meta.items()}

  @classmethod
  def from_hf_dict(cls, hf: Mapping[str, Any], **runtime_kw) -> PLTConfig:
    """A config without `plt_num_loops` (a Llama checkpoint) has R = 1."""
    hf = _from_transformers5(hf)
    known = {f.name for f in dataclasses.fields(cls)} - set(_NOT_HF)
    kwargs = {k: v for k, v in hf.items() if k in known}
    extra = {
        k: v for k, v in hf.items() if k not in known and k not in _HF_META
    }
    if "head_dim" not in hf:
      kwargs["head_dim"] = None
    kwargs.setdefault("plt_num_loops", 1)
    return cls(**kwargs, extra_hf=extra, runtime=RuntimeConfig(**runtime_kw))

  @classmethod
  def from_hf_file(cls, path: str | os.PathLike, **runtime_kw) -> PLTConfig:
    path = os.fspath(path)
    if os.path.isdir(path):
      path = os.path.join(path, "config.json")
    try:
      with open(path) as f:
        hf = json.load(f)
    except FileNotFoundError:
      raise ValueError(f"config file not found: {path}") from None
    except json.JSONDecodeError as e:
      raise ValueError(f"config file {path} is not valid JSON: {e}") from None
    if not isinstance(hf, dict):
      raise ValueError(f"config file {path} must hold a JSON object")
    missing = [k for k in REQUIRED_HF_KEYS if k not in hf]
    if missing:
      raise ValueError(f"config file {path} is missing {', '.join(missing)}")
    for key, value in hf.items():
      if not _json_type_ok(key, value):
        raise ValueError(
            f"config file {path}: {key} has the wrong type "
            f"({type(value).__name__} {value!r})"
        )
    try:
      return cls.from_hf_dict(hf, **runtime_kw)
    except ValueError as e:
      raise ValueError(f"config file {path}: {e}") from None

  def to_hf_dict(self) -> dict[str, Any]:
    out: dict[str, Any] = self.hf_meta
    for f in dataclasses.fields(self):
      # plt_cross_loop is written only when off: the published config has no such key
      if f.name in _NOT_HF or (
          f.name == "plt_cross_loop" and self.plt_cross_loop
      ):
        continue
      value = getattr(self, f.name)
      if isinstance(value, tuple):
        value = list(value)
      elif isinstance(value, _FrozenDict):
        value = dict(value)
      out[f.name] = value
    out.update({k: _thaw(v) for k, v in self.extra_hf.items()})
    return out

  def to_hf_file(self, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
      json.dump(self.to_hf_dict(), f, indent=2, sort_keys=True)
      f.write("\n")

  # ---------------------------------------------------------------- presets
  @classmethod
  def loopcoder_v2_7b(cls, loops: int = 2, **runtime_kw) -> PLTConfig:
    """The released LoopCoder-V2 shape (R=2) and its R = 1, 3, 4 siblings from the paper."""
    return cls(plt_num_loops=loops, runtime=RuntimeConfig(**runtime_kw))

  @classmethod
  def tiny(cls, loops: int = 2, **kw) -> PLTConfig:
    """A few-thousand-parameter fp32 config for CPU tests; `kw` overrides any PLTConfig or
    RuntimeConfig field (the benchmarks build their shapes on it: `cli.model_shape`).
    """
    runtime_kw = {
        k: kw.pop(k)
        for k in list(kw)
        if k in {f.name for f in dataclasses.fields(RuntimeConfig)}
    }
    base: dict[str, Any] = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        rope_theta=10000.0,
        plt_window_size=(4, 0),
        torch_dtype="float32",
    )
    base.update({"plt_num_loops": loops, **kw})
    return cls(runtime=RuntimeConfig(**runtime_kw), **base)


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return _is_int(v) or isinstance(v, float)


# JSON type checks of the config.json keys whose default's type does not say it all.
_JSON_TYPES = {
    "head_dim": lambda v: v is None or _is_int(v),
    "rope_scaling": lambda v: v is None or isinstance(v, dict),
    "bos_token_id": lambda v: v is None or _is_int(v),
    "pad_token_id": lambda v: v is None or _is_int(v),
    "eos_token_id": lambda v: v is None
    or _is_int(v)
    or (isinstance(v, list) and all(map(_is_int, v))),
    "plt_window_size": lambda v: isinstance(v, list) and all(map(_is_int, v)),
    "plt_emb_scale": lambda v: v is None or _is_number(v),
    "plt_hidden_scale": lambda v: v is None or _is_number(v),
}


def _json_type_ok(key: str, value: Any) -> bool:
  """Whether a config.json value has the type of the PLTConfig field it sets."""
  if key in _JSON_TYPES:
    return _JSON_TYPES[key](value)
  default = {f.name: f.default for f in dataclasses.fields(PLTConfig)}.get(
      key, dataclasses.MISSING
  )
  if isinstance(default, bool):
    return isinstance(value, bool)
  if isinstance(default, int):
    return _is_int(value)
  if isinstance(default, float):
    return _is_number(value)
  if isinstance(default, str):
    return isinstance(value, str)
  return True  # keys we do not model (kept verbatim in extra_hf)


def _from_transformers5(hf: Mapping[str, Any]) -> Mapping[str, Any]:
  """transformers 5 `save_pretrained` writes `rope_parameters` (for rope_theta/rope_scaling) and
  `dtype` (for torch_dtype); read them as the keys the released checkpoint uses.
  """
  hf = dict(hf)
  rope = hf.get("rope_parameters")
  if isinstance(rope, dict) and "rope_theta" not in hf:
    del hf["rope_parameters"]
    hf["rope_theta"] = rope.get("rope_theta", PLTConfig.rope_theta)
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    hf["rope_scaling"] = (
        None if scaling.get("rope_type", "default") == "default" else scaling
    )
  if "torch_dtype" not in hf and isinstance(hf.get("dtype"), str):
    hf["torch_dtype"] = hf.pop("dtype")
  return hf


class _FrozenDict(dict):
  """A hashable dict, so configs holding JSON objects can be Flax module attributes."""

  def __hash__(self):
    return hash(json.dumps(_thaw(self), sort_keys=True, default=str))

  def _readonly(self, *a, **k):
    raise TypeError("config mappings are read-only")

  __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = (
      _readonly
  )


def _thaw(v):
  if isinstance(v, dict):
    return {k: _thaw(x) for k, x in v.items()}
  if isinstance(v, tuple):
    return [_thaw(x) for x in v]
  return v
