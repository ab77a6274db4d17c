"""A roofline for decoding on TPU: how long a decode step should take, from the compiled programs.

Per device and per decode step (`decode.decode_step`, as `decode.make_serving_fns` serves it):

  XLA counts   FLOPs and bytes accessed from `compiled.cost_analysis()` of the step compiled for the
               slice with the layer loop unrolled (`runtime.scan_layers=False`, the same layer L
               times): XLA counts a while loop's body once whatever its trip count, so the served
               program (layers scanned) reports one layer of L. Its FLOPs are reported too.
  floor        what no implementation of the step avoids: the matmul FLOPs of
               `flops.decode_flops_per_token`, and the bytes of every weight once per pass over the
               layers (R passes for serial decoding, one for R = 1 and for PLT's batched loops; the
               embedding gives only its B rows), loop 1's K/V cache over its whole preallocated
               length (attention reads it with a mask) once per pass that attends to it (every pass),
               and each later loop's ring once.
  time         max(FLOPs / peak FLOP/s, bytes / HBM bandwidth) for each, with `hardware.PEAKS`.

The served program (layers scanned) is compiled as well: its memory says whether the step fits.
Not modelled: collectives (their count in the program is reported), overlap of compute and memory,
kernel efficiency. XLA's bytes count every operand and result of every fused op, copies included,
whether or not they stay in on-chip memory: the "XLA" estimate is the pessimistic one, the floor
the optimistic one. XLA's FLOPs also count one per element of the cache slice that each layer's
attention copies to write the new token in (the stacked layout): memory traffic, not matmul work.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp

from loopcoder_jax import hardware
from loopcoder_jax.model import flops
from loopcoder_jax.model.config import PLTConfig
from loopcoder_jax.scaling import aot

# Collective ops in the optimized HLO text (an asynchronous one once, by its -start).
_COLLECTIVE = re.compile(
    r"\s(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
    r"(-start)?\("
)


def variants(cfg: PLTConfig) -> list[tuple[str, PLTConfig, str]]:
  """R = 1, PLT-R (batched loops) and serial R, all on the shared weights of `cfg`."""
  r = cfg.plt_num_loops
  if r < 2:
    raise ValueError(
        f"the roofline compares R = 1 with a PLT model; the config has {r} loop"
    )
  return [
      ("R1", cfg.replace(plt_num_loops=1), "batched"),
      (f"PLT{r}", cfg, "batched"),
      (f"serial{r}", cfg, "serial"),
  ]


def _shard_bytes(sds, sharding) -> int:
  return (
      math.prod(sharding.shard_shape(sds.shape)) * jnp.dtype(sds.dtype).itemsize
  )


def floor_bytes(
    cfg: PLTConfig, batch: int, max_len: int, mode: str, shardings
) -> dict[str, int]:
  """Bytes one decode step must read per device (module docstring), by part."""
  from loopcoder_jax import inference
  from loopcoder_jax.model.transformer import abstract_params

  p_sh, c_sh, _ = shardings
  params = abstract_params(cfg)
  passes = cfg.plt_num_loops if mode == "serial" else 1
  layers = sum(
      _shard_bytes(a, s)
      for a, s in zip(
          jax.tree.leaves(params["layers"]), jax.tree.leaves(p_sh["layers"])
      )
  )
  head = sum(
      _shard_bytes(a, s)
      for k in params
      if k not in ("layers", "embed_tokens")
      for a, s in zip(jax.tree.leaves(params[k]), jax.tree.leaves(p_sh[k]))
  )
  emb = params["embed_tokens"]["embedding"]
  if cfg.tie_word_embeddings:  # the table is the head: read whole
    head += _shard_bytes(emb, p_sh["embed_tokens"]["embedding"])
  else:
    head += batch * cfg.hidden_size * jnp.dtype(emb.dtype).itemsize
  cache = inference.cache_shapes(cfg, batch, max_len)
  kv1 = _shard_bytes(cache.k1, c_sh.k1) + _shard_bytes(cache.v1, c_sh.v1)
  ring = _shard_bytes(cache.ring_k, c_sh.ring_k) + _shard_bytes(
      cache.ring_v, c_sh.ring_v
  )
  return {
      "weights": passes * layers + head,
      "kv_cache": passes * kv1 + ring,
  }


def _estimate(flops_, bytes_, peak) -> dict[str, float]:
  t_flops, t_bytes = flops_ / peak["bf16_flops"], bytes_ / peak["hbm_bw"]
  return {
      "flops": flops_,
      "bytes": bytes_,
      "step_s": max(t_flops, t_bytes),
      "bound": "memory" if t_bytes >= t_flops else "compute",
  }


def decode_step(
    cfg: PLTConfig,
    topology: str,
    *,
    batch: int,
    max_len: int,
    mode: str,
    mesh_cfg: Mapping[str, int] | None = None,
) -> dict[str, Any]:
  """One variant at one (batch, context): memory of the served step, XLA counts, floor, times."""
  from loopcoder_jax.inference import decode

  devices, chip = aot.topology_devices(topology)
  peak = hardware.PEAKS[chip]
  mesh = aot.make_mesh(mesh_cfg or {"tensor": -1}, devices)
  shardings = decode.serving_shardings(cfg, mesh, batch)
  p_sh, c_sh, rows = shardings
  row: dict[str, Any] = {
      "loops": cfg.plt_num_loops,
      "mode": mode,
      "batch": batch,
      "context": max_len,
      "chip": chip,
      "devices": mesh.size,
      "mesh": dict(mesh.shape),
  }

  def compile_step(c: PLTConfig, what: str):
    _, step, abstract = decode.make_serving_fns(
        c,
        batch=batch,
        max_len=max_len,
        prefill_len=1,
        mode=mode,
        param_shardings=p_sh,
        cache_shardings=c_sh,
        data_sharding=rows,
    )
    t0 = time.perf_counter()
    jitted = jax.jit(step, out_shardings=(rows, c_sh), donate_argnums=1)
    out = aot.compile_tpu(jitted, abstract["decode"])
    row[f"{what}_compile_s"] = time.perf_counter() - t0
    return out

  served, error = compile_step(cfg, "served")
  if served is None:
    return {**row, "fits": False, "error": error}
  row.update(aot.memory_report(served, int(peak["hbm_bytes"])))
  row["fits"] = row["peak_bytes"] <= peak["hbm_bytes"]
  row["served_xla_flops"] = float(served.cost_analysis()["flops"])
  model_flops = flops.decode_flops_per_token(cfg, max_len) * batch / mesh.size
  floor = floor_bytes(cfg, batch, max_len, mode, shardings)
  row["floor"] = {
      **_estimate(model_flops, sum(floor.values()), peak),
      "bytes_by_part": floor,
  }
  unrolled, error = compile_step(
      cfg.with_runtime(scan_layers=False), "unrolled"
  )
  if unrolled is None:
    row["xla_error"] = error
    return row
  cost = unrolled.cost_analysis()
  row["collectives"] = len(_COLLECTIVE.findall(unrolled.as_text()))
  row["xla"] = _estimate(
      float(cost["flops"]), float(cost["bytes accessed"]), peak
  )
  return row


def table(
    cfg: PLTConfig,
    topology: str,
    batches: Sequence[int],
    contexts: Sequence[int],
    mesh_cfg: Mapping[str, int] | None = None,
    log=None,
) -> list[dict[str, Any]]:
  """Every variant at every (batch, context), plus each point's time ratios PLT/R1 and PLT/serial
  (for both estimates)."""
  out = []
  for batch in batches:
    for ctx in contexts:
      point: dict[str, Any] = {"batch": batch, "context": ctx, "variants": {}}
      for name, c, mode in variants(cfg):
        row = decode_step(
            c, topology, batch=batch, max_len=ctx, mode=mode, mesh_cfg=mesh_cfg
        )
        point["variants"][name] = row
        if log:
          log(name, row)
      names = [n for n, _, _ in variants(cfg)]
      r1, plt, serial = (point["variants"][n] for n in names)
      point["ratios"] = {
          est: {
              f"{names[1]}/{names[0]}": plt[est]["step_s"] / r1[est]["step_s"],
              f"{names[1]}/{names[2]}": plt[est]["step_s"]
              / serial[est]["step_s"],
          }
          for est in ("xla", "floor")
          if all(est in r for r in (r1, plt, serial))
      }
      out.append(point)
  return out
