"""Loading a checkpoint for use (generate, diagnose, notebooks, evaluation): `load`.

One call takes any checkpoint directory we write or read: a params directory (config.json + Orbax
params/), a finished training workdir (its params/ export, tokenizer in tokenizer/) or an HF
directory (config.json + safetensors). Everything that can be checked from the config and the
tokenizer (format, dtype, loop count, vocabulary) is checked before any weight is read.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp

from loopcoder_jax.data import tokenizer as tok_lib
from loopcoder_jax.interop import convert
from loopcoder_jax.interop import safetensors_io as st
from loopcoder_jax.model.config import PLTConfig
from loopcoder_jax.train import checkpoint


def _locate(path: str) -> tuple[str, str, tuple[str, ...]]:
  """(weights directory, 'orbax' | 'hf', directories that may hold the tokenizer) for `path`."""
  if not os.path.isdir(path):
    raise ValueError(f"checkpoint {path} is not a directory")
  if checkpoint.is_params_dir(path):
    return path, "orbax", (path,)
  export = os.path.join(path, "params")
  if checkpoint.is_params_dir(export):
    return export, "orbax", (export, os.path.join(path, "tokenizer"))
  if os.path.isdir(os.path.join(path, "checkpoints")):
    raise ValueError(
        f"{path} is a training workdir without a final params/ export (training has not "
        "finished); convert a step first or wait for the run to end"
    )
  if os.path.isfile(os.path.join(path, "config.json")):
    return path, "hf", (path,)
  raise ValueError(
      f"{path} is not a checkpoint: expected a params directory (config.json + params/), a "
      "finished training workdir (with a params/ export) or an HF directory (config.json + "
      "safetensors)"
  )


def load(
    path: str | os.PathLike,
    dtype: str | None = None,
    loops: int | None = None,
    tokenizer: str | os.PathLike | None = None,
) -> tuple[PLTConfig, Any, tok_lib.Tokenizer]:
  """(cfg, params as jax arrays, tokenizer) of a checkpoint, ready for `PLTForCausalLM(cfg).apply`.

  dtype: cast the params to it and compute in it; None keeps the stored dtype (and the config's
    compute dtype).
  loops: evaluate the shared weights with this loop count; None keeps the checkpoint's. R > 1 needs
    a checkpoint trained with R > 1 (the gate params).
  tokenizer: a tokenizer file or directory; None finds it beside the weights (or in a workdir's
    tokenizer/). Its vocabulary must fit the model's.
  """
  path = os.path.abspath(os.fspath(path))
  st.check_dtype(dtype)
  if loops is not None and (
      isinstance(loops, bool) or not isinstance(loops, int) or loops < 1
  ):
    raise ValueError(f"loops must be an integer >= 1, got {loops!r}")
  weights_dir, fmt, tok_dirs = _locate(path)
  cfg = PLTConfig.from_hf_file(os.path.join(weights_dir, "config.json"))
  if loops is not None and loops > 1 and cfg.plt_num_loops == 1:
    raise ValueError(
        f"loops={loops}: the checkpoint has no PLT gate (trained with 1 loop); upcycle it "
        f"first (scripts/convert_checkpoint.py --loops={loops})"
    )
  tok = (
      tok_lib.load_tokenizer(os.fspath(tokenizer))
      if tokenizer is not None
      else tok_lib.find_tokenizer(*tok_dirs)
  )
  tok_lib.check_vocab(tok, cfg.vocab_size)

  if fmt == "orbax":
    cfg, params = convert.load_orbax(weights_dir, dtype)
  else:
    cfg, params = convert.load_hf(weights_dir, dtype)
    params = jax.tree.map(jnp.asarray, params)
  if dtype is not None:
    cfg = cfg.with_runtime(dtype=dtype, param_dtype=dtype)
  if loops is not None:
    cfg = cfg.replace(plt_num_loops=loops)
  return cfg, params, tok
