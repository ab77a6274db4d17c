"""A training run's reports: log lines, warnings, the progress bar and the metrics file."""

from __future__ import annotations

import json
import os
import sys


class RunLog:
  """What a run reports: lines on stdout (or above the progress bar), warnings on stderr, scalars in
  WORKDIR/metrics.jsonl (and TensorBoard). Only process 0 reports (`enabled`).
  """

  def __init__(self, workdir: str, enabled: bool, tensorboard: bool):
    self.enabled = enabled
    self._bar = None
    self._tb = None
    self._jsonl = None
    if enabled:
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      if tensorboard:
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def info(self, msg: str) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(msg)
    else:
      print(msg, flush=True)

  def warn(self, msg: str) -> None:
    if self.enabled:
      print(msg, file=sys.stderr, flush=True)

  def bar(self, start: int, total: int, show: bool):
    if self.enabled and show:
      from tqdm import tqdm

      self._bar = tqdm(
          initial=start,
          total=total,
          unit="step",
          dynamic_ncols=True,
          file=sys.stderr,
      )
    return self._bar

  def keep_through(self, step: int) -> None:
    """Drops the records after `step` (a resumed run logs those steps again) and torn lines."""
    if self._jsonl is None:
      return
    path = self._jsonl.name
    self._jsonl.close()
    kept = []
    with open(path) as f:
      for line in f:
        try:
          if json.loads(line)["step"] <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
          continue  # a line cut short by a kill
    with open(path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)
    self._jsonl = open(path, "a")

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if self._jsonl is None:
      return
    self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, step)

  def close_bar(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def close(self) -> None:
    self.close_bar()
    if self._jsonl:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def step_line(step: int, total: int, v: dict[str, float]) -> str:
  """One logged step: loss, gradient norm, learning rate, speed, MFU, truncations, gates."""
  parts = [
      f"step {step}/{total}",
      f"loss {v['loss']:.4f}",
      f"grad_norm {v['grad_norm']:.3f}",
      f"lr {v['lr']:.2e}",
  ]
  if "tokens_per_s" in v:
    parts.append(f"tok/s {v['tokens_per_s']:.0f}")
  if "mfu" in v:
    parts.append(f"mfu {100 * v['mfu']:.1f}%")
  if "truncated" in v:
    parts.append(f"truncated {v['truncated']:.0f}")
  gates = [f"{v[k]:.3f}" for k in sorted(v) if k.startswith("gate_loop")]
  if gates:
    parts.append("gate/loop " + ",".join(gates))
  return "  ".join(parts)
