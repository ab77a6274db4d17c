"""Loading a checkpoint for use (generate, diagnose, notebooks, evaluation): `load`.

One call takes any checkpoint directory we write or read: a params directory (config.json + Orbax
params/), a finished training workdir (its params/ export, tokenizer in tokenizer/), one step of a
training run (WORKDIR/checkpoints/<step>) or an HF directory (config.json + safetensors).
Everything that can be checked from the config and the tokenizer (format, dtype, loop count,
vocabulary) is checked before any weight is read; weights holding NaN or Inf are refused.

Weights go straight onto their devices: one device by default, or a mesh's shardings by the logical
axis rules (`model/sharding.py`: heads, kv heads, MLP and vocab on `tensor`, the model dimension on
`fsdp`), each device receiving only its slices. HF safetensors are read block by block
(`hf_io.load_hf_sharded`: host memory about one device's block of one param, never a full copy);
an Orbax params directory is restored onto the same shardings.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
from jax.sharding import Mesh

from loopcoder_jax.checkpoints import formats, hf_io, params_io
from loopcoder_jax.checkpoints import safetensors_io as st
from loopcoder_jax.data import tokenizer as tok_lib
from loopcoder_jax.model import sharding
from loopcoder_jax.model.config import PLTConfig


def check_base(record: dict, what: str) -> str:
  """The base checkpoint a LoRA run's `record` names, checked present and unchanged (its content
  hash): ValueError naming `what` (the adapters' place) otherwise."""
  base = record["base"]
  if not os.path.isdir(base):
    raise ValueError(
        f"{what} holds LoRA adapters of the base checkpoint {base}, which is missing; "
        "put the base back at that path"
    )
  got = formats.content_hash(base)
  if got != record["base_sha256"]:
    raise ValueError(
        f"the base checkpoint {base} of the LoRA adapters in {what} is not the one they were "
        f"trained on (content sha256 {got[:12]}..., recorded {record['base_sha256'][:12]}...)"
    )
  return base


def _locate(path: str) -> tuple[str, str, tuple[str, ...]]:
  """(weights directory, 'orbax' | 'hf', directories that may hold the tokenizer) for `path`."""
  if not os.path.isdir(path):
    raise ValueError(f"checkpoint {path} is not a directory")
  return formats.resolve_source(path)


def _check_finite(path: str, params: Any) -> None:
  """A checkpoint holding NaN or Inf weights would generate nothing useful: ValueError naming it."""
  bad = params_io.nonfinite_paths(params)
  if bad:
    n = len(jax.tree.leaves(params))
    raise ValueError(
        f"checkpoint {path} holds non-finite weights ({len(bad)} of {n} arrays, "
        f"first {bad[0]}); it cannot be used"
    )


def load(
    path: str | os.PathLike,
    dtype: str | None = None,
    loops: int | None = None,
    tokenizer: str | os.PathLike | None = None,
    *,
    mesh: Mesh | None = None,
    rules=sharding.DEFAULT_RULES,
    quantize: str | None = None,
) -> tuple[PLTConfig, Any, tok_lib.Tokenizer]:
  """(cfg, params as jax arrays, tokenizer) of a checkpoint, ready for `PLTForCausalLM(cfg).apply`.

  dtype: cast the params to it and compute in it; None keeps the stored dtype (and the config's
    compute dtype).
  mesh: place the params on it, sharded by `rules` (`sharding.param_shardings`); None puts them on
    the first local device.
  loops: evaluate the shared weights with this loop count; None keeps the checkpoint's. R > 1 needs
    a checkpoint trained with R > 1 (the gate params).
  tokenizer: a tokenizer file or directory; None finds it beside the weights (or in a workdir's
    tokenizer/). Its vocabulary must fit the model's.
  quantize: "int8" makes the linear weights int8 with a float32 scale per output channel
    (`model.quant`), each float weight freed once quantized; the config's `runtime.quantize` says
    so. An HF directory is quantized param by param as it is read (device peak: the int8 model plus
    one float param); an Orbax directory is restored whole first (peak: the float model plus one
    int8 weight).
  """
  path = os.path.abspath(os.fspath(path))
  st.check_dtype(dtype)
  if quantize not in (None, "none", "int8"):
    raise ValueError(f"quantize must be 'int8' or None, got {quantize!r}")
  if loops is not None and (
      isinstance(loops, bool) or not isinstance(loops, int) or loops < 1
  ):
    raise ValueError(f"loops must be an integer >= 1, got {loops!r}")
  weights_dir, fmt, tok_dirs = _locate(path)
  cfg = params_io.read_config(weights_dir)
  if cfg.lora is not None:
    return _load_lora(
        path,
        weights_dir,
        cfg,
        dtype,
        loops,
        tokenizer,
        tok_dirs,
        mesh,
        rules,
        quantize,
    )
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

  from loopcoder_jax.model.transformer import (
      abstract_params,  # local: model imports are heavy
  )

  target = abstract_params(cfg)
  if mesh is None:
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: one, target)
  else:
    shardings = sharding.param_shardings(target, mesh, rules)
  each = None
  if quantize == "int8":
    from loopcoder_jax.model import quant  # local: model imports are heavy

    q_sh = None if mesh is None else quant.int8_shardings(cfg, mesh, rules)
    each = functools.partial(
        quant.quantize_weight, cfg, shardings=q_sh, consume=True
    )

  if fmt == "orbax":
    cfg, params = formats.load_orbax(weights_dir, dtype, shardings)
    if each is not None:  # restored whole: quantized one weight at a time
      cfg, params = quant.quantize_params(
          cfg, params, mesh, rules, consume=True
      )
  else:
    cfg, params = hf_io.load_hf_sharded(weights_dir, shardings, dtype, each)
  if each is not None:
    cfg = cfg.with_runtime(quantize="int8")
  _check_finite(path, params)
  if dtype is not None:
    cfg = cfg.with_runtime(dtype=dtype, param_dtype=dtype)
  if loops is not None:
    cfg = cfg.replace(plt_num_loops=loops)
  return cfg, params, tok


