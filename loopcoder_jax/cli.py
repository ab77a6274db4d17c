"""Shared pieces of the absl entry points in scripts/: bad input in one line, never a traceback.

Imports only absl and ml_collections (no JAX), so a script can use it before choosing a backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import sys
import types

from absl import app, flags


def exit_on_bad_flags(e: Exception):
  """A bad flag, config file or override: one line on stderr (not a traceback), exit 2."""
  lines = [
      ln.strip()
      for ln in str(e).replace("\\n", "\n").splitlines()
      if ln.strip()
  ]
  print(
      f"error: bad flags or config: {lines[-1].strip(chr(39)) if lines else type(e).__name__}",
      file=sys.stderr,
  )
  sys.exit(2)


def define_config_flag(default_file: str):
  """`--config` (+ `--config.<key>=<value>` overrides); config_flags reads them at definition."""
  from ml_collections import config_flags

  try:
    config_flags.DEFINE_config_file(
        "config", default_file, "Training config file.", lock_config=True
    )
  except Exception as e:  # noqa: BLE001 - config_flags raises AttributeError/KeyError/ValueError/...
    exit_on_bad_flags(e)


def parse_flags(argv):
  """absl's flag parsing for `app.run(flags_parser=...)`, a bad flag or override in one line."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001
    exit_on_bad_flags(e)


def int_list(name: str, values: Sequence[str]) -> list[int]:
  """A `DEFINE_list` flag's values as integers; a ValueError naming the flag if any is not one."""
  try:
    out = [int(v) for v in values]
  except ValueError:
    out = []
  if not out:
    raise ValueError(
        f"--{name} must be comma-separated integers, got {','.join(values)!r}"
    )
  return out


def run_with_flags(
    run: Callable[[types.SimpleNamespace], object],
    flag_holders: Sequence[flags.FlagHolder],
    argv: Sequence[str],
):
  """A benchmark's `main`: `run(args)` with the flags as attributes; a ValueError is one line, exit 2."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    return run(types.SimpleNamespace(**{f.name: f.value for f in flag_holders}))
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
