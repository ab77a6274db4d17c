"""Device mesh and logical-axis sharding of params, optimizer state and batches.

Mesh axes are ("data", "fsdp", "tensor") with Auto axis types: the model names its activation axes
(`nn.with_logical_constraint`), params get their names from ONE table below (`PARAM_AXES`), and
`rules` map logical names to mesh axes (MaxText style). A dimension that the mapped mesh axes do not
divide stays unsharded (e.g. a 4-head gate on an 8-way tensor axis), so every config runs on every
mesh; `param_shardings` reports nothing for that, it is the usual fallback.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import contextlib
import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from loopcoder_jax import hardware

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis / axes / None. Batch over data and fsdp; weights FSDP-sharded on their
# model dimension and Megatron-style tensor-sharded on heads / MLP width / vocab.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),  # the stacked layer axis is scanned over: never shard it
    ("norm", None),
    ("gate_in", None),  # the PLT gate is tiny: replicated
    ("gate_out", None),
)

# Param path (regex over "/"-joined keys) -> logical axes, one entry per dimension.
# Layouts are those of model.py's docstring.
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"embed_tokens/embedding", ("vocab", "embed")),
    (r"lm_head/kernel", ("embed", "vocab")),
    (r"norm/scale", ("norm",)),
    (r"layers/(input|post_attention)_layernorm/scale", ("layers", "norm")),
    (
        r"layers/self_attn/q_proj/kernel",
        ("layers", "embed", "heads", "head_dim"),
    ),
    (
        r"layers/self_attn/[kv]_proj/kernel",
        ("layers", "embed", "kv_heads", "head_dim"),
    ),
    (
        r"layers/self_attn/o_proj/kernel",
        ("layers", "heads", "head_dim", "embed"),
    ),
    # [L,d,H] or [L,H,D]
    (
        r"layers/self_attn/plt_gate/kernel",
        ("layers", "gate_in", "gate_out"),
    ),
    (r"layers/self_attn/plt_gate/bias", ("layers", "gate_out")),
    (r"layers/self_attn/plt_gate/gate_norm/scale", ("layers", "norm")),
    (r"layers/mlp/(gate|up)_proj/kernel", ("layers", "embed", "mlp")),
    (r"layers/mlp/down_proj/kernel", ("layers", "mlp", "embed")),
    # int8 weights (model/quant.py): the kernel keeps its axes, the scale those of its outputs
    (r"lm_head/scale", ("vocab",)),
    (r"layers/self_attn/q_proj/scale", ("layers", "heads", "head_dim")),
    (r"layers/self_attn/[kv]_proj/scale", ("layers", "kv_heads", "head_dim")),
    (r"layers/(self_attn/o|mlp/down)_proj/scale", ("layers", "embed")),
    (r"layers/mlp/(gate|up)_proj/scale", ("layers", "mlp")),
    # LoRA adapters [L, n, in, r] / [L, n, r, out]: megabytes, replicated
    (r"layers/(self_attn|mlp)/\w+_lora/[ab]", ("layers", None, None, None)),
)

BATCH_AXES = ("activation_batch", "activation_length")


# ------------------------------------------------------------------------------------- mesh
def mesh_shape(
    mesh_cfg: Mapping[str, int], num_devices: int
) -> tuple[int, ...]:
  """Resolve one -1 entry to "the rest"; ValueError when the mesh does not divide the devices."""
  sizes = [int(mesh_cfg.get(a, 1)) for a in MESH_AXES]
  unknown = set(dict(mesh_cfg)) - set(MESH_AXES)
  if unknown:
    raise ValueError(
        f"mesh: unknown axes {sorted(unknown)}; expected {MESH_AXES}"
    )
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(
        f"mesh: sizes must be positive with at most one -1, got {dict(zip(MESH_AXES, sizes))}"
    )
  known = math.prod(s for s in sizes if s != -1)
  if num_devices % known:
    raise ValueError(
        f"mesh {dict(zip(MESH_AXES, sizes))} does not divide the {num_devices} devices"
    )
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f"mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices, "
        f"but there are {num_devices}"
    )
  return tuple(sizes)


def make_mesh(
    mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None
) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  # Auto axes: sharding propagates from in/out shardings and logical constraints.
  return jax.make_mesh(
      shape,
      MESH_AXES,
      axis_types=(AxisType.Auto,) * len(MESH_AXES),
      devices=devices,
  )


# Chip generations whose slice names count TensorCores, two per chip (one JAX
# device per chip): v4-8 and v5p-8 are 4 chips. v2 and v3 cores are JAX devices
# (v2-8: 8 devices), v5e and v6e names count chips: the count is the devices.
_CORES_PER_DEVICE = {"v4": 2, "v5p": 2}


@dataclasses.dataclass(frozen=True)
class Backend:
  """What this program runs on: `name` reads "TPU v5e-8", "TPU v2-8", "CPU".

  train_mesh: data parallel over every device (small models, and the notebook
    default). serve_mesh: the model's heads, MLP and vocabulary split over
    every device (`tensor`), so each device holds 1/n of a large checkpoint.
  """

  platform: str  # "tpu" | "gpu" | "cpu"
  device_kind: str
  num_devices: int
  chip: str | None  # hardware.PEAKS' key ("v2", "v5e", ...), None if unknown

  @property
  def name(self) -> str:
    if self.platform == "tpu":
      kind = self.chip or self.device_kind.lower().removeprefix("tpu ")
      kind = kind.replace(" ", "")
      return f"TPU {kind}-{_CORES_PER_DEVICE.get(kind, 1) * self.num_devices}"
    if self.platform == "cpu":
      return (
          "CPU"
          if self.num_devices == 1
          else f"CPU ({self.num_devices} devices)"
      )
    return f"{self.platform.upper()} {self.device_kind} x{self.num_devices}"

  def train_mesh(self) -> dict[str, int]:
    return {"data": -1, "fsdp": 1, "tensor": 1}

  def serve_mesh(self) -> dict[str, int]:
    return {"data": 1, "fsdp": 1, "tensor": self.num_devices}


def describe_backend(devices: Sequence[Any] | None = None) -> Backend:
  """The backend of `devices` (default: all of `jax.devices()`), from the first
  device's platform and kind and their number."""
  devices = list(jax.devices() if devices is None else devices)
  first = devices[0]
  return Backend(
      platform=first.platform,
      device_kind=first.device_kind,
      num_devices=len(devices),
      chip=hardware.chip_name(first.device_kind),
  )


