"""The error contract of the absl entry points in scripts/.

Bad input (a flag, config file or override, a data file, a checkpoint, a
prompt) ends in one `error: ...` line on stderr and exit code 2 (`BAD_INPUT`);
a run that fails for another reason it can name (`Failure`, e.g. a diverged
training run) in one such line and exit code 1 (`FAILED`). Bugs keep their
traceback. `--help` prints the usage and exits 0.

Imports only absl and ml_collections (no JAX), so a script can parse and check
its flags before choosing a backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import sys
import types
from typing import Any, NoReturn

from absl import app, flags, logging

# The flags the define_* functions here define belong to the script calling them
# (they are listed by its --help).
flags.disclaim_key_flags()

BAD_INPUT = 2
FAILED = 1
_CONFIG = "config"


class Failure(Exception):
  """A run that stopped for a reason other than bad input: exit code 1."""


def one_line(text: str) -> str:
  """`text` with its lines joined by spaces (an error is one stderr line)."""
  return " ".join(ln.strip() for ln in text.splitlines() if ln.strip())


def error_exit(message: str, code: int = BAD_INPUT) -> NoReturn:
  print(f"error: {one_line(message)}", file=sys.stderr)
  sys.exit(code)


def _unknown_key(e: BaseException, argv: Sequence[str]) -> str | None:
  """Names the override behind ml_collections' KeyError for an unknown key.

  ml_collections raises `AttributeError(KeyError("'key'\\nDid you mean ...?"))`
  whose text is the bare quoted key, not the override it came from.
  """
  err = e if isinstance(e, KeyError) else e.__context__
  if not isinstance(err, KeyError) or not err.args:
    return None
  first, *rest = str(err.args[0]).splitlines()
  key, hint = first.strip("'\""), " ".join(rest).strip()
  for arg in argv:
    name = arg.split("=", 1)[0].lstrip("-")
    if name.startswith(f"{_CONFIG}.") and key in name.split(".")[1:]:
      message = f"--{name}: unknown config key {key!r}"
      return f"{message} ({hint[:1].lower()}{hint[1:]})" if hint else message
  return None


def _config_arg(argv: Sequence[str]) -> str:
  """`--config=FILE` as given on the command line (the last one wins)."""
  found = f"--{_CONFIG}"
  for i, arg in enumerate(argv):
    name, eq, value = arg.lstrip("-").partition("=")
    if arg.startswith("-") and name == _CONFIG:
      value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
      found = f"--{_CONFIG}={value}"
  return found


def describe_flag_error(e: BaseException, argv: Sequence[str]) -> str:
  """One line naming what is wrong with the flags, config file or overrides."""
  unknown = _unknown_key(e, argv)
  if unknown:
    return unknown
  lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
  if len(lines) > 1:  # a config file's traceback: where, then what
    lines = [lines[0], lines[-1]]
  text = " ".join(lines) or type(e).__name__
  if isinstance(e, flags.Error):
    return text
  # absl wraps only ValueError and TypeError; anything else was raised by
  # running the config file
  return f"{_config_arg(argv)}: {type(e).__name__}: {text}"


def define_config_flag(default_file: str) -> None:
  """`--config=FILE[:ARG]` and its `--config.<key>=<value>` overrides.

  config_flags loads the default file and applies the overrides to it while
  defining the flag, so a bad override of the default config exits here.
  """
  from ml_collections import config_flags

  try:
    config_flags.DEFINE_config_file(
        _CONFIG,
        default_file,
        "Config file, FILE or FILE:ARG (ARG goes to get_config).",
        lock_config=True,
    )
  except Exception as e:  # noqa: BLE001 - the config file runs arbitrary code
    error_exit(describe_flag_error(e, sys.argv))


def _check_config_loaded() -> None:
  """A config file that could not be read raises only when first used."""
  if _CONFIG not in flags.FLAGS:
    return
  flag: Any = flags.FLAGS[_CONFIG]
  try:
    flag.value.keys()
  except OSError as e:
    cause = str(e.__cause__ or e).splitlines()
    raise flags.IllegalFlagValueError(
        f"--{_CONFIG}={flag.config_filename}: {cause[-1].strip()}"
    ) from None


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing: bad flags exit 2 in one line, `--help` exits 0."""
  try:
    rest = flags.FLAGS(argv)
    _check_config_loaded()
  except SystemExit:
    # only the help flags exit while parsing (absl's code for them is 1)
    sys.exit(0)
  except Exception as e:  # noqa: BLE001 - the config file runs arbitrary code
    error_exit(describe_flag_error(e, argv))
  if len(rest) > 1:
    error_exit(f"unexpected arguments: {' '.join(rest[1:])}")
  return rest


def run(main: Callable[[], int | None]) -> None:
  """`app.run` for a script that takes flags only: `main()` under the contract.

  A `ValueError` or `app.UsageError` from `main` is bad input (exit 2), a
  `Failure` exits 1, both as one `error:` line; `main`'s return value is the
  exit code otherwise.
  """

  def wrapped(argv):
    del argv  # parse_flags allows none left
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # Orbax logs each read at INFO
    try:
      return main()
    except (ValueError, app.UsageError) as e:
      error_exit(str(e) or type(e).__name__)
    except Failure as e:
      error_exit(str(e) or type(e).__name__, FAILED)

  app.run(wrapped, flags_parser=parse_flags)


