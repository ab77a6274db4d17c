"""The code-tracing loop study: its plan, resumable training, the verdict's rules, a run end to end."""

import json
import os

import numpy as np
import pytest

from loopcoder_jax.data import trace
from loopcoder_jax.eval import trace_report, trace_study
from loopcoder_jax.train import config as train_config
from tests.helpers import ROOT, run_script

CONFIG = os.path.join(ROOT, "configs", "trace_study.py")


def config(preset="test"):
  return train_config.load_config(f"{CONFIG}:{preset}")


def test_the_plan_holds_every_variant_of_the_issue():
  c = config("cpu")
  names = [
      (v.name, v.loops, v.layers, v.cross_loop, v.matches)
      for v in trace_study.plan(c)
  ]
  n = c.model.num_hidden_layers
  assert names == [
      ("R1", 1, n, True, 0),
      ("R2", 2, n, True, 0),
      ("R3", 3, n, True, 0),
      ("R4", 4, n, True, 0),
      ("R2-serial", 2, n, False, 0),
      ("R4-serial", 4, n, False, 0),
      (f"R1-L{2 * n}", 1, 2 * n, True, 2),
      (f"R1-L{4 * n}", 1, 4 * n, True, 4),
  ]
  for preset in ("cpu", "quick", "accel", "test"):
    trace_study.check(config(preset))  # every preset is a valid study
  # the control has the FLOPs per token of the loop count it matches (no gate, no local branch)
  from loopcoder_jax.model import flops

  seq = trace.seq_len(c.data.lines, c.data.queries) - 1
  by = {v.name: trace_study.model_config(c, v) for v in trace_study.plan(c)}
  ratio = flops.train_flops_per_token(by["R1-L4"], seq) / (
      flops.train_flops_per_token(by["R2"], seq)
  )
  assert 0.8 < ratio <= 1.0


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("study.loops", [0, 1], "study.loops"),
        ("study.serial", [1], "study.serial"),
        ("sweep.lrs", [], "sweep.lrs"),
        ("sweep.seed", 5, "sweep.seed"),
        ("data.max_k", 9, "max_k"),
        (
            "data.max_k",
            4,
            "max_k",
        ),  # k = lines: no distractor, the sum of the page answers
        ("train.steps", 0, "train.steps"),
        ("data.drill_frac", 1.0, "drill_frac"),
        ("data.drill_steps", 10**6, "drill_steps"),
        ("data.drill_size", 9, "drill_size"),  # 54 tokens, rows of 26
        # 2 constants and 3 steps: 27 tokens, rows of 26
        ("data.drill_fill", 3, "drill_fill"),
        ("data.drill_fill", -1, "drill_fill"),
        ("optim.b1", 1.5, "optim.b1"),
    ],
)
def test_bad_configs_are_refused_before_any_work(tmp_path, key, value, match):
  c = config()
  section, name = key.split(".")
  c[section][name] = value
  with pytest.raises(ValueError, match=match):
    trace_study.run_study(c, str(tmp_path / "s"))
  assert not os.path.exists(tmp_path / "s")


def test_the_curriculum_drills_first_then_mixes(tmp_path):
  c = config()
  c.train.pool = 16
  c.data.drill_steps, c.data.drill_frac = 2, 0.25
  pool = trace_study._pool(c, str(tmp_path))
  drill_ids = {tuple(r) for r in pool["drill/inputs"]}
  snippet_ids = {tuple(r) for r in pool["inputs"]}
  for s in range(5):
    rows = trace_study.batch_rows(c, pool, 0, s)
    assert rows["inputs"].shape == (8, trace.seq_len(4, c.data.queries) - 1)
    drills = sum(tuple(r) in drill_ids for r in rows["inputs"])
    assert drills == (8 if s < 2 else 2)  # then 25% of 8 rows
    assert drills + sum(tuple(r) in snippet_ids for r in rows["inputs"]) == 8
    again = trace_study.batch_rows(
        c, pool, 0, s
    )  # a resumed run sees the same batch
    np.testing.assert_array_equal(rows["inputs"], again["inputs"])
  # drills packed into segments, as many per row as fit
  assert pool["drill/segment_ids"].max() == trace.drills_per_row(
      c.data.drill_size, 4, c.data.queries, c.data.drill_fill
  )
  c.data.drill_steps, c.data.drill_frac = (
      0,
      0.0,
  )  # no curriculum: no drills generated
  os.makedirs(tmp_path / "none")
  assert "drill/inputs" not in trace_study._pool(c, str(tmp_path / "none"))


