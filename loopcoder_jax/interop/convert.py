"""HF directories <-> our params, on top of the name table and the streaming safetensors I/O.

`load_hf` checks every key, alias and shape against the config from the headers (`hf_names`,
`safetensors_io`) before any tensor is read, then reads one tensor at a time into preallocated
stacked arrays; `save_hf` streams one layer of one param at a time into the shards, so a conversion
holds about one copy of the weights. dtypes are kept exactly unless an output `dtype` is asked for.
Params directories (config.json + Orbax params/) go through `train/checkpoint.py`.

Outputs are built in a temp sibling and renamed into place, so a failure leaves nothing under the
final name (and a replaced directory stays whole until the new one is complete).

Entry points: `load_hf`, `save_hf`, `convert_checkpoint` (what `scripts/convert_checkpoint.py` runs).
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import glob
import os
import shutil
import tempfile
from typing import Any

import jax
import numpy as np

from loopcoder_jax.interop import hf_names
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
    key = source[s.key]
    w = st.read_tensor(files[key], key)
    if dtype is not None:
      w = w.astype(st.DTYPES[dtype], copy=False)
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
  return cfg, hf_names.unflatten(flat)


# ------------------------------------------------------------------------------------- writing HF
def check_params(cfg: PLTConfig, params) -> dict[str, Any]:
  """The flat params, once every path and shape matches the config's model."""
  want = hf_names.param_shapes(cfg)
  flat = hf_names.flatten(params)
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
) -> list[st.Entry]:
  entries = []
  for s in hf_names.plan(cfg):
    leaf = flat[s.rule.path]
    out = dtype or st.dtype_of(leaf)

    def produce(s=s, leaf=leaf, out=out):
      # one layer at a time off the device
      x = np.asarray(leaf if s.layer is None else leaf[s.layer])
      return s.rule.to_hf(x, cfg).astype(st.DTYPES[out], copy=False)

    entries.append(st.Entry(s.key, s.hf_shape, out, produce))
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
  flat = check_params(cfg, params)
  entries = _hf_entries(cfg, flat, dtype)
  dtypes = {e.dtype for e in entries}
  if len(dtypes) == 1:  # config.json states the dtype the tensors really have
    cfg = cfg.replace(torch_dtype=dtypes.pop())
  st.write_sharded(path, entries, shard_size)
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
    shard_size: int | str = st.DEFAULT_SHARD_SIZE,
    dtype: str | None = None,
    overwrite: bool = False,
    tokenizer_dir: str | os.PathLike | None = None,
):
  """Write an HF directory: sharded safetensors + index, config.json (with `auto_map`), the PyTorch
  modeling files and the tokenizer files of `tokenizer_dir`. `dtype=None` keeps each param's dtype.
  """
  st.check_dtype(dtype)
  st.parse_size(shard_size)
  with staged_dir(path, overwrite) as tmp:
    _write_hf(
        cfg,
        params,
        tmp,
        shard_size,
        dtype,
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


def convert_checkpoint(
    src: str,
    dst: str,
    to: str,
    *,
    shard_size: int | str = st.DEFAULT_SHARD_SIZE,
    dtype: str | None = None,
    overwrite: bool = False,
) -> str:
  """Convert `src` (format detected) to `to` in {'orbax', 'hf'} at `dst`. Returns the source format."""
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
