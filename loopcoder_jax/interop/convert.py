"""HF directories <-> our params, on top of the name table and the streaming safetensors I/O.

`load_hf` checks every key, alias and shape against the config from the headers (`hf_names`,
`safetensors_io`) before any tensor is read, then reads each tensor straight into its slot of the
preallocated stacked arrays (through a one-tensor buffer where it must be transposed or cast);
`save_hf` lays the shards out first and writes one layer of one param at a time. Orbax -> HF never
holds the model: params are restored one at a time and written as they come; HF -> Orbax holds one
copy (Orbax saves a whole tree). dtypes are kept exactly unless an output `dtype` is asked for.
Params directories (config.json + Orbax params/) go through `train/checkpoint.py`.

R >= 2 exports carry `auto_map` and the PyTorch modeling files (`IQuestPLTCoderForCausalLM`); R = 1
exports are plain Llama directories (`model_type: llama`), which any Llama loader reads.

Outputs are built in a temp sibling and renamed into place, so a failure leaves nothing under the
final name (and a replaced directory stays whole until the new one is complete).

Entry points: `load_hf`, `save_hf`, `convert_checkpoint` (what `scripts/convert_checkpoint.py` runs;
`loops=` upcycles on the way, see `upcycling.py`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
import contextlib
import glob
import itertools
import os
import shutil
import tempfile
from typing import Any

import jax
import numpy as np

from loopcoder_jax.interop import hf_names, upcycling
from loopcoder_jax.interop import safetensors_io as st
from loopcoder_jax.model.config import PLTConfig
from loopcoder_jax.train import checkpoint

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


_READ_BLOCK = (
    16 << 20
)  # bytes read at a time for a tensor that is transposed or cast on load


def _aligned_empty(shape, dtype, align=64):
  """np.empty on a 64-byte boundary: jax.device_put to CPU then aliases it instead of copying."""
  n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  raw = np.empty(n + align, np.uint8)
  start = -raw.ctypes.data % align
  return raw[start : start + n].view(dtype).reshape(shape)


def _cast_aligned(x, dtype: str):
  x = np.asarray(x)
  if x.dtype == st.DTYPES[dtype]:
    return x
  out = _aligned_empty(x.shape, st.DTYPES[dtype])
  out[...] = x
  return out


# ------------------------------------------------------------------------------------- reading HF
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
  st.check_dtype(dtype)
  cfg = read_hf_config(path)
  files = st.weight_files(path)
  headers = st.read_headers(files)
  slots = hf_names.plan(cfg)
  source = hf_names.match(cfg, slots, headers)
  for s in slots:
    shape = headers[source[s.key]][0]
    if shape != s.hf_shape:
      raise ValueError(
          f"{source[s.key]}: checkpoint shape {shape} does not match the config's {s.hf_shape}"
      )

  _check_tied_head(cfg, files, headers, source)

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
      flat[s.rule.path] = _aligned_empty(shape, st.DTYPES[stored[s.rule.path]])
    out = flat[s.rule.path] if s.layer is None else flat[s.rule.path][s.layer]
    key = source[s.key]
    if not s.rule.transpose and headers[key][1] == stored[s.rule.path]:
      st.read_into(files[key], key, out.reshape(s.hf_shape))
      continue
    # transposed or cast: through a buffer of a few rows
    rows, width = s.hf_shape[0], int(np.prod(s.hf_shape[1:], dtype=np.int64))
    step = max(1, _READ_BLOCK // (width * st.DTYPES[headers[key][1]].itemsize))
    for r in range(0, rows, step):
      block = np.empty(
          (min(step, rows - r),) + s.hf_shape[1:], st.DTYPES[headers[key][1]]
      )
      st.read_into(files[key], key, block, r)
      s.rule.into_ours(block, out, r)
  dtypes = set(stored.values())
  if dtype is not None:
    cfg = cfg.replace(torch_dtype=dtype)
  if len(dtypes) == 1:
    cfg = cfg.with_runtime(param_dtype=dtypes.pop())
  return cfg, hf_names.unflatten(flat)


def _check_tied_head(cfg, files, headers, source) -> None:
  """A tied checkpoint may also store the head: it must then equal the embedding."""
  head = hf_names.TIED_HEAD
  if not (cfg.tie_word_embeddings and head in headers):
    return
  emb = source["model.embed_tokens.weight"]
  same = headers[head] == headers[emb] and np.array_equal(
      st.read_tensor(files[head], head), st.read_tensor(files[emb], emb)
  )
  if not same:
    raise ValueError(
        f"tie_word_embeddings is true but {head} differs from {emb}; set "
        "tie_word_embeddings to false in config.json to load it as a separate head"
    )


# ------------------------------------------------------------------------------------- writing HF
def check_shapes(cfg: PLTConfig, shapes: dict[str, tuple[int, ...]]) -> None:
  """Every param path and shape (flat 'a/b/c' -> shape) matches the config's model."""
  want = hf_names.param_shapes(cfg)
  for p in sorted(want):
    if p not in shapes:
      raise ValueError(
          f"params are missing {p} (shape {want[p]}) for this config"
      )
  for p in sorted(shapes):
    if p not in want:
      raise ValueError(
          f"params hold unexpected {p} (shape {shapes[p]}) for this config"
      )
    if shapes[p] != want[p]:
      raise ValueError(
          f"params {p}: shape {shapes[p]} does not match the config's {want[p]}"
      )


