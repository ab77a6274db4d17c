"""HumanEval: problems, the canonical solutions' 164/164, pass@k, samples files, generation, the CLI."""

import fractions
import json
import math
import os
import subprocess
import sys

from hypothesis import given
from hypothesis import strategies as st
import pytest

from loopcoder_jax.eval import humaneval
from loopcoder_jax.inference import generation
from tests.helpers import SCRIPTS, subprocess_env

EVALUATE = os.path.join(SCRIPTS, "evaluate.py")
EPS = 2.0**-52


def evaluate(*flags, timeout=600):
  return subprocess.run(
      [sys.executable, EVALUATE, *flags],
      capture_output=True,
      text=True,
      env=subprocess_env(),
      timeout=timeout,
  )


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_problems_are_the_bundled_164():
  problems = humaneval.load_problems()
  assert [p["task_id"] for p in problems] == [
      f"HumanEval/{i}" for i in range(164)
  ]
  assert humaneval.load_problems(limit=3) == problems[:3]
  with pytest.raises(ValueError, match="limit"):
    humaneval.load_problems(limit=-1)


def test_canonical_solutions_score_164_of_164():
  problems = humaneval.load_problems()
  records = humaneval.score_samples(
      problems, humaneval.canonical_samples(problems), workers=2
  )
  failed = [(r["task_id"], r["result"]) for r in records if not r["passed"]]
  assert not failed
  assert humaneval.pass_at_k(records, [1]) == {"pass@1": 1.0}


def test_the_prompts_helpers_run_on_the_tests_side():
  """HumanEval/38's tests decode what the prompt's `encode_cyclic` encodes: a completion that
  redefines it as the identity (and decodes as the identity) must fail, as the prompt's own
  helper, not the program's, encodes."""
  (problem,) = [
      p for p in humaneval.load_problems() if p["task_id"] == "HumanEval/38"
  ]
  cheat = "    return s\n\n\ndef encode_cyclic(s):\n    return s\n"
  samples = [
      {"task_id": "HumanEval/38", "completion": problem["canonical_solution"]},
      {"task_id": "HumanEval/38", "completion": cheat},
  ]
  records = humaneval.score_samples([problem], samples, workers=2)
  assert [r["passed"] for r in records] == [True, False]
  assert records[1]["result"].startswith("failed: AssertionError")


def assert_pass_at_k(n, c, k, exact):
  """estimate_pass_at_k(n, c, k) within its float64 rounding of `exact`.

  c factors, each within 2 roundings of its value in [0, 1]: the product is off
  by at most 3c ulps of 1, 1 - product adds one more and the exact value's own
  rounding another.
  """
  got = humaneval.estimate_pass_at_k(n, c, k)
  assert abs(got - float(exact)) <= (3 * c + 2) * EPS, (n, c, k, got)


F = fractions.Fraction


@pytest.mark.parametrize(
    "n, c, k, want",
    [
        (1, 0, 1, F(0)),
        (1, 1, 1, F(1)),
        (5, 2, 1, F(2, 5)),
        (5, 2, 2, 1 - F(3, 10)),  # 1 - C(3,2)/C(5,2)
        (4, 1, 3, 1 - F(1, 4)),  # 1 - C(3,3)/C(4,3)
        (10, 3, 5, 1 - F(21, 252)),  # 1 - C(7,5)/C(10,5)
        (3, 1, 3, F(1)),  # every draw of 3 holds the correct one
        (200, 0, 100, F(0)),
    ],
)
def test_pass_at_k_hand_worked(n, c, k, want):
  assert_pass_at_k(n, c, k, want)


@given(st.data())
def test_pass_at_k_is_the_binomial_closed_form(data):
  n = data.draw(st.integers(1, 300))
  c = data.draw(st.integers(0, n))
  k = data.draw(st.integers(1, n))
  assert_pass_at_k(n, c, k, 1 - F(math.comb(n - c, k), math.comb(n, k)))


def test_pass_at_k_averages_problems_and_needs_k_samples():
  records = [
      {"task_id": "a", "passed": True},
      {"task_id": "a", "passed": False},
      {"task_id": "b", "passed": False},
      {"task_id": "b", "passed": False},
  ]
  assert humaneval.pass_at_k(records, [1, 2]) == {"pass@1": 0.25, "pass@2": 0.5}
  with pytest.raises(ValueError, match="pass@3 needs at least 3 samples"):
    humaneval.pass_at_k(records, [3])