class _ListParser(flags.ListParser):
  """Comma-separated values, each one converted by `convert`.

  A ValueError from `convert` names the bad value; absl adds the flag.
  """

  def __init__(self, convert: Callable[[str], Any], what: str):
    super().__init__()
    self._convert, self._what = convert, what
    self.syntactic_help = f"a comma separated list of {what}"

  def parse(self, argument):
    items = super().parse(argument)
    if not items:
      raise ValueError(f"expected a comma-separated list of {self._what}")
    return [self._convert(str(v).strip()) for v in items]


def define_int_list(
    name: str, default: Sequence[int], help_string: str, lower_bound: int = 1
) -> flags.FlagHolder[list[int]]:
  """A comma-separated list of integers, each at least `lower_bound`."""

  def convert(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise ValueError(f"{text!r} is not an integer") from None
    if value < lower_bound:
      raise ValueError(f"{value} is less than {lower_bound}")
    return value

  return flags.DEFINE(
      _ListParser(convert, f"integers >= {lower_bound}"),
      name,
      ",".join(map(str, default)),
      help_string,
      serializer=flags.CsvListSerializer(","),
  )


def define_choice_list(
    name: str, default: Sequence[str], choices: Sequence[str], help_string: str
) -> flags.FlagHolder[list[str]]:
  """A comma-separated list of names, each one of `choices`."""

  def convert(text: str) -> str:
    if text not in choices:
      raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
    return text

  return flags.DEFINE(
      _ListParser(convert, f"names from {', '.join(choices)}"),
      name,
      ",".join(default),
      help_string,
      serializer=flags.CsvListSerializer(","),
  )


class _MeshParser(flags.ArgumentParser):
  """`axis=size` pairs, comma-separated (e.g. `fsdp=2,tensor=4`); empty: no mesh."""

  syntactic_help = "axis=size pairs, e.g. tensor=8 or fsdp=2,tensor=4"

  def parse(self, argument):
    if isinstance(argument, dict):
      return argument
    out = {}
    for item in filter(None, (x.strip() for x in str(argument).split(","))):
      axis, _, size = (x.strip() for x in item.partition("="))
      if not axis or not size.lstrip("-").isdigit():
        raise ValueError(f"{item!r} is not axis=size (e.g. tensor=8)")
      out[axis] = int(size)
    return out

  def flag_type(self):
    return "mesh"


class _MeshSerializer(flags.ArgumentSerializer):

  def serialize(self, value):
    return ",".join(f"{k}={v}" for k, v in value.items())


def define_mesh(
    name: str, default: str, help_string: str
) -> flags.FlagHolder[dict[str, int]]:
  """A device mesh as `axis=size` pairs (axes and sizes are checked when the mesh is built)."""
  return flags.DEFINE(
      _MeshParser(), name, default, help_string, serializer=_MeshSerializer()
  )


def flag_values(
    flag_holders: Sequence[flags.FlagHolder],
) -> types.SimpleNamespace:
  """The flags' values as attributes named like the flags."""
  return types.SimpleNamespace(**{f.name: f.value for f in flag_holders})


# The model-shape flags the benchmark scripts share: flag -> (PLTConfig field, help).
MODEL_SHAPE_FLAGS = {
    "d": ("hidden_size", "Hidden size."),
    "ffn": ("intermediate_size", "SwiGLU intermediate size."),
    "layers": ("num_hidden_layers", "Layers."),
    "heads": ("num_attention_heads", "Query heads."),
    "kv_heads": ("num_key_value_heads", "KV heads."),
    "head_dim": ("head_dim", "Head dim (even: RoPE)."),
    "vocab": ("vocab_size", "Vocabulary size."),
    "window": ("plt_window_size", "Local attention window (left)."),
}


def define_model_shape(**defaults: int) -> tuple[flags.FlagHolder[int], ...]:
  """The `MODEL_SHAPE_FLAGS`, each with this script's default (all must be given)."""
  if set(defaults) != set(MODEL_SHAPE_FLAGS):
    raise TypeError(
        f"define_model_shape needs defaults for exactly {sorted(MODEL_SHAPE_FLAGS)}"
    )
  return tuple(
      flags.DEFINE_integer(
          name, defaults[name], help_string, lower_bound=int(name != "window")
      )
      for name, (_, help_string) in MODEL_SHAPE_FLAGS.items()
  )


def model_shape(args: Any) -> dict[str, Any]:
  """The PLTConfig keyword arguments the shape flags' values in `args` (attributes named like the
  flags, e.g. `flag_values(...)`) stand for: `PLTConfig.tiny(loops, **model_shape(args))`.
  """
  shape = {
      field: getattr(args, name)
      for name, (field, _) in MODEL_SHAPE_FLAGS.items()
  }
  shape["plt_window_size"] = (args.window, 0)
  return shape
