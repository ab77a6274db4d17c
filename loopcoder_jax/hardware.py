"""The accelerator we run on: chip peaks, backend naming, model FLOP utilisation (MFU).

A leaf: it imports nothing of the package, so every room (the model's sharding included) may use it.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

# Per JAX device: dense bf16 peak FLOP/s, HBM bytes and HBM bandwidth (bytes/s), vendor figures.
# Sources: Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v5e, /v5p, /v6e: per chip,
# one device per chip); TPU v2 (two TensorCores per chip, each its own JAX device with 8 GiB): JAX's
# TPU hardware reference (docs.jax.dev pallas/tpu/hardware, `pltpu.get_tpu_info`: 46 TFLOP/s and
# 716 GB/s per chip, halved per core); NVIDIA H200 SXM datasheet (989 TFLOP/s dense, 4.8 TB/s).
PEAKS = {
    "v2": dict(bf16_flops=23e12, hbm_bytes=8 * 2**30, hbm_bw=358e9),
    "v5e": dict(bf16_flops=197e12, hbm_bytes=16 * 2**30, hbm_bw=819e9),
    "v5p": dict(bf16_flops=459e12, hbm_bytes=95 * 2**30, hbm_bw=2765e9),
    "v6e": dict(bf16_flops=918e12, hbm_bytes=32 * 2**30, hbm_bw=1640e9),
    "h200": dict(bf16_flops=989e12, hbm_bytes=141 * 10**9, hbm_bw=4.8e12),
}
_KIND_ALIASES = {
    "v5 lite": "v5e",
    "v5litepod": "v5e",
    "v5lite": "v5e",
    "v6 lite": "v6e",
    "v6lite": "v6e",
    "trillium": "v6e",
    "v5p": "v5p",
    "v5e": "v5e",
    "v6e": "v6e",
    "h200": "h200",
    "tpu v2": "v2",
}


def chip_name(device_kind: str) -> str | None:
  """Our table key for a `jax.Device.device_kind` / topology name, or None if unknown."""
  kind = device_kind.lower()
  for fragment, name in _KIND_ALIASES.items():
    if fragment in kind:
      return name
  return None


def chip_peak(device_kind: str) -> dict | None:
  name = chip_name(device_kind)
  return None if name is None else PEAKS[name]


def mfu(
    tokens_per_s: float, flops_per_token: float, peak_flops: float
) -> float:
  """Model FLOP utilisation: achieved useful FLOP/s over the peak (a fraction, not percent)."""
  if peak_flops <= 0:
    raise ValueError(f"peak FLOP/s must be > 0, got {peak_flops}")
  return tokens_per_s * flops_per_token / peak_flops


def measure_matmul_peak(
    dtype=jnp.float32, n: int = 2048, repeats: int = 5, device=None
) -> float:
  """Best-of-`repeats` FLOP/s of a jitted n x n x n matmul on `device` (default: the first one).

  Several chained products per call amortise dispatch; the result is the machine's practical
  matmul peak that MFU on CPU is quoted against.
  """
  device = device or jax.devices()[0]
  chain = 4
  a, b = (
      jax.device_put(
          jax.random.normal(jax.random.key(i), (n, n), dtype) / n**0.5, device
      )
      for i in range(2)
  )

  @jax.jit
  def run(a, b):
    x = a
    for _ in range(chain):
      x = x @ b
    return x

  run(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    run(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return chain * 2 * n**3 / best
