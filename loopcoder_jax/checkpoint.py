"""Orbax checkpoints, behind this one module.

A *params directory* holds `config.json` (HF keys) and `params/` (an Orbax PyTree checkpoint of the
model params). `save_params`/`load_params` read and write it; the converter and `generate.py` use
them. Training checkpoints (optimizer state, data iterator, step) build on the same layout.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from loopcoder_jax.config import PLTConfig


def is_params_dir(path: str | os.PathLike) -> bool:
  path = os.fspath(path)
  return os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "params"))


def save_params(path: str | os.PathLike, cfg: PLTConfig, params: Any) -> None:
  """Write `config.json` and `params/` under `path` (which must not hold a checkpoint yet)."""
  path = os.path.abspath(os.fspath(path))
  os.makedirs(path, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, "params"), params)
    ckptr.wait_until_finished()
  cfg.to_hf_file(os.path.join(path, "config.json"))


def load_params(path: str | os.PathLike, shardings: Any = None, **runtime_kw) -> tuple[PLTConfig, Any]:
  """Read a params directory. `shardings` (a pytree like params, or one Sharding) places the arrays."""
  path = os.path.abspath(os.fspath(path))
  if not is_params_dir(path):
    raise ValueError(f"{path} is not a params checkpoint (needs config.json and params/)")
  cfg = PLTConfig.from_hf_file(os.path.join(path, "config.json"), **runtime_kw)
  from loopcoder_jax.model import abstract_params  # local: model imports are heavy

  target = abstract_params(cfg)
  if shardings is not None:
    if isinstance(shardings, jax.sharding.Sharding):
      shardings = jax.tree.map(lambda _: shardings, target)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, shardings)
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.join(path, "params"), target)
  return cfg, params
