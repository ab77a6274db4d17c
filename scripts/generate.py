"""Generate text with a PLT checkpoint, printing the completion as it is produced.

    python scripts/generate.py --checkpoint=DIR --prompt="def fib(n):" [--chat]
        [--max_new_tokens=128 --temperature=0 --top_k=0 --top_p=1 --seed=0 --loops=R
         --mode=batched|serial --prefill_chunk=0 --dtype=float32 --tokenizer=PATH]

DIR is a params directory (config.json + Orbax params/), a training workdir (its `params/` and
`tokenizer/`) or an HF directory (config.json + safetensors). The tokenizer is read from DIR (or
DIR/tokenizer, or --tokenizer). Temperature 0 is greedy. Several --prompt flags make a batch of prompts
of different lengths (printed when done); a single prompt streams token by token through the
generation loop's host callback.
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

from loopcoder_jax import checkpoint, convert, decode, sampling
from loopcoder_jax import tokenizer as tok_lib


def resolve(path: str) -> tuple[str, str]:
  """(weights directory, its format) for a params dir, a training workdir or an HF dir."""
  if not os.path.isdir(path):
    raise ValueError(f"--checkpoint {path} is not a directory")
  if checkpoint.is_params_dir(path):
    return path, "orbax"
  if checkpoint.is_params_dir(os.path.join(path, "params")):
    return os.path.join(path, "params"), "orbax"
  if os.path.isdir(os.path.join(path, "checkpoints")):
    raise ValueError(f"{path} is a training workdir without a final params/ export (training has not "
                     "finished); convert a step first or wait for the run to end")
  return path, convert.detect_format(path)


def find_tokenizer(path: str, weights_dir: str, override: str | None):
  if override:
    return tok_lib.load_tokenizer(override)
  for d in (weights_dir, path, os.path.join(path, "tokenizer")):
    if any(os.path.isfile(os.path.join(d, f)) for f in (tok_lib.TOKENIZER_JSON, tok_lib.TOKENIZER_MODEL)):
      return tok_lib.load_tokenizer(d)
  raise ValueError(f"no tokenizer (tokenizer.json or tokenizer.model) in {path}, {weights_dir} or "
                   f"{os.path.join(path, 'tokenizer')}; pass --tokenizer")


def load_model(path: str, dtype: str):
  weights_dir, fmt = resolve(path)
  if fmt == "orbax":
    cfg, params = convert.load_orbax(weights_dir, dtype)
  else:
    cfg, params = convert.load_hf(weights_dir, dtype)
    params = jax.tree.map(jnp.asarray, params)
  return cfg.with_runtime(dtype=dtype, param_dtype=dtype), params, weights_dir


def parse_args(argv):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--checkpoint", required=True)
  ap.add_argument("--prompt", action="append", required=True, help="repeat for a batch of prompts")
  ap.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
  ap.add_argument("--max_new_tokens", type=int, default=128)
  ap.add_argument("--temperature", type=float, default=0.0)
  ap.add_argument("--top_k", type=int, default=0)
  ap.add_argument("--top_p", type=float, default=1.0)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--loops", type=int, default=0, help="loops to run (default: the checkpoint's)")
  ap.add_argument("--mode", choices=decode.MODES, default="batched")
  ap.add_argument("--prefill_chunk", type=int, default=0, help="0: whole prompt in one forward")
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  ap.add_argument("--tokenizer", default=None, help="tokenizer file or directory (default: from DIR)")
  return ap.parse_args(argv)


def main(argv=None, out=None) -> list[str]:
  out = out or sys.stdout
  args = parse_args(argv)
  sampler = sampling.make_sampler(args.temperature, args.top_k, args.top_p)
  if args.max_new_tokens < 1:
    raise ValueError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
  if args.prefill_chunk < 0:
    raise ValueError(f"--prefill_chunk must be >= 0, got {args.prefill_chunk}")
  cfg, params, weights_dir = load_model(args.checkpoint, args.dtype)
  tok = find_tokenizer(args.checkpoint, weights_dir, args.tokenizer)
  tok_lib.check_vocab(tok, cfg.vocab_size)
  if args.loops:
    if args.loops > 1 and cfg.plt_num_loops == 1:
      raise ValueError(f"--loops={args.loops}: the checkpoint has no PLT gate (trained with 1 loop)")
    cfg = cfg.replace(plt_num_loops=args.loops)

  prompts = [tok.apply_chat_template([{"role": "user", "content": p}]) if args.chat else p for p in args.prompt]
  ids = [tok.encode(p, add_bos=tok.add_bos_token and not args.chat) for p in prompts]
  if min(len(i) for i in ids) == 0:
    raise ValueError("a prompt encodes to no tokens")
  plen = max(len(i) for i in ids)
  max_len = plen + args.max_new_tokens
  if max_len > cfg.max_position_embeddings:
    raise ValueError(f"prompt ({plen} tokens) + --max_new_tokens={args.max_new_tokens} exceed the model's "
                     f"max_position_embeddings={cfg.max_position_embeddings}")
  stop = sampling.StopRule(args.max_new_tokens, tuple(sorted(set(tok.eos_ids) | set(cfg.eos_ids))))
  pad = tok.pad_id if tok.pad_id is not None else 0
  tokens = jnp.asarray([i + [pad] * (plen - len(i)) for i in ids], jnp.int32)
  lengths = jnp.asarray([len(i) for i in ids], jnp.int32)

  streamed: list[int] = []
  shown = [""]

  def on_token(step, ids_B, live_B):  # host side: decode everything so far, print the new suffix
    del step
    if live_B[0] and int(ids_B[0]) not in stop.stop_ids:
      streamed.append(int(ids_B[0]))
      text = tok.decode(streamed)
      if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
        out.write(text[len(shown[0]):])
        out.flush()
        shown[0] = text

  stream = len(ids) == 1

  @jax.jit
  def run(params, tokens, lengths, key):
    logits, cache = decode.prefill(cfg, params, tokens, lengths, max_len, args.prefill_chunk)
    out_ids, counts, _ = decode.generate(cfg, params, cache, logits, key, sampler, stop, args.mode,
                                         callback=on_token if stream else None, pad_id=pad)
    return out_ids, counts

  if stream:
    out.write(prompts[0])
    out.flush()
  out_ids, counts = jax.device_get(run(params, tokens, lengths, jax.random.key(args.seed)))
  jax.effects_barrier()
  texts = []
  for row, n in zip(out_ids, counts):
    texts.append(tok.decode([int(t) for t in row[:n] if int(t) not in stop.stop_ids]))
  if stream:
    out.write(texts[0][len(shown[0]):] + "\n")
  else:
    for p, t in zip(prompts, texts):
      out.write(f"{p}{t}\n{'-' * 40}\n")
  out.flush()
  return texts


if __name__ == "__main__":
  try:
    main()
  except ValueError as e:
    sys.exit(f"error: {e}")
