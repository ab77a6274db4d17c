"""Train a PLT coder: `python scripts/train.py [--config=configs/tiny_cpu.py] [--config.<key>=<value>] [--workdir=DIR]`.

With no flags it trains the tiny CPU default on the built-in stdlib corpus (see configs/tiny_cpu.py).
"""
import os
import sys
import tempfile

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")



def _bad_flags(e: Exception):
  """A bad flag, config file or override: one line on stderr (not a traceback), exit 2."""
  lines = [ln.strip() for ln in str(e).replace("\\n", "\n").splitlines() if ln.strip()]
  print(f"error: bad flags or config: {lines[-1].strip(chr(39)) if lines else type(e).__name__}", file=sys.stderr)
  sys.exit(2)


try:  # config_flags already reads the default file and the overrides in sys.argv here
  config_flags.DEFINE_config_file("config", os.path.join(_CONFIGS, "tiny_cpu.py"), "Training config file.",
                                  lock_config=True)
except Exception as e:  # noqa: BLE001
  _bad_flags(e)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: <tmp>/loopcoder_runs/<config.name>).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  from loopcoder_jax import trainer

  try:
    config = flags.FLAGS.config
    name = config.name  # a config file that failed to load raises only when first used
  except Exception as e:  # noqa: BLE001
    _bad_flags(e)
  workdir = _WORKDIR.value or os.path.join(tempfile.gettempdir(), "loopcoder_runs", name)
  try:
    trainer.train(config, workdir)
  except (ValueError, trainer.TrainingDiverged) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def _parse_flags(argv):
  """absl parsing, but a bad flag or config override is one line on stderr, not a traceback."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - config_flags raises AttributeError/KeyError/ValueError/...
    _bad_flags(e)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
