"""Attention benchmark: XLA references vs the Pallas kernels on the current backend.

    python scripts/bench_attention.py [--seq_lens=1024,4096,16384,32768] [--left=64] [--heads=8]
        [--kv_heads=2] [--head_dim=128] [--batch=1] [--dtype=auto] [--iters=5] [--modes=fwd,fwd_bwd]
        [--max_dense_gib=2] [--kernels_on_cpu]

Impls: `ref_local` (loopcoder_jax.model.attention.local_attention_reference, blocked, O(S x window)),
`ref_gswa` (dense causal reference + local reference + blend; skipped where the S x S scores
exceed --max_dense_gib), and on TPU/GPU `local` (sliding_window_attention), `gswa_fused`
(gswa_attention) and `gswa_separate` (causal kernel + local kernel + blend, run separately).
On CPU the kernels would run in Pallas interpret mode, which says nothing about speed: only the XLA
references are timed, and the table says so. TFLOP/s count the useful FLOPs of the band (visible
query-key pairs x 4D forward, x 12D forward+backward, no recompute). `ratio_32k_4k` = time(32k) /
time(4k): 8 is linear in S, a dense mask would be 64. Prints a table, then one JSON line.
Exit codes: 0 done; 2 bad flags (one `error:` line on stderr, before anything runs).
"""

import json
import statistics
import time

from absl import flags
import jax
import jax.numpy as jnp

from loopcoder_jax import cli
from loopcoder_jax.model import attention
from pallas_kernels import gswa_attention, reference, sliding_window_attention

_SEQ = cli.define_int_list(
    "seq_lens", [1024, 4096, 16384, 32768], "Sequence lengths."
)
_LEFT = flags.DEFINE_integer(
    "left", 64, "Local window: query t sees keys t-left..t.", lower_bound=0
)
_HEADS = flags.DEFINE_integer("heads", 8, "Query heads.", lower_bound=1)
_KV_HEADS = flags.DEFINE_integer("kv_heads", 2, "KV heads.", lower_bound=1)
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dim.", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch", 1, "Batch.", lower_bound=1)
_DTYPE = flags.DEFINE_enum(
    "dtype",
    "auto",
    ["auto", "float32", "bfloat16"],
    "auto: bfloat16 on accelerators, float32 on CPU (no native bf16 there).",
)
_ITERS = flags.DEFINE_integer(
    "iters",
    5,
    "Timed iterations (median reported) after one warm-up.",
    lower_bound=1,
)
_MODES = cli.define_choice_list(
    "modes", ["fwd", "fwd_bwd"], ["fwd", "fwd_bwd"], "Passes to time."
)
_KERNELS_ON_CPU = flags.DEFINE_bool(
    "kernels_on_cpu",
    False,
    "Also run the kernels on CPU (interpret mode: "
    "checks this script's kernel path; the times mean nothing).",
)
_MAX_DENSE = flags.DEFINE_float(
    "max_dense_gib",
    2.0,
    "Skip dense-causal references above this score size.",
    lower_bound=0.0,
)


def band_pairs(s, left):
  """Visible (query, key) pairs per head and row: local window and causal."""
  w = min(left + 1, s)  # sum over t of min(t + 1, left + 1)
  return w * (w + 1) // 2 + (s - w) * w, s * (s + 1) // 2


def impls(with_kernels, left):
  def ref_local(q, k1, v1, k, v, g):
    return attention.local_attention_reference(q, k, v, left=left)

  def ref_gswa(q, k1, v1, k, v, g):
    return attention.gswa_attention(q, k1, v1, k, v, g, left=left)

  out = {
      "ref_local": (ref_local, "local", True),
      "ref_gswa": (ref_gswa, "gswa", True),
  }
  if with_kernels:
    out["local"] = (
        lambda q, k1, v1, k, v, g: sliding_window_attention(q, k, v, left=left),
        "local",
        False,
    )
    out["gswa_fused"] = (
        lambda q, k1, v1, k, v, g: gswa_attention(
            q, k1, v1, k, v, g, left=left
        ),
        "gswa",
        False,
    )
    out["gswa_separate"] = (
        lambda q, k1, v1, k, v, g: reference.blend(
            g,
            sliding_window_attention(q, k1, v1, left=None),
            sliding_window_attention(q, k, v, left=left),
        ),
        "gswa",
        False,
    )
  return out


