import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from loopcoder_jax.data import corpus
from loopcoder_jax.eval import loop_study
from loopcoder_jax.eval.loop_study import Variant
from loopcoder_jax.model import flops
from loopcoder_jax.model.transformer import init_params
from loopcoder_jax.train import config as train_config
from tests.helpers import ROOT, SCRIPTS, TINY, subprocess_env

STUDY_CONFIG = os.path.join(ROOT, "configs", "loop_study.py")


def base():
  return train_config.load_config(STUDY_CONFIG)


def model(config):
  return train_config.model_config_from(config)


def test_the_control_matches_the_training_flops_of_its_loop_count():
  b = base()
  variants, match = loop_study.plan(b, (1, 2, 3, 4), control_matches=3)
  n = model(b).num_hidden_layers
  assert [(v.name, v.loops, v.layers, v.control) for v in variants] == [
      ("R1", 1, n, 0),
      ("R2", 2, n, 0),
      ("R3", 3, n, 0),
      ("R4", 4, n, 0),
      (f"R1-L{match['layers']}", 1, match["layers"], 3),
  ]
  seq = b.data.seq_len

  def train_flops(v):
    return flops.train_flops_per_token(
        model(loop_study.run_config(b, v, 0, "")), seq
    )

  target = train_flops(variants[2])
  miss = {
      k: abs(train_flops(Variant("", 1, k)) / target - 1)
      for k in range(1, 4 * n * 3)
  }
  assert min(miss, key=miss.get) == match["layers"]
  # the same FLOP counts, divided the same way
  assert match["ratio"] == train_flops(variants[-1]) / target
  assert match["matches"] == "R3"


def test_runs_differ_only_in_the_loop_count_and_share_initial_weights():
  b = base()
  b.model.overrides.update(TINY)  # small weights to compare
  one, three = (
      loop_study.run_config(b, Variant(f"R{r}", r, 2), 7, "tok") for r in (1, 3)
  )
  d1, d3 = one.to_dict(), three.to_dict()
  assert (d1["model"].pop("loops"), d3["model"].pop("loops")) == (1, 3)
  assert d1 == d3  # same data, seed, steps, batch: the same tokens
  assert (one.seed, one.data.seed, one.tokenizer.path) == (7, 7, "tok")
  p1, p3 = (
      dict(
          jax.tree_util.tree_leaves_with_path(
              init_params(model(c), jax.random.key(c.seed))
          )
      )
      for c in (one, three)
  )
  assert set(p3) - set(p1) and all(
      "plt_gate" in str(k) for k in set(p3) - set(p1)
  )
  for k, v in p1.items():
    np.testing.assert_array_equal(v, p3[k])


@pytest.mark.parametrize(
    "loops, control, override, match",
    [
        ((), 2, {}, "loops must be"),
        ((1, 1), 2, {}, "loops must be"),
        ((1, 2), 1, {}, "control_matches=1"),
        ((1, 2), 2, {"model.loops": 2}, "sets the loop count"),
    ],
)
def test_bad_plans_are_refused(loops, control, override, match):
  b = base()
  for key, value in override.items():
    section, name = key.split(".")
    b[section][name] = value
  with pytest.raises(ValueError, match=match):
    loop_study.plan(b, loops, control)


def test_a_run_dir_of_another_config_is_refused_before_training(tmp_path):
  (tmp_path / "R1-s0").mkdir()
  (tmp_path / "R1-s0" / "run_config.json").write_text('{"seed": 7}')
  with pytest.raises(ValueError, match="R1-s0 holds a run with another config"):
    loop_study.run_study(
        base(), str(tmp_path), loops=(1,), seeds=(0,), control_matches=0
    )
  assert sorted(p.name for p in tmp_path.iterdir()) == ["R1-s0"]


def test_a_stored_config_predating_new_keys_is_the_same_run():
  current = {"seed": 0, "data": {"format": "text"}, "tokenizer": {"path": "/b"}}
  older = {"seed": 0, "data": {}, "tokenizer": {"path": "/a"}}
  assert loop_study._same_run(older, current)
  assert not loop_study._same_run({**older, "seed": 1}, current)
  assert not loop_study._same_run(
      {**older, "data": {"format": "chat"}}, current
  )


def row(name, loops, bpb, control=0, layers=2, flops_=1.0):
  return dict(
      name=name,
      loops=loops,
      layers=layers,
      control=control,
      bpb=bpb,
      seeds=[0, 1],
      params=1000,
      tokens=1000,
      train_flops=flops_,
      decode_flops=flops_,
      kv_bytes=flops_,
      diagnostics={
          "effective_rank": [5.0, 7.0, 6.0][:loops],
          "update_cos": [np.nan, 0.2, -0.3][:loops],
          "step_size": [3.0, 1.0, 0.5][:loops],
          "clp_state_ratio": [np.nan, 40.0, 30.0][:loops],
      },
  )


@pytest.mark.parametrize(
    "bpbs, expected",
    [
        # seeds differ more than the variants, but each seed ranks them alike
        ([[2.0, 2.4], [1.9, 2.3], [1.8, 2.2]], "grows monotonically"),
        (
            [[1.8, 2.2], [1.9, 2.3], [2.0, 2.4]],
            "does not pay at any loop count",
        ),
        ([[2.0, 2.4], [1.7, 2.1], [1.9, 2.3]], "non-monotonic: R = 2 beats"),
        ([[2.0, 2.1], [1.95, 2.15], [1.9, 2.0]], "Neither"),
    ],
)
def test_the_verdict_compares_seed_by_seed(bpbs, expected):
  rows = [row(f"R{r}", r, b) for r, b in zip((1, 2, 3), bpbs)]
  rows.append(row("R1-L4", 1, [2.5, 2.6], control=2, layers=4))
  lines = loop_study.verdict(rows)
  for text in (
      expected,
      "R = 2 with 2 layers is better than the unlooped 4-layer control",
      "the effective rank peaks after loop 2",
      "by 40.0x, 30.0x",
      "Scale: 0.00M parameters",
  ):
    assert any(text in line for line in lines), (text, lines)
  # the control's [2.5, 2.6] is worse than R = 1 in every seed of every case here
  assert any("control is itself worse" in line for line in lines), lines


