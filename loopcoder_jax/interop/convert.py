"""HF <-> Orbax conversion and HF exports, on top of the storage room (`loopcoder_jax/checkpoints`).

R >= 2 exports carry `auto_map` and the PyTorch modeling files (`IQuestPLTCoderForCausalLM`); R = 1
exports are plain Llama directories (`model_type: llama`), which any Llama loader reads. Orbax -> HF
never holds the model: params are restored one at a time and written as they come; HF -> Orbax
holds one copy (Orbax saves a whole tree). Outputs are staged (`checkpoints/staging.py`): a failure
leaves nothing under the final name.

Entry points: `save_hf`, `convert_checkpoint` (what `scripts/convert_checkpoint.py` runs; `loops=`
upcycles on the way, see `upcycling.py`).

A LoRA run (its workdir, export or a step: `checkpoints.lora_record`) converts to the merged model
(`checkpoints.load` checks its base and folds the shared adapters in) for `hf` and `orbax`, or to
its adapters in PEFT's format (`peft.py`) for `peft`; per-loop adapters have neither form.
"""

from __future__ import annotations

from collections.abc import Iterable
import contextlib
import itertools
import os
import shutil
from typing import Any

import numpy as np

from loopcoder_jax.checkpoints import (
    errors,
    formats,
    hf_io,
    loader,
    params_io,
    staging,
)
from loopcoder_jax.checkpoints import safetensors_io as st
from loopcoder_jax.interop import peft, upcycling
from loopcoder_jax.model import lora
from loopcoder_jax.model.config import PLTConfig

HF_MODELING_DIR = os.path.join(os.path.dirname(__file__), "hf_modeling")


MODELING_FILES = ("configuration_loopcoder.py", "modeling_loopcoder.py")


AUTO_MAP = {
    "AutoConfig": "configuration_loopcoder.IQuestPLTCoderConfig",
    "AutoModelForCausalLM": "modeling_loopcoder.IQuestPLTCoderForCausalLM",
}


def _write_export(
    cfg: PLTConfig,
    path: str,
    dtypes: dict[str, str],
    leaves: Iterable[tuple[str, Any]],
    shard_size,
    tokenizer_dir: str | None,
) -> None:
  """An HF export at `path`: the weights and config.json, for R >= 2 `auto_map` and the PyTorch
  modeling files (R = 1 is a Llama: no remote code needed), and the tokenizer's side files.
  """
  extra = {k: v for k, v in cfg.extra_hf.items() if k != "auto_map"}
  if cfg.plt_num_loops > 1:
    extra["auto_map"] = AUTO_MAP
  hf_io.write_hf(cfg.replace(extra_hf=extra), path, dtypes, leaves, shard_size)
  if cfg.plt_num_loops > 1:
    for name in MODELING_FILES:
      shutil.copyfile(
          os.path.join(HF_MODELING_DIR, name), os.path.join(path, name)
      )
  formats.copy_side_files(tokenizer_dir, path)


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
  hf_io.check_exportable(cfg)
  flat = hf_io.check_params(cfg, params)
  dtypes = {p: dtype or st.dtype_of(x) for p, x in flat.items()}
  with staging.staged_dir(path, overwrite) as tmp:
    _write_export(
        cfg,
        tmp,
        dtypes,
        flat.items(),
        shard_size,
        os.fspath(tokenizer_dir) if tokenizer_dir else None,
    )


def _orbax_to_hf(
    src: str,
    dst: str,
    *,
    shard_size,
    dtype: str | None,
    overwrite: bool,
    loops: int | None,
    gate_bias: float | None,
    tokenizer_dir: str | None,
) -> None:
  """Streamed: each param restored, written and dropped in turn (plus new gates when upcycling)."""
  cfg = params_io.read_config(src)
  hf_io.check_exportable(cfg)
  meta = params_io.params_metadata(src)
  hf_io.check_shapes(cfg, {p: tuple(m.shape) for p, m in meta.items()})
  dtypes = {p: dtype or st.dtype_of(m) for p, m in meta.items()}
  leaves: Iterable[tuple[str, Any]] = (
      (p, np.asarray(x)) for p, x in params_io.iter_params(src)
  )
  if loops is not None:
    cfg, add = upcycling.plan_loops(cfg, loops, gate_bias)
    if add:
      bias = upcycling.DEFAULT_GATE_BIAS if gate_bias is None else gate_bias
      gates = upcycling.gate_params(cfg, st.DTYPES[dtypes["norm/scale"]], bias)
      dtypes.update({p: dtypes["norm/scale"] for p in gates})
      # the new gates are checked before anything is read or written
      list(_finite(gates.items(), dtypes, gate_bias))
      leaves = itertools.chain(leaves, gates.items())
  with staging.staged_dir(dst, overwrite) as tmp:
    _write_export(
        cfg,
        tmp,
        dtypes,
        _finite(leaves, dtypes, gate_bias),
        shard_size,
        tokenizer_dir,
    )


def _nonfinite(param: str, dtype: str, gate_bias: float | None) -> ValueError:
  why = (
      f": gate_bias={gate_bias} does not fit {dtype}"
      if gate_bias is not None and param.startswith(upcycling.GATE_PREFIX)
      else ""
  )
  return ValueError(
      f"refusing to write a checkpoint that cannot load: {param} would hold NaN or Inf "
      f"({dtype}){why}"
  )


