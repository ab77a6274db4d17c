"""Decode latency and KV-cache size: R=1 vs PLT R=2 (batched loops) vs serial R=2, same weights.

    python scripts/bench_decode.py [--batches=1,8,32] [--contexts=512,4096] [--steps=10]
        [--dtype=float32|bfloat16] [--quantize=int8]

Model (defaults): d=1024, I=4096, L=4, H=16, K=4, D=64, V=8192, window 64, f32: 15M params (60 MB) per
layer, 310 MB in all. A decode step multiplies each weight with B*R rows, i.e. R*B/2 flops per weight
byte: at batch 1-8 an accelerator is bound by moving the weights (and, at long context and large batch,
the K/V cache), so R=2 rows cost what R=1 rows cost. XLA:CPU's matmuls are not: their time grows with
the rows (`layer_matmuls`: the layers' weight matmuls alone on B and 2B rows, timed in the same rounds),
which bounds PLT2/R1 from below on a CPU. The R=1 run uses the R=2 weights (the gate is unused).
`--layout`: per-layer buffers (default, what `generation.complete` uses on CPU) or stacked arrays (the
accelerator layout). Timing: the cache is filled to `context - steps - 2` tokens (values do not
change the cost: every step reads the whole preallocated cache), then `steps` rounds of one jitted
decode step (donated cache) per variant, interleaved so that load changes on a shared machine hit all
variants alike. Latency = median step time; ratios = median of the per-round ratios, and (`_min`) the
ratio of the fastest steps, the figure closest to an unloaded machine. `--dtype`: the weights' and
the compute dtype (default f32: this AVX2 CPU has no native bf16). `--quantize=int8` adds a variant
timed in the same rounds, PLT2_int8: PLT2 on the same weights made int8 (`model.quant`, a float32
scale per output channel; compute in `--dtype`), and the ratio PLT2_int8 / PLT2. Cache bytes are
measured from the cache pytree; the vanilla figure is what `R*L*S` K/V entries take (twice R=1's
K/V).
Prints a table and, as the last line, one JSON object.
Exit codes: 0 done; 2 bad flags (one `error:` line on stderr, before anything is compiled).
"""

from __future__ import annotations

import json
import statistics
import time

from absl import flags
import jax
import jax.numpy as jnp

from loopcoder_jax import cli, inference
from loopcoder_jax.inference import decode
from loopcoder_jax.model import quant
from loopcoder_jax.model.config import PLTConfig
from loopcoder_jax.model.transformer import (
    init_params,
    proj,
    unstack_layers,
)

VARIANTS = (
    ("R1", 1, "batched"),
    ("PLT2", 2, "batched"),
    ("serial2", 2, "serial"),
)

# bench_cfg reads these as attributes of one namespace named like the flags; the JSON "config" lists them
# (all but batches and contexts) in this order.
_FLAGS = (
    cli.define_int_list("batches", [1, 8, 32], "Batch sizes."),
    cli.define_int_list(
        "contexts",
        [512, 4096],
        "Cache lengths (preallocated K/V entries per sequence).",
    ),
    flags.DEFINE_integer(
        "steps",
        10,
        "Timed decode steps per variant (after one warm-up step).",
        lower_bound=1,
    ),
    *cli.define_model_shape(
        d=1024,
        ffn=4096,
        layers=4,
        heads=16,
        kv_heads=4,
        head_dim=64,
        vocab=8192,
        window=64,
    ),
    flags.DEFINE_enum(
        "layout",
        "per_layer",
        ["per_layer", "stacked"],
        "per_layer: L separate weight and cache buffers (model.unstack_layers), what "
        "generation.complete uses on CPU (default); stacked: [L, ...] arrays scanned over, the "
        "accelerator layout (on CPU 1.2-2.6x slower: XLA:CPU copies each layer's slices).",
    ),
    flags.DEFINE_enum(
        "dtype",
        "float32",
        ["float32", "bfloat16"],
        "Weights and compute dtype.",
    ),
    flags.DEFINE_enum(
        "quantize",
        None,
        ["int8"],
        "int8: also time PLT2 on the int8 weights (PLT2_int8).",
    ),
)