def test_read_samples_rejects_bad_files(tmp_path):
  problems = humaneval.load_problems(limit=2)
  good = [
      {"task_id": "HumanEval/0", "completion": "a"},
      {"task_id": "HumanEval/1", "completion": "b"},
  ]
  cases = {
      "not JSON": "{\n",
      "expected": json.dumps({"task_id": "HumanEval/0"}) + "\n",
      "not among the 2 problems": json.dumps(
          {"task_id": "X/1", "completion": ""}
      )
      + "\n",
      "no sample for 1 of the 2": json.dumps(good[0]) + "\n",
  }
  for i, (message, text) in enumerate(cases.items()):
    path = tmp_path / f"{i}.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
      humaneval.read_samples(str(path), problems)
  path = tmp_path / "good.jsonl"
  path.write_text("".join(json.dumps(s) + "\n" for s in good))
  assert humaneval.read_samples(str(path), problems) == good
  with pytest.raises(ValueError, match="does not exist"):
    humaneval.read_samples(str(tmp_path / "missing.jsonl"), problems)
  with pytest.raises(ValueError, match="not among the problems"):
    humaneval.score_samples(problems[:1], good, workers=1)


def test_generate_batches_like_complete(tiny_model):
  """Bucketed, sorted, padded batches give each prompt complete()'s stopped greedy text."""
  _, cfg, params, tok = tiny_model
  problems = humaneval.load_problems(limit=2)
  samples, stats = humaneval.generate_samples(
      cfg,
      params,
      tok,
      problems,
      n_samples=2,
      max_new_tokens=24,
      batch_size=3,
  )
  want = generation.complete(
      cfg,
      params,
      tok,
      [p["prompt"] for p in problems],
      max_new_tokens=24,
      stop=humaneval.STOP_SEQUENCES,
  )
  assert [s["task_id"] for s in samples] == [
      p["task_id"] for p in problems for _ in range(2)
  ]
  assert [s["completion"] for s in samples] == [
      w for w in want for _ in range(2)
  ]
  assert 0 < stats["generated_tokens"] <= 4 * 24
  assert stats["tokens_per_s"] > 0


@pytest.mark.slow
def test_evaluate_cli_end_to_end(tiny_model, tmp_path):
  """Generate, execute and write results; re-scoring the written samples gives the same."""
  path = tiny_model[0]
  out = tmp_path / "results.jsonl"
  run = evaluate(
      f"--checkpoint={path}",
      "--limit=2",
      "--max_new_tokens=8",
      "--batch_size=2",
      "--workers=2",
      f"--output={out}",
  )
  assert run.returncode == 0, run.stderr
  summary = json.loads(run.stdout.strip().splitlines()[-1])
  assert summary["problems"] == summary["samples"] == 2
  assert 0 < summary["generated_tokens"] <= 16
  records = read_jsonl(out)
  assert summary["pass@1"] == humaneval.pass_at_k(records, [1])["pass@1"]
  assert [r["task_id"] for r in records] == ["HumanEval/0", "HumanEval/1"]
  for r in records:
    assert set(r) == {"task_id", "completion", "passed", "result"}
    assert generation.truncate(r["completion"], humaneval.STOP_SEQUENCES) == (
        r["completion"]
    )
  again = tmp_path / "again.jsonl"
  rerun = evaluate(
      f"--completions={out}", "--limit=2", "--workers=2", f"--output={again}"
  )
  assert rerun.returncode == 0, rerun.stderr
  assert read_jsonl(again) == records
  assert json.loads(rerun.stdout.strip().splitlines()[-1])["pass@1"] == (
      summary["pass@1"]
  )


def test_evaluate_cli_bad_input_is_one_line(tmp_path):
  existing = tmp_path / "keep.jsonl"
  existing.write_text("precious\n")
  cases = {
      "--k=2": ["--completions=canonical", "--k=2"],
      "exists": ["--completions=canonical", f"--output={existing}"],
      "needs --checkpoint": ["--limit=1"],
      "identical samples": ["--n_samples=2", "--checkpoint=x"],
      "does not exist": [f"--completions={tmp_path / 'nope.jsonl'}"],
      "is for --task=humaneval": ["--task=perplexity", "--output=x.jsonl"],
  }
  for message, flags in cases.items():
    run = evaluate(*flags)
    assert run.returncode == 2, (flags, run.stderr)
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, (flags, last)
  assert existing.read_text() == "precious\n"
