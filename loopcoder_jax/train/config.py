"""Training config (ml_collections) -> typed pieces, and up-front validation.

A config file in `configs/` returns a ConfigDict built on `base_config()`. The model is a preset
name (or a path to an HF `config.json` / params directory) plus field overrides and runtime options:

  config.model.preset = "tiny"            # tiny | loopcoder_v2_7b | PATH
  config.model.loops = 3                  # plt_num_loops; unset: the preset's or file's
  config.model.overrides = {...}          # PLTConfig fields (HF keys)
  config.model.runtime.update(...)        # RuntimeConfig fields (dtype, remat_policy, ...)

The loop count R has one rule: the preset's (or the config.json's) stands unless it is set, in
`model.loops` or `model.overrides.plt_num_loops`, not both.

`validate(config, ...)` is the one check of a training config: the trainer calls it for the devices
it runs on, AOT compilation for a compile-only topology. It raises a one-line ValueError for every
bad value it can see before any data is read or anything is compiled.

Fine-tuning starts from a checkpoint instead (`config.init.checkpoint`): the model config is the
checkpoint's (`model.preset = ""`; a preset, overrides or loop count that disagree with it are an
error), only `model.runtime` applies. `lora.enabled` trains low-rank adapters on that checkpoint
(the base, frozen) instead of its weights: `config.lora` becomes the model config's `LoraConfig`.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections
from ml_collections import config_dict

from loopcoder_jax.data.pipeline import default_data_config
from loopcoder_jax.model import sharding
from loopcoder_jax.model.config import (
    LORA_TARGETS,
    LoraConfig,
    PLTConfig,
    RuntimeConfig,
)
from loopcoder_jax.train import optim

PRESETS = ("tiny", "loopcoder_v2_7b")
DATA_FORMATS = ("text", "chat")
# Fields that may differ between an explicit model and the checkpoint it starts from.
# lora.base_dtype: the frozen base as loaded, or its linear weights in int8 (model/quant.py)
LORA_BASE_DTYPES = ("float", "int8")
_NOT_ARCHITECTURE = ("runtime", "extra_hf", "torch_dtype", "lora")


def base_config() -> ml_collections.ConfigDict:
  """Every key a training config may set, with defaults."""
  c = ml_collections.ConfigDict()
  c.name = "run"
  c.seed = 0  # param init
  # runtime holds every RuntimeConfig field, so any of them can be overridden from the command line.
  c.model = ml_collections.ConfigDict(
      dict(
          preset="tiny",
          loops=config_dict.placeholder(int),  # None: the preset's
          overrides={},
          runtime=dataclasses.asdict(RuntimeConfig()),
      )
  )
  # path: a tokenizer.json / tokenizer.model / directory; "" = train a byte-level BPE of `vocab_size`
  # on the training source on first use and cache it in WORKDIR/tokenizer.
  c.tokenizer = ml_collections.ConfigDict(dict(path="", vocab_size=1024))
  c.data = default_data_config()
  # checkpoint: start from these weights with a fresh optimizer (an HF directory, a params
  # directory or a finished training workdir; its tokenizer too). A checkpoint of the run's own
  # workdir (a resumed run) wins over it.
  # allow_different_tokenizer: fine-tune with a tokenizer.path whose vocabulary differs from the
  # init checkpoint's (its embeddings then index other tokens): refused unless set
  c.init = ml_collections.ConfigDict(
      dict(checkpoint="", allow_different_tokenizer=False)
  )
  # data_shards: how many data shards the global batch is read from (0 = one per process). A run
  # with the same data_shards sees the same batches whatever the number of processes.
  c.train = ml_collections.ConfigDict(
      dict(
          global_batch_size=8,
          total_steps=100,
          grad_accum=1,
          log_every=10,
          data_shards=0,
      )
  )
  # LoRA (model/lora.py): train adapters on the projections of init.checkpoint, frozen. targets: a
  # comma-separated subset of q,k,v,o,gate,up,down; per_loop: one adapter per loop (R >= 2).
  # base_dtype: "float" (the base as loaded) or "int8" (its linear weights int8 with a float scale
  # per output channel, model/quant.py: about half the memory; the model's runtime.quantize).
  c.lora = ml_collections.ConfigDict(
      dict(
          enabled=False,
          rank=8,
          alpha=16.0,
          dropout=0.0,
          targets=",".join(LORA_TARGETS),
          per_loop=False,
          base_dtype="float",
      )
  )
  c.optim = optim.default_optim_config()
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.rules = sharding.DEFAULT_RULES
  c.checkpoint = ml_collections.ConfigDict(
      dict(every_steps=100, keep=3, async_save=True)
  )
  # Held-out evaluation (bits per byte) at the start and end of the run, then a greedy completion.
  c.eval = ml_collections.ConfigDict(
      dict(
          max_tokens=16384,
          batch_size=8,
          prompt="def fibonacci(n):\n",
          completion_tokens=48,
      )
  )
  # peak_flops: the per-device peak for MFU; 0 = the chip's table value, or a measured fp32 matmul
  # peak on CPU; < 0 = no MFU.
  c.metrics = ml_collections.ConfigDict(
      dict(peak_flops=0.0, tensorboard=True, progress_bar=True)
  )
  # enabled: call jax.distributed.initialize (arguments empty = auto-detect on TPU pods / SLURM).
  c.distributed = ml_collections.ConfigDict(
      dict(
          enabled=False,
          coordinator_address="",
          num_processes=0,
          process_id=-1,
          cpu_collectives="gloo",
      )
  )
  return c


def load_config(spec: str) -> ml_collections.ConfigDict:
  """A config file as `--config` takes it, from Python (notebooks): "configs/x.py" or "configs/x.py:arg"."""
  import importlib.util

  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ValueError(f"config file not found: {path}")
  module_spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(path))[0], path
  )
  if module_spec is None or module_spec.loader is None:
    raise ValueError(
        f"config file {path} cannot be imported as a Python module"
    )
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _plain(x):
  return x.to_dict() if hasattr(x, "to_dict") else dict(x or {})


def init_model_config(path: str, **runtime_kw) -> PLTConfig:
  """The model config of a checkpoint to start from (reads its config.json only)."""
  if not os.path.isdir(path):
    raise ValueError(f"init.checkpoint {path} is not a directory")
  for d in (path, os.path.join(path, "params")):
    if os.path.isfile(os.path.join(d, "config.json")):
      return PLTConfig.from_hf_file(
          os.path.join(d, "config.json"), **runtime_kw
      )
  raise ValueError(
      f"init.checkpoint {path} holds no config.json (expected an HF directory, a params "
      "directory or a finished training workdir)"
  )


def lora_config(config: ml_collections.ConfigDict) -> LoraConfig | None:
  """`config.lora` as a LoraConfig (None unless enabled); ValueError on a bad value."""
  c = config.get("lora")
  if c is None or not c.enabled:
    return None
  fields = {f.name for f in dataclasses.fields(LoraConfig)}
  bad = set(c) - fields - {"enabled", "base_dtype"}
  if bad:
    raise ValueError(f"lora: unknown fields {sorted(bad)}")
  if c.get("base_dtype", "float") not in LORA_BASE_DTYPES:
    raise ValueError(
        f"lora.base_dtype {c.base_dtype!r}: expected one of {list(LORA_BASE_DTYPES)}"
    )
  init = config.init.checkpoint
  if not init:
    raise ValueError(
        "lora.enabled needs init.checkpoint: the base model the adapters adapt"
    )
  if not os.path.isdir(init):
    raise ValueError(
        f"lora: the base checkpoint {init} (init.checkpoint) is missing"
    )
  return LoraConfig(**{k: c[k] for k in fields if k in c})


def model_config_from(config: ml_collections.ConfigDict) -> PLTConfig:
  """The PLTConfig named by `config.model` (preset + overrides + runtime), or by
  `config.init.checkpoint` when set (then an explicit model must agree with it); with `lora` when
  `config.lora.enabled`.
  """
  lc = lora_config(config)
  cfg = _model_config(config)
  if lc is None:
    return cfg
  init = config.init.checkpoint
  if any(
      os.path.isfile(os.path.join(d, "lora.json"))
      for d in (init, os.path.join(init, "params"))
  ):
    raise ValueError(
        f"init.checkpoint {init} holds LoRA adapters, not a base model; start from their "
        "base, or from a merged export (scripts/convert_checkpoint.py --to=hf)"
    )
  if config.lora.get("base_dtype", "float") == "int8":
    cfg = cfg.with_runtime(quantize="int8")
  return cfg.replace(lora=lc)


def _model_config(config: ml_collections.ConfigDict) -> PLTConfig:
  init, m = config.init.checkpoint, config.model
  if not init:
    return _preset_config(m)
  cfg = init_model_config(init, **_runtime_kw(m))
  if m.preset:
    want = _preset_config(m)
    diff = [
        f"{f.name} {getattr(want, f.name)!r} vs {getattr(cfg, f.name)!r}"
        for f in dataclasses.fields(PLTConfig)
        if f.name not in _NOT_ARCHITECTURE
        and getattr(want, f.name) != getattr(cfg, f.name)
    ]
    if diff:
      raise ValueError(
          f"model.preset {m.preset!r} disagrees with init.checkpoint {init}: "
          f"{'; '.join(diff)}; set model.preset='' to fine-tune the checkpoint's model"
      )
  elif _plain(m.get("overrides", {})):
    raise ValueError(
        "model.overrides need a model.preset; with init.checkpoint and no preset the "
        "model is the checkpoint's"
    )
  elif m.get("loops", None) not in (None, cfg.plt_num_loops):
    raise ValueError(
        f"model.loops {m.loops} disagrees with init.checkpoint {init} "
        f"(plt_num_loops {cfg.plt_num_loops})"
    )
  return cfg


def _runtime_kw(m: ml_collections.ConfigDict) -> dict:
  runtime = _plain(m.get("runtime", {}))
  bad = set(runtime) - {f.name for f in dataclasses.fields(RuntimeConfig)}
  if bad:
    raise ValueError(
        f"model.runtime: unknown RuntimeConfig fields {sorted(bad)}"
    )
  if runtime.get("quantize", "none") != "none":
    raise ValueError(
        f"model.runtime.quantize={runtime['quantize']!r}: int8 weights are frozen (no "
        f"gradient reaches them); train LoRA adapters on an int8 base with "
        f"lora.base_dtype='int8'"
    )
  return runtime


def _preset_config(m: ml_collections.ConfigDict) -> PLTConfig:
  overrides = _plain(m.get("overrides", {}))
  runtime = _runtime_kw(m)
  fields = {f.name for f in dataclasses.fields(PLTConfig)} - {
      "runtime",
      "extra_hf",
  }
  bad = set(overrides) - fields
  if bad:
    raise ValueError(f"model.overrides: unknown PLTConfig fields {sorted(bad)}")
  if "plt_window_size" in overrides:
    overrides["plt_window_size"] = tuple(overrides["plt_window_size"])
  loops = m.get("loops", None)
  if loops is not None:
    if isinstance(loops, bool) or not isinstance(loops, int) or loops < 1:
      raise ValueError(
          f"model.loops must be an integer >= 1 (or unset: the preset's), got {loops!r}"
      )
    if "plt_num_loops" in overrides:
      raise ValueError(
          f"the loop count is set twice: model.loops={loops} and "
          f"model.overrides.plt_num_loops={overrides['plt_num_loops']!r}; set one"
      )
    overrides["plt_num_loops"] = loops
  preset = m.preset
  if preset == "tiny":
    return PLTConfig.tiny(**overrides, **runtime)
  if preset == "loopcoder_v2_7b":
    return PLTConfig.loopcoder_v2_7b(**runtime).replace(**overrides)
  if isinstance(preset, str) and os.path.exists(preset):
    return PLTConfig.from_hf_file(preset, **runtime).replace(**overrides)
  if not preset:
    raise ValueError(
        "model.preset is empty: name a preset or set init.checkpoint to start from"
    )
  raise ValueError(
      f"model.preset {preset!r} is neither one of {PRESETS} nor an existing config.json path"
  )


def validate(
    config: ml_collections.ConfigDict,
    num_devices: int | None = None,
    process_count: int | None = None,
    num_slices: int = 1,
) -> PLTConfig:
  """One-line ValueError for the first bad value; returns the model config.

  The run's devices default to this process's JAX backend; a compile-only topology gives its own
  `num_devices` (all slices together), `process_count` (its hosts) and `num_slices` (joined over
  DCN, the data axis spanning them, as `aot.make_mesh` lays them out).
  """
  cfg = model_config_from(config)
  _check_steps(config, cfg)
  _check_batches(config, num_devices, process_count, num_slices)
  _check_data(config, cfg)
  return cfg


def _check_steps(config, cfg: PLTConfig) -> None:
  """Step counts, sequence length, optimizer, checkpoint policy."""
  t, d = config.train, config.data
  for key in ("global_batch_size", "total_steps", "grad_accum", "log_every"):
    if not isinstance(t[key], int) or t[key] < 1:
      raise ValueError(
          f"train.{key} must be a positive integer, got {t[key]!r}"
      )
  if d.seq_len > cfg.max_position_embeddings:
    raise ValueError(
        f"data.seq_len {d.seq_len} exceeds the model's max_position_embeddings "
        f"{cfg.max_position_embeddings}"
    )
  if d.seq_len < 2:
    raise ValueError(f"data.seq_len must be >= 2, got {d.seq_len}")
  optim.validate_optim_config(config.optim)
  ck = config.checkpoint
  if ck.every_steps < 1 or ck.keep < 1:
    raise ValueError(
        f"checkpoint.every_steps ({ck.every_steps}) and checkpoint.keep ({ck.keep}) must be >= 1"
    )


def _check_batches(config, num_devices, process_count, num_slices) -> None:
  """The batches split over the mesh's batch shards, the processes and the data shards."""
  import jax  # local: keeps config loading free of backend initialisation

  t = config.train
  num_devices = jax.device_count() if num_devices is None else num_devices
  process_count = (
      jax.process_count() if process_count is None else process_count
  )
  if num_slices < 1 or num_devices % num_slices:
    raise ValueError(
        f"{num_devices} devices do not split into {num_slices} equal slices"
    )
  shape = dict(
      zip(
          sharding.MESH_AXES,
          sharding.mesh_shape(_plain(config.mesh), num_devices // num_slices),
      )
  )
  shape["data"] *= num_slices
  rules = dict(config.rules)
  batch_axes = rules.get("activation_batch") or ()
  batch_axes = (
      (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
  )
  shards = 1
  for a in batch_axes:
    shards *= shape[a]
  gb, acc = t.global_batch_size, t.grad_accum
  if gb % (shards * acc):
    raise ValueError(
        f"train.global_batch_size {gb} must be a multiple of grad_accum ({acc}) x the "
        f"{shards} batch shards of mesh {shape}"
    )
  data_shards = t.data_shards or process_count
  if data_shards % process_count or gb % data_shards:
    raise ValueError(
        f"train.data_shards {data_shards} must be a multiple of the {process_count} processes "
        f"and divide train.global_batch_size {gb}"
    )
  e = config.eval
  if e.batch_size < 1 or e.batch_size % shards or e.batch_size % process_count:
    raise ValueError(
        f"eval.batch_size {e.batch_size} must be a positive multiple of the {shards} batch "
        f"shards and {process_count} processes"
    )


def _check_data(config, cfg: PLTConfig) -> None:
  """Held-out and sample sizes, the tokenizer, the data format (chat: its settings)."""
  d, e = config.data, config.eval
  if e.max_tokens < 0 or e.completion_tokens < 0:
    raise ValueError("eval.max_tokens and eval.completion_tokens must be >= 0")
  if config.tokenizer.path and not os.path.exists(config.tokenizer.path):
    raise ValueError(f"tokenizer.path {config.tokenizer.path} does not exist")
  init = config.init.checkpoint
  if d.format not in DATA_FORMATS:
    raise ValueError(
        f"data.format must be one of {DATA_FORMATS}, got {d.format!r}"
    )
  if d.format == "chat":
    if not str(d.source).strip():
      raise ValueError(
          "data.source is empty: name the chat data (jsonl files or globs)"
      )
    if d.on_bad_example not in ("error", "skip"):
      raise ValueError(
          f"data.on_bad_example must be 'error' or 'skip', got {d.on_bad_example!r}"
      )
    if d.pack_bins < 1:
      raise ValueError(f"data.pack_bins must be >= 1, got {d.pack_bins}")
    if not (init or config.tokenizer.path):
      raise ValueError(
          "data.format=chat needs a tokenizer: set init.checkpoint (its tokenizer) or "
          "tokenizer.path"
      )
  if (
      not (init or config.tokenizer.path)
      and config.tokenizer.vocab_size > cfg.vocab_size
  ):
    raise ValueError(
        f"tokenizer.vocab_size {config.tokenizer.vocab_size} is larger than the model's "
        f"vocab_size {cfg.vocab_size}"
    )
