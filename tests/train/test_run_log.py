"""A run's reports: the metrics file a resumed run rewrites, and the one-line step summary."""

import json

from loopcoder_jax.train import run_log


def test_keep_through_drops_later_steps_and_torn_lines(tmp_path):
  log = run_log.RunLog(str(tmp_path), enabled=True, tensorboard=False)
  for step in (1, 2, 3):
    log.scalars(step, {"loss": float(step)})
  log.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 4, "lo')  # cut short by a kill
  log = run_log.RunLog(str(tmp_path), enabled=True, tensorboard=False)
  log.keep_through(2)
  log.scalars(3, {"loss": 30.0})
  log.close()
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert rows == [
      {"step": 1, "loss": 1.0},
      {"step": 2, "loss": 2.0},
      {"step": 3, "loss": 30.0},
  ]


def test_a_disabled_log_writes_nothing(tmp_path, capsys):
  log = run_log.RunLog(str(tmp_path), enabled=False, tensorboard=False)
  log.info("hello")
  log.warn("careful")
  log.scalars(1, {"loss": 1.0})
  log.keep_through(0)
  log.close()
  assert not list(tmp_path.iterdir())
  assert capsys.readouterr() == ("", "")


def test_step_line():
  values = {
      "loss": 2.5,
      "grad_norm": 0.25,
      "lr": 3e-4,
      "tokens_per_s": 1234.4,
      "mfu": 0.123,
      "truncated": 2.0,
      "gate_loop3": 0.75,
      "gate_loop2": 0.5,
  }
  assert run_log.step_line(7, 10, values) == (
      "step 7/10  loss 2.5000  grad_norm 0.250  lr 3.00e-04  tok/s 1234  mfu 12.3%  "
      "truncated 2  gate/loop 0.500,0.750"
  )
  assert run_log.step_line(1, 10, {"loss": 1, "grad_norm": 1, "lr": 1}) == (
      "step 1/10  loss 1.0000  grad_norm 1.000  lr 1.00e+00"
  )
