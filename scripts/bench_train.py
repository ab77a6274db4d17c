"""Training throughput and MFU for R = 1, 2, 3 at equal parameters, with the matmul peak measured in the same run.

    python scripts/bench_train.py [--loops=1,2,3] [--steps=6] [--attention_impl=reference] [--dtype=float32]

Model (defaults): the issue's CPU reference, 4 layers, d=256, 4 heads of 64 (MHA), SwiGLU 1024,
vocab 32000, window 64, seq 256, batch 8; the same weights shape for every R (only the tiny gate
appears for R > 1). The step is the trainer's own (`train_step.make_train_fns` with the recipe
optimizer from `optim.make_optimizer`) on a one-device mesh: on CPU that device uses every core.
Useful FLOPs per token come from `flops.train_flops_per_token` (all R loops, causal attention,
lm_head; remat not counted). CPU-friendly defaults, each a flag: layers unrolled (`--scan_layers=0`,
same params and numbers as the scan), attention `reference` (jnp; on CPU about twice as fast as
`xla`'s `jax.nn.dot_product_attention`), plain logits loss (`--loss_chunk=0`; the chunked fused
head saves memory, not CPU time). Timing: after a compile-and-warm-up step, each round measures the
jitted fp32 (or `--dtype`) n x n matmul peak and then times one step; a shared machine only ever
slows things down, so the best step time and the best peak of the run are reported, and MFU is
their ratio. That ratio is biased low on a loaded host (a short peak measurement finds a quiet
moment more easily than a long step), so each step is also paired with the mean of the peaks
measured just before and just after it (MFU paired: the best and the median pair are shown); the
paired median is the figure to read on a shared host.
Prints a table and, as the last line, one JSON object.
Exit codes: 0 done; 2 bad flags (one `error:` line on stderr, before anything is compiled); 1 a
loss went non-finite.
"""

from __future__ import annotations

import json
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from loopcoder_jax import (
    cli,  # noqa: E402
    hardware,  # noqa: E402
)
from loopcoder_jax.model import (
    flops,  # noqa: E402
    sharding,  # noqa: E402
)
from loopcoder_jax.model.config import (  # noqa: E402
    ATTENTION_IMPLS,
    DTYPES,
    REMAT_POLICIES,
    PLTConfig,
)
from loopcoder_jax.train import optim
from loopcoder_jax.train import step as train_step

# bench_cfg / bench_loops read these as attributes of one namespace named like the flags.
_FLAGS = (
    cli.define_int_list("loops", [1, 2, 3], "Loop counts R to benchmark."),
    flags.DEFINE_integer(
        "steps", 6, "Timed steps per R (after one warm-up step).", lower_bound=1
    ),
    flags.DEFINE_integer("batch", 8, "Batch size.", lower_bound=1),
    flags.DEFINE_integer("seq", 256, "Sequence length.", lower_bound=2),
    *cli.define_model_shape(
        d=256,
        ffn=1024,
        layers=4,
        heads=4,
        kv_heads=4,
        head_dim=64,
        vocab=32000,
        window=64,
    ),
    flags.DEFINE_enum(
        "dtype",
        "float32",
        DTYPES,
        "Compute dtype (also the dtype of the measured matmul peak).",
    ),
    flags.DEFINE_enum(
        "attention_impl",
        "reference",
        ATTENTION_IMPLS,
        "Attention implementation.",
    ),
    flags.DEFINE_enum("remat", "none", REMAT_POLICIES, "Remat policy."),
    flags.DEFINE_integer(
        "scan_layers",
        0,
        "1: nn.scan over layers; 0 (default): unrolled, ~15% faster on CPU "
        "(no stacked residual slicing in the backward pass).",
        lower_bound=0,
        upper_bound=1,
    ),
    flags.DEFINE_integer(
        "loss_chunk",
        0,
        "Sequence positions per step of the fused head + cross-entropy "
        "(0: plain logits path).",
        lower_bound=0,
    ),
    flags.DEFINE_integer(
        "peak_n", 2048, "Matmul size for the measured peak.", lower_bound=1
    ),
)


def bench_cfg(args, loops: int) -> PLTConfig:
  return PLTConfig.tiny(
      loops,
      max_position_embeddings=max(4096, args.seq),
      **cli.model_shape(args),
  ).with_runtime(
      dtype=args.dtype,
      attention_impl=args.attention_impl,
      remat_policy=args.remat,
      scan_layers=bool(args.scan_layers),
      loss_chunk=args.loss_chunk,
  )


