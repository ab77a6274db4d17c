"""Helpers shared by the tests (fixtures live in conftest.py files).

- `assert_close`: the one float comparison, its tolerance from rounding;
- the local-window boundary check shared by the model's and the kernels' tests;
- kernel comparisons against the f32 reference;
- safetensors directories written with safetensors' own writer (not ours);
- a small corpus and tokenizer; running scripts/train.py (or any script) in a subprocess on
  fake CPU devices.
"""

import json
import math
import os
import pathlib
import socket
import subprocess
import sys

from hypothesis import Phase
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open

from loopcoder_jax.checkpoints import hf_names
from loopcoder_jax.checkpoints import safetensors_io as st

ROOT = str(pathlib.Path(__file__).resolve().parents[1])
SCRIPTS = os.path.join(ROOT, "scripts")


# ---------------------------------------------------------------------------- float tolerances
# Each rounding step in `dtype` errs by at most eps/2 relative to the value it
# rounds. Over the `ops` steps along a value's longest dependency chain (the
# reduction lengths of the matmuls, norms and softmaxes it passes through) the
# errors add up like a random walk: ~eps * sqrt(ops) relative to the values'
# scale (max |want|). Two programs (other fusion, summation order or vector
# width: AVX2 or AVX-512, Intel or AMD, thread count) double the variance, the
# worst of many elements sits a few deviations out, and the deep comparisons
# (JAX against PyTorch, R = 4) amplify a little: the largest ratio
# err / (eps * sqrt(ops) * scale) measured over the suite is 3.1 (XLA's
# AVX-512, AVX2 and SSE4.2 code, PyTorch's AVX-512, AVX2 and scalar kernels,
# MKL's AVX2 and SSE4.2 paths, 1 to 16 threads). TOL_C = 8 keeps 2.5x over it.
# Injected bugs of the smallest kind (a window one key off, a gate or its bias
# ignored, a CLP state carried across a segment start, a step's token count off
# by one) still exceed the tolerance 40x to 10^4x (bf16 kernels: 9x).
#
# bf16 compute accumulates in f32: a rounding of a vector that then enters an
# f32 dot product is averaged over the dot's terms. What reaches a result
# unaveraged is its own rounding and, in the model, the residual stream's; for
# bf16 `ops` counts those.
EPS = {"float32": 2.0**-23, "bfloat16": 2.0**-7, "float64": 2.0**-52}
TOL_C = 8.0


def free_port() -> int:
  """A TCP port free on this host now (for a server or coordinator a test starts)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def perturbed(params, scale=0.05):
  """Random gates (they start at zero) and less uniform weights, so every path shows in the
  logits."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  return jax.tree.unflatten(
      tree,
      [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)],
  )


def tolerance(want, *, ops: int, dtype="float32", scale=None) -> float:
  """`TOL_C * eps(dtype) * sqrt(ops) * scale`; scale: max |want| by default."""
  if scale is None:
    scale = float(np.max(np.abs(np.asarray(want, np.float64))))
  return TOL_C * EPS[str(np.dtype(dtype))] * math.sqrt(ops) * scale


def assert_close(got, want, *, ops: int, dtype="float32", scale=None, what=""):
  """max |got - want| <= tolerance(want, ops=ops, dtype=dtype, scale=scale)."""
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
  assert np.isfinite(want).all(), f"{what}: non-finite reference"
  tol = tolerance(want, ops=ops, dtype=dtype, scale=scale)
  err = float(np.max(np.abs(got - want), initial=0.0))
  assert err <= tol, (
      f"{what}: max |error| {err:.3g} > tolerance {tol:.3g} for {ops} {dtype}"
      " ops"
  )


def forward_ops(cfg, seq_len: int) -> int:
  """Rounding steps along a forward pass in `cfg.runtime.dtype`.

  float32, per layer and loop: the two RMSNorms (d each), the q/k/v, gate and
  MLP-in projections (d), the scores (D), the softmax and value sums over the
  keys (2 S), o_proj (H D) and the MLP-out projection (I); then the final norm
  and the head (2 d).
  """
  loops_layers = cfg.plt_num_loops * cfg.num_hidden_layers
  if cfg.runtime.dtype == "bfloat16":  # the residual stream's two adds a layer
    return 2 * loops_layers + 1
  d, hd = cfg.hidden_size, cfg.head_size
  layer = (
      4 * d
      + hd
      + 2 * seq_len
      + cfg.num_attention_heads * hd
      + cfg.intermediate_size
  )
  return loops_layers * layer + 2 * d


def attention_ops(seq_len: int, head_dim: int) -> int:
  """Scores (D), then softmax and value sums over the keys (2 S)."""
  return head_dim + 2 * seq_len


