"""Serve a PLT checkpoint over an OpenAI-compatible HTTP API, with continuous batching.

    python scripts/serve.py --checkpoint=DIR [--port=8000] [--host=127.0.0.1] [--mesh=tensor=8]
        [--slots=8 --max_len=0 --prefill_chunk=64 --prefill_budget=512 --max_queue=64
         --when_full=reject|wait --mode=batched|serial --loops=R --dtype=bfloat16 --quantize=int8
         --tokenizer=PATH --model_name=NAME]

Routes: /v1/completions, /v1/chat/completions (stream: true for server-sent events), /v1/models,
/health; docs/serving.md shows how to query them (curl, the openai client) and what each limit
means. DIR is any checkpoint `interop.load` reads. The programs are compiled before the port opens.
Exit codes: 0 stopped (Ctrl-C); 2 bad input (flags, checkpoint: one `error:` line on stderr).
"""

import os

from absl import flags

from loopcoder_jax import cli

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Checkpoint directory.", required=True
)
_HOST = flags.DEFINE_string(
    "host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface)."
)
_PORT = flags.DEFINE_integer(
    "port", 8000, "Port to listen on.", lower_bound=1, upper_bound=65535
)
_MESH = cli.define_mesh(
    "mesh",
    "",
    "Shard over a device mesh, e.g. tensor=8 (default: one device).",
)
_SLOTS = flags.DEFINE_integer(
    "slots", 8, "Requests decoded together (rows of the cache).", lower_bound=1
)
_MAX_LEN = flags.DEFINE_integer(
    "max_len",
    0,
    "Tokens per request, prompt + completion (0: max_position_embeddings).",
    lower_bound=0,
)
_PREFILL_CHUNK = flags.DEFINE_integer(
    "prefill_chunk",
    64,
    "Prompt tokens of one request prefilled between two decode steps.",
    lower_bound=1,
)
_PREFILL_BUDGET = flags.DEFINE_integer(
    "prefill_budget",
    512,
    "Prompt tokens of all requests prefilled between two decode steps (>= prefill_chunk).",
    lower_bound=1,
)
_MAX_QUEUE = flags.DEFINE_integer(
    "max_queue", 64, "Requests waiting for a slot at most.", lower_bound=1
)
_WHEN_FULL = flags.DEFINE_enum(
    "when_full",
    "reject",
    ["reject", "wait"],
    "A request beyond a full queue: 429 at once, or wait for room.",
)
_MODE = flags.DEFINE_enum(
    "mode",
    "batched",
    ["batched", "serial"],
    "All loops of a token in one pass (PLT), or one pass per loop.",
)
_LOOPS = flags.DEFINE_integer(
    "loops", 0, "Loops to run (default: the checkpoint's).", lower_bound=0
)
_DTYPE = flags.DEFINE_enum(
    "dtype",
    None,
    ["float32", "bfloat16"],
    "Param and compute dtype (default: the checkpoint's).",
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
    "Tokenizer file or directory (default: the checkpoint's).",
)
_MODEL_NAME = flags.DEFINE_string(
    "model_name", None, "Model name clients ask for (default: DIR's basename)."
)


def main():
  import uvicorn

  from loopcoder_jax import serving

  server = serving.build(
      _CHECKPOINT.value,
      model_name=_MODEL_NAME.value
      or os.path.basename(os.path.normpath(_CHECKPOINT.value)),
      mesh_spec=_MESH.value,
      slots=_SLOTS.value,
      max_len=_MAX_LEN.value or None,
      prefill_chunk=_PREFILL_CHUNK.value,
      prefill_budget=_PREFILL_BUDGET.value,
      max_queue=_MAX_QUEUE.value,
      when_full=_WHEN_FULL.value,
      mode=_MODE.value,
      loops=_LOOPS.value or None,
      dtype=_DTYPE.value,
      tokenizer=_TOKENIZER.value,
      quantize=_QUANTIZE.value,
  )
  try:
    uvicorn.run(server.app, host=_HOST.value, port=_PORT.value)
  finally:
    server.scheduler.stop()


if __name__ == "__main__":
  cli.run(main)
