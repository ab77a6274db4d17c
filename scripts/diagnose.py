"""Loop-count diagnostics of a PLT checkpoint on held-out text (spec section 6).

    python scripts/diagnose.py --checkpoint=DIR [--data=stdlib:heldout] [--loops=R]
        [--seq_len=256 --batch_size=4 --max_tokens=8192] [--plots=DIR]

Prints a per-loop table (step size, update alignment, effective rank, fixed-point gap, CLP
mismatch, gate, logit-lens rank/KL/entropy, attention entropy and inter-loop KL; see
loopcoder_jax/eval/diagnostics.py) and, as the last line, the same figures (with the per-layer,
per-head ones) as one JSON object ("-" in the table and null in the JSON: not defined for that
loop; nan: a non-finite value). --plots=DIR also writes them as DIR/diagnostics.json and PNG
plots beside it (loopcoder_jax/eval/plots.py). --loops evaluates the shared weights with a
different loop count than they were trained with (R >= 2 checkpoints only).
Exit codes: 0 done; 2 bad input (flags, checkpoint, data: one `error:` line on stderr).
"""

import json
import os

from absl import flags, logging

from loopcoder_jax import cli

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint",
    None,
    "Params dir, finished training workdir or HF dir.",
    required=True,
)
_DATA = flags.DEFINE_string(
    "data",
    "stdlib:heldout",
    "Text source: stdlib:heldout, or files/globs (.txt/.py/.jsonl).",
)
_TEXT_KEY = flags.DEFINE_string(
    "text_key", "text", "Field of .jsonl records holding the text."
)
_LOOPS = flags.DEFINE_integer(
    "loops",
    0,
    "Loop count to evaluate (default: the checkpoint's).",
    lower_bound=0,
)
_SEQ_LEN = flags.DEFINE_integer(
    "seq_len", 256, "Tokens per row.", lower_bound=1
)
_BATCH = flags.DEFINE_integer("batch_size", 4, "Rows per batch.", lower_bound=1)
_MAX_TOKENS = flags.DEFINE_integer(
    "max_tokens", 8192, "Held-out tokens to evaluate at most.", lower_bound=1
)
_PLOTS = flags.DEFINE_string(
    "plots",
    None,
    "Directory for PNG plots and diagnostics.json (created; files of those names "
    "are replaced).",
)


def main():
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
  # made before any computation (and JAX): a path it cannot be fails here
  if _PLOTS.value:
    if os.path.lexists(_PLOTS.value) and not os.path.isdir(_PLOTS.value):
      raise ValueError(f"--plots={_PLOTS.value} is a file, not a directory")
    try:
      os.makedirs(_PLOTS.value, exist_ok=True)
    except OSError as e:
      raise ValueError(
          f"--plots={_PLOTS.value}: cannot make the directory ({e.strerror})"
      ) from None
  from loopcoder_jax import interop
  from loopcoder_jax.data import pipeline as data
  from loopcoder_jax.eval import diagnostics

  cfg, params, tok = interop.load(_CHECKPOINT.value, loops=_LOOPS.value or None)
  if _SEQ_LEN.value > cfg.max_position_embeddings:
    raise ValueError(
        f"--seq_len={_SEQ_LEN.value} exceeds max_position_embeddings={cfg.max_position_embeddings}"
    )
  data_cfg = data.default_data_config()
  data_cfg.source, data_cfg.eval_source, data_cfg.text_key = (
      _DATA.value,
      _DATA.value,
      _TEXT_KEY.value,
  )
  batches, _ = data.make_eval_batches(
      data_cfg,
      tok,
      seq_len=_SEQ_LEN.value,
      batch_size=_BATCH.value,
      max_tokens=_MAX_TOKENS.value,
  )
  result = diagnostics.loop_diagnostics(cfg, params, batches)
  print(diagnostics.format_table(result))
  line = json.dumps(
      {"loops": cfg.plt_num_loops, **diagnostics.for_json(result)}
  )
  if _PLOTS.value:
    from loopcoder_jax.eval import plots

    with open(os.path.join(_PLOTS.value, "diagnostics.json"), "w") as f:
      f.write(line + "\n")
    plots.diagnostics_plots(result, _PLOTS.value)
  print(line)


if __name__ == "__main__":
  cli.run(main)
