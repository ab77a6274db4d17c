"""Training checkpoints: TrainState, grain iterator state and run metadata, one step per directory."""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

from loopcoder_jax.checkpoints.params_io import (
    first_line,
    quiet_abandoned_reads,
)


def _snapshot(iterator):
  """Freezes an iterator's state at save time (the async save may run after the loop moved on)."""
  import grain  # local: only training needs grain

  class Snapshot(grain.DatasetIterator):

    def __init__(self, state):
      super().__init__()
      self._state = state

    def __next__(self):
      raise StopIteration

    def get_state(self):
      return self._state

    def set_state(self, state):
      self._state = state

  return Snapshot(iterator.get_state())


class _OrbaxThreadErrors(logging.Filter):
  """Drops Orbax's error logs (with their tracebacks), and asyncio's for Orbax's tasks: a failed
  asynchronous save is logged by each of its background threads and tasks, then raised by the
  next `save` or wait, where the caller reports it once."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    if f"{os.sep}orbax{os.sep}" in record.pathname:
      return False
    return not (record.name == "asyncio" and "orbax" in record.getMessage())


def _quiet_orbax_threads() -> None:
  """From now on (tasks a failed save abandons report at exit too), drops those logs and the
  "Event loop is closed" reports of those tasks; once per process."""
  for name in ("absl", "asyncio"):
    logger = logging.getLogger(name)
    if not any(isinstance(f, _OrbaxThreadErrors) for f in logger.filters):
      logger.addFilter(_OrbaxThreadErrors())
  quiet_abandoned_reads()


class TrainCheckpointer:
  """Orbax `CheckpointManager` for training: `state` (TrainState), `data` (grain iterator state, one
  JSON file per process) and `meta` (JSON: model config, run info) in one step directory.

  Saves are asynchronous, every `every_steps` steps (or forced: preemption, end of run); the latest
  `keep` are kept, and temporary directories of saves cut short (kill -9) are removed on start.
  `restore` walks back from the latest step, skipping unreadable (or rejected) ones with a one-line
  warning, and restores onto the shardings carried by the abstract target (any mesh). The steps it
  skipped are moved to `<directory>_unusable/`, so the run saves those steps anew.
  """

  def __init__(
      self,
      directory: str | os.PathLike,
      *,
      every_steps: int,
      keep: int,
      async_save: bool = True,
      log=print,
  ):
    from orbax.checkpoint import checkpoint_managers as cm

    self.directory = os.path.abspath(os.fspath(directory))
    self._log = log
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=cm.FixedIntervalPolicy(every_steps),
        preservation_policy=cm.LatestN(keep),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        create=True,
    )
    self._mgr = ocp.CheckpointManager(self.directory, options=options)
    _quiet_orbax_threads()

  def all_steps(self) -> list[int]:
    return sorted(self._mgr.all_steps())

  def should_save(self, step: int) -> bool:
    """Whether `save(step, ...)` without `force` would save."""
    return self._mgr.should_save(step)

  def save(
      self,
      step: int,
      state: Any,
      data_iterator: Any,
      meta: dict,
      *,
      force: bool = False,
  ) -> bool:
    """Starts an (async) save when the policy says so or `force`; True if one was started."""
    import grain.checkpoint as gck

    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=gck.CheckpointSave(_snapshot(data_iterator)),
        meta=ocp.args.JsonSave(meta),
    )
    return self._mgr.save(step, args=args, force=force)

  def restore(
      self,
      abstract_state: Any,
      data_iterator: Any,
      *,
      check_meta=None,
      check_state=None,
  ) -> tuple[int, Any, dict] | None:
    """(step, state, meta) from the newest usable checkpoint (sets `data_iterator`'s state), or
    None when the directory holds none. `abstract_state`'s leaves carry the target shardings.

    `check_meta(meta)` runs on each step's metadata before its state is read (a ValueError from it
    stops the restore); `check_state(state)` returns why a restored state is unusable, or None.
    """
    steps = sorted(self._mgr.all_steps(), reverse=True)
    skipped: list[str] = []  # a line per skipped step, logged with its fate
    for step in steps:
      problem, state, meta = self._read(
          step, abstract_state, data_iterator, check_meta
      )
      if problem is None and check_state is not None:
        problem = check_state(state)
      if problem is None:
        aside = self._set_aside(steps[: len(skipped)])
        for line in skipped:
          self._log(f"{line}; using step {step}, it is moved to {aside}")
        return step, state, meta
      skipped.append(f"checkpoint step {step} in {self.directory} {problem}")
    for line in skipped:
      self._log(f"{line}; no usable checkpoint left")
    if steps:
      raise ValueError(
          f"no usable checkpoint in {self.directory} (tried steps {steps})"
      )
    return None

  def _read(self, step, abstract_state, data_iterator, check_meta):
    """(None, state, meta), or (why the step is unreadable, None, None)."""
    import grain.checkpoint as gck

    try:
      meta = self._mgr.restore(
          step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
      )["meta"]
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: fall back to the previous
      return f"is unreadable ({first_line(e)})", None, None
    if check_meta is not None:
      check_meta(meta)
    try:
      out = self._mgr.restore(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state),
              data=gck.CheckpointRestore(data_iterator),
          ),
      )
    except Exception as e:  # noqa: BLE001 - as above
      quiet_abandoned_reads()
      return f"is unreadable ({first_line(e)})", None, None
    return None, out["state"], meta

  def _set_aside(self, steps: list[int]) -> str:
    """Moves skipped steps out of the manager's directory (kept, never deleted); returns where."""
    aside = f"{self.directory}_unusable"
    if not steps:
      return aside
    if jax.process_index() == 0:
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        dst, n = os.path.join(aside, str(step)), 1
        while os.path.exists(dst):
          dst, n = os.path.join(aside, f"{step}.{n}"), n + 1
        shutil.move(os.path.join(self.directory, str(step)), dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("checkpoints set aside")
    self._mgr.reload()
    return aside

  def wait_until_finished(self) -> None:
    self._mgr.wait_until_finished()

  def close(self) -> None:
    self._mgr.wait_until_finished()
    self._mgr.close()
