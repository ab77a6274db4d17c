"""Train a PLT coder: `python scripts/train.py [--config=configs/tiny_cpu.py] [--config.<key>=<value>] [--workdir=DIR]`.

With no flags it trains the tiny CPU default on the built-in stdlib corpus (see configs/tiny_cpu.py).
Exit codes: 0 trained (or already done); 2 bad input (flags, config, data, tokenizer, a workdir
whose checkpoints another model, batch shape or tokenizer wrote: one `error:` line on stderr,
before anything is built); 1 the loss, gradient norm or updated state went non-finite (one
`error:` line naming the step and the last good checkpoint, which is kept), or another trainer
holds the workdir (the line names it), or storage failed (a full disk or read-only file system
while saving a checkpoint or exporting the params: the line names the last good checkpoint); 143
stopped by SIGTERM and 130 by Ctrl-C (SIGINT) after saving a checkpoint: not finished, rerun the
same command to resume (a second Ctrl-C stops at once, without saving).
"""

import os
import signal
import tempfile

from absl import flags

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
  from loopcoder_jax.train import trainer

  config = flags.FLAGS.config
  workdir = _WORKDIR.value or os.path.join(
      tempfile.gettempdir(), "loopcoder_runs", config.name
  )
  try:
    summary = trainer.train(config, workdir)
  except (
      trainer.TrainingDiverged,
      trainer.WorkdirBusy,
      trainer.StorageError,
  ) as e:
    raise cli.Failure(str(e)) from e
  except KeyboardInterrupt:
    cli.error_exit(
        "interrupted; the last saved checkpoint is kept", 128 + signal.SIGINT
    )
  # a signal stopped the run after saving: not finished (128 + signal, as if killed by it)
  return 128 + summary["preempted"] if summary.get("preempted") else 0


if __name__ == "__main__":
  cli.run(main)