def timed(fn, args, iters):
  jax.block_until_ready(fn(*args))  # compile + warm-up
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def main():
  if _HEADS.value % _KV_HEADS.value:
    raise ValueError(
        f"--heads={_HEADS.value} must be a multiple of --kv_heads={_KV_HEADS.value}"
    )
  backend = jax.default_backend()
  dtype = jnp.dtype(
      _DTYPE.value
      if _DTYPE.value != "auto"
      else ("float32" if backend == "cpu" else "bfloat16")
  )
  b, h, hk, d, left = (
      _BATCH.value,
      _HEADS.value,
      _KV_HEADS.value,
      _HEAD_DIM.value,
      _LEFT.value,
  )
  seqs = _SEQ.value
  kernels = backend != "cpu" or _KERNELS_ON_CPU.value
  note = (
      f"{backend}: references and kernels"
      if backend != "cpu"
      else "CPU: kernels in interpret mode, times meaningless"
      if kernels
      else "CPU: only the XLA references are timed (the kernels would run in interpret mode)"
  )
  print(
      f"backend={backend} dtype={dtype.name} B={b} H={h} Hkv={hk} D={d} left={left}  [{note}]"
  )
  print(f"{'impl':14s} {'mode':8s} {'S':>6s} {'ms':>10s} {'TFLOP/s':>8s}")
  rows = []
  for s in seqs:
    keys = jax.random.split(jax.random.key(s), 6)
    q = jax.random.normal(keys[0], (b, s, h, d), dtype)
    kvs = [jax.random.normal(kk, (b, s, hk, d), dtype) for kk in keys[1:5]]
    gate = jax.nn.sigmoid(jax.random.normal(keys[5], (b, s, h)))
    args = (q, *kvs, gate)
    local_pairs, causal_pairs = band_pairs(s, left)
    dense_gib = b * h * s * s * 4 / 2**30
    for name, (fn, kind, dense) in impls(kernels, left).items():
      if kind == "gswa" and dense and dense_gib > _MAX_DENSE.value:
        print(
            f"{name:14s} {'-':8s} {s:6d}  skipped: dense S x S scores need {dense_gib:.1f} GiB"
        )
        continue
      pairs = b * h * (local_pairs + (causal_pairs if kind == "gswa" else 0))
      for mode in _MODES.value:
        if mode == "fwd":
          run = jax.jit(fn)
        else:
          run = jax.jit(
              jax.grad(
                  lambda *a, fn=fn: fn(*a).astype(jnp.float32).sum(),
                  argnums=(0, 1, 2, 3, 4, 5),
              )
          )
        sec = timed(run, args, _ITERS.value)
        flops = pairs * d * (4 if mode == "fwd" else 12)
        rows.append(
            dict(
                impl=name,
                mode=mode,
                seq=s,
                ms=sec * 1e3,
                tflops=flops / sec / 1e12,
            )
        )
        print(
            f"{name:14s} {mode:8s} {s:6d} {sec * 1e3:10.2f} {flops / sec / 1e12:8.3f}"
        )
  ratios = {}
  for r in rows:
    if r["seq"] == 32768:
      base = [
          x
          for x in rows
          if x["seq"] == 4096
          and x["impl"] == r["impl"]
          and x["mode"] == r["mode"]
      ]
      if base:
        ratios[f"{r['impl']}/{r['mode']}"] = r["ms"] / base[0]["ms"]
  for key, val in ratios.items():
    print(f"time(32k)/time(4k) {key}: {val:.2f}")
  print(
      json.dumps(
          dict(
              backend=backend,
              dtype=dtype.name,
              batch=b,
              heads=h,
              kv_heads=hk,
              head_dim=d,
              left=left,
              kernels_timed=kernels,
              note=note,
              results=rows,
              ratio_32k_4k=ratios,
          )
      )
  )


if __name__ == "__main__":
  cli.run(main)
