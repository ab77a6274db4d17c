"""The training loop: the jitted step, and after each step its hooks (divergence, throughput and
MFU, logging, checkpointing, preemption).

SIGTERM or Ctrl-C saves at the next step boundary and stops (summary `preempted`: the signal); on
multi-host runs JAX's preemption service picks the step. A non-finite loss or gradient norm stops
the run, and so does a non-finite state before any save: a checkpoint is never non-finite.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from typing import Any

import jax
import numpy as np

from loopcoder_jax import checkpoints
from loopcoder_jax.checkpoints import params_io
from loopcoder_jax.train import step as train_step
from loopcoder_jax.train.run_log import step_line
from loopcoder_jax.train.setup import Run, nonfinite_state


class TrainingDiverged(RuntimeError):
  pass


def train_steps(run: Run, summary: dict) -> Any:
  """Steps from the set-up state to `train.total_steps`; the final state, or None when a signal or
  preemption stopped the run after saving (`summary["preempted"]`)."""
  t = run.config.train
  state, step = run.state, int(run.state.step)
  meter = _Throughput(run)
  bar = run.log.bar(step, t.total_steps, run.config.metrics.progress_bar)
  truncated = 0  # chat conversations cut to seq_len since this (re)start, on this process
  try:
    with _StopSignals() as signals:
      while step < t.total_steps:
        local = next(run.batches)
        truncated += int(local["truncated"].sum()) if run.chat else 0
        batch = train_step.global_batch(local, run.mesh, run.rules)
        state, metrics = run.step_fn(state, batch)
        step += 1
        values = _step_values(run, step, jax.device_get(metrics))
        meter.add(values, time.time())
        logged = step % t.log_every == 0 or step == t.total_steps
        if run.chat and logged:
          values["truncated"] = float(_sum_over_processes(truncated))
        _report(run, bar, step, values, logged)
        stop = signals.signum is not None or _preemption_sync(step)
        _checkpoint(run, step, state, values, stop or step == t.total_steps)
        if stop:
          _stopped(run, step, signals.signum or signal.SIGTERM, summary)
          return None
  finally:
    run.log.close_bar()
    with storage_guard(run.ckpt, "saving a checkpoint"):
      run.ckpt.close()
  summary["end_step"] = step
  summary["train_s"] = meter.seconds
  return state


def _step_values(run: Run, step: int, m: dict) -> dict[str, float]:
  """The step's scalars; a non-finite loss or gradient norm stops the run here."""
  loss, gnorm = float(m["loss"]), float(m["grad_norm"])
  if not (math.isfinite(loss) and math.isfinite(gnorm)):
    what = "loss" if not math.isfinite(loss) else "gradient norm"
    diverged(run.ckpt, f"non-finite {what} at step {step}", loss, gnorm)
  values = {
      "loss": loss,
      "grad_norm": gnorm,
      "lr": float(m["lr"]),
      "tokens": float(m["tokens"]),
  }
  for r, g in enumerate(np.atleast_1d(m["gate_mean"])):
    values[f"gate_loop{r + 2}"] = float(g)
  return values


class _Throughput:
  """Tokens per second and MFU since the run's first step (which includes compilation)."""

  def __init__(self, run: Run):
    config = run.config
    self.tokens_per_step = config.train.global_batch_size * config.data.seq_len
    self.peak = _peak_flops(config, run.log)
    self.flops_per_token: float | None = None
    if self.peak is not None:
      from loopcoder_jax.model import flops

      self.flops_per_token = flops.train_flops_per_token(
          run.cfg, config.data.seq_len
      )
    self.tokens, self.seconds = 0.0, 0.0
    self._prev: float | None = None

  def add(self, values: dict[str, float], now: float) -> None:
    if self._prev is not None:
      self.tokens += self.tokens_per_step
      self.seconds += now - self._prev
      values["tokens_per_s"] = self.tokens / self.seconds
      if self.flops_per_token is not None and self.peak is not None:
        values["mfu"] = (
            values["tokens_per_s"]
            * self.flops_per_token
            / (self.peak * jax.device_count())
        )
    self._prev = now