def _finite(leaves, dtypes: dict[str, str], gate_bias: float | None):
  """`leaves` as they come, each checked finite in its output dtype before it is written."""
  for p, x in leaves:
    if not np.isfinite(
        np.asarray(x).astype(st.DTYPES[dtypes[p]], copy=False)
    ).all():
      raise _nonfinite(p, dtypes[p], gate_bias)
    yield p, x


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
  """Convert `src` (format detected) to `to` in {'orbax', 'hf', 'peft'} at `dst`. Returns the source
  format ('lora' for a LoRA run's adapters).

  `loops`: write the model with this loop count; from an R = 1 (or Llama) source that upcycles it,
  adding gates with bias `gate_bias` (see `upcycling.py`).
  """
  if to not in ("orbax", "hf", "peft"):
    raise ValueError(f"--to must be 'orbax', 'hf' or 'peft', got {to!r}")
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
  weights, fmt, tok_dirs = formats.resolve_source(src)
  # fail before reading any weights: unsafe side files, the destination, the loop settings
  tok_dir = next((d for d in tok_dirs if formats.side_files(d)), None)
  staging.check_dst(dst, overwrite)
  record = params_io.lora_record(weights) if fmt == "orbax" else None
  if record is not None or to == "peft":
    _check_lora_args(src, weights, record, to, loops, gate_bias)
    with _storage_errors(src, dst):
      _convert_lora(
          src, weights, record, dst, to, tok_dir, shard_size, dtype, overwrite
      )
    return "lora"
  if loops is not None:
    upcycling.plan_loops(params_io.read_config(weights), loops, gate_bias)
  elif gate_bias is not None:
    raise ValueError("gate_bias applies only with loops (upcycling)")
  with _storage_errors(src, dst):
    _convert(
        weights,
        fmt,
        dst,
        to,
        tok_dir,
        shard_size=shard_size,
        dtype=dtype,
        overwrite=overwrite,
        loops=loops,
        gate_bias=gate_bias,
    )
  return fmt


def _check_lora_args(src, weights, record, to, loops, gate_bias) -> None:
  if record is None:
    raise ValueError(
        f"--to=peft writes a LoRA run's adapters; {src} holds a plain model"
    )
  if loops is not None or gate_bias is not None:
    raise ValueError(
        f"{src} holds LoRA adapters: --loops and --gate_bias do not apply"
    )
  if params_io.read_config(weights).lora.per_loop:  # type: ignore[union-attr]
    raise ValueError(
        f"{src} holds per-loop LoRA adapters, which have no --to={to} form (the exported "
        "model's loops share one weight set); serve the workdir itself with "
        "scripts/generate.py or scripts/serve.py"
    )
  loader.check_base(record, src)


def _convert_lora(
    src, weights, record, dst, to, tok_dir, shard_size, dtype, overwrite
) -> None:
  """A LoRA run: its adapters as PEFT's, or the merged model (base + shared adapters)."""
  if to == "peft":
    cfg, adapters = formats.load_orbax(weights)
    peft.save_peft(
        cfg,
        adapters,
        dst,
        base=record["base"],
        dtype=dtype,
        overwrite=overwrite,
    )
    return
  base, base_fmt, _ = formats.resolve_source(record["base"])
  base_cfg, params = (
      hf_io.load_hf(base, dtype)
      if base_fmt == "hf"
      else formats.load_orbax(base, dtype)
  )
  lcfg, adapters = formats.load_orbax(weights, dtype)
  cfg = base_cfg  # merged: the plain model
  params = lora.merge(
      base_cfg.replace(lora=lcfg.lora), lora.combine(params, adapters)
  )
  _write(to, cfg, params, dst, shard_size, overwrite, tok_dir)


def _convert(
    weights: str,
    fmt: str,
    dst: str,
    to: str,
    tok_dir: str | None,
    *,
    shard_size,
    dtype: str | None,
    overwrite: bool,
    loops: int | None,
    gate_bias: float | None,
) -> None:
  """The conversion itself, once every argument was checked: each output param is checked finite
  before it is written."""
  if fmt == "orbax" and to == "hf":
    _orbax_to_hf(
        weights,
        dst,
        shard_size=shard_size,
        dtype=dtype,
        overwrite=overwrite,
        loops=loops,
        gate_bias=gate_bias,
        tokenizer_dir=tok_dir,
    )
    return
  cfg, params = (
      hf_io.load_hf(weights, dtype)
      if fmt == "hf"
      else formats.load_orbax(weights, dtype)
  )
  if loops is not None:
    cfg, params = upcycling.upcycle(cfg, params, loops, gate_bias=gate_bias)
  bad = params_io.nonfinite_paths(params)
  if bad:
    raise _nonfinite(
        bad[0],
        dtype or st.dtype_of(params_io.flat_paths(params)[bad[0]]),
        gate_bias,
    )
  _write(to, cfg, params, dst, shard_size, overwrite, tok_dir)


@contextlib.contextmanager
def _storage_errors(src: str, dst: str):
  """A full disk, read-only or unwritable destination: one StorageError line."""
  try:
    yield
  except Exception as e:
    problem = errors.storage_problem(e)
    if problem is None:
      raise
    raise errors.StorageError(
        f"writing {dst} failed ({problem}); nothing was left there and the source "
        f"{src} is unchanged"
    ) from None


def _write(to, cfg, params, dst, shard_size, overwrite, tok_dir) -> None:
  """`params` at `dst` as an HF directory (`to="hf"`) or an Orbax params directory."""
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
    formats.save_orbax(
        cfg, params, dst, overwrite=overwrite, tokenizer_dir=tok_dir
    )