def check_params(cfg: PLTConfig, params) -> dict[str, Any]:
  """The flat params, once every path and shape matches the config's model."""
  flat = hf_names.flatten(params)
  check_shapes(cfg, {p: tuple(np.shape(x)) for p, x in flat.items()})
  return flat


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
    path: str,
    dtypes: dict[str, str],
    leaves: Iterable[tuple[str, Any]],
    shard_size,
    tokenizer_dir: str | None,
):
  """An HF directory at `path`. `dtypes`: param -> output dtype; `leaves`: (param, array) pairs in
  any order, each written as it comes (one layer at a time off the device).
  """
  slots: dict[str, list[hf_names.Slot]] = {}
  entries = []
  for s in hf_names.plan(cfg):
    slots.setdefault(s.rule.path, []).append(s)
    entries.append(st.Entry(s.key, s.hf_shape, dtypes[s.rule.path]))
  if len(set(dtypes.values())) == 1:  # config.json states the dtype written
    cfg = cfg.replace(torch_dtype=next(iter(dtypes.values())))
  with st.ShardedWriter(path, entries, shard_size) as w:
    for p, leaf in leaves:
      for s in slots[p]:
        x = s.rule.to_hf(
            np.asarray(leaf if s.layer is None else leaf[s.layer]), cfg
        )
        w.write(s.key, np.ascontiguousarray(x, st.DTYPES[dtypes[p]]))
  extra = {k: v for k, v in cfg.extra_hf.items() if k != "auto_map"}
  if cfg.plt_num_loops > 1:  # R = 1 is a Llama: no remote code needed
    extra["auto_map"] = AUTO_MAP
    for name in MODELING_FILES:
      shutil.copyfile(
          os.path.join(HF_MODELING_DIR, name), os.path.join(path, name)
      )
  cfg.replace(extra_hf=extra).to_hf_file(os.path.join(path, "config.json"))
  copy_side_files(tokenizer_dir, path)