def random_batch(
    cfg: PLTConfig, batch: int, seq: int, seed: int = 0
) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.vocab_size, (batch, seq + 1), dtype=np.int32)
  return {
      "inputs": tokens[:, :-1],
      "targets": tokens[:, 1:],
      "segment_ids": np.ones((batch, seq), np.int32),
      "positions": np.broadcast_to(
          np.arange(seq, dtype=np.int32), (batch, seq)
      ).copy(),
      "loss_mask": np.ones((batch, seq), np.float32),
  }


def bench_loops(args, loops: int, device, peak_dtype) -> dict:
  cfg = bench_cfg(args, loops)
  mesh = sharding.make_mesh(
      {"data": 1, "fsdp": 1, "tensor": 1}, devices=[device]
  )
  tx, _ = optim.make_optimizer(optim.default_optim_config(), total_steps=1000)
  init_fn, step_fn, _ = train_step.make_train_fns(
      cfg, tx, mesh, sharding.DEFAULT_RULES
  )
  state = init_fn(jax.random.key(0))
  batch = {
      k: jax.device_put(v, device)
      for k, v in random_batch(cfg, args.batch, args.seq).items()
  }
  t0 = time.perf_counter()
  state, metrics = step_fn(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  step_times, peaks, cpu_times = [], [], []

  def measure_peak():
    return hardware.measure_matmul_peak(
        peak_dtype, n=args.peak_n, repeats=2, device=device
    )

  peaks.append(measure_peak())
  for _ in range(args.steps):
    t0, c0 = time.perf_counter(), time.process_time()
    state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    step_times.append(time.perf_counter() - t0)
    cpu_times.append(time.process_time() - c0)
    peaks.append(measure_peak())
  loss = float(metrics["loss"])
  if not np.isfinite(loss):
    raise cli.Failure(f"R={loops}: loss is {loss}")
  fpt = flops.train_flops_per_token(cfg, args.seq)
  tokens = args.batch * args.seq
  # Each step against the mean of the peaks measured just before and just after it.
  paired = [
      hardware.mfu(tokens / t, fpt, (p0 + p1) / 2)
      for t, p0, p1 in zip(step_times, peaks, peaks[1:])
  ]
  return {
      "loops": loops,
      "params": cfg.num_params(),
      "flops_per_token": fpt,
      "step_s_best": min(step_times),
      "step_s_median": statistics.median(step_times),
      "step_cpu_s_median": statistics.median(cpu_times),
      "compile_s": compile_s,
      "peak_flops": max(peaks),
      "peak_flops_median": statistics.median(peaks),
      "mfu_paired_best": max(paired),
      "mfu_paired_median": statistics.median(paired),
      "loss": loss,
  }


def main():
  return run(cli.flag_values(_FLAGS))


def run(args):
  loops = args.loops
  device = jax.devices()[0]
  peak_dtype = jnp.dtype(args.dtype)
  rows = [bench_loops(args, r, device, peak_dtype) for r in loops]
  # the machine's peak: best seen over the whole run
  peak = max(r["peak_flops"] for r in rows)
  tokens = args.batch * args.seq
  for r in rows:
    r["tokens_per_s"] = tokens / r["step_s_best"]
    r["tokens_per_s_median"] = tokens / r["step_s_median"]
    r["mfu"] = hardware.mfu(r["tokens_per_s"], r["flops_per_token"], peak)

  print(
      f"backend={device.platform} ({device.device_kind}), {args.dtype}, attention={args.attention_impl}, "
      f"remat={args.remat}, scan_layers={args.scan_layers}, batch={args.batch} x seq={args.seq}, measured {args.dtype} matmul peak "
      f"{peak / 1e9:.1f} GFLOP/s"
  )
  print(
      f"{'R':>2} {'params':>10} {'MFLOP/tok':>10} {'step s':>8} {'(median)':>8} {'tok/s':>8} "
      f"{'(median)':>8} {'MFU':>6} {'paired best':>11} {'(median)':>8} {'compile s':>9}"
  )
  for r in rows:
    print(
        f"{r['loops']:>2} {r['params']:>10,} {r['flops_per_token'] / 1e6:>10.1f} {r['step_s_best']:>8.3f} "
        f"{r['step_s_median']:>8.3f} {r['tokens_per_s']:>8.0f} {r['tokens_per_s_median']:>8.0f} "
        f"{r['mfu']:>6.1%} {r['mfu_paired_best']:>11.1%} {r['mfu_paired_median']:>8.1%} {r['compile_s']:>9.1f}"
    )
  print(
      json.dumps(
          {
              "backend": device.platform,
              "device_kind": device.device_kind,
              "dtype": args.dtype,
              "attention_impl": args.attention_impl,
              "remat": args.remat,
              "scan_layers": args.scan_layers,
              "batch": args.batch,
              "seq": args.seq,
              "peak_flops": peak,
              "results": rows,
          }
      )
  )


if __name__ == "__main__":
  cli.run(main)
