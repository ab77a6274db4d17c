"""Training behind `scripts/train.py`, in three phases like the flax examples' train_and_evaluate:

  set up (`setup.py`)   distributed init, config validation, tokenizer, data, mesh and jitted step,
                        the state restored from the newest checkpoint or initialised; every check
                        that can fail does so here, before anything is compiled
  the loop (`loop.py`)  steps with their hooks: divergence, throughput and MFU, logging,
                        checkpointing, preemption
  finish (here)         the params export, the held-out score again and a greedy completion

Fine-tuning (`init.checkpoint`): the weights, model config and tokenizer come from a checkpoint
(loaded by `checkpoints.load`) and the optimizer starts fresh; the tokenizer, with the chat template the
run renders with, is saved in `WORKDIR/tokenizer`. Chat data (`data.format = "chat"`, see
data/chat.py) is validated in full before anything is compiled; its held-out score is the mean loss
per assistant token (nats) instead of bits per byte, and conversations truncated to `seq_len` are
counted in the log.

Checkpoints: `WORKDIR/checkpoints/<step>/{state,data,meta}` (see `checkpoints.TrainCheckpointer`); a
run restarted with the same workdir resumes from the newest usable one (of init.checkpoint only
the config.json is read then) and sees exactly the batch it would have seen. The run metadata
(model config, batch shape, tokenizer vocabulary) must match the restarted run's. SIGTERM or
Ctrl-C saves at the next step boundary and stops (summary `preempted`: the signal). A non-finite
loss or gradient norm stops the run, and so does a non-finite state before any save: a checkpoint
is never non-finite, and a restored one that is (written by an older version) is skipped. The
final params are also written as a params directory (`WORKDIR/params`, for generate/convert),
replaced whenever the run ends at a newer step (`WORKDIR/params/step.json` names its step).

One trainer per workdir: `lock.WorkdirLock` (the workdir lock) is held from start to end.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from typing import Any

import jax
import ml_collections

from loopcoder_jax import checkpoints
from loopcoder_jax.inference import generation
from loopcoder_jax.train import config as train_config
from loopcoder_jax.train import lock
from loopcoder_jax.train.loop import (
    TrainingDiverged,
    storage_guard,
    train_steps,
)
from loopcoder_jax.train.run_log import RunLog
from loopcoder_jax.train.setup import Run, set_up

__all__ = [
    "EXPORT_STEP_FILE",
    "StorageError",
    "TrainingDiverged",
    "WorkdirBusy",
    "train",
]

WorkdirBusy = lock.WorkdirBusy
StorageError = checkpoints.StorageError
EXPORT_STEP_FILE = "step.json"  # in WORKDIR/params: the step the export holds


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) training; returns a summary (steps, held-out score before/after, completion)."""
  _init_distributed(config.distributed)
  cfg = train_config.validate(config)
  if "://" in workdir:  # abspath would make "gs://b/x" a local ./gs:/b/x
    raise ValueError(
        f"workdir {workdir} is a URL; the trainer writes to a file system: "
        "mount the bucket (e.g. gcsfuse) and pass the mounted path"
    )
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"workdir {workdir} exists and is not a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ValueError(f"cannot create workdir {workdir}: {e.strerror}") from None
  held = lock.WorkdirLock(workdir, jax.process_index())
  took_over = held.acquire()
  try:
    log = RunLog(
        workdir,
        enabled=jax.process_index() == 0,
        tensorboard=config.metrics.tensorboard,
    )
    if took_over:
      log.warn(took_over)
    try:
      return train_and_evaluate(config, cfg, workdir, log)
    finally:
      log.close()
  finally:
    held.release()


def train_and_evaluate(
    config, cfg, workdir: str, log: RunLog
) -> dict[str, Any]:
  """Set up, score, train, finish: the three phases under the workdir lock."""
  t_start = time.time()
  # read before any process can replace it
  exported_step = _exported_step(os.path.join(workdir, "params"))
  run = set_up(config, cfg, workdir, log)
  summary: dict[str, Any] = {
      "workdir": workdir,
      "start_step": int(run.state.step),
  }
  run.heldout.before(
      run.model_params(run.state.params), int(run.state.step), summary, log
  )
  state = train_steps(run, summary)
  if state is not None:
    _finish(run, state, exported_step, summary)
    summary["wall_s"] = time.time() - t_start
    log.info(f"done in {summary['wall_s']:.0f}s")
  return summary


