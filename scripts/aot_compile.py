"""Compile the training step (and the serving prefill/decode steps) for a TPU slice on this host.

    python scripts/aot_compile.py --config=configs/<name>.py --topology=v5p:4x4x4 [--num_slices=N]
        [--what=train,prefill,decode] [--serve_batch=1,8,32] [--serve_len=8192,32768]
        [--prefill_len=8192] [--prefill_chunk=512] [--serve_mesh=tensor=4]
        [--config.<key>=<value> ...]

Needs libtpu (`pip install 'jax[tpu]'`), no TPU. Topologies: v5e, v5p, v6e and v2 (`v2:2x2` = a
v2-8). Training uses the config's mesh, rules, batch, sequence length and model runtime (dtype,
remat policy, attention); serving compiles `decode.make_serving_fns` for the config's model at every
`--serve_batch` x `--serve_len` (cache length; prompts of `--prefill_len`, default the cache length)
with the params sharded by the same rules over `--serve_mesh` and the KV cache split over kv heads
(`decode.serving_shardings`, what `generate.py --mesh` runs). For each step:
per-device memory against the chip's HBM (or the compiler's refusal, in one line), useful FLOPs per
device per step, compile time. Prints one line per step and, as the last line, one JSON object.
Exit codes: 0 done (a step that does not fit is reported, not an error); 2 bad input (flags,
config, topology, no libtpu: one `error:` line on stderr).
"""

import json
import os

from absl import flags

from loopcoder_jax import cli

# the host runs nothing; TPU devices are compile-only
os.environ.setdefault("JAX_PLATFORMS", "cpu")

WHATS = ("train", "prefill", "decode")
_CONFIGS = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "configs"
)
cli.define_config_flag(os.path.join(_CONFIGS, "tiny_cpu.py"))
_TOPOLOGY = flags.DEFINE_string(
    "topology", "v5e:2x2", "TPU slice, CHIP:AxB[xC] (v5e, v5p, v6e)."
)
_NUM_SLICES = flags.DEFINE_integer(
    "num_slices",
    1,
    "Slices joined over DCN (the data axis spans them).",
    lower_bound=1,
)
_WHAT = cli.define_choice_list("what", ["train"], WHATS, "Steps to compile.")
_SERVE_BATCH = cli.define_int_list(
    "serve_batch", [32], "Serving batches (prefill and decode)."
)
_SERVE_LEN = cli.define_int_list(
    "serve_len", [8192], "Serving contexts: cache lengths."
)
_PREFILL_LEN = flags.DEFINE_integer(
    "prefill_len",
    0,
    "Prompt length of the prefill (0: the cache length).",
    lower_bound=0,
)
_PREFILL_CHUNK = flags.DEFINE_integer(
    "prefill_chunk",
    0,
    "Chunked prefill size (0 = whole prompt at once).",
    lower_bound=0,
)
_SERVE_MESH = cli.define_mesh(
    "serve_mesh", "tensor=-1", "Serving mesh, e.g. data=2,tensor=2."
)


def _line(r):
  head = (
      f"{r['what']:8s} {r['topology']}x{r['num_slices']} mesh={r['mesh']} R={r['loops']} "
      f"flops/device={r['flops_per_device']:.3e} compile={r['compile_s']:.1f}s"
  )
  if "max_len" in r:
    head += f" batch={r['batch']} len={r['max_len']}"
  if "peak_bytes" not in r:
    return f"{head}  DOES NOT FIT: {r['error']}"
  gib = 2**30
  extra = (
      f" cache/device={r['cache_bytes_per_device'] / gib:.2f} GiB"
      if "cache_bytes_per_device" in r
      else ""
  )
  return (
      f"{head}  peak/device={r['peak_bytes'] / gib:.2f} GiB of {r['hbm_bytes'] / gib:.1f} GiB "
      f"({r['hbm_fraction']:.0%}) temp={r['temp_bytes'] / gib:.2f} GiB{extra} fits={r['fits']}"
  )


def main():
  from loopcoder_jax.scaling import aot
  from loopcoder_jax.train import config as train_config

  config = flags.FLAGS.config
  what = _WHAT.value
  aot.parse_topology(_TOPOLOGY.value)
  mesh_cfg = _SERVE_MESH.value
  reports = []
  if "train" in what:
    reports.append(
        aot.compile_train(config, _TOPOLOGY.value, _NUM_SLICES.value)
    )
    print(_line(reports[-1]), flush=True)
  serve = [w for w in what if w != "train"]
  if serve:
    cfg = train_config.model_config_from(config)
    for max_len in _SERVE_LEN.value:
      if _PREFILL_LEN.value > max_len:
        raise ValueError(
            f"--prefill_len={_PREFILL_LEN.value} exceeds --serve_len={max_len}"
        )
    for batch in _SERVE_BATCH.value:
      for max_len in _SERVE_LEN.value:
        for r in aot.compile_serving(
            cfg,
            _TOPOLOGY.value,
            batch=batch,
            max_len=max_len,
            prefill_len=_PREFILL_LEN.value or None,
            chunk=_PREFILL_CHUNK.value,
            mesh_cfg=mesh_cfg,
            num_slices=_NUM_SLICES.value,
            what=serve,
        ):
          reports.append(r)
          print(_line(r), flush=True)
  print(json.dumps({"config": config.name, "reports": reports}, default=str))


if __name__ == "__main__":
  cli.run(main)
