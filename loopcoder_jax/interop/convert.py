"""HF safetensors <-> our params, through one declarative table (spec section 5).

`TABLE` maps each HF key pattern (`{i}` = layer index, stacked on our axis 0) to our param path, the
HF shape, and whether the linear is transposed (HF `[out, in]`, ours `[in, ...out]`; reshapes come
from comparing the HF shape with `abstract_params`). Both directions read the same rows; an input
alias is one more string in a row's `aliases`.

Streaming: HF tensors are read one at a time (`safe_open` per tensor, so the mapped pages of a shard
never pile up in RSS) into preallocated stacked arrays; shards are written one tensor at a time
(header first, then each tensor's bytes), so a conversion holds about one copy of the weights.
dtypes are kept exactly (bf16 via ml_dtypes) unless an output `dtype` is asked for.

Safety: safetensors only (a `*.bin` pickle directory is refused, never unpickled); every key, alias
and shape is checked against the config from the headers before any tensor is read; outputs are
built in a temp sibling and renamed into place, so a failure leaves nothing under the final name.

Entry points: `load_hf`, `save_hf`, `convert_checkpoint` (what `scripts/convert_checkpoint.py` runs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import contextlib
import dataclasses
import glob
import json
import os
import re
import shutil
import struct
import tempfile
from typing import Any

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open

from loopcoder_jax.model.config import PLTConfig
from loopcoder_jax.train import checkpoint

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
HF_MODELING_DIR = os.path.join(os.path.dirname(__file__), "hf_modeling")
MODELING_FILES = ("configuration_loopcoder.py", "modeling_loopcoder.py")
AUTO_MAP = {
    "AutoConfig": "configuration_loopcoder.IQuestPLTCoderConfig",
    "AutoModelForCausalLM": "modeling_loopcoder.IQuestPLTCoderForCausalLM",
}
# Copied verbatim in both directions (plus any *.jinja chat template).
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.json",
)
DEFAULT_SHARD_SIZE = "5GB"

_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
# Param dtypes we read and write (numpy, bf16 through ml_dtypes).
DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}


# ------------------------------------------------------------------------------------- the table
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

  def to_ours(self, w, our_shape):
    return (w.T if self.transpose else w).reshape(our_shape)

  def to_hf(self, x, cfg):
    shape = self.hf_shape(cfg)
    x = x.reshape(shape[::-1] if self.transpose else shape)
    return x.T if self.transpose else x


def _V_d(c):
  return (c.vocab_size, c.hidden_size)


def _d(c):
  return (c.hidden_size,)


def _HD_d(c):
  return (c.num_attention_heads * c.head_size, c.hidden_size)


def _KD_d(c):
  return (c.num_key_value_heads * c.head_size, c.hidden_size)


def _d_HD(c):
  return (c.hidden_size, c.num_attention_heads * c.head_size)


def _I_d(c):
  return (c.intermediate_size, c.hidden_size)


def _d_I(c):
  return (c.hidden_size, c.intermediate_size)


def _hidden_gate(c):
  return c.plt_gate_use_hidden_states


def _query_gate(c):
  return not c.plt_gate_use_hidden_states


_L, _A = "model.layers.{i}.", "layers/self_attn/"
_GATE_W = (
    "model.layers.{i}.self_attn.loop_gate_proj.weight",
    "model.gate_projections.{i}.weight",
)

TABLE: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", "embed_tokens/embedding", _V_d),
    Rule(_L + "input_layernorm.weight", "layers/input_layernorm/scale", _d),
    Rule(_L + "self_attn.q_proj.weight", _A + "q_proj/kernel", _HD_d, True),
    Rule(_L + "self_attn.k_proj.weight", _A + "k_proj/kernel", _KD_d, True),
    Rule(_L + "self_attn.v_proj.weight", _A + "v_proj/kernel", _KD_d, True),
    Rule(_L + "self_attn.o_proj.weight", _A + "o_proj/kernel", _d_HD, True),
    Rule(
        _L + "self_attn.plt_gate.weight",
        _A + "plt_gate/kernel",
        lambda c: (c.num_attention_heads, c.hidden_size),
        True,
        _GATE_W,
        _hidden_gate,
    ),
    Rule(
        _L + "self_attn.plt_gate.weight",
        _A + "plt_gate/kernel",
        lambda c: (c.num_attention_heads, c.head_size),
        False,
        _GATE_W,
        _query_gate,
    ),
    Rule(
        _L + "self_attn.plt_gate.bias",
        _A + "plt_gate/bias",
        lambda c: (c.num_attention_heads,),
        aliases=(
            "model.layers.{i}.self_attn.loop_gate_proj.bias",
            "model.gate_projections.{i}.bias",
        ),
    ),
    Rule(
        _L + "self_attn.plt_gate.gate_norm.weight",
        _A + "plt_gate/gate_norm/scale",
        _d,
        aliases=("model.layers.{i}.self_attn.loop_gate_proj.gate_norm.weight",),
    ),
    Rule(
        _L + "post_attention_layernorm.weight",
        "layers/post_attention_layernorm/scale",
        _d,
    ),
    Rule(
        _L + "mlp.gate_proj.weight", "layers/mlp/gate_proj/kernel", _I_d, True
    ),
    Rule(_L + "mlp.up_proj.weight", "layers/mlp/up_proj/kernel", _I_d, True),
    Rule(
        _L + "mlp.down_proj.weight", "layers/mlp/down_proj/kernel", _d_I, True
    ),
    Rule("model.norm.weight", "norm/scale", _d),
    Rule("lm_head.weight", "lm_head/kernel", _V_d, True),
)


@dataclasses.dataclass(frozen=True)
class Slot:
  """One HF tensor: rule, layer (None for unstacked), HF key/shape, our per-layer shape."""

  rule: Rule
  layer: int | None
  key: str
  hf_shape: tuple[int, ...]
  our_shape: tuple[int, ...]


def _flat(tree, prefix=()) -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) or hasattr(v, "items"):
      out.update(_flat(v, prefix + (k,)))
    else:
      out["/".join(prefix + (k,))] = v
  return out


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, v in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def plan(cfg: PLTConfig) -> list[Slot]:
  """Every HF tensor of a model with this config, in the order written (layer-major)."""
  from loopcoder_jax.model.transformer import (
      abstract_params,  # local: model imports are heavy
  )

  shapes = {p: tuple(a.shape) for p, a in _flat(abstract_params(cfg)).items()}
  active = [r for r in TABLE if r.when(cfg) and r.path in shapes]
  uncovered = set(shapes) - {r.path for r in active}
  if uncovered:  # the table must cover the model; a new param needs a row
    raise ValueError(
        f"convert.TABLE has no row for param(s) {sorted(uncovered)}"
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
          f"convert.TABLE: {s.key} HF shape {s.hf_shape} does not fit param {s.rule.path} "
          f"shape {s.our_shape}"
      )
  return out


def _pattern(hf: str) -> re.Pattern:
  return re.compile(re.escape(hf).replace(re.escape("{i}"), r"(\d+)") + r"\Z")


# ------------------------------------------------------------------------------------- reading HF
def _dtype_name(st_dtype: str, key: str) -> str:
  for name, st in _ST_DTYPES.items():
    if st == st_dtype:
      return name
  raise ValueError(
      f"{key}: unsupported tensor dtype {st_dtype} (expected one of {sorted(_ST_DTYPES.values())})"
  )


def _check_dtype(dtype: str | None) -> str | None:
  if dtype is not None and dtype not in DTYPES:
    raise ValueError(
        f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}"
    )
  return dtype


def hf_weight_files(path: str) -> dict[str, str]:
  """key -> safetensors file of an HF directory (from the index, or the single model file)."""
  index = os.path.join(path, INDEX_FILE)
  if os.path.isfile(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ValueError(
          f"{index} is not a valid safetensors index (needs a 'weight_map'): {e}"
      ) from None
    files = {k: os.path.join(path, v) for k, v in weight_map.items()}
    for k, f in files.items():
      if not os.path.isfile(f):
        raise ValueError(
            f"{index} maps {k} to {os.path.basename(f)}, which does not exist"
        )
    return files
  single = os.path.join(path, SINGLE_FILE)
  if os.path.isfile(single):
    with safe_open(single, "numpy") as f:
      return {k: single for k in f.keys()}
  bins = sorted(glob.glob(os.path.join(path, "*.bin")))
  if bins:  # pickles can run code on load; we read safetensors only
    raise ValueError(
        f"{path} holds PyTorch pickle weights ({os.path.basename(bins[0])}); only safetensors are "
        "read. Convert them with transformers' save_pretrained(safe_serialization=True) first"
    )
  raise ValueError(f"{path} has no {INDEX_FILE} or {SINGLE_FILE}")


def _headers(files: dict[str, str]) -> dict[str, tuple[tuple[int, ...], str]]:
  """key -> (shape, dtype name), from the safetensors headers only (no tensor data is read)."""
  out = {}
  by_file: dict[str, list[str]] = {}
  for k, f in files.items():
    by_file.setdefault(f, []).append(k)
  for fname, keys in by_file.items():
    with safe_open(fname, "numpy") as f:
      present = set(f.keys())
      for k in keys:
        if k not in present:
          raise ValueError(
              f"the index maps {k} to {os.path.basename(fname)}, which does not hold it"
          )
        sl = f.get_slice(k)
        out[k] = (tuple(sl.get_shape()), _dtype_name(sl.get_dtype(), k))
  return out


def _match(cfg: PLTConfig, slots: list[Slot], keys) -> dict[str, str]:
  """Our slot key -> the checkpoint key holding it (canonical or alias); raises on any mismatch."""
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


def _read(fname: str, key: str) -> np.ndarray:
  # One handle per tensor: closing it unmaps the shard, so RSS holds one tensor, not a whole shard.
  with safe_open(fname, "numpy") as f:
    return f.get_tensor(key)


def _aligned_empty(shape, dtype, align=64):
  """np.empty on a 64-byte boundary: jax.device_put to CPU then aliases it instead of copying."""
  n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  raw = np.empty(n + align, np.uint8)
  start = -raw.ctypes.data % align
  return raw[start : start + n].view(dtype).reshape(shape)


def _cast_aligned(x, dtype: str):
  x = np.asarray(x)
  if x.dtype == DTYPES[dtype]:
    return x
  out = _aligned_empty(x.shape, DTYPES[dtype])
  out[...] = x
  return out


def read_hf_config(path: str) -> PLTConfig:
  """config.json of an HF directory (transformers 5 key spellings accepted: see PLTConfig)."""
  return PLTConfig.from_hf_file(os.path.join(path, "config.json"))


def load_hf(
    path: str | os.PathLike, dtype: str | None = None
) -> tuple[PLTConfig, dict]:
  """Read an HF directory into `(cfg, params)` (numpy, stacked layers) for `PLTForCausalLM(cfg).apply`.

  `dtype=None` keeps each tensor's stored dtype; a dtype name casts every tensor to it.
  `cfg.runtime.param_dtype` is set to the params' dtype when they share one.
  """
  path = os.path.abspath(os.fspath(path))
  _check_dtype(dtype)
  cfg = read_hf_config(path)
  files = hf_weight_files(path)
  headers = _headers(files)
  slots = plan(cfg)
  source = _match(cfg, slots, headers)
  for s in slots:
    shape = headers[source[s.key]][0]
    if shape != s.hf_shape:
      raise ValueError(
          f"{source[s.key]}: checkpoint shape {shape} does not match the config's {s.hf_shape}"
      )

  stored: dict[str, str] = {}  # our path -> dtype
  for s in slots:
    d = dtype or headers[source[s.key]][1]
    if stored.setdefault(s.rule.path, d) != d:
      raise ValueError(
          f"{source[s.key]} is {d} but other layers of it are {stored[s.rule.path]}; pass dtype="
      )
  layers = cfg.num_hidden_layers
  flat = {}
  for s in slots:
    if s.rule.path not in flat:
      shape = ((layers,) if s.rule.per_layer else ()) + s.our_shape
      flat[s.rule.path] = _aligned_empty(shape, DTYPES[stored[s.rule.path]])
    key = source[s.key]
    w = _read(files[key], key)
    if dtype is not None:
      w = w.astype(DTYPES[dtype], copy=False)
    x = s.rule.to_ours(w, s.our_shape)
    if s.layer is None:
      flat[s.rule.path][...] = x
    else:
      flat[s.rule.path][s.layer] = x
    del w, x
  dtypes = set(stored.values())
  if dtype is not None:
    cfg = cfg.replace(torch_dtype=dtype)
  if len(dtypes) == 1:
    cfg = cfg.with_runtime(param_dtype=dtypes.pop())
  return cfg, _nest(flat)


# ------------------------------------------------------------------------------------- writing HF
def parse_size(size: int | str) -> int:
  """Bytes from an int or a string like '5GB', '500MB', '2GiB'."""
  if isinstance(size, int) and not isinstance(size, bool):
    value = size
  else:
    m = re.fullmatch(
        r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE
    )
    if not m:
      raise ValueError(
          f"shard size {size!r} is not a size like 5GB, 500MB or 1048576"
      )
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    value = int(float(m.group(1)) * base ** "BKMGT".index(unit[0]))
  if value <= 0:
    raise ValueError(f"shard size must be positive, got {size!r}")
  return value


@dataclasses.dataclass(frozen=True)
class Entry:
  """A tensor to write: its key, shape and dtype (known up front, for the header) and a producer."""

  key: str
  shape: tuple[int, ...]
  dtype: str
  produce: Callable[[], np.ndarray]

  @property
  def nbytes(self) -> int:
    return (
        int(np.prod(self.shape, dtype=np.int64)) * DTYPES[self.dtype].itemsize
    )


def write_safetensors(fname: str, entries: list[Entry]) -> None:
  """One safetensors file, streamed: the header (from declared shapes), then each tensor in turn."""
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for e in entries:
    header[e.key] = {
        "dtype": _ST_DTYPES[e.dtype],
        "shape": list(e.shape),
        "data_offsets": [offset, offset + e.nbytes],
    }
    offset += e.nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  with open(fname, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for e in entries:
      x = np.ascontiguousarray(e.produce())
      if x.shape != e.shape or x.dtype != DTYPES[e.dtype]:
        raise ValueError(
            f"{e.key}: produced {x.dtype}{x.shape}, declared {e.dtype}{e.shape}"
        )
      f.write(x.reshape(-1).view(np.uint8).data)
      del x


def write_sharded(
    path: str, entries: list[Entry], shard_size: int | str = DEFAULT_SHARD_SIZE
) -> list[str]:
  """Safetensors shards of at most `shard_size` bytes (a bigger tensor gets its own) plus the index."""
  limit = parse_size(shard_size)
  shards: list[list[Entry]] = [[]]
  size = 0
  for e in entries:
    if shards[-1] and size + e.nbytes > limit:
      shards.append([])
      size = 0
    shards[-1].append(e)
    size += e.nbytes
  if len(shards) == 1:
    names = [SINGLE_FILE]
  else:
    names = [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        for i in range(len(shards))
    ]
  for name, group in zip(names, shards):
    write_safetensors(os.path.join(path, name), group)
  if len(shards) > 1:
    index = {
        "metadata": {"total_size": sum(e.nbytes for e in entries)},
        "weight_map": {
            e.key: n
            for n, g in zip(names, shards)
            for e in sorted(g, key=lambda e: e.key)
        },
    }
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    with open(os.path.join(path, INDEX_FILE), "w") as f:
      json.dump(index, f, indent=2)
      f.write("\n")
  return names


def _dtype_of(x) -> str:
  name = np.dtype(x.dtype).name
  if name not in DTYPES:
    raise ValueError(
        f"unsupported param dtype {name}; expected one of {sorted(DTYPES)}"
    )
  return name


def _check_params(cfg: PLTConfig, params) -> dict[str, Any]:
  from loopcoder_jax.model.transformer import abstract_params

  want = {p: tuple(a.shape) for p, a in _flat(abstract_params(cfg)).items()}
  flat = _flat(params)
  for p in sorted(want):
    if p not in flat:
      raise ValueError(
          f"params are missing {p} (shape {want[p]}) for this config"
      )
  for p in sorted(flat):
    if p not in want:
      raise ValueError(
          f"params hold unexpected {p} (shape {tuple(np.shape(flat[p]))}) for this config"
      )
    if tuple(np.shape(flat[p])) != want[p]:
      raise ValueError(
          f"params {p}: shape {tuple(np.shape(flat[p]))} does not match the config's {want[p]}"
      )
  return flat


def _hf_entries(
    cfg: PLTConfig, flat: dict[str, Any], dtype: str | None
) -> list[Entry]:
  entries = []
  for s in plan(cfg):
    leaf = flat[s.rule.path]
    out = dtype or _dtype_of(leaf)

    def produce(s=s, leaf=leaf, out=out):
      # one layer at a time off the device
      x = np.asarray(leaf if s.layer is None else leaf[s.layer])
      return s.rule.to_hf(x, cfg).astype(DTYPES[out], copy=False)

    entries.append(Entry(s.key, s.hf_shape, out, produce))
  return entries


def copy_side_files(src: str | None, dst: str) -> list[str]:
  """Tokenizer, chat template and generation config files of `src`, copied verbatim into `dst`."""
  if not src:
    return []
  names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
  names += sorted(
      os.path.basename(p) for p in glob.glob(os.path.join(src, "*.jinja"))
  )
  for n in names:
    shutil.copyfile(os.path.join(src, n), os.path.join(dst, n))
  return names


def _write_hf(
    cfg: PLTConfig,
    params,
    path: str,
    shard_size,
    dtype: str | None,
    tokenizer_dir: str | None,
):
  flat = _check_params(cfg, params)
  entries = _hf_entries(cfg, flat, dtype)
  dtypes = {e.dtype for e in entries}
  if len(dtypes) == 1:  # config.json states the dtype the tensors really have
    cfg = cfg.replace(torch_dtype=dtypes.pop())
  write_sharded(path, entries, shard_size)
  cfg.replace(extra_hf={**cfg.extra_hf, "auto_map": AUTO_MAP}).to_hf_file(
      os.path.join(path, "config.json")
  )
  for name in MODELING_FILES:
    shutil.copyfile(
        os.path.join(HF_MODELING_DIR, name), os.path.join(path, name)
    )
  copy_side_files(tokenizer_dir, path)


def save_hf(
    cfg: PLTConfig,
    params,
    path: str | os.PathLike,
    *,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    dtype: str | None = None,
    overwrite: bool = False,
    tokenizer_dir: str | os.PathLike | None = None,
):
  """Write an HF directory: sharded safetensors + index, config.json (with `auto_map`), the PyTorch
  modeling files and the tokenizer files of `tokenizer_dir`. `dtype=None` keeps each param's dtype.
  """
  _check_dtype(dtype)
  parse_size(shard_size)
  with staged_dir(path, overwrite) as tmp:
    _write_hf(
        cfg,
        params,
        tmp,
        shard_size,
        dtype,
        tokenizer_dir and os.fspath(tokenizer_dir),
    )


# ------------------------------------------------------------------------------------- directories
def check_dst(path: str, overwrite: bool) -> None:
  if os.path.exists(path):
    if not os.path.isdir(path):
      raise ValueError(f"destination {path} exists and is not a directory")
    if os.listdir(path) and not overwrite:
      raise ValueError(
          f"destination {path} is not empty; pass overwrite=True (--overwrite) to replace it"
      )


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike, overwrite: bool) -> Iterator[str]:
  """Yield a temp sibling of `path`; on success it replaces `path`, on failure it is removed."""
  path = os.path.abspath(os.fspath(path))
  check_dst(path, overwrite)
  parent, base = os.path.split(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.exists(path):
    old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
    os.rename(path, os.path.join(old, base))
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.rename(tmp, path)


# ------------------------------------------------------------------------------------- conversion
def detect_format(path: str) -> str:
  """'orbax' for a params directory, 'hf' for config.json plus weights; ValueError otherwise."""
  if checkpoint.is_params_dir(path):
    return "orbax"
  if os.path.isfile(os.path.join(path, "config.json")):
    return "hf"
  raise ValueError(
      f"{path} is neither an HF checkpoint (config.json + safetensors) nor a params "
      "directory (config.json + params/)"
  )


def load_orbax(path: str, dtype: str | None = None) -> tuple[PLTConfig, Any]:
  """A params directory restored in its stored dtype (or cast to `dtype`)."""
  if dtype is None:
    stored = checkpoint.stored_dtypes(path)
    if len(stored) != 1:
      raise ValueError(
          f"{path} holds params of mixed dtypes {sorted(stored)}; pass an explicit dtype"
      )
    dtype = stored.pop()
  return checkpoint.load_params(path, param_dtype=dtype)


def save_orbax(
    cfg: PLTConfig,
    params,
    path: str,
    *,
    overwrite: bool = False,
    tokenizer_dir: str | None = None,
    dtype: str | None = None,
):
  _check_dtype(dtype)
  flat = _check_params(cfg, params)
  if dtype is not None:
    flat = {p: _cast_aligned(x, dtype) for p, x in flat.items()}
    cfg = cfg.replace(torch_dtype=dtype)
  # Host jax arrays (aliasing load_hf's aligned numpy buffers): Orbax stages less than from numpy.
  cpu = _cpu_device()
  flat = {p: jax.device_put(x, cpu) for p, x in flat.items()}
  with staged_dir(path, overwrite) as tmp:
    checkpoint.save_params(tmp, cfg, _nest(flat))
    copy_side_files(tokenizer_dir, tmp)


def _cpu_device():
  try:
    return jax.devices("cpu")[0]
  except RuntimeError:  # JAX_PLATFORMS without cpu: the default device
    return None


def convert_checkpoint(
    src: str,
    dst: str,
    to: str,
    *,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    dtype: str | None = None,
    overwrite: bool = False,
) -> str:
  """Convert `src` (format detected) to `to` in {'orbax', 'hf'} at `dst`. Returns the source format."""
  if to not in ("orbax", "hf"):
    raise ValueError(f"--to must be 'orbax' or 'hf', got {to!r}")
  _check_dtype(dtype)
  parse_size(shard_size)
  src, dst = os.path.abspath(src), os.path.abspath(dst)
  if not os.path.isdir(src):
    raise ValueError(f"source {src} is not a directory")
  if os.path.commonpath([src, dst]) in (src, dst):
    raise ValueError(
        f"source {src} and destination {dst} must not contain each other"
    )
  fmt = detect_format(src)
  check_dst(dst, overwrite)  # fail before reading any weights
  cfg, params = load_hf(src, dtype) if fmt == "hf" else load_orbax(src, dtype)
  if to == "hf":
    save_hf(
        cfg,
        params,
        dst,
        shard_size=shard_size,
        overwrite=overwrite,
        tokenizer_dir=src,
    )
  else:
    save_orbax(cfg, params, dst, overwrite=overwrite, tokenizer_dir=src)
  return fmt


def resolve_checkpoint(path: str) -> tuple[str, str]:
  """(weights directory, 'orbax' | 'hf') for a params dir, a finished training workdir or an HF dir."""
  if not os.path.isdir(path):
    raise ValueError(f"checkpoint {path} is not a directory")
  if checkpoint.is_params_dir(path):
    return path, "orbax"
  if checkpoint.is_params_dir(os.path.join(path, "params")):
    return os.path.join(path, "params"), "orbax"
  if os.path.isdir(os.path.join(path, "checkpoints")):
    raise ValueError(
        f"{path} is a training workdir without a final params/ export (training has not "
        "finished); convert a step first or wait for the run to end"
    )
  return path, detect_format(path)


def load_checkpoint(
    path: str, dtype: str | None = None
) -> tuple[PLTConfig, Any, str]:
  """Any checkpoint directory we know -> (cfg, params as jax arrays, weights directory).

  With `dtype` the params are cast to it and the model computes in it; otherwise they keep the
  stored dtype (the compute dtype stays the config's default)."""
  weights_dir, fmt = resolve_checkpoint(path)
  if fmt == "orbax":
    cfg, params = load_orbax(weights_dir, dtype)
  else:
    cfg, params = load_hf(weights_dir, dtype)
    params = jax.tree.map(jax.numpy.asarray, params)
  if dtype is not None:
    cfg = cfg.with_runtime(dtype=dtype, param_dtype=dtype)
  return cfg, params, weights_dir
