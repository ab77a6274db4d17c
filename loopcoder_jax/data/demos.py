"""Built-in demonstration chats: complete a stdlib function from its signature and docstring.

Every function of the built-in corpus (corpus.py) that has a docstring and more code after it
becomes one conversation: the user turn asks to complete the function and shows its `def` line(s)
and docstring, the assistant turn is the rest of its body, so the request followed by the answer is
the function's source. Functions are read with `ast` from the sorted corpus files in source order
(methods included, decorators left out, both parts dedented by the `def` line's indentation), so the
set is the same on every machine with the same Python. The split follows the corpus split (a
function is held out when its file is), and no download is needed.

Functions whose answer exceeds `MAX_ANSWER_LINES` lines or whose request or answer exceeds
`MAX_CHARS` characters are left out: the set is for fine-tuning small models in minutes.
"""

from __future__ import annotations

import ast
import functools

from loopcoder_jax.data import corpus

SOURCES = {
    "demos": "train",
    "demos:train": "train",
    "demos:heldout": "heldout",
}
REQUEST = "Complete this Python function:\n\n"
MAX_ANSWER_LINES = 24
MAX_CHARS = 1200


def function_pairs(text: str) -> list[tuple[str, str]]:
  """(request code, answer code) for each qualifying function of one source file, in `ast.walk`
  order; none for a file that does not parse."""
  try:
    tree = ast.parse(text)
  except (SyntaxError, ValueError):  # ValueError: null bytes
    return []
  lines = text.splitlines(keepends=True)
  out = []
  for node in ast.walk(tree):
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      continue
    if ast.get_docstring(node) is None or len(node.body) < 2:
      continue
    doc_end, end = node.body[0].end_lineno, node.end_lineno
    # the answer starts on a line of its own, after the docstring's last line (the None checks
    # only narrow types: parsed nodes carry end lines)
    if doc_end is None or end is None or node.body[1].lineno <= doc_end:
      continue
    indent = len(lines[node.lineno - 1]) - len(lines[node.lineno - 1].lstrip())
    head = lines[node.lineno - 1 : doc_end]
    body = lines[doc_end:end]
    if any(ln.strip() and ln[:indent].strip() for ln in head + body):
      continue  # a line left of the def (a continued string): not dedentable
    request, answer = (
        # blank lines may carry less indentation than the code
        "".join(ln[indent:] if ln.strip() else ln.lstrip(" \t") for ln in part)
        for part in (head, body)
    )
    answer = answer.rstrip() + "\n"
    if (
        answer.count("\n") > MAX_ANSWER_LINES
        or max(len(request), len(answer)) > MAX_CHARS
    ):
      continue
    out.append((request, answer))
  return out


@functools.lru_cache(maxsize=2)
def _split_pairs(split: str) -> tuple[tuple[str, str], ...]:
  return tuple(
      pair
      for _, text in corpus.stdlib_files(split)
      for pair in function_pairs(text)
  )


def demo_pairs(split: str) -> list[tuple[str, str]]:
  """(request code, answer code) pairs of `split` ("train" or "heldout"), in corpus order."""
  pairs = list(_split_pairs(split))
  if not pairs:
    raise ValueError(f"the built-in demonstration split {split!r} is empty")
  return pairs


def conversation(request: str, answer: str) -> list[dict[str, str]]:
  """One demonstration as chat messages (the common `messages` format)."""
  return [
      {"role": "user", "content": REQUEST + request},
      {"role": "assistant", "content": answer},
  ]


def demo_conversations(split: str) -> list[list[dict[str, str]]]:
  """The demonstrations of `split` as conversations, in corpus order (cached per process)."""
  return [conversation(q, a) for q, a in demo_pairs(split)]
