"""A depth-bound code-tracing task: Python snippets whose asked value needs k chained steps.

    q=4        <- a distractor chain starts
    c=7        <- the asked chain starts (k = 1 would ask c)
    m=c-2
    w=q+5
    a=m+1      <- asked: a = m + 1 = (c - 2) + 1 = 6, three chained assignments (k = 3)
    print(a)
    6

A snippet has `lines` assignments: the asked chain of k (a constant, then k - 1 steps `x=y+c` or
`x=y-c`, each reading the previous variable) and distractor chains of the same form filling the
rest, interleaved at random (each chain keeps its order, so every snippet is valid Python and the
chain must be followed by name). Every value is a digit 0..9, so the answer is one character.
Each snippet is run (`exec`, its `print` captured) and the answer read from what it printed: the
generator, not the model, checks the answer.

Splits are a fixed partition of snippet space (CRC-32 of the text), so no held-out snippet is ever
trained on: `test` (final accuracy per k), `val` (choosing the learning rate), `train` (the rest).
Everything is deterministic from a seed; nothing is downloaded.

Tokens are characters (`VOCAB`, id 0 is padding). A row is the snippet and its answer, right-padded
to `seq_len(lines)`; the only scored position is the one predicting the answer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import string
import zlib

import numpy as np

PAD = 0
VOCAB = ("<pad>",) + tuple("\n=+-()" + string.digits + string.ascii_lowercase)
_ID = {c: i for i, c in enumerate(VOCAB)}
SPLITS = ("train", "val", "test")
_HELD_OUT = 16  # 1/16 of snippet space is test, 1/16 val
_NAMES = np.array(list(string.ascii_lowercase))
_LONGEST_LINE = len("x=y+9\n")
_QUERY = len("print(x)\n")


@dataclasses.dataclass(frozen=True)
class Snippet:
  code: str  # the assignments and the prints, newline-terminated
  answers: tuple[str, ...]  # what running `code` prints, one digit per print
  ks: tuple[
      int, ...
  ]  # per print: the chained assignments its answer depends on

  @property
  def text(self) -> str:
    """The snippet with each answer on the line after its print (still valid Python)."""
    lines = self.code.splitlines()
    n = len(lines) - len(self.answers)
    out = lines[:n]
    for line, ans in zip(lines[n:], self.answers):
      out += [line, ans]
    return "\n".join(out) + "\n"


def seq_len(lines: int, queries: int) -> int:
  """Positions of a row: the longest snippet of `lines` assignments and `queries` prints."""
  return lines * _LONGEST_LINE + queries * (_QUERY + 2)


def split_of(code: str) -> str:
  h = zlib.crc32(code.encode()) % _HELD_OUT
  return "test" if h == 0 else "val" if h == 1 else "train"


def run_snippet(code: str) -> tuple[str, ...]:
  """What the snippet prints, line by line."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(code, {"__builtins__": {"print": print}})  # noqa: S102 - our own generated code
  return tuple(out.getvalue().splitlines())


def _chain(rng: np.random.Generator, names) -> list[str]:
  """Assignments of one chain over `names`: a constant, then steps keeping the value a digit."""
  value = int(rng.integers(10))
  lines = [f"{names[0]}={value}"]
  for prev, name in zip(names, names[1:]):
    new = int(rng.integers(10))
    op = "+" if new >= value else "-"
    lines.append(f"{name}={prev}{op}{abs(new - value)}")
    value = new
  return lines


