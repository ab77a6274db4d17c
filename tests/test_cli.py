"""Entry-point helpers: bad input ends in one `error:` line and exit code 2."""

import subprocess
import sys
import textwrap

from absl import flags
import pytest

from loopcoder_jax import cli

_INTS = cli.define_int_list("test_cli_ints", [1, 2], "Test list.", 0)
_NAMES = cli.define_choice_list("test_cli_names", ["a"], ["a", "b"], "Test.")
_MESH = cli.define_mesh("test_cli_mesh", "", "Test mesh.")


def test_one_line():
  assert cli.one_line("  a\n\n  b c \n") == "a b c"


def test_error_exit(capsys):
  with pytest.raises(SystemExit) as e:
    cli.error_exit("bad\nthing")
  assert e.value.code == cli.BAD_INPUT == 2
  assert capsys.readouterr().err == "error: bad thing\n"
  with pytest.raises(SystemExit) as e:
    cli.error_exit("diverged", cli.FAILED)
  assert e.value.code == cli.FAILED == 1


def _unknown_key_error(text):
  """What ml_collections raises for an override of a key the config lacks."""
  try:
    try:
      raise KeyError(text)
    except KeyError as k:
      raise AttributeError(k) from None  # keeps the KeyError as context
  except AttributeError as e:
    return e


def test_unknown_config_key_names_the_override():
  argv = ["prog", "--config=c.py", "--config.train.total_stepz=3"]
  err = _unknown_key_error(
      '\'total_stepz\'\nDid you mean "total_steps" instead of "total_stepz"?'
  )
  assert cli.describe_flag_error(err, argv) == (
      "--config.train.total_stepz: unknown config key 'total_stepz' "
      '(did you mean "total_steps" instead of "total_stepz"?)'
  )
  # a missing parent is the unknown key
  err = _unknown_key_error("'trian'")
  assert (
      cli.describe_flag_error(err, ["prog", "--config.trian.steps=1"])
      == "--config.trian.steps: unknown config key 'trian'"
  )


def test_describe_flag_error():
  # absl's own errors keep their text, a traceback in them shrinks to its ends
  assert (
      cli.describe_flag_error(
          flags.UnrecognizedFlagError("bogus"), ["prog", "--bogus"]
      )
      == "Unknown command line flag 'bogus'"
  )
  traced = flags.IllegalFlagValueError(
      "flag --config=c.py: Error whilst parsing config file:\n\nTraceback"
      " (most recent call last):\n  File ...\nValueError: boom\n"
  )
  assert (
      cli.describe_flag_error(traced, ["prog"])
      == "flag --config=c.py: Error whilst parsing config file: ValueError:"
      " boom"
  )
  # anything else came from running the config file: it is named
  for argv in (["p", "--config=c.py"], ["p", "--config", "c.py"]):
    assert (
        cli.describe_flag_error(NameError("name 'x' is not defined"), argv)
        == "--config=c.py: NameError: name 'x' is not defined"
    )
  # a KeyError that no override explains is not called an unknown key
  assert (
      cli.describe_flag_error(KeyError("k"), ["p"]) == "--config: KeyError: 'k'"
  )


def test_int_list_flag():
  flag = flags.FLAGS["test_cli_ints"]
  assert flag.default == [1, 2]
  flag.parse("3, 0,4")
  assert flag.value == [3, 0, 4]
  for bad, match in (
      ("x", "--test_cli_ints=x: 'x' is not an integer"),
      ("1,-1", "-1 is less than 0"),
      ("", "expected a comma-separated list of integers >= 0"),
  ):
    with pytest.raises(flags.IllegalFlagValueError, match=match):
      flag.parse(bad)


def test_choice_list_flag():
  flag = flags.FLAGS["test_cli_names"]
  flag.parse("b,a")
  assert flag.value == ["b", "a"]
  with pytest.raises(
      flags.IllegalFlagValueError, match="'c' is not one of a, b"
  ):
    flag.parse("a,c")


def test_mesh_flag():
  flag = flags.FLAGS["test_cli_mesh"]
  assert flag.default == {}
  flag.parse(" fsdp=2, tensor=-1 ")
  assert flag.value == {"fsdp": 2, "tensor": -1}
  assert flag.serialize() == "--test_cli_mesh=fsdp=2,tensor=-1"
  for bad in ("tensor", "tensor=x", "=4", "tensor=8,data"):
    with pytest.raises(flags.IllegalFlagValueError, match="is not axis=size"):
      flag.parse(bad)


