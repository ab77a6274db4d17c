"""HF directories <-> our params, on top of the name table and the streaming safetensors I/O.

`load_hf` checks every key, alias and shape against the config from the headers (`hf_names`,
`safetensors_io`) before any tensor is read, then reads one tensor at a time into preallocated
stacked arrays; `save_hf` streams one layer of one param at a time into the shards, so a conversion
holds about one copy of the weights. dtypes are kept exactly unless an output `dtype` is asked for.
Params directories (config.json + Orbax params/) go through `train/checkpoint.py`.

Sources (`resolve_source`): an HF directory, a params directory, a training workdir (its params/
export, tokenizer from WORKDIR/tokenizer) or one of its steps (`WORKDIR/checkpoints/<step>`). Side
files are copied only from inside the source: a symlink out of it is refused (except into the
blob store of the Hugging Face cache a snapshot directory links into).

Outputs are built in a temp sibling and renamed into place, so a failure leaves nothing under the
final name (and a replaced directory stays whole until the new one is complete); a destination
symlink is followed, and temp siblings left by a killed conversion are cleaned up by the next one.
`overwrite` replaces only a directory that holds a checkpoint (or nothing).

Entry points: `load_hf`, `save_hf`, `convert_checkpoint` (what `scripts/convert_checkpoint.py` runs).
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import glob
import os
import secrets
import shutil
import socket
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


def _within(path: str, root: str) -> bool:
  return os.path.commonpath([path, root]) == root


def side_files(src: str | None) -> list[str]:
  """Names of the tokenizer, chat template and generation config files of `src`.

  ValueError for one that is a symlink out of `src` (copying it would export whatever it points
  at), unless `src` is a Hugging Face cache snapshot and the link goes into the cache's blobs/.
  """
  if not src:
    return []
  names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
  names += sorted(
      os.path.basename(p) for p in glob.glob(os.path.join(src, "*.jinja"))
  )
  root = os.path.realpath(src)
  roots = [root]
  if os.path.basename(os.path.dirname(root)) == "snapshots":
    roots.append(os.path.join(os.path.dirname(os.path.dirname(root)), "blobs"))
  for n in names:
    target = os.path.realpath(os.path.join(src, n))
    if not any(_within(target, r) for r in roots):
      raise ValueError(
          f"{os.path.join(src, n)} is a symlink to {target}, outside the source "
          f"{src}; refusing to copy it (put the file itself there)"
      )
  return names


def copy_side_files(src: str | None, dst: str) -> list[str]:
  """The `side_files` of `src`, copied verbatim into `dst`."""
  if not src:
    return []
  names = side_files(src)
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
def is_hf_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "config.json")) and any(
      os.path.isfile(os.path.join(path, n))
      for n in (st.SINGLE_FILE, st.INDEX_FILE)
  )


def check_dst(path: str, overwrite: bool) -> None:
  path = os.path.realpath(path)
  if os.path.exists(path):
    if not os.path.isdir(path):
      raise ValueError(f"destination {path} exists and is not a directory")
    names = sorted(os.listdir(path))
    if names and not overwrite:
      raise ValueError(
          f"destination {path} is not empty; pass overwrite=True (--overwrite) to replace it"
      )
    if names and not (checkpoint.is_params_dir(path) or is_hf_dir(path)):
      raise ValueError(
          f"destination {path} holds {', '.join(names[:3])}"
          f"{', ...' if len(names) > 3 else ''}, not a checkpoint; --overwrite "
          "replaces only a params or HF checkpoint directory (or an empty one)"
      )


def _tag() -> str:
  return f"{os.getpid()}@{socket.gethostname()}"


def _alive(tag: str) -> bool:
  """Whether the process named by a temp directory's tag may still run (other hosts: assume so)."""
  pid, _, host = tag.partition("@")
  if host != socket.gethostname() or not pid.isdigit():
    return True
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _clean_stale(parent: str, base: str) -> None:
  """Removes temp siblings of `base` left by a conversion that was killed (kill -9, power loss).

  A killed replacement may have left the previous checkpoint only in its `.old-` sibling: that is
  moved back when `base` is missing.
  """
  for kind in ("tmp", "old"):
    prefix = f".{base}.{kind}-"
    for name in sorted(os.listdir(parent)):
      if not name.startswith(prefix):
        continue
      tag = name[len(prefix) :].rpartition("-")[0]
      stale = os.path.join(parent, name)
      if _alive(tag):
        continue
      kept = os.path.join(stale, base)
      path = os.path.join(parent, base)
      if kind == "old" and os.path.isdir(kept) and not os.path.exists(path):
        os.rename(kept, path)
      shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike, overwrite: bool) -> Iterator[str]:
  """Yield a temp sibling of `path`; on success it replaces `path`, on failure it is removed.

  A symlink `path` is followed (the output goes where it points).
  """
  path = os.path.realpath(os.fspath(path))
  parent, base = os.path.split(path)
  os.makedirs(parent, exist_ok=True)
  _clean_stale(parent, base)
  check_dst(path, overwrite)
  tmp = os.path.join(parent, f".{base}.tmp-{_tag()}-{secrets.token_hex(4)}")
  os.mkdir(tmp)  # mode 0o777 less the umask, like any directory the user makes
  try:
    yield tmp
    if os.path.exists(path):
      old = os.path.join(parent, f".{base}.old-{_tag()}-{secrets.token_hex(4)}")
      os.mkdir(old)
      os.rename(path, os.path.join(old, base))
      os.rename(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


# ------------------------------------------------------------------------------------- conversion
def resolve_source(path: str) -> tuple[str, str, tuple[str, ...]]:
  """(weights directory, 'orbax' | 'hf', directories that may hold the tokenizer) of a checkpoint:
  a params directory, a training workdir (its params/ export), a training step or an HF directory.
  """
  if checkpoint.is_params_dir(path):
    return path, "orbax", (path,)
  if checkpoint.is_step_dir(path):
    workdir = os.path.dirname(os.path.dirname(path))
    return path, "orbax", (os.path.join(workdir, "tokenizer"),)
  export = os.path.join(path, "params")
  if checkpoint.is_params_dir(export):
    return export, "orbax", (export, os.path.join(path, "tokenizer"))
  steps = os.path.join(path, "checkpoints")
  if os.path.isdir(steps):
    found = sorted(
        (int(n) for n in os.listdir(steps) if n.isdigit()), reverse=True
    )
    where = (
        f"use one of its steps, e.g. {os.path.join(steps, str(found[0]))}"
        if found
        else "it holds no checkpoint step yet"
    )
    raise ValueError(
        f"{path} is a training workdir without a final params/ export (the run has "
        f"not finished); {where}"
    )
  if os.path.isfile(os.path.join(path, "config.json")):
    return path, "hf", (path,)
  raise ValueError(
      f"{path} is not a checkpoint: expected a params directory (config.json + params/), a "
      "finished training workdir (with a params/ export) or one of its steps "
      "(WORKDIR/checkpoints/<step>), or an HF directory (config.json + safetensors)"
  )


def detect_format(path: str) -> str:
  """'orbax' or 'hf' for a checkpoint `resolve_source` takes; ValueError otherwise."""
  return resolve_source(path)[1]


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
  real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
  if os.path.commonpath([real_src, real_dst]) in (real_src, real_dst):
    raise ValueError(
        f"source {src} and destination {dst} must not contain each other"
    )
  weights, fmt, tok_dirs = resolve_source(src)
  # fail before reading any weights
  tok_dir = next((d for d in tok_dirs if side_files(d)), None)
  check_dst(dst, overwrite)
  if fmt == "hf":
    cfg, params = load_hf(weights, dtype)
  else:
    cfg, params = load_orbax(weights, dtype)
  if to == "hf":
    save_hf(
        cfg,
        params,
        dst,
        shard_size=shard_size,
        overwrite=overwrite,
        tokenizer_dir=tok_dir,
    )
  else:
    save_orbax(cfg, params, dst, overwrite=overwrite, tokenizer_dir=tok_dir)
  return fmt