def _peak_flops(config, log) -> float | None:
  """Per-device peak FLOP/s for MFU (None: not reported)."""
  peak = config.metrics.peak_flops
  if peak < 0:
    return None
  if peak > 0:
    return peak
  from loopcoder_jax import hardware

  dev = jax.devices()[0]
  known = hardware.chip_peak(dev.device_kind)
  if known is not None:
    return known["bf16_flops"]
  if dev.platform == "cpu":
    import jax.numpy as jnp

    measured = hardware.measure_matmul_peak(jnp.float32, n=1024, repeats=3)
    log.info(
        f"measured fp32 matmul peak: {measured / 1e9:.1f} GFLOP/s per device (MFU reference)"
    )
    return measured
  return None


def _report(run: Run, bar, step: int, values: dict, logged: bool) -> None:
  run.log.scalars(step, values)
  if bar is not None:
    bar.update(1)
    bar.set_postfix(
        loss=f"{values['loss']:.3f}",
        tok_s=f"{values.get('tokens_per_s', 0):.0f}",
    )
  if logged:
    run.log.info(step_line(step, run.config.train.total_steps, values))


def _checkpoint(run: Run, step: int, state, values: dict, force: bool) -> None:
  """Saves when the policy says so or `force`, once the state is checked finite."""
  if force or run.ckpt.should_save(step):
    # the loss and gradient norm are the pre-update params'; the update may have broken them
    bad = nonfinite_state(state)
    if bad:
      diverged(
          run.ckpt,
          f"{bad} at step {step} after the update",
          values["loss"],
          values["grad_norm"],
      )
    # a failed asynchronous save surfaces here, at the next save, or at the last wait
    with storage_guard(run.ckpt, "saving a checkpoint"):
      run.ckpt.save(step, state, run.data_it, run.meta, force=force)


def _stopped(run: Run, step: int, signum: int, summary: dict) -> None:
  with storage_guard(run.ckpt, "saving a checkpoint"):
    run.ckpt.wait_until_finished()
  run.log.info(
      f"preempted: saved step {step} in {run.ckpt.directory} "
      f"({signal.Signals(signum).name}); rerun the same command to resume"
  )
  summary.update(preempted=int(signum), end_step=step)


def diverged(ckpt, what: str, loss: float, gnorm: float):
  """Stops the run naming the newest checkpoint (every saved one was checked finite)."""
  ckpt.wait_until_finished()
  raise TrainingDiverged(
      f"{what} (loss {loss}, grad norm {gnorm}); stopped without saving, "
      f"{last_good(ckpt.directory)}"
  )


def last_good(directory: str) -> str:
  """'last good checkpoint: step N in DIR' (the newest complete step), or that none was saved."""
  steps = (
      sorted(int(n) for n in os.listdir(directory) if n.isdigit())
      if os.path.isdir(directory)
      else []
  )
  if not steps:
    return f"no checkpoint saved in {directory}"
  return f"last good checkpoint: step {steps[-1]} in {directory}"


@contextlib.contextmanager
def storage_guard(ckpt, what: str):
  """A storage failure (full disk, read-only, quota) while `what`: one StorageError line that
  names the last good checkpoint; any other error passes through."""
  try:
    yield
  except Exception as e:
    problem = checkpoints.storage_problem(e)
    if problem is None:
      raise
    params_io.quiet_abandoned_reads()  # Orbax's async writes end on a closed event loop
    raise checkpoints.StorageError(
        f"{what} failed ({problem}); {last_good(ckpt.directory)}; free space and "
        "rerun the same command to resume"
    ) from None


class _StopSignals(contextlib.AbstractContextManager):
  """SIGTERM and Ctrl-C recorded (`signum`) for the loop to stop at the next step boundary; the
  previous handlers come back on exit. A second Ctrl-C interrupts at once; a signal the run was
  started to ignore (nohup, a background job) stays ignored. Only the main thread sets handlers.
  """

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(sig) is not signal.SIG_IGN:
          self._previous[sig] = signal.signal(sig, self._on_signal)
    return self

  def _on_signal(self, signum, _):
    self.signum = signum
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.default_int_handler)

  def __exit__(self, *_):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _sum_over_processes(n: int) -> int:
  if jax.process_count() == 1:
    return n
  from jax.experimental import multihost_utils

  return int(np.sum(multihost_utils.process_allgather(np.int64(n))))


def _preemption_sync(step: int) -> bool:
  """On multi-host runs, JAX's preemption service agrees on one step for all hosts to save at."""
  if jax.process_count() == 1:
    return False
  from jax.experimental import multihost_utils

  try:
    return multihost_utils.reached_preemption_sync_point(step)
  except RuntimeError:  # the service is not running (e.g. a CPU test cluster)
    return False