def test_flag_values():
  args = cli.flag_values([_INTS, _NAMES])
  assert vars(args).keys() == {"test_cli_ints", "test_cli_names"}


def _run(tmp_path, body, *args, setup=""):
  """A script whose `main` is `body`, run under `cli.run` with `args`."""
  script = tmp_path / "prog.py"
  script.write_text(
      '"""Usage text."""\n'
      "import sys\n"
      "from absl import flags\n"
      "from loopcoder_jax import cli\n"
      f"{setup}\n"
      "_N = flags.DEFINE_integer('n', 1, 'A number.', lower_bound=1)\n"
      "def main():\n"
      f"{textwrap.indent(body, '  ')}\n"
      "cli.run(main)\n"
  )
  return subprocess.run(
      [sys.executable, str(script), *args],
      capture_output=True,
      text=True,
      timeout=60,
  )


@pytest.mark.parametrize(
    "body, args, code, out, err",
    [
        ("print(_N.value)", ["--n=3"], 0, "3\n", ""),
        ("return 5", [], 5, "", ""),
        (
            "pass",
            ["--n=0"],
            2,
            "",
            "error: flag --n=0: 0 is not a positive integer\n",
        ),
        ("pass", ["--m=1"], 2, "", "error: Unknown command line flag 'm'\n"),
        ("pass", ["a", "b"], 2, "", "error: unexpected arguments: a b\n"),
        ("raise ValueError('bad\\nvalue')", [], 2, "", "error: bad value\n"),
        ("raise cli.Failure('diverged')", [], 1, "", "error: diverged\n"),
    ],
)
def test_run(tmp_path, body, args, code, out, err):
  res = _run(tmp_path, body, *args)
  assert (res.returncode, res.stdout, res.stderr) == (code, out, err)


def test_run_keeps_the_traceback_of_a_bug(tmp_path):
  res = _run(tmp_path, "raise KeyError('bug')")
  assert res.returncode == 1
  assert "Traceback" in res.stderr and "KeyError: 'bug'" in res.stderr


def test_run_help_exits_0_and_does_not_import_jax(tmp_path):
  body = "print('jax' in sys.modules)"
  res = _run(tmp_path, body, "--help")
  assert res.returncode == 0, res.stderr
  assert "Usage text." in res.stdout and "--n: A number." in res.stdout
  assert _run(tmp_path, body).stdout == "False\n"


def test_config_flag_errors(tmp_path):
  good, broken, missing = (tmp_path / n for n in ("c.py", "b.py", "m.py"))
  good.write_text(
      "import ml_collections\n"
      "def get_config():\n"
      "  return ml_collections.ConfigDict({'train': {'steps': 1}})\n"
  )
  broken.write_text("def get_config():\n  return undefined\n")
  setup = f"cli.define_config_flag({str(good)!r})"

  def run(*args):
    res = _run(
        tmp_path, "print(flags.FLAGS.config.train.steps)", *args, setup=setup
    )
    return res.returncode, res.stdout + res.stderr

  assert run() == (0, "1\n")
  assert run(f"--config={good}", "--config.train.steps=5") == (0, "5\n")
  hint = '(did you mean "steps" instead of "stepz"?)'
  # an override of the default config fails while the flag is defined, one of
  # a given config while the flags are parsed
  for args in (
      ["--config.train.stepz=5"],
      [f"--config={good}", "--config.train.stepz=5"],
  ):
    assert run(*args) == (
        2,
        f"error: --config.train.stepz: unknown config key 'stepz' {hint}\n",
    )
  assert run("--config.train.steps=x") == (
      2,
      "error: flag --config.train.steps=x: invalid literal for int() with"
      " base 10: 'x'\n",
  )
  assert run(f"--config={missing}") == (
      2,
      f"error: --config={missing}: [Errno 2] No such file or directory:"
      f" '{missing}'\n",
  )
  assert run(f"--config={broken}") == (
      2,
      f"error: --config={broken}: NameError: name 'undefined' is not"
      " defined\n",
  )
