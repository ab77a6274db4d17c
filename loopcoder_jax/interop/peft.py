"""A LoRA run's adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

PEFT (and vLLM's LoRA serving) apply `W x + (lora_alpha / r) * B A x` to the modules named in
`target_modules`, with tensors `base_model.model.<module>.lora_A.weight` `[r, in]` and
`...lora_B.weight` `[out, r]`. The module names are those of the HF export of the base
(`checkpoints/hf_names.py`: `model.layers.<i>.self_attn.q_proj`, ...), and the in/out axes are
flattened as the export flattens the kernels (heads major), so the pair is the HF base's weight
update `B @ A = scale^-1 * (A_ours @ B_ours)^T`. Per-loop adapters have no such form (the export's
loops share one weight set): refused.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from loopcoder_jax.checkpoints import hf_names, staging
from loopcoder_jax.checkpoints import safetensors_io as st
from loopcoder_jax.model import lora
from loopcoder_jax.model.config import PLTConfig

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def module_name(target: str) -> str:
  """The HF module (with `{i}` for the layer) a LoRA target adapts, from the name table."""
  scope, name, _ = lora.TARGETS[target]
  path = f"layers/{scope}/{name}/kernel"
  rule = next(r for r in hf_names.TABLE if r.path == path)
  return rule.hf.removesuffix(".weight")


def adapter_tensors(cfg: PLTConfig, adapters: Any) -> dict[str, np.ndarray]:
  """PEFT's key -> tensor for every adapted module of every layer (the adapters' dtype)."""
  lc = cfg.lora
  if lc is None:
    raise ValueError("no LoRA config: nothing to export in PEFT's format")
  if lc.per_loop:
    raise ValueError(
        "per-loop LoRA adapters have no PEFT form (the exported model's loops share one "
        "weight set); serve the workdir with scripts/generate.py or scripts/serve.py"
    )
  out = {}
  for target in lc.targets:
    scope, name, _ = lora.TARGETS[target]
    ab = adapters["layers"][scope][name + lora.SUFFIX]
    a, b = np.asarray(ab["a"]), np.asarray(
        ab["b"]
    )  # [L, 1, in, r], [L, 1, r, out]
    for i in range(cfg.num_hidden_layers):
      key = "base_model.model." + module_name(target).format(i=i)
      out[key + ".lora_A.weight"] = np.ascontiguousarray(a[i, 0].T)
      out[key + ".lora_B.weight"] = np.ascontiguousarray(b[i, 0].T)
  return out


def save_peft(
    cfg: PLTConfig,
    adapters: Any,
    path: str | os.PathLike,
    *,
    base: str = "",
    dtype: str | None = None,
    overwrite: bool = False,
) -> None:
  """Write `adapters` (a LoRA model's, `lora.split`) as a PEFT adapter directory; `base`: the
  `base_model_name_or_path` it names (the base's HF export or hub id)."""
  st.check_dtype(dtype)
  tensors = adapter_tensors(cfg, adapters)
  lc = cfg.lora
  assert lc is not None
  config = {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base,
      "r": lc.rank,
      "lora_alpha": lc.alpha,
      "lora_dropout": lc.dropout,
      "target_modules": sorted(lora.TARGETS[t][1] for t in lc.targets),
      "bias": "none",
      "fan_in_fan_out": False,
      "use_rslora": False,
      "use_dora": False,
      "inference_mode": True,
      "init_lora_weights": True,
      "modules_to_save": None,
      "layers_to_transform": None,
  }

  def entry(key: str, x: np.ndarray) -> st.Entry:
    out = dtype or st.dtype_of(x)
    return st.Entry(key, x.shape, out, lambda: x.astype(st.DTYPES[out]))

  entries = [entry(k, x) for k, x in tensors.items()]
  with staging.staged_dir(os.fspath(path), overwrite) as tmp:
    st.write_safetensors(os.path.join(tmp, WEIGHTS_FILE), entries)
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)
      f.write("\n")
