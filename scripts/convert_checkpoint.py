"""Convert a LoopCoder-V2 / PLT checkpoint between HF safetensors and our Orbax params directory.

    python scripts/convert_checkpoint.py --src=DIR --dst=DIR --to=orbax|hf|peft
        [--shard_size=5GB] [--dtype=bfloat16|float32|float16] [--overwrite]
        [--loops=R [--gate_bias=2.0]]

The source format is detected: a params directory (config.json + params/), a training workdir
(its final params/ export), one step of a run (WORKDIR/checkpoints/<step>) or an HF directory
(config.json + safetensors). Tokenizer files and the chat template are copied through (never
through a symlink that leads out of the source). An HF output carries the PyTorch modeling files,
so `AutoModelForCausalLM.from_pretrained(dst, trust_remote_code=True)` loads it; an R = 1 (or
Llama) model is written as a plain Llama directory. `--loops` writes the model with that loop
count: from an R = 1 or Llama checkpoint this upcycles it into a PLT for continued pretraining,
each new gate starting with zero weights and the bias `--gate_bias` (so g = sigmoid(bias)
everywhere; the rule and its promises are in loopcoder_jax/interop/upcycling.py). --overwrite
replaces a destination that holds a checkpoint, never another directory; a destination symlink is
followed. A LoRA run (workdir, export or step) converts to the merged model (`--to=hf|orbax`; its
base must be where it was, unchanged) or to its adapters in PEFT's format (`--to=peft`:
adapter_config.json + adapter_model.safetensors, module names those of the base's HF export);
per-loop adapters are refused by both (serve the workdir itself). Runs on the host CPU (JAX_PLATFORMS=cpu unless set).
Exit codes: 0 converted; 2 bad input (flags, a missing, damaged or unsafe source checkpoint, a
non-empty destination without --overwrite or one that is not a checkpoint, output that would hold
NaN or Inf, e.g. an upcycling gate bias its dtype cannot hold: one `error:` line on stderr); 1 the
destination ran out of space or is read-only (one line; nothing is left there).
"""

import os

from absl import flags

from loopcoder_jax import cli

# conversion is host work; keep accelerators free
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_SRC = flags.DEFINE_string(
    "src", None, "Source checkpoint directory (format detected).", required=True
)
_DST = flags.DEFINE_string(
    "dst",
    None,
    "Destination directory (must be empty unless --overwrite).",
    required=True,
)
_TO = flags.DEFINE_enum(
    "to",
    None,
    ["orbax", "hf", "peft"],
    "Output format (peft: a LoRA run's adapters).",
    required=True,
)
_SHARD_SIZE = flags.DEFINE_string(
    "shard_size",
    "5GB",
    "Max bytes per safetensors shard, e.g. 5GB, 500MB (HF output).",
)
_DTYPE = flags.DEFINE_enum(
    "dtype",
    None,
    ["bfloat16", "float16", "float32"],
    "Output dtype (default: keep every tensor's stored dtype).",
)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace a non-empty destination."
)
_LOOPS = flags.DEFINE_integer(
    "loops",
    None,
    "Loop count to write (default: the source's); from R = 1 it upcycles.",
)
_GATE_BIAS = flags.DEFINE_float(
    "gate_bias",
    None,
    "Bias of the gates added when upcycling (default 2.0: g = 0.88).",
)


def main():
  from loopcoder_jax import checkpoints
  from loopcoder_jax.interop import convert

  try:
    fmt = convert.convert_checkpoint(
        _SRC.value,
        _DST.value,
        _TO.value,
        shard_size=_SHARD_SIZE.value,
        dtype=_DTYPE.value,
        overwrite=_OVERWRITE.value,
        loops=_LOOPS.value,
        gate_bias=_GATE_BIAS.value,
    )
  except checkpoints.StorageError as e:
    raise cli.Failure(str(e)) from e
  print(
      f"converted {fmt} {os.path.abspath(_SRC.value)} -> {_TO.value} {os.path.abspath(_DST.value)}"
  )


if __name__ == "__main__":
  cli.run(main)
