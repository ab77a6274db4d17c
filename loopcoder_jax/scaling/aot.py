"""Ahead-of-time compilation for TPU slices on any host: does a step fit, and what does it cost.

`jax.experimental.topologies.get_topology_desc("v5p:4x4x4", "tpu")` gives compile-only TPU devices
(libtpu from the `[tpu]` extra, no TPU needed); a step jitted with shardings over a mesh of those
devices is lowered with abstract arguments and compiled by the real TPU compiler. The compiler
refuses a program that does not fit the chip's HBM: that is reported (`fits=False`, one line), not
raised. Reported per device: memory from `compiled.memory_analysis()` against the chip's HBM, and
useful FLOPs per step from `model/flops.py` (XLA's cost analysis does not multiply scan bodies).
Chips: v5e, v5p, v6e and v2 (`v2:2x2` is a v2-8: 4 chips of two TensorCores, 8 devices of 8 GiB).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import math
import os
import re
import time
from typing import Any

# Other JAX processes on a shared host hold libtpu's lock file; compile-only use is safe alongside.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding  # noqa: E402
import numpy as np  # noqa: E402

from loopcoder_jax import hardware  # noqa: E402
from loopcoder_jax.model import (
    flops,  # noqa: E402
    sharding,  # noqa: E402
)
from loopcoder_jax.model.config import PLTConfig  # noqa: E402
import pallas_kernels  # noqa: E402

_TOPOLOGY = re.compile(r"^(v2|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")
_OOM = re.compile(
    r"RESOURCE_EXHAUSTED|[Rr]an out of memory|exceeds? .*memory|Out of memory|HBM",
    re.S,
)


def parse_topology(topology: str) -> tuple[str, tuple[int, ...]]:
  """`"v5p:4x4x4"` -> ("v5p", (4, 4, 4)); ValueError naming the accepted form otherwise."""
  m = _TOPOLOGY.match(topology or "")
  if not m:
    raise ValueError(
        f"topology {topology!r} is not of the form CHIP:AxB[xC] with CHIP one of v2, v5e, v5p, "
        f"v6e (e.g. v5e:2x2, v5p:4x4x4, v6e:4x8, v2:2x2 = a v2-8)"
    )
  dims = tuple(int(x) for x in m.group(2).split("x"))
  if m.group(1) == "v5p" and len(dims) != 3:
    raise ValueError(
        f"topology {topology!r}: v5p slices are 3-D (e.g. v5p:2x2x1)"
    )
  if m.group(1) != "v5p" and len(dims) != 2:
    raise ValueError(
        f"topology {topology!r}: {m.group(1)} slices are 2-D (e.g. {m.group(1)}:2x2)"
    )
  return m.group(1), dims


def topology_devices(
    topology: str, num_slices: int = 1
) -> tuple[list[jax.Device], str]:
  """Compile-only devices of `num_slices` slices of `topology`, and the chip name."""
  chip, dims = parse_topology(topology)
  if num_slices < 1:
    raise ValueError(f"num_slices must be >= 1, got {num_slices}")
  try:
    import libtpu  # noqa: F401
  except ImportError:
    raise ValueError(
        "AOT compilation for TPU needs libtpu: pip install 'jax[tpu]' (the [tpu] extra)"
    ) from None
  from jax.experimental import topologies

  kw: dict[str, Any] = {"num_slices": num_slices} if num_slices > 1 else {}
  if chip in ("v5e", "v6e") and math.prod(dims) < 4:
    # a single-chip (Colab) runtime: one host of 1 or 2 chips, not libtpu's default 2x2 host
    kw["chips_per_host_bounds"] = (*dims, 1)
  return list(topologies.get_topology_desc(topology, "tpu", **kw).devices), chip


def make_mesh(
    mesh_cfg: Mapping[str, int], devices: list[jax.Device], num_slices: int = 1
) -> Mesh:
  """`sharding.make_mesh` on compile-only devices; across slices (DCN) only the data axis grows."""
  if num_slices == 1:
    return sharding.make_mesh(mesh_cfg, devices)
  from jax.experimental import mesh_utils

  per_slice = len(devices) // num_slices
  ici = sharding.mesh_shape(mesh_cfg, per_slice)
  dev = mesh_utils.create_hybrid_device_mesh(ici, (num_slices, 1, 1), devices)
  return Mesh(
      dev,
      sharding.MESH_AXES,
      axis_types=(AxisType.Auto,) * len(sharding.MESH_AXES),
  )


def _with_shardings(tree, shardings):
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      tree,
      shardings,
  )


def memory_report(compiled, hbm_bytes: int) -> dict[str, Any]:
  """Per-device bytes from the compiler: arguments, outputs, temporaries, and their peak."""
  m = compiled.memory_analysis()
  args, out, alias, temp = (
      int(getattr(m, f"{k}_size_in_bytes"))
      for k in ("argument", "output", "alias", "temp")
  )
  peak = args + out - alias + temp
  return {
      "argument_bytes": args,
      "output_bytes": out,
      "alias_bytes": alias,
      "temp_bytes": temp,
      "peak_bytes": peak,
      "hbm_bytes": hbm_bytes,
      "hbm_fraction": peak / hbm_bytes,
  }


def compile_tpu(jitted, args: tuple) -> tuple[Any, str | None]:
  """Lower and compile a jitted function on abstract sharded `args` for compile-only TPU devices:
  `(compiled, None)`, or `(None, the compiler's one-line refusal)` when it does not fit.
  """
  # Compile-only TPU executables cannot be read back from the persistent cache: keep them out of it.
  # (`jax.config.read` refuses flags that have a context manager, as this one does)
  cache_on = jax.config.jax_enable_compilation_cache  # type: ignore[attr-defined]
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    # The kernels pick their backend at trace time: compile-only TPU devices need the Mosaic kernels,
    # not this CPU host's interpret path.
    with pallas_kernels.default_backend("tpu"):
      lowered = jitted.lower(*args)
    return lowered.compile(), None
  # The TPU compiler reports an HBM overflow as a runtime error.
  except Exception as e:
    msg = str(e)
    if not _OOM.search(msg):
      raise
    first = next(
        (line for line in msg.splitlines() if _OOM.search(line)),
        msg.splitlines()[0],
    )
    return None, first.strip()[:300]
  finally:
    jax.config.update("jax_enable_compilation_cache", cache_on)


def compile_report(
    name: str,
    fn: Callable,
    args: tuple,
    *,
    hbm_bytes: int,
    flops_per_device: float,
    donate_argnums=(),
) -> dict[str, Any]:
  """Lower and compile `fn` (a function or a jitted one) on abstract sharded `args`; never raises for OOM."""
  jitted = (
      fn if hasattr(fn, "lower") else jax.jit(fn, donate_argnums=donate_argnums)
  )
  t0 = time.perf_counter()
  report: dict[str, Any] = {"what": name, "flops_per_device": flops_per_device}
  compiled, error = compile_tpu(jitted, args)
  report["compile_s"] = time.perf_counter() - t0
  if compiled is None:
    report.update(fits=False, error=error)
    return report
  report.update(memory_report(compiled, hbm_bytes))
  report["fits"] = report["peak_bytes"] <= hbm_bytes
  return report


# ------------------------------------------------------------------------------------- training
def compile_train(config, topology: str, num_slices: int = 1) -> dict[str, Any]:
  """Compile the trainer's sharded step for a TPU slice (config: an ml_collections training config).

  The config passes the trainer's own validation first, for the topology's devices and hosts. A
  LoRA config (`lora.enabled`) compiles the adapters' step with the frozen base as its third
  argument (int8 with `lora.base_dtype=int8`); its FLOPs are 2/3 of the full step's (the forward
  and the activations' backward, no weight gradients; the adapters' own few are not counted).
  """
  from loopcoder_jax.train import config as train_config
  from loopcoder_jax.train import optim
  from loopcoder_jax.train import step as train_step

  devices, chip = topology_devices(topology, num_slices)
  cfg = train_config.validate(
      config,
      num_devices=len(devices),
      process_count=len({d.process_index for d in devices}),
      num_slices=num_slices,
  )
  mesh = make_mesh(dict(config.mesh), devices, num_slices)
  rules = tuple(tuple(r) for r in config.rules)
  gb, seq, accum = (
      config.train.global_batch_size,
      config.data.seq_len,
      config.train.grad_accum,
  )
  tx, schedule = optim.make_optimizer(config.optim, config.train.total_steps)
  _, step_fn, state_sh = train_step.make_train_fns(
      cfg, tx, mesh, rules, grad_accum=accum, schedule=schedule
  )
  abs_state, _ = train_step.state_shardings_for(cfg, tx, mesh, rules)
  b_sh = sharding.batch_sharding(mesh, rules)
  batch = {
      k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=b_sh)
      for k, s in train_step.batch_spec(gb, seq).items()
  }
  step_flops = flops.train_flops_per_token(cfg, seq) * gb * seq
  args: tuple = (_with_shardings(abs_state, state_sh), batch)
  if (
      cfg.lora is not None
  ):  # the frozen base: the LoRA step's third input, never differentiated
    abs_base, base_sh = train_step.base_shardings(cfg, mesh, rules)
    args += (_with_shardings(abs_base, base_sh),)
    step_flops = step_flops * 2 / 3
  report = compile_report(
      "train",
      step_fn,
      args,
      hbm_bytes=int(hardware.PEAKS[chip]["hbm_bytes"]),
      flops_per_device=step_flops / len(devices),
  )
  report.update(
      _context(cfg, topology, num_slices, chip, mesh),
      global_batch=gb,
      seq_len=seq,
      grad_accum=accum,
      remat=cfg.runtime.remat_policy,
  )
  if cfg.lora is not None:
    report.update(
        lora_rank=cfg.lora.rank,
        lora_per_loop=cfg.lora.per_loop,
        base=cfg.runtime.quantize
        if cfg.runtime.quantize != "none"
        else cfg.runtime.param_dtype,
    )
  return report


def _context(
    cfg: PLTConfig, topology, num_slices, chip, mesh
) -> dict[str, Any]:
  return {
      "topology": topology,
      "num_slices": num_slices,
      "chip": chip,
      "devices": mesh.size,
      "mesh": dict(mesh.shape),
      "loops": cfg.plt_num_loops,
      "params": cfg.num_params(),
      "dtype": cfg.runtime.dtype,
      "attention_impl": cfg.runtime.attention_impl,
  }


# ------------------------------------------------------------------------------------- serving
def compile_serving(
    cfg: PLTConfig,
    topology: str,
    *,
    batch: int,
    max_len: int,
    prefill_len: int | None = None,
    chunk: int = 0,
    mesh_cfg: Mapping[str, int] | None = None,
    num_slices: int = 1,
    what=("prefill", "decode"),
) -> list[dict[str, Any]]:
  """Compile decode.make_serving_fns' prefill and decode step for a slice; one report each."""
  from loopcoder_jax import inference
  from loopcoder_jax.inference import decode

  prefill_len = prefill_len or max_len
  devices, chip = topology_devices(topology, num_slices)
  mesh = make_mesh(
      mesh_cfg or {"data": 1, "fsdp": 1, "tensor": -1}, devices, num_slices
  )
  p_sh, c_sh, rows = decode.serving_shardings(cfg, mesh, batch)
  if batch % sharding.batch_shards(
      mesh, (("activation_batch", ("data", "fsdp")),)
  ):
    raise ValueError(
        f"serving batch {batch} is not divisible by the data axes of mesh {dict(mesh.shape)}"
    )
  prefill_fn, decode_fn, abstract = decode.make_serving_fns(
      cfg,
      batch=batch,
      max_len=max_len,
      prefill_len=prefill_len,
      chunk=chunk,
      param_shardings=p_sh,
      cache_shardings=c_sh,
      data_sharding=rows,
  )
  hbm = int(hardware.PEAKS[chip]["hbm_bytes"])
  cache_bytes = sum(
      math.prod(s.shape) * s.dtype.itemsize
      for s in jax.tree.leaves(inference.cache_shapes(cfg, batch, max_len))
  )
  cache_dev = sum(
      _device_bytes(s, sh)
      for s, sh in zip(
          jax.tree.leaves(inference.cache_shapes(cfg, batch, max_len)),
          jax.tree.leaves(c_sh),
      )
  )
  ctx = _context(cfg, topology, num_slices, chip, mesh)
  out = []
  if "prefill" in what:
    prefill_flops = (
        flops.forward_flops_per_token(cfg, prefill_len) * batch * prefill_len
    )
    jitted = jax.jit(prefill_fn, out_shardings=(rows, c_sh))
    r = compile_report(
        "prefill",
        jitted,
        abstract["prefill"],
        hbm_bytes=hbm,
        flops_per_device=prefill_flops / mesh.size,
    )
    out.append(
        {
            **r,
            **ctx,
            "batch": batch,
            "max_len": max_len,
            "prefill_len": prefill_len,
            "chunk": chunk,
            "cache_bytes_per_device": cache_dev,
            "cache_bytes_total": cache_bytes,
        }
    )
  if "decode" in what:
    jitted = jax.jit(decode_fn, out_shardings=(rows, c_sh), donate_argnums=1)
    r = compile_report(
        "decode",
        jitted,
        abstract["decode"],
        hbm_bytes=hbm,
        flops_per_device=flops.decode_flops_per_token(cfg, max_len)
        * batch
        / mesh.size,
    )
    out.append(
        {
            **r,
            **ctx,
            "batch": batch,
            "max_len": max_len,
            "cache_bytes_per_device": cache_dev,
            "cache_bytes_total": cache_bytes,
        }
    )
  return out


def _device_bytes(sds: jax.ShapeDtypeStruct, sh: NamedSharding) -> int:
  shard = sh.shard_shape(sds.shape)
  return int(np.prod(shard)) * jnp.dtype(sds.dtype).itemsize