# ---------------------------------------------------------------------------- window boundary
def influence(
    attn_fn,
    seq_len: int,
    *,
    segment_ids=None,
    heads=2,
    kv_heads=1,
    head_dim=4,
    seed=0,
):
  """I[t, j] = True when value j changes output t. `attn_fn(q, k, v, segment_ids) -> out`."""
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(kq, (1, seq_len, heads, head_dim))
  k = jax.random.normal(kk, (1, seq_len, kv_heads, head_dim))
  v = jax.random.normal(kv, (1, seq_len, kv_heads, head_dim))
  seg = (
      None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)[None]
  )
  # [1,S,H,D, 1,S,K,D]
  jac = jax.jit(jax.jacrev(lambda v_: attn_fn(q, k, v_, seg)))(v)
  return np.asarray(jnp.abs(jac).sum(axis=(0, 2, 3, 4, 6, 7)) > 0)


def expected_window(seq_len: int, left: int | None, segment_ids=None):
  t = np.arange(seq_len)[:, None]
  j = np.arange(seq_len)[None, :]
  ok = j <= t
  if left is not None:
    ok &= j >= t - left
  if segment_ids is not None:
    seg = np.asarray(segment_ids)
    ok &= seg[:, None] == seg[None, :]
  return ok


def assert_window(attn_fn, seq_len: int, left: int | None, segment_ids=None):
  got = influence(attn_fn, seq_len, segment_ids=segment_ids)
  want = expected_window(seq_len, left, segment_ids)
  bad = np.argwhere(got != want)
  assert not len(bad), (
      f"window mismatch (left={left}) at (query, key) {bad[:5].tolist()}: "
      f"got {got[tuple(bad[0])]} want {want[tuple(bad[0])]}"
  )


# ---------------------------------------------------------------------------- kernels
# Shrinking re-compiles the kernels for every candidate (minutes in interpret mode): report as found.
NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)
# Inputs are unit normal. Gradients that are exactly zero (a one-key window: softmax = 1) come out as
# rounding noise of D = rowsum(dO * O) with O in the output dtype (as in every flash attention), so
# errors are measured against at least unit scale.
FLOOR = 1.0
# bf16: the output's own rounding, and in the backward that of O in
# D = rowsum(dO * O).
BF16_ROUNDINGS = {"output": 1, "grad": 2}


def kernel_ops(dtype: str, what: str, seq_len: int, head_dim: int) -> int:
  """Rounding steps of an attention output or gradient (the backward walks the
  chain twice).
  """
  if dtype == "bfloat16":
    return BF16_ROUNDINGS[what]
  return attention_ops(seq_len, head_dim) * (1 if what == "output" else 2)


def assert_kernel_close(got, want, q_shape, dtype: str, what: str, name: str):
  """A kernel's output or gradient (`what`) against the f32 reference, for q of
  `q_shape` [B, S, H, D].
  """
  assert_close(
      got,
      want,
      ops=kernel_ops(dtype, what, q_shape[1], q_shape[3]),
      dtype=dtype,
      scale=max(float(np.max(np.abs(np.asarray(want, np.float32)))), FLOOR),
      what=f"{name} ({dtype})",
  )


def random_segments(rng, b, s, n):
  """[B, S] non-decreasing ids with up to n segments per row (packed documents)."""
  cuts = np.sort(rng.integers(0, s + 1, size=(b, n - 1)), axis=1)
  return jnp.asarray(
      (np.arange(s)[None, :, None] >= cuts[:, None, :]).sum(-1), jnp.int32
  )


def inputs(seed, shapes, dtype):
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  return [
      jax.random.normal(k, s, jnp.float32).astype(dtype)
      for k, s in zip(keys, shapes)
  ]


def value_and_grads(fn, args, ct):
  """fn(*args) and d<fn(*args), ct>/d(args), jitted (interpret mode is ~250x slower eagerly)."""

  def run(args, ct):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(ct.astype(out.dtype))

  return jax.jit(run)(tuple(args), ct)


def check(kernel, reference, args, ct, dtype, names):
  out, grads = value_and_grads(kernel, args, ct)
  # The reference runs in f32 on the same (rounded) inputs: it is the exact answer for them.
  ref_out, ref_grads = value_and_grads(
      reference, [a.astype(jnp.float32) for a in args], ct
  )
  assert out.dtype == args[0].dtype
  q_shape = args[0].shape
  assert_kernel_close(out, ref_out, q_shape, dtype, "output", "output")
  for name, g, rg in zip(names, grads, ref_grads):
    assert g.dtype == args[0].dtype
    assert_kernel_close(g, rg, q_shape, dtype, "grad", f"d{name}")


# ---------------------------------------------------------------------------- safetensors
def write_safetensors_dir(path, tensors, shard_bytes=3000):
  """`tensors` in shards of about `shard_bytes` plus the index, by safetensors' own writer."""
  import safetensors.numpy as stn

  os.makedirs(path)
  shards, size = [{}], 0
  for k, v in tensors.items():
    if shards[-1] and size + v.nbytes > shard_bytes:
      shards.append({})
      size = 0
    shards[-1][k] = v
    size += v.nbytes
  weight_map = {}
  for j, shard in enumerate(shards):
    name = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
    stn.save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
    weight_map.update({k: name for k in shard})
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump(
        {
            "metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
            "weight_map": weight_map,
        },
        f,
    )
  return len(shards)


# ---------------------------------------------------------------------------- training runs
TRAIN_SCRIPT = os.path.join(SCRIPTS, "train.py")