def bench_cfg(args, loops):
  return PLTConfig.tiny(
      loops,
      max_position_embeddings=65536,
      dtype=args.dtype,
      param_dtype=args.dtype,
      **cli.model_shape(args),
  )


def make_runner(cfg, params, batch, context, steps, mode):
  """A jitted step with a donated cache filled to `context - steps - 2` tokens; call it to time one step."""
  step = jax.jit(
      lambda p, c, t: decode.decode_step(cfg, p, c, t, mode), donate_argnums=1
  )
  state = {
      "cache": inference.init_cache(
          cfg, batch, context, inference.params_layout(params)
      ).replace(lengths=jnp.full((batch,), context - steps - 2, jnp.int32))
  }
  tok = jnp.zeros((batch,), jnp.int32)

  def run():
    t0 = time.perf_counter()
    logits, state["cache"] = step(params, state["cache"], tok)
    logits.block_until_ready()
    return time.perf_counter() - t0

  run()  # compile + warm up
  return run, state


def make_gemm_runner(params, rows):
  """The layers' weight matmuls alone (`model.proj`, each weight as one [in, out] matrix) on `rows`
  rows: what a decode step's L layers multiply, without attention or the cache.
  """
  layers = unstack_layers(params)["layers"]
  d = params["embed_tokens"]["embedding"].shape[1]
  mats = [
      w.reshape(w.shape[0], -1)
      if w.shape[0] == d
      else w.reshape(-1, w.shape[-1])
      for w in jax.tree.leaves(layers)
      if w.ndim >= 2
  ]
  fn = jax.jit(lambda ws, x: [proj(x[:, : w.shape[0]], w) for w in ws])
  x = jnp.ones((rows, max(w.shape[0] for w in mats)), mats[0].dtype)

  def run():
    t0 = time.perf_counter()
    jax.block_until_ready(fn(mats, x))
    return time.perf_counter() - t0

  run()
  return run, None


def time_interleaved(runners, steps):
  """Rounds of one step per variant, so load changes on a shared machine hit every variant alike.

  Per variant: median step time; per pair: median over rounds of the per-round time ratio.
  """
  times = {name: [] for name in runners}
  for _ in range(steps):
    for name, (run, _) in runners.items():
      times[name].append(run())

  def ratio(a, b):
    return statistics.median(x / y for x, y in zip(times[a], times[b]))

  return {n: (statistics.median(t), min(t)) for n, t in times.items()}, ratio


def main():
  return run(cli.flag_values(_FLAGS))