def save_hf(
    cfg: PLTConfig,
    params,
    path: str | os.PathLike,
    *,
    shard_size: int | str = st.DEFAULT_SHARD_SIZE,
    dtype: str | None = None,
    overwrite: bool = False,
    tokenizer_dir: str | os.PathLike | None = None,
):
  """Write an HF directory: sharded safetensors + index, config.json, for R >= 2 `auto_map` and the
  PyTorch modeling files, and the tokenizer files of `tokenizer_dir`. `dtype=None` keeps each
  param's dtype.
  """
  st.check_dtype(dtype)
  st.parse_size(shard_size)
  flat = check_params(cfg, params)
  dtypes = {p: dtype or st.dtype_of(x) for p, x in flat.items()}
  with staged_dir(path, overwrite) as tmp:
    _write_hf(
        cfg,
        tmp,
        dtypes,
        flat.items(),
        shard_size,
        os.fspath(tokenizer_dir) if tokenizer_dir else None,
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
  st.check_dtype(dtype)
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
  st.check_dtype(dtype)
  flat = check_params(cfg, params)
  if dtype is not None:
    flat = {p: _cast_aligned(x, dtype) for p, x in flat.items()}
    cfg = cfg.replace(torch_dtype=dtype)
  # Host jax arrays (aliasing load_hf's aligned numpy buffers): Orbax stages less than from numpy.
  cpu = _cpu_device()
  flat = {p: jax.device_put(x, cpu) for p, x in flat.items()}
  with staged_dir(path, overwrite) as tmp:
    checkpoint.save_params(tmp, cfg, hf_names.unflatten(flat))
    copy_side_files(tokenizer_dir, tmp)


def _cpu_device():
  try:
    return jax.devices("cpu")[0]
  except RuntimeError:  # JAX_PLATFORMS without cpu: the default device
    return None


def _orbax_to_hf(
    src: str,
    dst: str,
    *,
    shard_size,
    dtype: str | None,
    overwrite: bool,
    loops: int | None,
    gate_bias: float | None,
) -> None:
  """Streamed: each param restored, written and dropped in turn (plus new gates when upcycling)."""
  cfg = PLTConfig.from_hf_file(os.path.join(src, "config.json"))
  meta = checkpoint.params_metadata(src)
  check_shapes(cfg, {p: tuple(m.shape) for p, m in meta.items()})
  dtypes = {p: dtype or st.dtype_of(m) for p, m in meta.items()}
  leaves: Iterable[tuple[str, Any]] = (
      (p, np.asarray(x)) for p, x in checkpoint.iter_params(src)
  )
  if loops is not None:
    cfg, add = upcycling.plan_loops(cfg, loops, gate_bias)
    if add:
      bias = upcycling.DEFAULT_GATE_BIAS if gate_bias is None else gate_bias
      gates = upcycling.gate_params(cfg, st.DTYPES[dtypes["norm/scale"]], bias)
      dtypes.update({p: dtypes["norm/scale"] for p in gates})
      leaves = itertools.chain(leaves, gates.items())
  with staged_dir(dst, overwrite) as tmp:
    _write_hf(cfg, tmp, dtypes, leaves, shard_size, src)


def convert_checkpoint(
    src: str,
    dst: str,
    to: str,
    *,
    shard_size: int | str = st.DEFAULT_SHARD_SIZE,
    dtype: str | None = None,
    overwrite: bool = False,
    loops: int | None = None,
    gate_bias: float | None = None,
) -> str:
  """Convert `src` (format detected) to `to` in {'orbax', 'hf'} at `dst`. Returns the source format.

  `loops`: write the model with this loop count; from an R = 1 (or Llama) source that upcycles it,
  adding gates with bias `gate_bias` (see `upcycling.py`).
  """
  if to not in ("orbax", "hf"):
    raise ValueError(f"--to must be 'orbax' or 'hf', got {to!r}")
  st.check_dtype(dtype)
  st.parse_size(shard_size)
  src, dst = os.path.abspath(src), os.path.abspath(dst)
  if not os.path.isdir(src):
    raise ValueError(f"source {src} is not a directory")
  if os.path.commonpath([src, dst]) in (src, dst):
    raise ValueError(
        f"source {src} and destination {dst} must not contain each other"
    )
  fmt = detect_format(src)
  check_dst(dst, overwrite)  # fail before reading any weights
  if loops is not None:  # bad loop settings fail before any weight is read too
    upcycling.plan_loops(
        PLTConfig.from_hf_file(os.path.join(src, "config.json")),
        loops,
        gate_bias,
    )
  elif gate_bias is not None:
    raise ValueError("gate_bias applies only with loops (upcycling)")
  if fmt == "orbax" and to == "hf":
    _orbax_to_hf(
        src,
        dst,
        shard_size=shard_size,
        dtype=dtype,
        overwrite=overwrite,
        loops=loops,
        gate_bias=gate_bias,
    )
    return fmt
  cfg, params = load_hf(src, dtype) if fmt == "hf" else load_orbax(src, dtype)
  if loops is not None:
    cfg, params = upcycling.upcycle(cfg, params, loops, gate_bias=gate_bias)
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
