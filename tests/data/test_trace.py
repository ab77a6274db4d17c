"""The code-tracing generator: answers are Python's, k counts the chain, splits are disjoint."""

import re

import numpy as np
import pytest

from loopcoder_jax.data import trace

ASSIGN = re.compile(r"^([a-z])=(?:(\d)|([a-z])([+-])(\d))$")


def python_answers(code: str) -> list[str]:
  """Run the assignments in a plain namespace and read each printed variable back."""
  lines = code.splitlines()
  assigns = [ln for ln in lines if not ln.startswith("print(")]
  ns: dict = {}
  exec("\n".join(assigns), {}, ns)  # noqa: S102 - generated test input
  return [str(ns[ln[6:-1]]) for ln in lines if ln.startswith("print(")]


def chain_depths(code: str) -> dict[str, int]:
  """Per variable, how many assignments its value depends on (itself included), by parsing."""
  depth: dict[str, int] = {}
  for ln in code.splitlines():
    if ln.startswith("print("):
      continue
    m = ASSIGN.match(ln)
    assert m, ln
    name, const, src = m.group(1), m.group(2), m.group(3)
    assert name not in depth  # every variable is assigned once
    depth[name] = 1 if const is not None else depth[src] + 1
  return depth


@pytest.mark.parametrize("lines, queries", [(10, 1), (10, 3), (4, 2), (26, 4)])
def test_answers_are_pythons_and_k_counts_the_chain(lines, queries):
  rng = np.random.default_rng(7)
  seen_k = set()
  for i in range(300):
    k = 1 + i % lines
    s = trace.make_snippet(rng, k, lines, queries)
    assert list(s.answers) == python_answers(s.code)
    depth = chain_depths(s.code)
    assert len(depth) == lines
    printed = re.findall(r"print\(([a-z])\)", s.code)
    assert 1 <= len(printed) <= queries
    assert list(s.ks) == [depth[v] for v in printed]
    assert k in s.ks  # the asked chain is printed, its depth exactly k
    assert all(a in "0123456789" and len(a) == 1 for a in s.answers)
    seen_k.add(k)
  assert seen_k == set(range(1, lines + 1))


def test_the_chain_is_shuffled_among_distractors():
  """The asked chain's lines are not a contiguous block in a fixed place: it must be followed."""
  rng = np.random.default_rng(0)
  starts = set()
  for _ in range(50):
    s = trace.make_snippet(rng, 3, 10)
    lines = s.code.splitlines()
    asked = re.findall(r"print\(([a-z])\)", s.code)[0]
    # walk the chain back from the asked variable
    by_name = {ln[0]: (i, ln) for i, ln in enumerate(lines[:-1])}
    i, ln = by_name[asked]
    while not ln[2].isdigit():
      i, ln = by_name[ln[2]]
    starts.add(i)
  assert len(starts) > 3


def test_sampling_is_deterministic_and_splits_are_disjoint():
  ks = range(1, 9)
  a = trace.sample(3, 0, 40, ks, 10, 3, "train")
  assert a == trace.sample(3, 0, 40, ks, 10, 3, "train")
  assert a != trace.sample(4, 0, 40, ks, 10, 3, "train")
  test = trace.sample(3, 0, 40, ks, 10, 3, "test")
  val = trace.sample(3, 0, 40, ks, 10, 3, "val")
  assert {trace.split_of(s.code) for s in a} == {"train"}
  assert {trace.split_of(s.code) for s in test} == {"test"}
  codes = [{s.code for s in x} for x in (a, test, val)]
  assert not (codes[0] & codes[1] or codes[0] & codes[2] or codes[1] & codes[2])
  assert all(k in s.ks for s, k in zip(test, list(ks) * 5))


def test_rows_score_exactly_the_answers():
  snippets = trace.sample(0, 0, 16, range(1, 5), 6, 3, "train")
  rows = trace.batch(snippets, 6, 3)
  s = trace.seq_len(6, 3) - 1
  assert rows["inputs"].shape == rows["loss_mask"].shape == (16, s)
  np.testing.assert_array_equal(rows["inputs"][:, 1:], rows["targets"][:, :-1])
  for i, sn in enumerate(snippets):
    n = len(sn.answers)
    at = rows["answer_at"][i, :n]
    assert (rows["answer_at"][i, n:] == -1).all()
    assert np.flatnonzero(rows["loss_mask"][i]).tolist() == sorted(at.tolist())
    got = "".join(trace.VOCAB[t] for t in rows["targets"][i, at])
    assert got == "".join(sn.answers)
    assert rows["k"][i, :n].tolist() == list(sn.ks)
    # the text is the code with each answer under its print, padding after it
    text = "".join(trace.VOCAB[t] for t in rows["inputs"][i] if t != trace.PAD)
    assert sn.text.startswith(text) and len(text) >= len(sn.text) - 1
    assert python_answers(sn.code) == list(sn.answers)


