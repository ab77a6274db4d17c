"""Convert a LoopCoder-V2 / PLT checkpoint between HF safetensors and our Orbax params directory.

    python scripts/convert_checkpoint.py --src=DIR --dst=DIR --to=orbax|hf
        [--shard_size=5GB] [--dtype=bfloat16|float32|float16] [--overwrite]

The source format is detected (a params directory has config.json + params/; an HF directory has
config.json + safetensors). Tokenizer files and the chat template are copied through. An HF output
carries the PyTorch modeling files, so `AutoModelForCausalLM.from_pretrained(dst,
trust_remote_code=True)` loads it. Runs on the host CPU (JAX_PLATFORMS=cpu unless set).
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # conversion is host work; keep accelerators free

from loopcoder_jax import convert  # noqa: E402


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--src", required=True, help="source checkpoint directory (format detected)")
  ap.add_argument("--dst", required=True, help="destination directory (must be empty unless --overwrite)")
  ap.add_argument("--to", required=True, choices=("orbax", "hf"))
  ap.add_argument("--shard_size", default=convert.DEFAULT_SHARD_SIZE,
                  help="max bytes per safetensors shard, e.g. 5GB, 500MB (HF output)")
  ap.add_argument("--dtype", default=None, choices=sorted(convert.DTYPES),
                  help="output dtype (default: keep every tensor's stored dtype)")
  ap.add_argument("--overwrite", action="store_true", help="replace a non-empty destination")
  args = ap.parse_args(argv)
  try:
    fmt = convert.convert_checkpoint(args.src, args.dst, args.to, shard_size=args.shard_size, dtype=args.dtype,
                                     overwrite=args.overwrite)
  except ValueError as e:
    print(f"convert_checkpoint: error: {e}", file=sys.stderr)
    return 2
  print(f"converted {fmt} {os.path.abspath(args.src)} -> {args.to} {os.path.abspath(args.dst)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
