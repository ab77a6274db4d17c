"""Train a PLT coder: `python scripts/train.py [--config=configs/tiny_cpu.py] [--config.<key>=<value>] [--workdir=DIR]`.

With no flags it trains the tiny CPU default on the built-in stdlib corpus (see configs/tiny_cpu.py).
"""

import os
import sys
import tempfile

from absl import app, flags, logging

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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  from loopcoder_jax.train import trainer

  try:
    config = flags.FLAGS.config
    # a config file that failed to load raises only when first used
    name = config.name
  except Exception as e:  # noqa: BLE001
    cli.exit_on_bad_flags(e)
  workdir = _WORKDIR.value or os.path.join(
      tempfile.gettempdir(), "loopcoder_runs", name
  )
  try:
    trainer.train(config, workdir)
  except (ValueError, trainer.TrainingDiverged) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