def write_assets(root):
  """A small text corpus (40 stdlib files) and a 320-token BPE trained on it, under `root`."""
  from loopcoder_jax.data import corpus, tokenizer

  files = corpus.stdlib_files("train")[:40]
  os.makedirs(os.path.join(root, "corpus"))
  for i, (_, text) in enumerate(files):
    with open(os.path.join(root, "corpus", f"{i:03d}.py"), "w") as f:
      f.write(text)
  tokenizer.train_bpe((t for _, t in files), 320, os.path.join(root, "tok"))
  return {
      "source": os.path.join(root, "corpus", "*.py"),
      "tokenizer": os.path.join(root, "tok"),
  }


TINY = dict(
    vocab_size=320,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
)


def train_flags(assets, workdir, **extra):
  over = {f"model.overrides.{k}": v for k, v in TINY.items()}
  over.update(
      {
          "tokenizer.path": assets["tokenizer"],
          "data.source": assets["source"],
          "data.seq_len": 32,
          "data.shuffle_window": 16,
          "train.global_batch_size": 8,
          "train.total_steps": 16,
          "train.log_every": 4,
          "checkpoint.every_steps": 4,
          "eval.max_tokens": 0,
          "eval.completion_tokens": 0,
          "metrics.progress_bar": False,
          "metrics.peak_flops": -1.0,
          "metrics.tensorboard": False,
      }
  )
  over.update(extra)
  return [f"--workdir={workdir}"] + [
      f"--config.{k}={v}" for k, v in over.items()
  ]


def subprocess_env(devices=1):
  env = dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
      JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
  )
  return env


def run_script(name, args, timeout=240, devices=1):
  """scripts/<name>.py with `args` in a subprocess (CPU, the tests' compile cache)."""
  return subprocess.run(
      [sys.executable, os.path.join(SCRIPTS, name)] + [str(a) for a in args],
      env=subprocess_env(devices),
      capture_output=True,
      text=True,
      timeout=timeout,
      cwd=ROOT,
  )


def run_train(args, timeout=240, devices=1):
  return run_script("train.py", args, timeout, devices)


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


# ------------------------------------------------------------------------------------- HF dirs
BF16 = np.dtype(ml_dtypes.bfloat16)


def random_hf_tensors(cfg, dtype=BF16, seed=0):
  """Random tensors for every key of `cfg`'s HF checkpoint (the name table's plan)."""
  rng = np.random.default_rng(seed)
  return {
      s.key: (rng.standard_normal(s.hf_shape) * 0.5).astype(dtype)
      for s in hf_names.plan(cfg)
  }


def write_hf(path, cfg, tensors, shard_bytes=3000, extra_config=None):
  """An HF directory written with safetensors' own writer (independent of ours), sharded + index."""
  n_shards = write_safetensors_dir(path, tensors, shard_bytes)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({**cfg.to_hf_dict(), **(extra_config or {})}, f, indent=2)
  return n_shards


def read_hf(path):
  """An HF directory's tensors, read with safetensors' own reader."""
  files = st.weight_files(path)
  out = {}
  for k, fname in files.items():
    with safe_open(fname, "numpy") as f:
      out[k] = f.get_tensor(k)
  return out


def hf_dir(path, cfg, rename=None, dtype=BF16, **kw):
  """An HF directory of random tensors, some keys renamed (`rename`: old -> new)."""
  tensors = random_hf_tensors(cfg, dtype)
  for old, new in (rename or {}).items():
    tensors[new] = tensors.pop(old)
  write_hf(path, cfg, tensors, **kw)
  return str(path)


# ------------------------------------------------------------------------------------- LoRA
def lora_export(root, per_loop=False, loops=2, rank=4, **cfg_kw):
  """A LoRA run's export made by hand: a perturbed tiny base (params directory `root/base`) and
  trained-looking adapters (B random) with the base's record (`root/adapters`). Returns
  `(lora cfg, base params, adapters, base dir, adapters dir)`."""
  from loopcoder_jax.checkpoints import formats, params_io
  from loopcoder_jax.model import lora
  from loopcoder_jax.model.config import LoraConfig, PLTConfig
  from loopcoder_jax.model.transformer import init_params

  cfg = PLTConfig.tiny(loops=loops, **cfg_kw)
  base = perturbed(init_params(cfg, jax.random.key(0)))
  lcfg = cfg.replace(lora=LoraConfig(rank=rank, per_loop=per_loop))
  _, adapters = lora.split(init_params(lcfg, jax.random.key(1)))
  # B of the size a trained adapter's update has next to the base's weights
  adapters = perturbed(adapters, scale=0.05)
  base_dir, ad_dir = os.path.join(root, "base"), os.path.join(root, "adapters")
  params_io.save_params(base_dir, cfg, base)
  params_io.save_params(ad_dir, lcfg, adapters)
  params_io.write_lora_record(
      ad_dir,
      {
          "lora": lcfg.lora.to_dict(),
          "base": base_dir,
          "base_sha256": formats.content_hash(base_dir),
      },
  )
  return lcfg, base, adapters, base_dir, ad_dir
