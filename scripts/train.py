"""Train a PLT coder: `python scripts/train.py [--config=configs/tiny_cpu.py] [--config.<key>=<value>] [--workdir=DIR]`.

With no flags it trains the tiny CPU default on the built-in stdlib corpus (see configs/tiny_cpu.py).
Exit codes: 0 trained; 2 bad input (flags, config, data, tokenizer: one `error:` line on stderr,
before anything is built); 1 the loss or gradient norm went non-finite (one `error:` line naming
the step and the last good checkpoint, which is kept).
"""

import os
import tempfile

from absl import flags, logging

from loopcoder_jax import cli

_CONFIGS = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "configs"
)
cli.define_config_flag(os.path.join(_CONFIGS, "tiny_cpu.py"))
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Run directory (default: <tmp>/loopcoder_runs/<config.name>).",
)


def main():
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  from loopcoder_jax.train import trainer

  config = flags.FLAGS.config
  workdir = _WORKDIR.value or os.path.join(
      tempfile.gettempdir(), "loopcoder_runs", config.name
  )
  try:
    trainer.train(config, workdir)
  except trainer.TrainingDiverged as e:
    raise cli.Failure(str(e)) from e


if __name__ == "__main__":
  cli.run(main)