def make_snippet(
    rng: np.random.Generator, k: int, lines: int, queries: int = 1
) -> Snippet:
  """A snippet whose first chain needs exactly `k` chained assignments (1 <= k <= lines), with
  distractor chains filling `lines`; it prints the last variable of the first chain and of up to
  `queries - 1` distractor chains, in random order (one print per chain, so no printed answer
  shortens another's chain)."""
  if not 1 <= k <= lines <= len(_NAMES) or queries < 1:
    raise ValueError(
        f"need 1 <= k ({k}) <= lines ({lines}) <= {len(_NAMES)}, queries ({queries}) >= 1"
    )
  names = rng.permutation(_NAMES)[:lines]
  chains = [list(names[:k])]
  start = k
  while (
      start < lines
  ):  # distractor chains of random lengths fill the remaining lines
    n = int(rng.integers(1, lines - start + 1))
    chains.append(list(names[start : start + n]))
    start += n
  code_of = [_chain(rng, c) for c in chains]
  order = rng.permutation(
      np.repeat(np.arange(len(chains)), [len(c) for c in chains])
  )
  queues = [iter(c) for c in code_of]
  body = [next(queues[i]) for i in order]
  asked = [0] + list(rng.permutation(np.arange(1, len(chains)))[: queries - 1])
  asked = [asked[i] for i in rng.permutation(len(asked))]
  code = "\n".join(body + [f"print({chains[i][-1]})" for i in asked]) + "\n"
  return Snippet(code, run_snippet(code), tuple(len(chains[i]) for i in asked))


def sample(
    seed: int, index: int, n: int, ks, lines: int, queries: int, split: str
) -> list[Snippet]:
  """`n` snippets of `split`, the i-th with a first chain of k = ks[i % len(ks)]; deterministic
  in (seed, index). Snippets of other splits are drawn and dropped."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  rng = np.random.default_rng([seed, index, SPLITS.index(split)])
  out: list[Snippet] = []
  while len(out) < n:
    s = make_snippet(rng, int(ks[len(out) % len(ks)]), lines, queries)
    if split_of(s.code) == split:
      out.append(s)
  return out


def one_line_accuracy() -> float:
  """The best accuracy at k >= 2 from the asked variable's own line alone (`x=y+c` says x is in
  c..9, `x=y-c` that it is in 0..9-c), for the generator's uniform values: what a model scores
  without following the chain."""
  best: dict[tuple[str, int], int] = {}
  for prev in range(10):
    for new in range(10):
      key = ("+" if new >= prev else "-", abs(new - prev))
      best[key] = 1  # each (op, c) fits each of its values once: guess any
  return len(best) / 100


def encode(text: str) -> list[int]:
  return [_ID[c] for c in text]


def batch(snippets, lines: int, queries: int) -> dict[str, np.ndarray]:
  """Rows for `train.step` (inputs, targets, segment_ids, positions, loss_mask on every answer;
  padding is segment 0) plus, per row and print (`[B, queries]`, -1 where a row has fewer),
  `answer_at` (the position predicting the answer), `answer` (its token id) and `k`.
  """
  s = seq_len(lines, queries) - 1
  b = len(snippets)
  tokens = np.zeros((b, s + 1), np.int32)
  at = np.full((b, queries), -1, np.int32)
  ks = np.full((b, queries), -1, np.int32)
  for i, sn in enumerate(snippets):
    ids = encode(sn.text)
    tokens[i, : len(ids)] = ids
    ends = np.flatnonzero(np.array(ids) == _ID["\n"])
    # the last 2n lines alternate print, answer: the print's newline predicts the answer
    n = len(sn.answers)
    at[i, :n] = ends[-2 * n :: 2]
    ks[i, :n] = sn.ks
  real = tokens[:, :-1] != PAD
  mask = np.zeros((b, s), np.float32)
  rows, cols = np.nonzero(at >= 0)
  mask[rows, at[rows, cols]] = 1.0
  answer = np.where(at >= 0, tokens[np.arange(b)[:, None], at + 1], -1)
  return {
      "inputs": tokens[:, :-1],
      "targets": tokens[:, 1:],
      "segment_ids": real.astype(np.int32),
      "positions": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy(),
      "loss_mask": mask,
      "answer_at": at,
      "answer": answer.astype(np.int32),
      "k": ks,
  }