def _load_lora(
    path,
    weights_dir,
    cfg,
    dtype,
    loops,
    tokenizer,
    tok_dirs,
    mesh,
    rules,
    quantize,
):
  """A LoRA run's export or step: its base (checked unchanged) plus its adapters. Shared adapters
  come back merged into the base kernels (a plain model); per-loop ones, and any adapters on an
  int8 base (`quantize`, or the run's `lora.base_dtype=int8`: the base they were trained under),
  are applied by the model (`cfg.lora` set, the adapter leaves in the params).
  """
  from loopcoder_jax.model import lora  # local: model imports are heavy

  lc = cfg.lora
  record = params_io.lora_record(weights_dir)
  assert record is not None and lc is not None
  base = check_base(record, path)
  if quantize is None and record.get("base_quantize", "none") != "none":
    quantize = record["base_quantize"]
  if lc.per_loop and loops not in (None, cfg.plt_num_loops):
    raise ValueError(
        f"loops={loops}: {path} holds per-loop LoRA adapters for "
        f"{cfg.plt_num_loops} loops"
    )
  if tokenizer is None:
    # the run's own (with its chat template), else the base's
    tokenizer = next(
        (
            d
            for d in tok_dirs
            if any(
                os.path.isfile(os.path.join(d, f))
                for f in (tok_lib.TOKENIZER_JSON, tok_lib.TOKENIZER_MODEL)
            )
        ),
        None,
    )
  base_cfg, params, tok = load(
      base, dtype, loops, tokenizer, mesh=mesh, rules=rules, quantize=quantize
  )
  lcfg = base_cfg.replace(lora=lc)
  target = params_io.stored_target(lcfg)
  if mesh is None:
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: one, target)
  else:
    shardings = sharding.param_shardings(target, mesh, rules)
  _, adapters = formats.load_orbax(weights_dir, dtype, shardings)
  _check_finite(path, adapters)
  params = lora.combine(params, adapters)
  if lc.per_loop or base_cfg.runtime.quantize != "none":
    return lcfg, params, tok
  return base_cfg, lora.merge(lcfg, params), tok
