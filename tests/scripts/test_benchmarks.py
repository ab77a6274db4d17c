"""Smoke tests of the benchmark scripts (scripts/bench_*.py) at tiny sizes, each in its own process as a user runs it.

Each run must finish, print its table and end stdout with the JSON summary (bad flags: test_entry_points.py).
The figures themselves are checked only for sanity (the machine is shared).
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import pytest

from loopcoder_jax.model import flops
from loopcoder_jax.model.config import PLTConfig
from tests.helpers import ROOT, SCRIPTS

# About 65 s on 2 loaded cores with a cold compile cache (40 s warm): over the default suite's share.
pytestmark = pytest.mark.slow

TINY_TRAIN = [
    "--loops=1,2",
    "--steps=1",
    "--batch=2",
    "--seq=16",
    "--layers=1",
    "--d=32",
    "--heads=2",
    "--kv_heads=2",
    "--head_dim=16",
    "--ffn=64",
    "--vocab=128",
    "--window=4",
    "--peak_n=128",
]
TINY_DECODE = [
    "--batches=1",
    "--contexts=64",
    "--steps=2",
    "--d=32",
    "--ffn=64",
    "--layers=2",
    "--heads=4",
    "--kv_heads=2",
    "--head_dim=8",
    "--vocab=128",
    "--window=4",
]
TINY_TORCH_DECODE = [
    "--loops=1,2",
    "--prompt=12",
    "--new_tokens=4",
    "--batch=2",
    "--d=32",
    "--ffn=64",
    "--layers=2",
    "--heads=4",
    "--kv_heads=2",
    "--head_dim=8",
    "--vocab=128",
    "--window=4",
]
TINY_SERVE = [
    "--direct",
    "--clients=2",
    "--repeats=1",
    "--max_tokens=4",
    "--prompt_tokens=4",
    "--step_rounds=2",
    "--d=32",
    "--ffn=64",
    "--layers=2",
    "--heads=2",
    "--kv_heads=2",
    "--head_dim=16",
    "--vocab=300",
]
# The converter benchmark's model width is fixed (d=2048): --params=1 gives its smallest, one layer (~0.18B).
TINY_CONVERT = ["--params=1", "--shard_size=100MB"]


def run_script(name, *args, tmpdir=None):
  # One CPU device as on the command line (not the 8 fake ones conftest sets), sharing the tests' compile cache.
  xla_flags = [
      f
      for f in os.environ.get("XLA_FLAGS", "").split()
      if "xla_force_host_platform_device_count" not in f
  ]
  env = {
      **os.environ,
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": " ".join(xla_flags),
      "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
  }
  if tmpdir is not None:
    env["TMPDIR"] = str(tmpdir)
  return subprocess.run(
      [sys.executable, os.path.join(SCRIPTS, name), *args],
      capture_output=True,
      text=True,
      env=env,
      timeout=300,
  )


def summary(run):
  assert run.returncode == 0, run.stderr[-3000:]
  lines = run.stdout.strip().splitlines()
  assert len(lines) >= 3, run.stdout  # a header, table rows, then the JSON line
  return json.loads(lines[-1])


def positive(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_train():
  out = summary(run_script("bench_train.py", *TINY_TRAIN))
  assert (out["batch"], out["seq"], out["scan_layers"], out["dtype"]) == (
      2,
      16,
      0,
      "float32",
  )
  rows = out["results"]
  assert [r["loops"] for r in rows] == [1, 2]
  for r in rows:
    for key in (
        "tokens_per_s",
        "tokens_per_s_median",
        "mfu",
        "mfu_paired_median",
        "flops_per_token",
        "loss",
    ):
      assert positive(r[key]), (key, r)
    assert r["mfu"] < 1 and r["step_s_best"] <= r["step_s_median"]
  assert positive(out["peak_flops"]) and out["peak_flops"] == max(
      r["peak_flops"] for r in rows
  )
  # The model TINY_TRAIN describes: same weights but for R=2's gate, FLOPs of
  # every loop.
  for r in rows:
    cfg = PLTConfig.tiny(
        loops=r["loops"],
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        plt_window_size=(4, 0),
    )
    assert r["params"] == cfg.num_params()
    assert r["flops_per_token"] == flops.train_flops_per_token(cfg, 16)


@pytest.mark.parametrize(
    "layout, extra",
    [(None, []), ("stacked", ["--quantize=int8", "--dtype=bfloat16"])],
)
def test_bench_decode(layout, extra):
  out = summary(
      run_script(
          "bench_decode.py",
          *TINY_DECODE,
          *([f"--layout={layout}"] if layout else []),
          *extra,
      )
  )
  assert out["config"]["steps"] == 2 and "batches" not in out["config"]
  assert out["config"]["layout"] == (layout or "per_layer")
  [res] = out["results"]
  assert (res["batch"], res["context"]) == (1, 64)
  mm = res["layer_matmuls"]
  assert (
      positive(mm["ms_B_rows"])
      and positive(mm["ms_2B_rows"])
      and positive(mm["ratio_2B_over_B"])
  )
  for name in ("R1", "PLT2", "serial2"):
    assert positive(res[name]["ms_per_token"]) and positive(
        res[name]["tokens_per_s"]
    ), res[name]
    assert res[name]["min_ms_per_token"] <= res[name]["ms_per_token"]
  if extra:  # int8 weights: the linear weights at one byte each (bf16: two)
    assert out["config"]["dtype"] == "bfloat16"
    assert positive(res["PLT2_int8"]["ms_per_token"])
    assert positive(res["plt2_int8_over_plt2_latency"])
    assert (
        out["weight_bytes"] / 2 < out["int8_weight_bytes"] < out["weight_bytes"]
    )
  else:
    assert "PLT2_int8" not in res and "int8_weight_bytes" not in out
  # PLT keeps one shared-loop K/V cache plus the local carry: more than R=1, less than a vanilla R=2 cache.
  assert res["PLT2"]["cache_bytes"] == res["serial2"]["cache_bytes"]
  assert (
      res["plt2_over_r1_cache"] > 1
      and res["vanilla2_cache_bytes"] > res["PLT2"]["cache_bytes"]
  )
  assert positive(res["plt2_over_r1_latency"]) and positive(
      res["plt2_over_serial2_latency"]
  )


def test_bench_serve_direct():
  out = summary(run_script("bench_serve.py", *TINY_SERVE))
  recs = {r["config"]: r for r in out["records"]}
  assert sorted(recs) == ["PLT-2", "R1", "serial"]
  for r in recs.values():
    assert r["clients"] == 2 and r["completion_tokens"] >= 2, r
    assert positive(r["tokens_per_s"]) and positive(r["step_ms"]), r
    assert r["decode_steps"] >= 1 and r["admission_calls"] >= 1, r
  [q] = out["ratios"]
  # the steps-alone bound is the inverted ratio of the step times recorded beside it
  step = {k: r["step_ms"] for k, r in recs.items()}
  assert math.isclose(q["step_bound_over_r1"], step["R1"] / step["PLT-2"])
  assert math.isclose(
      q["step_bound_over_serial"], step["serial"] / step["PLT-2"]
  )
  assert math.isclose(
      q["plt2_over_r1"],
      recs["PLT-2"]["tokens_per_s"] / recs["R1"]["tokens_per_s"],
  )


def test_bench_torch_decode():
  out = summary(run_script("bench_torch_decode.py", *TINY_TORCH_DECODE))
  assert [r["loops"] for r in out["results"]] == [1, 2]
  for r in out["results"]:
    for key in (
        "cached_tokens_per_s",
        "uncached_tokens_per_s",
        "cached_tokens_per_cpu_s",
        "prefill_cpu_s",
        "step_cpu_ms",
    ):
      assert positive(r[key]), (key, r)
    assert r["same_tokens"], r
  r1 = out["results"][0]
  assert positive(r1["llama_cached_tokens_per_s"]) and r1["llama_same_tokens"]


def test_bench_convert(tmp_path):
  out = summary(run_script("bench_convert.py", *TINY_CONVERT, tmpdir=tmp_path))
  # its scratch directory (a few copies of the weights) is removed
  assert os.listdir(tmp_path) == []
  assert (
      out["dtype"] == "bfloat16"
      and out["checkpoint_bytes"] >= 2 * out["params"]
  )
  phases = (
      "baseline",
      "write_hf",
      "hf_to_hf",
      "hf_to_orbax",
      "orbax_to_hf",
      "verify",
      "load_1",
      "load_mesh",
  )
  assert set(out["peak_rss_bytes"]) == set(phases) and all(
      positive(v) for v in out["peak_rss_bytes"].values()
  )
  ratios = out["over_baseline_per_checkpoint_byte"]
  assert ratios["baseline"] == 0 and all(
      positive(ratios[p]) for p in phases[1:]
  ), ratios
  # the whole checkpoint lands on the devices: once on one, once in all on a tensor mesh whose
  # replicated params (norms, gate) are held by each of the 8 devices
  one, mesh = out["loads"]["load_1"], out["loads"]["load_mesh"]
  assert (one["devices"], mesh["devices"]) == (1, 8)
  assert one["device_bytes"] == out["tensor_bytes"] < out["checkpoint_bytes"]
  assert mesh["device_bytes"] > one["device_bytes"]
  assert positive(out["largest_shard_bytes"])


@pytest.mark.tpu_compile
@pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install 'jax[tpu]', the [tpu] extra)",
)
def test_roofline():
  out = summary(
      run_script(
          "roofline.py",
          f"--config={os.path.join(ROOT, 'configs', 'tiny_cpu.py')}",
          "--topology=v5e:2x2",
          "--batches=2",
          "--contexts=256",
      )
  )
  assert out["topology"] == "v5e:2x2"
  [point] = out["points"]
  assert sorted(point["variants"]) == ["PLT2", "R1", "serial2"]
  for r in point["variants"].values():
    assert r["fits"] and positive(r["xla"]["step_s"])
    assert positive(r["floor"]["step_s"])
  assert set(point["ratios"]) == {"xla", "floor"}
  # serial R=2 streams the weights twice: the floor says PLT2 is faster
  assert point["ratios"]["floor"]["PLT2/serial2"] < 1
