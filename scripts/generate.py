"""Generate text with a PLT checkpoint, printing the completion as it is produced.

    python scripts/generate.py --checkpoint=DIR --prompt="def fib(n):" [--chat]
        [--max_new_tokens=128 --temperature=0 --top_k=0 --top_p=1 --seed=0 --loops=R
         --mode=batched|serial --prefill_chunk=0 --dtype=bfloat16 --quantize=int8
         --tokenizer=PATH --mesh=tensor=8]

DIR is a params directory (config.json + Orbax params/), a finished training workdir or one of its
steps (WORKDIR/checkpoints/<step>), or an HF directory (config.json + safetensors); the tokenizer
is read from there (or --tokenizer).
Temperature 0 is greedy. Several --prompt flags make a batch (printed when done); a single prompt
streams token by token. Weights and compute keep the checkpoint's dtype (bf16 for the released
7B) unless --dtype says otherwise; --quantize=int8 makes the linear weights int8 (a float scale
per output channel, dequantised in the matmul; docs/serving.md). --mesh shards the model over the
devices (axes data, fsdp, tensor; e.g. tensor=8 on a TPU v5e-8 or v2-8, fsdp=2,tensor=4): each
device loads only its slices and prefill and decoding run on the mesh; without it, everything is on
one device.
Exit codes: 0 done; 2 bad input (flags, a damaged checkpoint or one with NaN/Inf weights,
tokenizer, prompt: one `error:` line on stderr); 130 Ctrl-C (one line, no traceback).
"""

import signal

from absl import flags

from loopcoder_jax import cli

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Checkpoint directory.", required=True
)
_PROMPT = flags.DEFINE_multi_string(
    "prompt", None, "Prompt; repeat for a batch.", required=True
)
_CHAT = flags.DEFINE_bool(
    "chat", False, "Wrap the prompt in the tokenizer's chat template."
)
_MAX_NEW = flags.DEFINE_integer(
    "max_new_tokens", 128, "Tokens to generate at most.", lower_bound=1
)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer(
    "top_k", 0, "Sample from the k most likely tokens (0 = off)."
)
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_LOOPS = flags.DEFINE_integer(
    "loops", 0, "Loops to run (default: the checkpoint's).", lower_bound=0
)
_MODE = flags.DEFINE_enum(
    "mode",
    "batched",
    ["batched", "serial"],
    "All loops of a token in one pass, or one per loop.",
)
_PREFILL_CHUNK = flags.DEFINE_integer(
    "prefill_chunk",
    0,
    "Prefill chunk size (0 = whole prompt).",
    lower_bound=0,
)
_DTYPE = flags.DEFINE_enum(
    "dtype",
    None,
    ["float32", "bfloat16"],
    "Param and compute dtype (default: the checkpoint's).",
)
_MESH = cli.define_mesh(
    "mesh",
    "",
    "Shard over a device mesh, e.g. tensor=8 or fsdp=2,tensor=4 (-1: the rest of the devices; "
    "default: one device).",
)
_QUANTIZE = flags.DEFINE_enum(
    "quantize",
    None,
    ["int8"],
    "int8: the linear weights as int8 with a float scale per output channel "
    "(about half the bf16 bytes; docs/serving.md).",
)
_TOKENIZER = flags.DEFINE_string(
    "tokenizer",
    None,
    "Tokenizer file or directory (default: from the checkpoint).",
)


def main():
  try:
    _generate()
  except KeyboardInterrupt:
    print(flush=True)  # ends a streamed line
    cli.error_exit("interrupted", 128 + signal.SIGINT)


def _generate():
  from loopcoder_jax import interop
  from loopcoder_jax.inference import engine, generation, sampling
  from loopcoder_jax.model import sharding

  sampler = sampling.make_sampler(
      _TEMPERATURE.value, _TOP_K.value, _TOP_P.value
  )
  mesh = sharding.make_mesh(_MESH.value) if _MESH.value else None
  cfg, params, tok = interop.load(
      _CHECKPOINT.value,
      _DTYPE.value,
      loops=_LOOPS.value or None,
      tokenizer=_TOKENIZER.value,
      mesh=mesh,
      quantize=_QUANTIZE.value,
  )
  if _DTYPE.value is None:  # compute (and cache) in the weights' dtype too
    cfg = cfg.with_runtime(dtype=cfg.runtime.param_dtype)
  prompts, _ = generation.encode_prompts(tok, _PROMPT.value, _CHAT.value)
  stream = len(prompts) == 1
  if stream:
    print(prompts[0], end="", flush=True)
  eng = engine.Engine(
      cfg,
      params,
      tok,
      mesh=mesh,
      mode=_MODE.value,
      prefill_chunk=_PREFILL_CHUNK.value,
  )
  texts = eng.complete(
      _PROMPT.value,
      max_new_tokens=_MAX_NEW.value,
      sampler=sampler,
      chat=_CHAT.value,
      seed=_SEED.value,
      on_text=(lambda s: print(s, end="", flush=True)) if stream else None,
  )
  if stream:
    print()
  else:
    for p, t in zip(prompts, texts):
      print(f"{p}{t}\n{'-' * 40}")


if __name__ == "__main__":
  cli.run(main)
