import json

import numpy as np
import pytest

from loopcoder_jax.eval import plots

PNG = b"\x89PNG\r\n\x1a\n"
NAN = float("nan")


def diag_result(loops, layers=2, heads=4, seed=0):
  """A loop_diagnostics-shaped result (NaN where a loop has no value)."""
  rng = np.random.default_rng(seed)

  def per_loop(first=0):
    return [NAN] * first + rng.random(loops - first).tolist()

  res = {
      "step_size": per_loop(),
      "update_cos": per_loop(1),
      "effective_rank": per_loop(),
      "median_rank": per_loop(),
      "kl_prev": per_loop(1),
      "argmax_changes": per_loop(1),
      "attn_entropy_global": per_loop(),
  }
  heads_out = {
      "attn_entropy_global": rng.random((loops, layers, heads)).tolist()
  }
  if loops > 1:
    res |= {
        "fixed_point_gap": per_loop(),
        "mean_gate": per_loop(1),
        "attn_kl_global": per_loop(1),
        "attn_entropy_local": per_loop(1),
    }
    gate = rng.random((loops, layers, heads))
    gate[0] = NAN
    heads_out |= {"mean_gate": gate.tolist(), "gate_std": (gate / 4).tolist()}
  res["per_head"] = heads_out
  return res


def written(paths):
  assert all(open(p, "rb").read(8) == PNG for p in paths)
  return sorted(p.rsplit("/", 1)[-1] for p in paths)


def test_diagnostics_plots_of_a_looped_model(tmp_path):
  out = tmp_path / "new" / "dir"
  paths = plots.diagnostics_plots(diag_result(3), str(out))
  assert written(paths) == [
      "attention.png",
      "effective_rank.png",
      "gate.png",
      "logit_lens.png",
      "step_size.png",
  ]
  assert sorted(p.name for p in out.iterdir()) == written(paths)


def test_a_single_loop_has_no_gate_plot(tmp_path):
  paths = plots.diagnostics_plots(diag_result(1), str(tmp_path))
  assert written(paths) == [
      "attention.png",
      "effective_rank.png",
      "logit_lens.png",
      "step_size.png",
  ]


def test_study_plots(tmp_path):
  rows = [
      dict(
          name=f"R{r}",
          loops=r,
          train_flops=1e12 * r,
          decode_flops=1e6 * r,
          bpb=[2.0 - 0.1 * r, 2.05 - 0.1 * r],
          diagnostics={
              k: v for k, v in diag_result(r).items() if k != "per_head"
          },
      )
      for r in (1, 2, 3)
  ]
  paths = plots.study_plots(rows, str(tmp_path / "docs" / "study"))
  assert set(paths) == {"quality", "loops"}
  assert written(paths.values()) == ["study_loops.png", "study_quality.png"]


def test_training_plots_read_the_workdir_metrics(tmp_path):
  with pytest.raises(ValueError, match="not a training workdir"):
    plots.training_plots(str(tmp_path), str(tmp_path / "plots"))
  records = [
      {"step": s, "loss": 5.0 - s / 10, "gate_loop2": 0.5, "gate_loop3": 0.4}
      for s in (1, 2, 3, 2, 3)  # a resumed run logs steps 2 and 3 again
  ]
  (tmp_path / "metrics.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in records)
  )
  paths = plots.training_plots(str(tmp_path), str(tmp_path / "plots"))
  assert written(paths) == ["training.png"]
