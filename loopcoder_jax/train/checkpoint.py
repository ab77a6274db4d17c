"""Orbax checkpoints, behind this one module.

A *params directory* holds `config.json` (HF keys) and `params/` (an Orbax PyTree checkpoint of the
model params, stored uncompressed). `save_params`/`load_params` read and write it; the converter and
`generate.py` use them; `iter_params` reads it one param at a time (streaming conversion).
`TrainCheckpointer` holds the training checkpoints (TrainState, grain iterator state, run metadata)
in an Orbax CheckpointManager.
"""

from __future__ import annotations

from collections.abc import Iterator
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from loopcoder_jax.model.config import PLTConfig


def is_params_dir(path: str | os.PathLike) -> bool:
  path = os.fspath(path)
  return os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(
      os.path.join(path, "params")
  )


def save_params(path: str | os.PathLike, cfg: PLTConfig, params: Any) -> None:
  """Write `config.json` and `params/` under `path` (which must not hold a checkpoint yet)."""
  path = os.path.abspath(os.fspath(path))
  os.makedirs(path, exist_ok=True)
  # Uncompressed: zstd saves about a fifth of the disk on bf16 weights, but the compressed stream
  # of the whole checkpoint stays in memory until it commits (about +0.8x the checkpoint's size).
  handler = ocp.PyTreeCheckpointHandler(use_compression=False)
  with ocp.Checkpointer(handler) as ckptr:
    ckptr.save(os.path.join(path, "params"), args=ocp.args.PyTreeSave(params))
  cfg.to_hf_file(os.path.join(path, "config.json"))


def _flat_metadata(path: str) -> dict[tuple[str, ...], Any]:
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.metadata(os.path.join(path, "params")).item_metadata.tree
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {tuple(k.key for k in keys): m for keys, m in leaves}


def params_metadata(path: str | os.PathLike) -> dict[str, jax.ShapeDtypeStruct]:
  """'a/b/c' -> shape and dtype of every param under `path/params` (reads no array data)."""
  flat = _flat_metadata(os.path.abspath(os.fspath(path)))
  return {
      "/".join(k): jax.ShapeDtypeStruct(tuple(m.shape), m.dtype)
      for k, m in flat.items()
  }


def iter_params(path: str | os.PathLike) -> Iterator[tuple[str, jax.Array]]:
  """('a/b/c', host array) for each param of a params directory, restored one at a time (a partial
  restore each), so the reader holds one param rather than the model.
  """
  path = os.path.abspath(os.fspath(path))
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  handler = ocp.PyTreeCheckpointHandler()
  for keys, m in _flat_metadata(path).items():
    target: dict[str, Any] = {}
    node = target
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=cpu)
    with ocp.Checkpointer(handler) as ckptr:
      tree = ckptr.restore(
          os.path.join(path, "params"),
          args=ocp.args.PyTreeRestore(
              target,
              restore_args=jax.tree.map(
                  lambda _: ocp.ArrayRestoreArgs(sharding=cpu), target
              ),
              partial_restore=True,
          ),
      )
    leaf = tree
    for k in keys:
      leaf = leaf[k]
    yield "/".join(keys), leaf
    del tree, leaf


def stored_dtypes(path: str | os.PathLike) -> set[str]:
  """dtype names of the arrays under `path/params`, from Orbax metadata (reads no array data)."""
  return {str(m.dtype) for m in params_metadata(path).values()}


def load_params(
    path: str | os.PathLike, shardings: Any = None, **runtime_kw
) -> tuple[PLTConfig, Any]:
  """Read a params directory. `shardings` (a pytree like params, or one Sharding) places the arrays;
  by default they go to the first local device, whatever mesh they were saved from.
  """
  path = os.path.abspath(os.fspath(path))
  if not is_params_dir(path):
    raise ValueError(
        f"{path} is not a params checkpoint (needs config.json and params/)"
    )
  cfg = PLTConfig.from_hf_file(os.path.join(path, "config.json"), **runtime_kw)
  from loopcoder_jax.model.transformer import (
      abstract_params,  # local: model imports are heavy
  )

  target = abstract_params(cfg)
  if shardings is None:
    shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, target)
  target = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      target,
      shardings,
  )
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.join(path, "params"), target)
  return cfg, params


# ------------------------------------------------------------------------------------- training
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


class TrainCheckpointer:
  """Orbax `CheckpointManager` for training: `state` (TrainState), `data` (grain iterator state, one
  JSON file per process) and `meta` (JSON: model config, run info) in one step directory.

  Saves are asynchronous, every `every_steps` steps (or forced: preemption, end of run); the latest
  `keep` are kept. `restore` walks back from the latest step and skips unreadable ones with a one-line
  warning, restoring onto the shardings carried by the abstract target (any mesh).
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
        create=True,
    )
    self._mgr = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    return sorted(self._mgr.all_steps())

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
      self, abstract_state: Any, data_iterator: Any
  ) -> tuple[int, Any, dict] | None:
    """(step, state, meta) from the newest readable checkpoint (sets `data_iterator`'s state), or
    None when the directory holds none. `abstract_state`'s leaves carry the target shardings.
    """
    import grain.checkpoint as gck

    steps = sorted(self._mgr.all_steps(), reverse=True)
    for i, step in enumerate(steps):
      try:
        out = self._mgr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=gck.CheckpointRestore(data_iterator),
                meta=ocp.args.JsonRestore(),
            ),
        )
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: fall back to the previous
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        nxt = (
            f"using step {steps[i + 1]}"
            if i + 1 < len(steps)
            else "no older checkpoint left"
        )
        self._log(
            f"checkpoint step {step} in {self.directory} is unreadable "
            f"({type(e).__name__}: {first}); {nxt}"
        )
        continue
      return step, out["state"], out["meta"]
    if steps:
      raise ValueError(
          f"no readable checkpoint in {self.directory} (tried steps {steps})"
      )
    return None

  def wait_until_finished(self) -> None:
    self._mgr.wait_until_finished()

  def close(self) -> None:
    self._mgr.wait_until_finished()
    self._mgr.close()
