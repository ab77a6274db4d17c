"""Peak host memory (RSS) of checkpoint conversion on a synthetic checkpoint of >= 1B parameters.

    python scripts/bench_convert.py [--params=1.05e9] [--dtype=bfloat16] [--shard_size=1GB]
                                    [--workdir=DIR]

Writes a random HF checkpoint (LoopCoder-V2 layout at d=2048, H=16, K=8, D=128, I=5632, V=32000, R=2,
as many layers as reach --params), then converts HF -> HF (re-shard: our reader and writer alone),
HF -> Orbax and Orbax -> HF, each in a fresh process, and reads that process's peak RSS (`os.wait4`
rusage, ru_maxrss) next to a baseline process that only imports the converter and starts JAX.
Streaming target: peak RSS about one copy of the weights (checkpoint bytes) plus the baseline. The
round trip is checked tensor by tensor (bytes equal).
Loading for use (`hf_io.load_hf_sharded`, what `interop.load` runs) is measured onto one CPU device
and onto `--load_devices` fake CPU devices (mesh `tensor` = all of them): there the devices' arrays
are host memory too, so the loader's own transient memory is the peak minus the process's RSS before
the load minus the bytes the devices hold; it is reported against the largest shard file.
Prints a table and, as the last line, one JSON object.
Exit codes: 0 done; 2 bad flags (one `error:` line on stderr, before any process starts); 1 a
phase failed or the round trip changed a tensor.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

from absl import flags, logging

from loopcoder_jax import cli

PHASES = (
    "baseline",
    "write_hf",
    "hf_to_hf",
    "hf_to_orbax",
    "orbax_to_hf",
    "verify",
    "load_1",
    "load_mesh",
)
LOADS = ("load_1", "load_mesh")

# run_phase / measure read these as attributes of one namespace named like the flags.
_FLAGS = (
    flags.DEFINE_float("params", 1.05e9, "Synthetic model size (parameters)."),
    flags.DEFINE_enum(
        "dtype",
        "bfloat16",
        ["bfloat16", "float32", "float16"],
        "Checkpoint dtype.",
    ),
    flags.DEFINE_string(
        "shard_size",
        "1GB",
        "Safetensors shard size of the written checkpoints.",
    ),
    flags.DEFINE_string(
        "workdir",
        None,
        "Scratch directory, empty or new (default: a temp dir, removed).",
    ),
    flags.DEFINE_integer(
        "load_devices",
        8,
        "Fake CPU devices of the sharded load (mesh tensor=N).",
        lower_bound=1,
    ),
    flags.DEFINE_enum(
        "phase",
        None,
        PHASES,
        "Internal: run one phase in this process (the parent starts "
        "one child per phase).",
    ),
)


def bench_cfg(params_target: float, dtype: str):
  from loopcoder_jax.model.config import PLTConfig

  base = dict(
      vocab_size=32000,
      hidden_size=2048,
      intermediate_size=5632,
      num_attention_heads=16,
      num_key_value_heads=8,
      head_dim=128,
      max_position_embeddings=4096,
      plt_num_loops=2,
      torch_dtype=dtype,
  )
  one = PLTConfig(num_hidden_layers=1, **base)
  two = PLTConfig(num_hidden_layers=2, **base)
  per_layer = two.num_params() - one.num_params()
  layers = max(
      1, -int(-(params_target - (one.num_params() - per_layer)) // per_layer)
  )
  return PLTConfig(num_hidden_layers=layers, **base)


def run_phase(args, phase: str) -> None:
  """Body of one child process."""
  import numpy as np

  from loopcoder_jax.checkpoints import hf_names
  from loopcoder_jax.checkpoints import safetensors_io as st
  from loopcoder_jax.interop import convert

  hf, orbax, hf2, resharded = (
      os.path.join(args.workdir, n) for n in ("hf", "orbax", "hf2", "resharded")
  )
  if phase == "baseline":
    import jax

    jax.numpy.zeros(1).block_until_ready()
  elif phase == "write_hf":
    cfg = bench_cfg(args.params, args.dtype)
    os.makedirs(hf)
    entries = []
    for i, s in enumerate(hf_names.plan(cfg)):

      def produce(s=s, i=i):
        rng = np.random.default_rng(i)
        return (rng.standard_normal(s.hf_shape, np.float32) * 0.02).astype(
            st.DTYPES[args.dtype]
        )

      entries.append(st.Entry(s.key, s.hf_shape, args.dtype, produce))
    st.write_sharded(hf, entries, args.shard_size)
    cfg.to_hf_file(os.path.join(hf, "config.json"))
  # our streaming path alone (re-shard): no Orbax in the process
  elif phase == "hf_to_hf":
    convert.convert_checkpoint(hf, resharded, "hf", shard_size="300MB")
    shutil.rmtree(resharded)
  elif phase == "hf_to_orbax":
    convert.convert_checkpoint(hf, orbax, "orbax")
  elif phase == "orbax_to_hf":
    convert.convert_checkpoint(orbax, hf2, "hf", shard_size=args.shard_size)
  elif phase in LOADS:
    _load_phase(args, phase, hf)
  elif phase == "verify":
    from safetensors import safe_open

    a, b = st.weight_files(hf), st.weight_files(hf2)
    if sorted(a) != sorted(b):
      raise cli.Failure("round trip changed the key set")
    for k in a:
      with safe_open(a[k], "numpy") as fa, safe_open(b[k], "numpy") as fb:
        x, y = fa.get_tensor(k), fb.get_tensor(k)
        if x.dtype != y.dtype or x.tobytes() != y.tobytes():
          raise cli.Failure(f"round trip changed {k}")


def _load_phase(args, phase: str, hf: str) -> None:
  """Load `hf` onto one device or a tensor mesh; record the RSS before and the bytes placed."""
  import resource

  import jax

  from loopcoder_jax.checkpoints import hf_io
  from loopcoder_jax.model import sharding
  from loopcoder_jax.model.transformer import abstract_params

  jax.numpy.zeros(1).block_until_ready()
  cfg = hf_io.read_hf_config(hf)
  target = abstract_params(cfg)
  if phase == "load_1":
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: one, target)
  else:
    mesh = sharding.make_mesh({"tensor": -1})
    shardings = sharding.param_shardings(target, mesh)
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  _, params = hf_io.load_hf_sharded(hf, shardings)
  placed = sum(
      s.data.nbytes
      for x in jax.tree.leaves(params)
      for s in x.addressable_shards
  )
  with open(os.path.join(args.workdir, f"{phase}.json"), "w") as f:
    json.dump(
        {
            "rss_before": before,
            "device_bytes": placed,
            "devices": len(jax.devices()),
        },
        f,
    )


def measure(args, phase: str) -> int:
  """Peak RSS in bytes of a child process running `phase`."""
  cmd = [
      sys.executable,
      os.path.abspath(__file__),
      f"--phase={phase}",
      f"--workdir={args.workdir}",
      f"--params={args.params}",
      f"--dtype={args.dtype}",
      f"--shard_size={args.shard_size}",
  ]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  if phase == "load_mesh":
    env["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={args.load_devices}"
    )
  proc = subprocess.Popen(cmd, env=env)
  _, status, usage = os.wait4(proc.pid, 0)
  if os.waitstatus_to_exitcode(status) != 0:
    raise cli.Failure(f"phase {phase} failed")
  return usage.ru_maxrss * 1024  # KiB on Linux


def dir_bytes(path: str, suffix: str = "") -> int:
  return sum(
      os.path.getsize(os.path.join(d, f))
      for d, _, fs in os.walk(path)
      for f in fs
      if f.endswith(suffix)
  )


def main():
  if not flags.FLAGS["verbosity"].present:
    # Orbax logs every save and restore at INFO
    logging.set_verbosity(logging.WARNING)
  return run(cli.flag_values(_FLAGS))


def run(args):
  if args.phase:
    return run_phase(args, args.phase)
  if args.params <= 0:
    raise ValueError(f"--params must be positive, got {args.params}")
  if args.workdir and os.path.isdir(args.workdir) and os.listdir(args.workdir):
    raise ValueError(f"--workdir {args.workdir} is not empty")
  import numpy as np

  from loopcoder_jax.checkpoints import safetensors_io as st

  # before the children start: a bad size would otherwise fail inside write_hf
  st.parse_size(args.shard_size)
  own = args.workdir is None
  args.workdir = args.workdir or tempfile.mkdtemp(prefix="bench_convert-")
  try:
    cfg = bench_cfg(args.params, args.dtype)
    rss = {p: measure(args, p) for p in PHASES}
    weights = dir_bytes(os.path.join(args.workdir, "hf"), ".safetensors")
    headers = st.read_headers(st.weight_files(os.path.join(args.workdir, "hf")))
    tensor_bytes = sum(
        int(np.prod(shape)) * st.DTYPES[dtype].itemsize
        for shape, dtype in headers.values()
    )
    largest = max(
        os.path.getsize(os.path.join(args.workdir, "hf", f))
        for f in os.listdir(os.path.join(args.workdir, "hf"))
        if f.endswith(".safetensors")
    )
    loads = {}
    for p in LOADS:
      with open(os.path.join(args.workdir, f"{p}.json")) as f:
        loads[p] = json.load(f)
      loads[p]["transient_bytes"] = (
          rss[p] - loads[p]["rss_before"] - loads[p]["device_bytes"]
      )
      loads[p]["transient_per_largest_shard"] = round(
          loads[p]["transient_bytes"] / largest, 3
      )
  finally:
    if own:
      shutil.rmtree(args.workdir, ignore_errors=True)
  gib = 2.0**30
  print(
      f"synthetic checkpoint: {cfg.num_params() / 1e9:.3f}B params, L={cfg.num_hidden_layers}, {args.dtype}, "
      f"{weights / gib:.2f} GiB of safetensors, shards <= {args.shard_size}"
  )
  print(
      f"{'phase':<14}{'peak RSS GiB':>14}{'minus baseline':>16}{'/ checkpoint':>14}"
  )
  for p in PHASES:
    extra = rss[p] - rss["baseline"]
    print(
        f"{p:<14}{rss[p] / gib:>14.2f}{extra / gib:>16.2f}{extra / weights:>14.2f}"
    )
  print(
      f"\nloading for use (largest shard {largest / gib:.2f} GiB):\n"
      f"{'phase':<14}{'devices':>8}{'placed GiB':>12}{'transient GiB':>15}"
      f"{'/ largest shard':>17}"
  )
  for p, r in loads.items():
    print(
        f"{p:<14}{r['devices']:>8}{r['device_bytes'] / gib:>12.2f}"
        f"{r['transient_bytes'] / gib:>15.2f}{r['transient_per_largest_shard']:>17.2f}"
    )
  print(
      json.dumps(
          {
              "params": cfg.num_params(),
              "dtype": args.dtype,
              "checkpoint_bytes": weights,
              "tensor_bytes": tensor_bytes,
              "largest_shard_bytes": largest,
              "loads": loads,
              "peak_rss_bytes": rss,
              "over_baseline_per_checkpoint_byte": {
                  p: round((rss[p] - rss["baseline"]) / weights, 3)
                  for p in PHASES
              },
          }
      )
  )


if __name__ == "__main__":
  cli.run(main)
