"""What a checkpoint path holds, and the params directory with its side files.

Sources (`resolve_source`): an HF directory, a params directory, a training workdir (its params/
export, tokenizer from WORKDIR/tokenizer) or one of its steps (`WORKDIR/checkpoints/<step>`). Side
files (tokenizer, chat template, generation config) are copied only from inside the source: a
symlink out of it is refused (except into the blob store of the Hugging Face cache a snapshot
directory links into).
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
from typing import Any

import jax

from loopcoder_jax.checkpoints import hf_io, hf_names, params_io, staging
from loopcoder_jax.checkpoints import safetensors_io as st
from loopcoder_jax.model.config import PLTConfig

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


def resolve_source(path: str) -> tuple[str, str, tuple[str, ...]]:
  """(weights directory, 'orbax' | 'hf', directories that may hold the tokenizer) of a checkpoint:
  a params directory, a training workdir (its params/ export), a training step or an HF directory.
  """
  if params_io.is_params_dir(path):
    return path, "orbax", (path,)
  if params_io.is_step_dir(path):
    workdir = os.path.dirname(os.path.dirname(path))
    return path, "orbax", (os.path.join(workdir, "tokenizer"),)
  export = os.path.join(path, "params")
  if params_io.is_params_dir(export):
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


def content_hash(path: str) -> str:
  """sha256 of a checkpoint's weights and config (what a LoRA run records of its base).

  A params directory hashes its config.json and CRC-32 table (one per param: cheap, and content
  derived); any other source (an HF directory, a training step) hashes every file's bytes.
  """
  weights, _, _ = resolve_source(os.path.abspath(path))
  h = hashlib.sha256()
  if os.path.isfile(os.path.join(weights, params_io.CHECKSUMS)):
    files = ["config.json", params_io.CHECKSUMS]
  else:
    files = sorted(
        os.path.relpath(os.path.join(d, n), weights)
        for d, _, names in os.walk(weights)
        for n in names
    )
  for rel in files:
    h.update(rel.encode() + b"\0")
    with open(os.path.join(weights, rel), "rb") as f:
      for block in iter(lambda: f.read(1 << 24), b""):
        h.update(block)
  return h.hexdigest()


def tokenizer_dirs(path: str) -> tuple[str, ...]:
  """The directories that may hold the tokenizer of the checkpoint at `path`."""
  return resolve_source(path)[2]


def detect_format(path: str) -> str:
  """'orbax' or 'hf' for a checkpoint `resolve_source` takes; ValueError otherwise."""
  return resolve_source(path)[1]


def load_orbax(
    path: str, dtype: str | None = None, shardings: Any = None
) -> tuple[PLTConfig, Any]:
  """A params directory (or training step) restored in its stored dtype (or cast to `dtype`), onto
  `shardings` (see `params_io.load_params`; default: the first local device).
  """
  st.check_dtype(dtype)
  if dtype is None:
    stored = params_io.stored_dtypes(path)
    if len(stored) != 1:
      raise ValueError(
          f"{path} holds params of mixed dtypes {sorted(stored)}; pass an explicit dtype"
      )
    dtype = stored.pop()
  return params_io.load_params(path, shardings, param_dtype=dtype)


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
  flat = hf_io.check_params(cfg, params)
  if dtype is not None:
    flat = {p: hf_io.cast_aligned(x, dtype) for p, x in flat.items()}
    cfg = cfg.replace(torch_dtype=dtype)
  # Host jax arrays (aliasing load_hf's aligned numpy buffers): Orbax stages less than from numpy.
  cpu = _cpu_device()
  flat = {p: jax.device_put(x, cpu) for p, x in flat.items()}
  with staging.staged_dir(path, overwrite) as tmp:
    params_io.save_params(tmp, cfg, hf_names.unflatten(flat))
    copy_side_files(tokenizer_dir, tmp)


def _cpu_device():
  try:
    return jax.devices("cpu")[0]
  except RuntimeError:  # JAX_PLATFORMS without cpu: the default device
    return None