@contextlib.contextmanager
def logical_context(mesh: Mesh, rules):
  """Trace-time context for the model's `nn.with_logical_constraint` (usable inside jit)."""
  with (
      jax.sharding.use_abstract_mesh(mesh.abstract_mesh),
      nn.logical_axis_rules(rules),
  ):
    yield


# ------------------------------------------------------------------------------------- params
def _path_str(path) -> str:
  return "/".join(
      str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
      for k in path
  )


def logical_axes_for(path: str, ndim: int) -> tuple[str | None, ...]:
  for pattern, axes in PARAM_AXES:
    if re.fullmatch(pattern, path):
      if len(axes) != ndim:
        raise ValueError(
            f"param {path}: {ndim} dims but the sharding table names {len(axes)}: {axes}"
        )
      return axes
  raise ValueError(f"param {path} has no entry in sharding.PARAM_AXES")


def param_logical_axes(params: Any) -> Any:
  """A tree like `params` holding a tuple of logical axis names per leaf."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: logical_axes_for(_path_str(p), np.ndim(x)), params
  )


def logical_to_spec(
    axes: Iterable[str | None], shape: Sequence[int], mesh: Mesh, rules
) -> P:
  """Map logical axes to a PartitionSpec; drop mesh axes that are used twice or do not divide."""
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name, dim in zip(axes, shape):
    mapped = table.get(name) if name is not None else None
    if name is not None and name not in table:
      raise ValueError(f"logical axis {name!r} has no sharding rule")
    mesh_axes = (
        ()
        if mapped is None
        else ((mapped,) if isinstance(mapped, str) else tuple(mapped))
    )
    keep: list[str] = []
    for a in mesh_axes:
      size = mesh.shape[a]
      if a in used or dim % (size * math.prod(mesh.shape[k] for k in keep)):
        continue
      keep.append(a)
    used.update(keep)
    out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
  return P(*out)


def param_shardings(
    params_or_abstract: Any, mesh: Mesh, rules=DEFAULT_RULES
) -> Any:
  """NamedShardings for params (arrays or ShapeDtypeStructs) following `PARAM_AXES` and `rules`."""
  axes = param_logical_axes(params_or_abstract)
  return jax.tree.map(
      lambda x, a: NamedSharding(
          mesh, logical_to_spec(a, np.shape(x), mesh, rules)
      ),
      params_or_abstract,
      axes,
  )


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
  """Sharding of `[global_batch, seq_len]` batch arrays (global_batch a multiple of `batch_shards`)."""
  return NamedSharding(
      mesh,
      logical_to_spec(
          BATCH_AXES, (batch_shards(mesh, rules), mesh.size), mesh, rules
      ),
  )


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_shards(mesh: Mesh, rules=DEFAULT_RULES) -> int:
  """How many ways the batch dimension is split (the global batch must be a multiple)."""
  mapped = dict(rules).get("activation_batch")
  axes = (
      ()
      if mapped is None
      else ((mapped,) if isinstance(mapped, str) else tuple(mapped))
  )
  return math.prod(mesh.shape[a] for a in axes)
