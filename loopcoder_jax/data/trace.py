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
chain must be followed by name). Every value is a digit 0..9, so the answer is one token.
Each snippet is run (`exec`, its `print` captured) and the answer read from what it printed: the
generator, not the model, checks the answer.

Splits are a fixed partition of snippet space (CRC-32 of the text), so no held-out snippet is ever
trained on: `test` (final accuracy per k), `val` (choosing the learning rate), `train` (the rest).
Everything is deterministic from a seed; nothing is downloaded.

Tokens are code tokens, as a code model's tokenizer merges them: an assignment's target with its
`=` (`c=`), a whole print line (`print(c)` and its newline), and single characters for the rest
(`VOCAB`, id 0 is padding). Each lookup is then one token away: a constant follows its `c=`, and
the answer follows its print. A row is the snippet and its answers, right-padded to
`seq_len(lines, queries)`; the positions scored are the prints, each predicting its answer.

Lookup drills (`make_drill`) are the curriculum that lets a small model learn the lookup within a
CPU budget: a few constants among distractor steps (`x=y+c`), every constant printed once, so each
print is a k = 1 lookup and a row carries several (dense supervision of the step every chain
starts with). A snippet with one scored print teaches the lookup too, but a 2-layer model then
sits on a plateau for hundreds of thousands of rows before it learns it; drills of constants alone
are learnt fast but transfer to snippets slowly, and the distractor steps, which make a drill's
page look like a snippet's, close that gap (docs/loop_study.md). Drills never print a step's
value, so they shorten no chain; they are training rows only, and every variant trains on the
same ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import string
import zlib

import numpy as np

PAD = 0
_LETTERS = string.ascii_lowercase
VOCAB = (
    ("<pad>",)
    + tuple("\n=+-()" + string.digits + _LETTERS)
    + tuple(f"{x}=" for x in _LETTERS)
    + tuple(f"print({x})\n" for x in _LETTERS)
)
_ID = {c: i for i, c in enumerate(VOCAB)}
_TOKEN = re.compile(r"print\([a-z]\)\n|[a-z]=|.", re.S)
_PRINTS = np.array([_ID[f"print({x})\n"] for x in _LETTERS])
SPLITS = ("train", "val", "test")
_HELD_OUT = 16  # 1/16 of snippet space is test, 1/16 val
_NAMES = np.array(list(_LETTERS))
_LONGEST_LINE = 5  # `x=` `y` `+` `9` `\n`
_QUERY = 3  # `print(x)\n` and the answer's digit and newline


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
  """Tokens of a row: the longest snippet of `lines` assignments and `queries` prints."""
  return lines * _LONGEST_LINE + queries * _QUERY


def drills_per_row(size: int, lines: int, queries: int, fill: int = 0) -> int:
  """Lookup drills of `size` constants and `fill` distractor steps that fit a row of
  `seq_len(lines, queries)` tokens (a constant costs 3 tokens to assign and 3 to print, a step
  5)."""
  return seq_len(lines, queries) // (6 * size + _LONGEST_LINE * fill)


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
    lines.append(_step_line(name, prev, value, new))
    value = new
  return lines


def _step_line(name: str, prev: str, old: int, new: int) -> str:
  """`name=prev+c` or `name=prev-c`, taking `prev`'s value `old` to `new`."""
  return f"{name}={prev}{'+' if new >= old else '-'}{abs(new - old)}"


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


def make_drill(rng: np.random.Generator, size: int, fill: int = 0) -> Snippet:
  """A lookup drill: `size` constants and `fill` distractor steps (`x=y+c`, reading a variable
  assigned before it), interleaved at random, then every constant printed once, in random order.
  """
  if not 1 <= size <= size + fill <= len(_NAMES):
    raise ValueError(
        f"need size ({size}) >= 1 and size + fill ({size + fill}) <= {len(_NAMES)}"
    )
  names = rng.permutation(_NAMES)[: size + fill]
  consts, steps = names[:size], list(names[size:])
  value: dict[str, int] = {}
  body = []
  for x in consts:
    # before each constant, each remaining step comes with probability fill / (size + fill)
    while steps and value and rng.random() < fill / (size + fill):
      body.append(_step(rng, steps.pop(0), value))
    value[x] = int(rng.integers(10))
    body.append(f"{x}={value[x]}")
  body += [_step(rng, y, value) for y in steps]
  prints = [f"print({consts[i]})" for i in rng.permutation(size)]
  code = "\n".join(body + prints) + "\n"
  return Snippet(code, run_snippet(code), (1,) * size)


