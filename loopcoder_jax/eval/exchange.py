"""The two sides of a sandboxed check, and the plain data that alone passes between them.

Standard library only. In the sandbox (`jail.py`), two processes:

  candidate  `python -I -S -B /exchange.py` (this file, copied into the sandbox's root): runs the
             program (prompt + completion), then answers calls: reads one request line on fd 3
             (`{"call", "args", "kwargs"}`), writes one reply line on fd 4 (`{"value": ...}`,
             `{"raised": "Type: message"}`, or `{"error": ...}`, which ends the tests: the program
             exited, or returned what is not plain data).
  tests      `run_tests(job)` in a fork of the jail (`{"prelude", "tests", "entry_point"}`: the
             tests' source is never in a file): runs the prelude (the prompt, whose helpers such as
             `poly` or `encode_cyclic` the tests use), binds the entry point to a proxy that calls
             the candidate, runs the tests; the jail writes the verdict to fd 5, which only it
             holds.

Values cross as tagged JSON (`encode` / `decode`): None, bool, int, float, complex, str, bytes and
lists, tuples, dicts, sets and frozensets of them, exact types only (never a subclass), never
pickle. Whatever object the candidate builds, the tests see a value, not behaviour: an `__eq__`
that answers True to anything cannot cross, nor can anything the candidate writes become a pass.
"""

import json
import os

# each side reads fd 3 and writes fd 4; the tests' side alone holds fd 5, the verdict
IN_FD, OUT_FD, VERDICT_FD = 3, 4, 5
VERDICT_BYTES = 4096
MAX_LINE = 16 << 20  # one request or reply, bytes
MAX_DEPTH = 100  # nesting of containers in one value
_SCALARS = (type(None), bool, str, float)
_SEQUENCES: dict[type, str] = {list: "l", tuple: "t", set: "s", frozenset: "f"}
_BUILD = {tag: kind for kind, tag in _SEQUENCES.items()}
# wider ints cross as hex text: decimal text that long is refused by int() (3.11's digit cap)
_JSON_INT = 1 << 63
_EXITED = "the program exited (code {!r}) before its tests finished"
ENDED = "the program ended before its tests finished"


def encode(value, depth: int = 0):
  """`value` as JSON-ready data; TypeError for anything that is not plain data."""
  kind = type(value)
  if depth > MAX_DEPTH:
    raise TypeError(f"a value nested deeper than {MAX_DEPTH} levels")
  if kind in _SCALARS:
    return value
  if kind is int:
    return value if -_JSON_INT < value < _JSON_INT else ["i", hex(value)]
  if kind is complex:
    return ["c", [value.real, value.imag]]
  if kind is bytes:
    return ["b", value.hex()]
  if kind in _SEQUENCES:
    return [_SEQUENCES[kind], [encode(v, depth + 1) for v in value]]
  if kind is dict:
    items = value.items()
    return [
        "d",
        [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in items],
    ]
  raise TypeError(f"a {kind.__module__}.{kind.__qualname__}, not plain data")


def decode(data, depth: int = 0):
  """The value that `encode` turned into `data`; ValueError for anything else."""
  kind = type(data)
  if depth > MAX_DEPTH:
    raise ValueError(f"a value nested deeper than {MAX_DEPTH} levels")
  if kind in _SCALARS or kind is int:
    return data
  if kind is not list or len(data) != 2 or type(data[0]) is not str:
    raise ValueError("not an encoded value")
  tag, payload = data
  if tag == "i" and type(payload) is str:
    return int(payload, 16)
  if tag == "b" and type(payload) is str:
    return bytes.fromhex(payload)
  if tag == "c" and type(payload) is list and len(payload) == 2:
    real, imag = payload
    if type(real) is float and type(imag) is float:
      return complex(real, imag)
  if tag in _BUILD and type(payload) is list:
    return _BUILD[tag](decode(v, depth + 1) for v in payload)
  if tag == "d" and type(payload) is list:
    out = {}
    for pair in payload:
      if type(pair) is not list or len(pair) != 2:
        raise ValueError("a dict entry that is not a (key, value) pair")
      out[decode(pair[0], depth + 1)] = decode(pair[1], depth + 1)
    return out
  raise ValueError(f"not an encoded value (tag {tag!r})")


def write_line(fd: int, message: dict) -> None:
  data = json.dumps(message).encode() + b"\n"
  while data:
    data = data[os.write(fd, data) :]


class ProgramRaised(Exception):
  """The program's function raised (tests may catch this, as they could the exception itself)."""