def run(args):
  batches, contexts = args.batches, args.contexts
  if min(contexts) < args.steps + 3:
    raise ValueError(
        f"every --contexts value must be >= --steps + 3 = {args.steps + 3}, got {min(contexts)}"
    )

  cfg2 = bench_cfg(args, 2)
  params = init_params(cfg2, jax.random.key(0))
  variants = list(VARIANTS)
  if args.quantize:
    cfg_q, params_q = quant.quantize_params(cfg2, params)
    variants.append(("PLT2_int8", 2, "batched"))
  if args.layout == "per_layer":
    params = unstack_layers(params)
    if args.quantize:
      params_q = unstack_layers(params_q)
  weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  rows, out = [], {
      "device": jax.devices()[0].device_kind,
      "weight_bytes": weight_bytes,
      **(
          {
              "int8_weight_bytes": sum(
                  x.size * x.dtype.itemsize for x in jax.tree.leaves(params_q)
              )
          }
          if args.quantize
          else {}
      ),
      "config": {
          k: v
          for k, v in vars(args).items()
          if k not in ("batches", "contexts")
      },
      "results": [],
  }
  print(
      f"# device={out['device']} weights={weight_bytes / 2**20:.0f} MiB  {out['config']}",
      flush=True,
  )
  hdr = (
      f"{'batch':>5} {'ctx':>5} | {'R1 ms':>8} {'PLT2 ms':>8} {'ser2 ms':>8} | {'R1 tok/s':>9} "
      f"{'PLT2 tok/s':>10} {'ser2 tok/s':>10} | {'PLT2/R1':>7} {'PLT2/ser2':>9} {'(min)':>11} {'mm 2B/B':>7} | "
      f"{'R1 cache MiB':>12} "
      f"{'PLT2 MiB':>9} {'vanilla2 MiB':>12} {'PLT2/R1 bytes':>13}"
      + (f" | {'int8 ms':>9} {'int8/PLT2':>9}" if args.quantize else "")
  )
  for batch in batches:
    for ctx in contexts:
      res = {"batch": batch, "context": ctx}
      runners = {
          name: make_runner(
              cfg_q if name == "PLT2_int8" else bench_cfg(args, loops),
              params_q if name == "PLT2_int8" else params,
              batch,
              ctx,
              args.steps,
              mode,
          )
          for name, loops, mode in variants
      }
      gemms = {
          "gemm_B": make_gemm_runner(params, batch),
          "gemm_2B": make_gemm_runner(params, 2 * batch),
      }
      sec, ratio = time_interleaved({**runners, **gemms}, args.steps)
      # PLT2 multiplies the layers' weights with 2B rows where R1 uses B: on a device that streams
      # the weights at its memory bandwidth both cost the same, so this ratio is ~1; above 1 it is
      # the matmul cost that bounds PLT2/R1 from below on this machine
      res["layer_matmuls"] = {
          "ms_B_rows": sec["gemm_B"][0] * 1e3,
          "ms_2B_rows": sec["gemm_2B"][0] * 1e3,
          "ratio_2B_over_B": ratio("gemm_2B", "gemm_B"),
      }
      for name, (_, state) in runners.items():
        nbytes = inference.cache_bytes(state["cache"])
        med, best = sec[name]
        res[name] = {
            "ms_per_token": med * 1e3,
            "min_ms_per_token": best * 1e3,
            "tokens_per_s": batch / med,
            "cache_bytes": nbytes,
        }
      c1 = runners["R1"][1]["cache"]
      # R*L*S, no carry
      res["vanilla2_cache_bytes"] = 2 * sum(
          x.nbytes for x in jax.tree.leaves((c1.k1, c1.v1))
      )
      del runners, c1
      res["plt2_over_r1_latency"] = ratio("PLT2", "R1")
      res["plt2_over_serial2_latency"] = ratio("PLT2", "serial2")
      # the fastest step of each variant: closest to an unloaded machine
      res["plt2_over_r1_latency_min"] = (
          res["PLT2"]["min_ms_per_token"] / res["R1"]["min_ms_per_token"]
      )
      res["plt2_over_serial2_latency_min"] = (
          res["PLT2"]["min_ms_per_token"] / res["serial2"]["min_ms_per_token"]
      )
      res["plt2_over_r1_cache"] = (
          res["PLT2"]["cache_bytes"] / res["R1"]["cache_bytes"]
      )
      int8 = ""
      if args.quantize:
        res["plt2_int8_over_plt2_latency"] = ratio("PLT2_int8", "PLT2")
        int8 = (
            f" | {res['PLT2_int8']['ms_per_token']:>9.2f} "
            f"{res['plt2_int8_over_plt2_latency']:>9.3f}"
        )
      out["results"].append(res)
      rows.append(
          f"{batch:>5} {ctx:>5} | {res['R1']['ms_per_token']:>8.2f} {res['PLT2']['ms_per_token']:>8.2f} "
          f"{res['serial2']['ms_per_token']:>8.2f} | {res['R1']['tokens_per_s']:>9.1f} "
          f"{res['PLT2']['tokens_per_s']:>10.1f} {res['serial2']['tokens_per_s']:>10.1f} | "
          f"{res['plt2_over_r1_latency']:>7.3f} {res['plt2_over_serial2_latency']:>9.3f} "
          f"{res['plt2_over_r1_latency_min']:>5.2f}/{res['plt2_over_serial2_latency_min']:<5.2f} "
          f"{res['layer_matmuls']['ratio_2B_over_B']:>7.3f} | "
          f"{res['R1']['cache_bytes'] / 2**20:>12.1f} {res['PLT2']['cache_bytes'] / 2**20:>9.1f} "
          f"{res['vanilla2_cache_bytes'] / 2**20:>12.1f} {res['plt2_over_r1_cache']:>13.4f}"
          + int8
      )
      print(rows[-1] if len(rows) > 1 else hdr + "\n" + rows[-1], flush=True)
  print(hdr)
  print("\n".join(rows))
  print(json.dumps(out))


if __name__ == "__main__":
  cli.run(main)
