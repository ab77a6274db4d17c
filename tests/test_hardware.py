"""Chip peaks, backend naming and MFU: the leaf every room may import."""

import jax.numpy as jnp
import pytest

from loopcoder_jax import hardware


def test_peak_table():
  assert hardware.chip_name("TPU v5 lite") == "v5e"
  assert hardware.chip_name("TPU v6 lite") == "v6e"
  assert hardware.chip_name("TPU v5p") == "v5p"
  assert hardware.chip_name("NVIDIA H200") == "h200"
  assert hardware.chip_name("cpu") is None
  assert hardware.chip_peak("TPU v5p")["hbm_bytes"] == 95 * 2**30
  assert hardware.chip_name("TPU v2") == "v2"
  # every chip has the three figures a roofline needs, per JAX device
  for peak in hardware.PEAKS.values():
    assert set(peak) == {"bf16_flops", "hbm_bytes", "hbm_bw"}


def test_mfu():
  assert hardware.mfu(1000.0, 2e6, 4e9) == 0.5
  with pytest.raises(ValueError, match="peak"):
    hardware.mfu(1.0, 1.0, 0.0)


def test_measure_matmul_peak():
  peak = hardware.measure_matmul_peak(jnp.float32, n=256, repeats=2)
  assert 1e8 < peak < 1e15