def _finish(run: Run, state, exported_step: int | None, summary: dict) -> None:
  """The params export, the held-out score after training, a greedy completion."""
  step, log = summary["end_step"], run.log
  pi, pc = jax.process_index(), jax.process_count()
  if exported_step != step:
    with storage_guard(
        run.ckpt, f"exporting the params of step {step} to {run.params_dir}"
    ):
      _export(
          run.params_dir,
          run.cfg,
          state.params,
          step,
          pi,
          pc,
          run.meta.get("lora"),
      )
    what = "params" if run.base is None else "LoRA adapters"
    log.info(f"{what} of step {step} exported to {run.params_dir}")
  params = run.model_params(state.params)
  run.heldout.after(params, step, summary, log)
  for key in ("loss_after", "bpb_after"):
    if key in summary and not math.isfinite(summary[key]):
      raise TrainingDiverged(
          f"the held-out score at step {step} is {summary[key]} (finite params "
          f"in {run.params_dir}, but they do not evaluate to a finite loss)"
      )
  e, d = run.config.eval, run.config.data
  if e.completion_tokens > 0 and pc == 1:
    summary["completion"] = generation.complete(
        run.cfg,
        params,
        run.tok,
        [e.prompt],
        max_new_tokens=e.completion_tokens,
        chat=run.chat,
        add_bos=d.add_bos,
    )[0]
    generation.clear_engines()  # its placed copy of the weights is not needed again
    shown = "" if run.chat else e.prompt
    kind = "chat completion" if run.chat else "completion"
    log.info(f"greedy {kind} of {e.prompt!r}:\n{shown}{summary['completion']}")


def _init_distributed(dist: ml_collections.ConfigDict) -> None:
  if not dist.enabled:
    return
  if dist.cpu_collectives:
    jax.config.update(
        "jax_cpu_collectives_implementation", dist.cpu_collectives
    )
  kw = {}
  if dist.coordinator_address:
    kw = dict(
        coordinator_address=dist.coordinator_address,
        num_processes=dist.num_processes,
        process_id=dist.process_id,
    )
  jax.distributed.initialize(**kw)


def _exported_step(params_dir: str) -> int | None:
  try:
    with open(os.path.join(params_dir, EXPORT_STEP_FILE)) as f:
      return int(json.load(f)["step"])
  except (OSError, ValueError, KeyError, TypeError):
    return None


def _export(
    params_dir: str, cfg, params, step: int, pi: int, pc: int, lora_ref=None
) -> None:
  """Writes the params directory beside the old one, then swaps it in (never half-written). A LoRA
  run's holds its adapters and `lora.json` (their config, the base's path and content hash).
  """
  partial, old = params_dir + ".partial", params_dir + ".old"
  if pi == 0:  # left by an export cut short: the old export is put back first
    shutil.rmtree(partial, ignore_errors=True)
    if os.path.exists(old) and not os.path.exists(params_dir):
      os.rename(old, params_dir)
    shutil.rmtree(old, ignore_errors=True)
  _sync(pc, "export: start")
  try:
    checkpoints.save_params(partial, cfg, params)
    if pi == 0:
      with open(os.path.join(partial, EXPORT_STEP_FILE), "w") as f:
        json.dump({"step": step}, f)
      if lora_ref is not None:
        checkpoints.write_lora_record(partial, lora_ref)
  except BaseException:
    # a failed export leaves nothing behind; the previous one stays in place
    if pi == 0:
      shutil.rmtree(partial, ignore_errors=True)
    raise
  if pi == 0:
    if os.path.exists(params_dir):
      os.rename(params_dir, old)
    os.rename(partial, params_dir)
    shutil.rmtree(old, ignore_errors=True)
  _sync(pc, "export: done")


def _sync(pc: int, name: str) -> None:
  if pc > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)
