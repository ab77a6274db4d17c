"""Decode roofline on TPU: estimated step time of R = 1, PLT-R (batched loops) and serial R.

    python scripts/roofline.py [--config=configs/loopcoder_v2_7b.py:2] [--topology=v5e:2x4]
        [--mesh=tensor=-1] [--batches=1,8,32] [--contexts=4096,32768] [--quantize=int8]
        [--config.<key>=<value> ...]

Needs libtpu (`pip install 'jax[tpu]'`), no TPU. For each batch x context (cache length) and each
variant, the decode step is compiled for the slice as `generate.py --mesh` serves it (params by the
sharding rules, the KV cache over kv heads, bf16 params: the config's compute dtype), and again with
its layer loop unrolled so that XLA's cost analysis counts every layer. Per device: FLOPs and bytes
accessed (XLA's counts, and the floor no implementation avoids: weights once per pass over the
layers, the KV cache once per pass that reads it), estimated step time = max(FLOPs / peak FLOP/s,
bytes / HBM bandwidth) with `hardware.PEAKS`, whether the served step fits, and the ratios PLT/R1 and
PLT/serial. --quantize=int8: the linear weights int8 with a float32 scale per output channel, as
`generate.py --quantize=int8` serves them (they stream at one byte each). Method:
`loopcoder_jax/scaling/roofline.py`. Compile-only: nothing is timed.
Prints a table and, as the last line, one JSON object.
Exit codes: 0 done (a step that does not fit is reported, not an error); 2 bad input (flags,
config, topology, no libtpu: one `error:` line on stderr).
"""

import json
import os

from absl import flags

from loopcoder_jax import cli

# the host runs nothing; TPU devices are compile-only
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_CONFIGS = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "configs"
)
cli.define_config_flag(os.path.join(_CONFIGS, "loopcoder_v2_7b.py"))
_TOPOLOGY = flags.DEFINE_string(
    "topology", "v5e:2x4", "TPU slice, CHIP:AxB[xC] (v2, v5e, v5p, v6e)."
)
_MESH = cli.define_mesh("mesh", "tensor=-1", "Serving mesh.")
_BATCHES = cli.define_int_list("batches", [1, 8, 32], "Decode batches.")
_CONTEXTS = cli.define_int_list(
    "contexts", [4096, 32768], "Contexts (KV cache lengths)."
)
_QUANTIZE = flags.DEFINE_enum(
    "quantize", None, ["int8"], "int8: int8 linear weights (model/quant.py)."
)


def _ms(row, est):
  return f"{row[est]['step_s'] * 1e3:8.3f}" if est in row else "       -"


def main():
  from loopcoder_jax.scaling import aot, roofline
  from loopcoder_jax.train import config as train_config

  aot.parse_topology(_TOPOLOGY.value)
  cfg = train_config.model_config_from(flags.FLAGS.config)
  cfg = cfg.with_runtime(param_dtype=cfg.runtime.dtype)
  if _QUANTIZE.value:
    cfg = cfg.with_runtime(quantize=_QUANTIZE.value)
  roofline.variants(cfg)  # R >= 2, before anything is compiled
  gib = 2**30
  print(
      f"{'variant':<9}{'batch':>6}{'ctx':>7}{'fits':>6}{'peak GiB':>9}"
      f"{'XLA GFLOP':>10}{'XLA GB':>8}{'XLA ms':>9}{'floor GB':>9}"
      f"{'floor ms':>9}{'colls':>6}",
      flush=True,
  )

  def log(name, r):
    peak = f"{r['peak_bytes'] / gib:9.2f}" if "peak_bytes" in r else "        -"
    xla = r.get("xla", {})
    print(
        f"{name:<9}{r['batch']:>6}{r['context']:>7}{str(r['fits']):>6}{peak}"
        f"{xla.get('flops', float('nan')) / 1e9:>10.2f}"
        f"{xla.get('bytes', float('nan')) / 1e9:>8.2f}{_ms(r, 'xla')}"
        f"{r['floor']['bytes'] / 1e9 if 'floor' in r else float('nan'):>9.2f}"
        f"{_ms(r, 'floor')}{r.get('collectives', '-'):>6}",
        flush=True,
    )

  points = roofline.table(
      cfg,
      _TOPOLOGY.value,
      _BATCHES.value,
      _CONTEXTS.value,
      mesh_cfg=_MESH.value,
      log=log,
  )
  print("\nratios of estimated step times (XLA counts | floor):")
  for p in points:
    text = "  ".join(
        f"{k}: {p['ratios'].get('xla', {}).get(k, float('nan')):.3f} | {v:.3f}"
        for k, v in p["ratios"].get("floor", {}).items()
    )
    print(f"batch {p['batch']:>3} ctx {p['context']:>6}  {text}")
  print(
      json.dumps(
          {
              "config": flags.FLAGS.config.name,
              "topology": _TOPOLOGY.value,
              "quantize": _QUANTIZE.value,
              "points": points,
          },
          default=str,
      )
  )


if __name__ == "__main__":
  cli.run(main)