def test_bad_arguments_are_refused():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="k"):
    trace.make_snippet(rng, 5, 4)
  with pytest.raises(ValueError, match="split"):
    trace.sample(0, 0, 1, [1], 4, 1, "dev")


def test_the_one_line_baseline_is_what_the_last_line_alone_gives():
  """Guessing x from `x=y+c` alone (the best guess per op and c, counted on generated snippets)
  scores what `one_line_accuracy` says."""
  rng = np.random.default_rng(1)
  counts: dict = {}
  n = 4000
  for _ in range(n):
    s = trace.make_snippet(rng, 2, 2)
    line = s.code.splitlines()[1]
    key = line[3:]  # op and constant
    counts.setdefault(key, np.zeros(10))[int(s.answers[0])] += 1
  best = sum(c.max() for c in counts.values()) / n
  assert len(counts) == 19  # + with 0..9, - with 1..9
  assert abs(best - trace.one_line_accuracy()) < 0.03
  assert trace.one_line_accuracy() == 0.19


def test_code_tokens_put_each_lookup_one_token_away():
  sn = trace.make_snippet(np.random.default_rng(3), 2, 6, 2)
  ids = trace.encode(sn.text)
  assert trace.decode(ids) == sn.text
  tokens = [trace.VOCAB[i] for i in ids]
  # every assignment target is one `x=` token and every print one `print(x)\n` token
  assert sum(t.endswith("=") for t in tokens) == 6
  prints = [i for i, t in enumerate(tokens) if t.startswith("print(")]
  assert [tokens[i + 1] for i in prints] == list(sn.answers)
  # the longest snippet of a row's size fits it: every line is at most 5 tokens
  worst = trace.Snippet("a=b+1\n" * 6 + "print(a)\n" * 2, ("1", "1"), (1, 1))
  assert len(trace.encode(worst.text)) == trace.seq_len(6, 2)
  with pytest.raises(ValueError, match="exceed rows"):
    trace.batch([worst], 5, 2)


def test_drills_are_k1_lookups_printed_once_and_pack_into_segments():
  drills = trace.sample_drills(0, 12, 3)
  assert drills == trace.sample_drills(0, 12, 3)  # deterministic
  for d in drills:
    assert trace.split_of(d.code) == "train"
    assert python_answers(d.code) == list(d.answers) and d.ks == (1, 1, 1)
    assert set(chain_depths(d.code).values()) == {1}  # constants only
    printed = [ln for ln in d.code.splitlines() if ln.startswith("print(")]
    assert len(printed) == len(set(printed)) == 3  # each variable once
  per_row = trace.drills_per_row(3, 6, 2)
  assert per_row == 2  # 36 tokens hold two drills of 18
  groups = [drills[i : i + per_row] for i in range(0, 12, per_row)]
  rows = trace.packed_batch(groups, 6, 2)
  assert rows["answer_at"].shape == (6, 6)
  for i, group in enumerate(groups):
    seg, pos = rows["segment_ids"][i], rows["positions"][i]
    for j, d in enumerate(group, 1):
      # each drill is its own segment, its positions counted from 0
      n = len(trace.encode(d.text))
      at = np.flatnonzero(seg == j)
      assert len(at) in (n, n - 1)  # the row's last token is only a target
      np.testing.assert_array_equal(pos[at], np.arange(len(at)))
    got = "".join(trace.VOCAB[t] for t in rows["answer"][i])
    assert got == "".join(a for d in group for a in d.answers)
    assert (rows["targets"][i, rows["answer_at"][i]] == rows["answer"][i]).all()
  with pytest.raises(ValueError, match="size"):
    trace.make_drill(np.random.default_rng(0), 27)


@pytest.mark.parametrize("size, fill", [(3, 2), (1, 4), (4, 0), (2, 24)])
def test_drills_with_distractor_steps_print_only_their_constants(size, fill):
  drills = trace.sample_drills(1, 40, size, fill)
  assert drills == trace.sample_drills(1, 40, size, fill)
  first_line_is_step = 0
  for d in drills:
    assert python_answers(d.code) == list(d.answers) and d.ks == (1,) * size
    # chain_depths asserts every step reads a variable assigned before it
    depth = chain_depths(d.code)
    assert sorted(depth.values()).count(1) == size and len(depth) == size + fill
    printed = [
        ln[6:-1] for ln in d.code.splitlines() if ln.startswith("print(")
    ]
    assert len(set(printed)) == size and all(depth[x] == 1 for x in printed)
    # the tokens drills_per_row counts
    assert len(trace.encode(d.text)) == 6 * size + 5 * fill
    first_line_is_step += depth[d.code.split("=")[0]] > 1
  assert first_line_is_step == 0  # a step needs an assigned variable to read
  assert trace.drills_per_row(3, 6, 2, 2) == 1  # 28 of 36 tokens
  assert trace.drills_per_row(2, 6, 2, 1) == 2  # 17 each
  with pytest.raises(ValueError, match="fill"):
    trace.make_drill(np.random.default_rng(0), 3, 24)