def _step(rng: np.random.Generator, name: str, value: dict[str, int]) -> str:
  """`name=y+c` or `name=y-c` for a random assigned `y`, keeping the value a digit."""
  prev = list(value)[int(rng.integers(len(value)))]
  value[name] = int(rng.integers(10))
  return _step_line(name, prev, value[prev], value[name])


def sample_drills(seed: int, n: int, size: int, fill: int = 0) -> list[Snippet]:
  """`n` training-split drills of `size` constants and `fill` steps, deterministic in `seed`."""
  rng = np.random.default_rng([seed, 2, SPLITS.index("train")])
  out: list[Snippet] = []
  while len(out) < n:
    s = make_drill(rng, size, fill)
    if split_of(s.code) == "train":
      out.append(s)
  return out


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
  return [_ID[t] for t in _TOKEN.findall(text)]


def decode(ids) -> str:
  return "".join(VOCAB[int(i)] for i in ids if i != PAD)


def batch(snippets, lines: int, queries: int) -> dict[str, np.ndarray]:
  """Rows of `seq_len(lines, queries)` tokens, one snippet each (`packed_batch`)."""
  return packed_batch([[sn] for sn in snippets], lines, queries)


def packed_batch(groups, lines: int, queries: int) -> dict[str, np.ndarray]:
  """Rows of `seq_len(lines, queries)` tokens, row i holding the snippets of `groups[i]` one after
  another, each its own segment (1, 2, ...; padding is 0) with positions from 0: the inputs of
  `train.step` (inputs, targets, segment_ids, positions, loss_mask on every answer) plus, per row
  and print (`[B, Q]`, Q the most prints of a row and at least `queries`; -1 where a row has
  fewer), `answer_at` (the print's position, which predicts the answer), `answer` (its token id)
  and `k`.
  """
  s = seq_len(lines, queries) - 1
  b = len(groups)
  q = max([queries] + [sum(len(sn.answers) for sn in g) for g in groups])
  tokens = np.zeros((b, s + 1), np.int32)
  segments = np.zeros((b, s + 1), np.int32)
  positions = np.zeros((b, s + 1), np.int32)
  at = np.full((b, q), -1, np.int32)
  ks = np.full((b, q), -1, np.int32)
  for i, group in enumerate(groups):
    ids = [encode(sn.text) for sn in group]
    if sum(map(len, ids)) > s + 1:
      raise ValueError(
          f"{len(group)} snippet(s) of {sum(map(len, ids))} tokens exceed rows of {s + 1} "
          f"(lines={lines}, queries={queries})"
      )
    start = n = 0
    for seg, (sn, x) in enumerate(zip(group, ids), 1):
      end = start + len(x)
      tokens[i, start:end] = x
      segments[i, start:end] = seg
      positions[i, start:end] = np.arange(len(x))
      m = len(sn.answers)
      at[i, n : n + m] = start + np.flatnonzero(np.isin(x, _PRINTS))
      ks[i, n : n + m] = sn.ks
      start, n = end, n + m
  mask = np.zeros((b, s), np.float32)
  rows, cols = np.nonzero(at >= 0)
  mask[rows, at[rows, cols]] = 1.0
  answer = np.where(at >= 0, tokens[np.arange(b)[:, None], at + 1], -1)
  return {
      "inputs": tokens[:, :-1],
      "targets": tokens[:, 1:],
      "segment_ids": segments[:, :-1],
      "positions": positions[:, :-1],
      "loss_mask": mask,
      "answer_at": at,
      "answer": answer.astype(np.int32),
      "k": ks,
  }