class ProgramFailed(BaseException):
  """The program ended, or answered with something other than plain data: the tests end here
  (a BaseException, so that no `except Exception` in them swallows it)."""


def read_reply(replies) -> dict:
  """The candidate's next reply line: a dict with one key."""
  line = replies.readline(MAX_LINE + 1)
  if not line.endswith(b"\n"):
    if len(line) > MAX_LINE:
      raise ProgramFailed(f"the program's answer exceeds {MAX_LINE} bytes")
    raise ProgramFailed(ENDED)
  try:
    reply = json.loads(line)
  except (ValueError, RecursionError):
    raise ProgramFailed("the program's answer is not JSON") from None
  if type(reply) is not dict or len(reply) != 1:
    raise ProgramFailed("the program's answer is not a reply")
  return reply


def reply_value(reply: dict):
  """A reply's value; ProgramRaised for a raise, ProgramFailed for anything else."""
  ((key, data),) = reply.items()
  if key == "value":
    try:
      return decode(data)
    except (ValueError, TypeError, RecursionError) as e:
      raise ProgramFailed(
          f"the program's answer is not plain data: {e}"
      ) from None
  if key == "raised" and type(data) is str:
    raise ProgramRaised(data[:VERDICT_BYTES])
  if key == "error" and type(data) is str:
    raise ProgramFailed(data[:VERDICT_BYTES])
  raise ProgramFailed("the program's answer is not a reply")


class Candidate:
  """The program's entry point as the tests see it: each call is one request and one reply."""

  def __init__(self, name: str, replies):
    self.name = name
    self._replies = replies

  def __call__(self, *args, **kwargs):
    try:
      request = {
          "call": self.name,
          "args": encode(args),
          "kwargs": encode(kwargs),
      }
    except TypeError as e:
      raise ProgramFailed(f"the tests passed the program {e}") from None
    try:
      write_line(OUT_FD, request)
    except BrokenPipeError:
      raise ProgramFailed(ENDED) from None
    return reply_value(read_reply(self._replies))


def run_tests(job: dict) -> str:
  """The tests' side: the verdict of `job`'s tests, "passed" or "failed: <why>"."""
  replies = os.fdopen(IN_FD, "rb")
  try:
    first = read_reply(replies)
    if first != {"ready": True}:
      reply_value(first)  # raises: the program failed to load
      raise ProgramFailed("the program's first answer is not a reply")
    scope: dict[str, object] = {"__name__": "__tests__"}
    exec(compile(job["prelude"], "<prompt>", "exec"), scope)
    if job["entry_point"] is not None:
      scope[job["entry_point"]] = Candidate(job["entry_point"], replies)
    exec(compile(job["tests"], "<tests>", "exec"), scope)
  except (ProgramRaised, ProgramFailed) as e:
    return f"failed: {e}"
  except BaseException as e:  # noqa: BLE001 - every way the tests end is a verdict
    return f"failed: {type(e).__name__}: {e}"
  return "passed"


def _describe(e: BaseException) -> str:
  try:
    return f"{type(e).__name__}: {e}"
  except BaseException:  # noqa: BLE001 - a hostile __str__
    return type(e).__name__


def serve_candidate() -> None:
  """The candidate's side: run the program, then answer calls until the tests close the pipe."""
  scope: dict = {"__name__": "__candidate__"}
  try:
    with open("/program.py", encoding="utf-8") as f:
      exec(compile(f.read(), "/program.py", "exec"), scope)
  except SystemExit as e:
    write_line(OUT_FD, {"error": _EXITED.format(e.code)})
    return
  except BaseException as e:  # noqa: BLE001 - reported to the tests, which fail
    write_line(OUT_FD, {"error": _describe(e)})
    return
  write_line(OUT_FD, {"ready": True})
  calls = os.fdopen(IN_FD, "rb")
  while line := calls.readline(MAX_LINE + 1):
    request = json.loads(line)
    try:
      value = scope[request["call"]](
          *decode(request["args"]), **decode(request["kwargs"])
      )
    except SystemExit as e:
      write_line(OUT_FD, {"error": _EXITED.format(e.code)})
      return
    except BaseException as e:  # noqa: BLE001 - the tests decide what it means
      write_line(OUT_FD, {"raised": _describe(e)})
      continue
    try:
      reply = {"value": encode(value)}
    except (TypeError, RecursionError) as e:
      reply = {"error": f"the program returned {e}"}
    write_line(OUT_FD, reply)


if __name__ == "__main__":
  serve_candidate()
  os._exit(0)