def test_the_report_says_when_no_run_solves_a_problem():
  rows = [row("R1", 1, [2.0, 2.1]), row("R2", 2, [1.9, 2.0])]
  for r, passed in zip(rows, (0.0, 0.0)):
    r["code_eval"] = {"pass@1": passed}
  assert "cannot tell the variants apart" in loop_study._code_summary(rows)
  rows[1]["code_eval"] = {"pass@1": 0.5}
  assert "cannot tell" not in loop_study._code_summary(rows)


def test_a_control_mixed_against_r1_gets_no_such_note():
  rows = [row("R1", 1, [2.0, 2.1]), row("R2", 2, [2.3, 2.4])]
  rows.append(row("R1-L4", 1, [2.2, 2.05], control=2, layers=4))
  lines = loop_study.verdict(rows)
  assert not any("control is itself worse" in line for line in lines), lines
  assert any("worse than the unlooped 4-layer control" in x for x in lines)


def _committed(workdir, step):
  return os.path.isfile(
      os.path.join(workdir, "checkpoints", str(step), "_CHECKPOINT_METADATA")
  )


@pytest.mark.slow
def test_a_tiny_study_runs_end_to_end_and_resumes(tmp_path):
  docs = tmp_path / "corpus"
  docs.mkdir()
  for i, (_, text) in enumerate(corpus.stdlib_files("train")[:30]):
    (docs / f"{i:03d}.py").write_text(text)
  over = {f"model.overrides.{k}": v for k, v in TINY.items()}
  over |= {
      "model.overrides.plt_window_size": "(8, 0)",
      # room for HumanEval prompts (the code evaluation at the end)
      "model.overrides.max_position_embeddings": 512,
      "tokenizer.vocab_size": TINY["vocab_size"],
      "data.source": str(docs / "*.py"),
      "data.eval_source": str(docs / "00*.py"),
      "data.seq_len": 32,
      "data.shuffle_window": 16,
      "train.global_batch_size": 4,
      "train.total_steps": 24,
      "checkpoint.every_steps": 4,
      "checkpoint.keep": 1,
      "eval.max_tokens": 256,
      "eval.batch_size": 4,
  }
  study = tmp_path / "study"
  doc = study / "loop_study.md"  # the report's default place
  args = [
      sys.executable,
      os.path.join(SCRIPTS, "loop_study.py"),
      f"--study_dir={study}",
      "--loops=1,2",
      "--seeds=0",
      "--control_matches=0",
      "--diag_tokens=64",
      "--diag_batch=2",
  ] + [f"--config.{k}={v}" for k, v in over.items()]

  def run():
    return subprocess.run(
        args,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )

  # killed while R2 trains, after its first checkpoint
  proc = subprocess.Popen(
      args,
      env=subprocess_env(),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
      cwd=ROOT,
  )
  t0 = time.time()
  while not _committed(study / "R2-s0", 4):
    if proc.poll() is not None:
      pytest.fail(f"the study ended early:\n{proc.stderr.read()[-3000:]}")
    assert time.time() - t0 < 600, "timed out"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert (study / "R1-s0" / "eval.json").exists()
  assert not (study / "R2-s0" / "train.json").exists()

  resumed = run()
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from step" in resumed.stdout  # R2, from its checkpoint
  assert resumed.stdout.count("workdir:") == 1  # R1 is not trained again
  train = json.loads((study / "R2-s0" / "train.json").read_text())
  assert train["start_step"] >= 4 and train["end_step"] == 24
  rows = json.loads(resumed.stdout.strip().splitlines()[-1])
  assert [(r["name"], r["loops"]) for r in rows] == [("R1", 1), ("R2", 2)]
  assert all(np.isfinite(r["bpb"][0]) for r in rows)
  for name in ("R1", "R2"):
    diag = json.loads((study / f"{name}-s0" / "eval.json").read_text())
    assert len(diag["diagnostics"]["step_size"]) == int(name[1])
  text = doc.read_text()
  assert "| R2 | 2 | 2 |" in text and "## Verdict" in text
  assert (study / "loop_study_quality.png").exists()
  assert (study / "loop_study_loops.png").exists()
  sessions = (study / "sessions.jsonl").read_text().splitlines()
  assert len(sessions) == 1  # the killed session wrote none

  again = run()  # everything done: nothing trained or evaluated
  assert again.returncode == 0, again.stderr[-3000:]
  assert "workdir:" not in again.stdout
  assert json.loads(again.stdout.strip().splitlines()[-1]) == rows

  # HumanEval pass@1 added to the finished runs (their weights are loaded, nothing is trained)
  coded = subprocess.run(
      args + ["--code_eval_problems=2"],
      env=subprocess_env(),
      capture_output=True,
      text=True,
      timeout=600,
      cwd=ROOT,
  )
  assert coded.returncode == 0, coded.stderr[-3000:]
  assert "workdir:" not in coded.stdout
  for name in ("R1", "R2"):
    evaluated = json.loads((study / f"{name}-s0" / "eval.json").read_text())
    assert 0.0 <= evaluated["code_eval"]["pass@1"] <= 1.0
  assert "pass@1 |" in doc.read_text()