@pytest.mark.slow
def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
  c = config()
  v = trace_study.plan(c)[1]  # R2-serial
  cfg = trace_study.model_config(c, v)
  c.train.pool = 32
  pool = trace_study._pool(
      c, str(tmp_path)
  )  # snippets and drills: the curriculum's batches
  whole, losses = trace_study.train_run(c, cfg, 3e-3, 0, pool, str(tmp_path))
  assert len(losses) == c.train.steps + 1 and np.isfinite(losses[1:]).all()
  # the state saved at step `save_every` is still there: train again from it
  resumed, again = trace_study.train_run(c, cfg, 3e-3, 0, pool, str(tmp_path))
  assert len(again) == c.train.steps - c.train.save_every + 1
  np.testing.assert_allclose(again[1:], losses[-len(again) + 1 :], rtol=1e-6)
  for a, b in zip(jax_leaves(whole), jax_leaves(resumed)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def jax_leaves(tree):
  import jax

  return [np.asarray(x) for x in jax.tree.leaves(tree)]


# ----------------------------------------------------------------------------------- the verdict
def row(name, loops, acc, *, layers=2, cross_loop=True, matches=0):
  acc = np.asarray(acc, float)
  return dict(
      name=name,
      loops=loops,
      layers=layers,
      cross_loop=cross_loop,
      matches=matches,
      params=1000 * layers,
      seeds=list(range(len(acc))),
      acc=acc.tolist(),
      mean=acc.mean(0).tolist(),
      sd=acc.std(0, ddof=1).tolist(),
      train_flops=1e12 * loops * layers,
  )


def seeds(means, jitter=0.01):
  return [np.clip(np.add(means, d), 0, 1) for d in (-jitter, 0, jitter)]


def test_the_verdict_reads_depth_off_the_numbers():
  rows = [
      row("R1", 1, seeds([0.99, 0.5, 0.2, 0.1])),
      row("R2", 2, seeds([0.99, 0.9, 0.5, 0.2])),
      row("R3", 3, seeds([0.99, 0.9, 0.5, 0.2])),
      row("R2-serial", 2, seeds([0.99, 0.9, 0.8, 0.5]), cross_loop=False),
      row("R1-L4", 1, seeds([0.99, 0.9, 0.8, 0.6]), layers=4, matches=2),
  ]
  assert trace_report.matched_up_to(rows[1], rows[4]) == 2
  assert trace_report.ahead_at(rows[4], rows[1]) == [3, 4]
  text = "\n".join(trace_report.verdict(rows))
  assert "The easy case is learnt: R = 1 reaches 99.0% at k = 1" in text
  assert (
      "matches the unlooped 4-layer control" in text and "up to k = 2;" in text
  )
  assert (
      "serial looping is ahead at k = 3, 4, CLP at no k (in every seed" in text
  )
  assert "the control is ahead at k = 3, 4, R = 2 at no k" in text
  assert "CLP loses depth on this task." in text
  assert "R = 1 -> 2: +20.0 points of mean accuracy" in text
  assert "R = 2 -> 3: +0.0 points" in text
  assert "the extra loop is neither ahead nor behind at any k" in text
  assert "Another loop stops paying after R = 2" in text
  assert "highest for R1 " in text  # the cheapest run per FLOP


def test_a_loop_ahead_at_one_k_and_behind_at_another_does_not_pay():
  rows = [
      row("R1", 1, seeds([0.99, 0.5, 0.5])),
      row("R2", 2, seeds([0.99, 0.8, 0.3])),
  ]
  text = "\n".join(trace_report.verdict(rows))
  assert "the extra loop is ahead at k = 2, behind at k = 3." in text
  assert (
      "Another loop stops paying after R = 1: R = 2 is ahead at k = 2 but behind at k = 3."
      in text
  )


def test_the_verdict_says_when_the_easy_case_is_not_learnt():
  flat = seeds([0.1, 0.1, 0.1, 0.1], jitter=0.02)
  rows = [
      row("R1", 1, flat),
      row("R2", 2, flat),
      row("R2-serial", 2, flat, cross_loop=False),
  ]
  text = "\n".join(trace_report.verdict(rows))
  assert "The easy case is NOT learnt: R = 1 reaches only 10.0%" in text
  assert "No variant beats, at any k >= 2, the 19% a guess from" in text
  assert (
      "With no variant following the chain, this says nothing about depth."
      in text
  )
  assert "neither serial looping nor CLP is ahead at any k" in text
  assert "none" not in text and "-0.0" not in text
  assert "by seed 8%, 10%, 12%, 0 of 3 at the bar" in text
  # one seed past the plateau does not make the mean: the verdict names it
  mixed = [[0.56, 0.2, 0.2], [0.97, 0.2, 0.2], [0.6, 0.2, 0.2]]
  text = "\n".join(trace_report.verdict([row("R1", 1, mixed)]))
  assert "reaches only 71.0% at k = 1" in text
  assert "by seed 56%, 97%, 60%, 1 of 3 at the bar" in text


def test_a_looped_model_and_its_control_both_on_the_plateau_are_no_match_of_depth():
  # the shape of the quick study: R = 1 and serial R = 2 learn the lookup, CLP R = 2 and the
  # 4-layer control stay at 55%
  rows = [
      row("R1", 1, seeds([0.98, 0.5, 0.3])),
      row("R2", 2, seeds([0.55, 0.19, 0.3])),
      row("R2-serial", 2, seeds([0.97, 0.5, 0.3]), cross_loop=False),
      row("R1-L4", 1, seeds([0.55, 0.2, 0.32]), layers=4, matches=2),
  ]
  text = "\n".join(trace_report.verdict(rows))
  assert "matches the unlooped 4-layer control" in text
  assert "Neither learnt the k = 1 lookup (55% and 55%; bar 95%)" in text
  assert "CLP loses depth on this task." in text
  # a learnt pair gets no such remark
  rows[1] = row("R2", 2, seeds([0.98, 0.6, 0.3]))
  rows[3] = row("R1-L4", 1, seeds([0.98, 0.6, 0.3]), layers=4, matches=2)
  assert "Neither learnt" not in "\n".join(trace_report.verdict(rows))


# ----------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_a_tiny_study_runs_end_to_end_and_resumes(tmp_path):
  """The script on the test preset (two variants, two rates, two seeds), then rerun: resumed."""
  study, doc = tmp_path / "study", tmp_path / "doc.md"
  doc.write_text(
      "# title\n\n<!-- stdlib study: begin -->\nkept\n<!-- stdlib study: end -->\n"
  )
  args = [
      "--task=trace",
      f"--config={CONFIG}:test",
      f"--study_dir={study}",
      f"--report={doc}",
  ]
  # one variant first, on its own (`--variants`: no report), then the rest and the report
  part = run_script(
      "loop_study.py", args + ["--variants=R2-serial"], timeout=300
  )
  assert part.returncode == 0, part.stderr[-3000:]
  assert "rerun without --variants for the report" in part.stdout
  assert {p.parent.parent.name for p in study.glob("*/*/result.json")} == {
      "R2-serial"
  }
  assert not doc.read_text().count("Code tracing")
  out = run_script("loop_study.py", args, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = json.loads(out.stdout.strip().splitlines()[-1])
  assert [r["name"] for r in rows] == ["R2", "R2-serial"]
  results = [
      json.loads(p.read_text()) for p in sorted(study.glob("*/*/result.json"))
  ]
  # the sweep (2 rates on seed 0) and seed 1 at each variant's best rate
  assert len(results) == 2 * 2 + 2
  assert not list(
      study.glob("*/*/state.msgpack")
  )  # finished runs keep only their result
  text = doc.read_text()
  assert "kept" in text and "## Code tracing: a depth-bound task" in text
  assert (
      "| R2-serial | 2 | 1 | no |" in text
      and "### Verdict (code tracing)" in text
  )
  assert (tmp_path / "doc_trace_accuracy.png").stat().st_size > 0
  before = {p: p.stat().st_mtime for p in study.glob("*/*/result.json")}
  again = run_script("loop_study.py", args, timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert {p: p.stat().st_mtime for p in study.glob("*/*/result.json")} == before
  sessions = (study / "sessions.jsonl").read_text().splitlines()
  assert len(sessions) == 3
  assert "minutes of wall time while any invocation ran" in doc.read_text()
  # another config in the same directory is refused with one line
  other = run_script("loop_study.py", args + ["--config.train.steps=7"])
  assert (
      other.returncode == 2
      and "holds a study of another config" in other.stderr
  )
  # so is a variant the study does not have
  bad = run_script("loop_study.py", args + ["--variants=R9"])
  assert bad.returncode == 2 and "unknown variants ['R9']" in bad.stderr


def test_overlapping_invocations_count_their_wall_time_once():
  entries = [
      dict(start=0.0, wall_s=10.0),
      dict(start=5.0, wall_s=10.0),  # ran beside the first (`--variants`)
      dict(start=30.0, wall_s=1.0),
      dict(wall_s=2.0),  # an older entry without a start: counted whole
  ]
  assert trace_report.elapsed(entries) == 15.0 + 1.0 + 2.0
