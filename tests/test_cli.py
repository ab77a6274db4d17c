"""Entry-point helpers: bad input ends in one `error:` line and exit code 2."""

import types

from absl import app
import pytest

from loopcoder_jax import cli


def test_bad_flags_exit_2_with_the_last_line(capsys):
  with pytest.raises(SystemExit) as e:
    cli.exit_on_bad_flags(AttributeError("Traceback...\n  frame\n'bogus'"))
  assert e.value.code == 2
  assert capsys.readouterr().err == "error: bad flags or config: bogus\n"


def test_int_list():
  assert cli.int_list("loops", ["1", "2"]) == [1, 2]
  for bad in (["x"], [], ["1", ""]):
    with pytest.raises(
        ValueError, match="--loops must be comma-separated integers"
    ):
      cli.int_list("loops", bad)


def test_run_with_flags_passes_values_and_reports_value_errors(capsys):
  holder = types.SimpleNamespace(name="steps", value=3)
  assert (
      cli.run_with_flags(lambda args: args.steps * 2, [holder], ["prog"]) == 6
  )

  def bad(args):
    raise ValueError(f"--steps must be >= 5, got {args.steps}")

  with pytest.raises(SystemExit) as e:
    cli.run_with_flags(bad, [holder], ["prog"])
  assert e.value.code == 2
  assert capsys.readouterr().err == "error: --steps must be >= 5, got 3\n"
  with pytest.raises(app.UsageError, match="unexpected arguments"):
    cli.run_with_flags(bad, [holder], ["prog", "extra"])
