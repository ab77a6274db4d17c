"""The params directory: a model's weights on disk, in Orbax (with `training.py`, the only importers of Orbax).

A *params directory* holds `config.json` (HF keys), `params/` (an Orbax PyTree checkpoint of the
model params, stored uncompressed) and `checksums.json` (a CRC-32 per param, checked on reading:
uncompressed chunks have no checksum of their own). `save_params`/`load_params` write and read it; the converter and
`generate.py` use them; `iter_params` reads it one param at a time (streaming conversion). The
readers also take one training step (`WORKDIR/checkpoints/<step>`, see `is_step_dir`).

Reading fails with one ValueError line: a missing, truncated or corrupted data file, or a config
whose shapes disagree with the stored arrays (checked from the metadata before any array is read).
"""

from __future__ import annotations

from collections.abc import Iterator
import inspect
import json
import logging
import os
import sys
import traceback
from typing import Any
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from loopcoder_jax.model.config import LoraConfig, PLTConfig

# Beside a params directory's config.json: a CRC-32 per param (its bytes in C order).
CHECKSUMS = "checksums.json"
# A training step directory: the TrainState, with the model config in the run metadata.
_STEP_STATE, _STEP_META = "state", os.path.join("meta", "metadata")
# Beside the config.json of a LoRA run's export: its adapters' config and base (`lora_record`).
LORA_FILE = "lora.json"


def is_params_dir(path: str | os.PathLike) -> bool:
  path = os.fspath(path)
  return os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(
      os.path.join(path, "params")
  )


def is_step_dir(path: str | os.PathLike) -> bool:
  """A step of a training run's checkpoints (`WORKDIR/checkpoints/<step>`)."""
  path = os.fspath(path)
  return os.path.isdir(os.path.join(path, _STEP_STATE)) and os.path.isfile(
      os.path.join(path, _STEP_META)
  )


def first_line(e: BaseException) -> str:
  """The first line of the innermost cause: the storage error, not the layers above it."""
  while (e.__cause__ or e.__context__) is not None:
    e = e.__cause__ or e.__context__  # type: ignore[assignment]
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def _abandoned_read(u) -> bool:
  """An unraisable report of an Orbax read left behind by a failed restore."""
  if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == (
      "Event loop is closed"
  ):
    return True
  return inspect.iscoroutine(u.object) and (
      "orbax" in u.object.cr_code.co_filename
  )


def _orbax_task_report(record: logging.LogRecord) -> bool:
  """asyncio's "Task exception was never retrieved" for a task running Orbax code."""
  if "never retrieved" not in str(record.msg):
    return False
  frames = traceback.extract_tb(record.exc_info[2]) if record.exc_info else []
  return any("orbax" in f.filename for f in frames) or (
      "orbax" in record.getMessage()
  )


class _QuietOrbaxTasks(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    return not _orbax_task_report(record)


def quiet_abandoned_reads() -> None:
  """After a failed restore, Orbax's pending reads finish on its closed event loop (or are
  collected unfinished), each reporting an "unraisable" exception, or a failed task that asyncio
  logs when it is collected: tens of tracebacks on stderr around the one error that matters.
  Installed before a restore starts (some reads finish before the failure reaches us), it drops
  those reports, and only those, from then on.
  """
  asyncio_log = logging.getLogger("asyncio")
  if not any(isinstance(f, _QuietOrbaxTasks) for f in asyncio_log.filters):
    asyncio_log.addFilter(_QuietOrbaxTasks())
  previous = sys.unraisablehook
  if getattr(previous, "quiets_orbax", False):
    return

  def hook(u):
    if not _abandoned_read(u):
      previous(u)

  hook.quiets_orbax = True  # type: ignore[attr-defined]
  sys.unraisablehook = hook


def _key(k) -> str:
  return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def flat_paths(tree) -> dict[str, Any]:
  """'a/b/c' -> leaf of a pytree (dict keys, dataclass fields and sequence indices joined)."""
  return {
      "/".join(_key(k) for k in p): x
      for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


@jax.jit
def _all_finite(leaves):
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def nonfinite_paths(tree) -> list[str]:
  """Paths of the float arrays of `tree` holding a NaN or Inf (one jitted pass over them all)."""
  floats = {
      p: x
      for p, x in flat_paths(tree).items()
      if jnp.issubdtype(x.dtype, jnp.inexact)
  }
  if not floats:
    return []
  ok = np.asarray(_all_finite(list(floats.values())))
  return [p for p, good in zip(floats, ok) if not good]


def _crc32(x) -> int:
  """CRC-32 of an array's bytes in C order (a host copy of a device array, one at a time)."""
  a = np.ascontiguousarray(np.asarray(x))
  return zlib.crc32(a.reshape(-1).view(np.uint8).data)


def _addressable(x) -> bool:
  return getattr(x, "is_fully_addressable", True)


def save_params(path: str | os.PathLike, cfg: PLTConfig, params: Any) -> None:
  """Write `config.json`, `params/` and `checksums.json` under `path` (which must not hold a
  checkpoint yet)."""
  path = os.path.abspath(os.fspath(path))
  os.makedirs(path, exist_ok=True)
  # Uncompressed: zstd saves about a fifth of the disk on bf16 weights, but the compressed stream
  # of the whole checkpoint stays in memory until it commits (about +0.8x the checkpoint's size).
  handler = ocp.PyTreeCheckpointHandler(use_compression=False)
  with ocp.Checkpointer(handler) as ckptr:
    ckptr.save(os.path.join(path, "params"), args=ocp.args.PyTreeSave(params))
  # Uncompressed chunks carry no checksum of their own: without these a damaged byte would load
  # as a wrong weight. (Arrays spread over several hosts are not checksummed.)
  flat = flat_paths(params)
  if jax.process_count() == 1 and all(_addressable(x) for x in flat.values()):
    sums = {name: _crc32(x) for name, x in flat.items()}
    with open(os.path.join(path, CHECKSUMS), "w") as f:
      json.dump({"crc32": sums}, f, indent=0, sort_keys=True)
  # one writer: the other processes may already be past the save
  if jax.process_index() == 0:
    cfg.to_hf_file(os.path.join(path, "config.json"))


def _verify(path: str, name: str, x, sums: dict[str, int]) -> None:
  """ValueError when a restored param (in its stored dtype) differs from the checksum saved with
  it; params without one (older directories, training steps) pass."""
  if name in sums and _addressable(x) and _crc32(x) != sums[name]:
    raise ValueError(
        f"checkpoint {path} is unreadable ({name} does not match the checksum saved with it: a "
        "data file under params/ is damaged)"
    )


def _checksums(path: str) -> dict[str, int]:
  try:
    with open(os.path.join(path, CHECKSUMS)) as f:
      return {str(k): int(v) for k, v in json.load(f)["crc32"].items()}
  except FileNotFoundError:
    return {}
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise ValueError(
        f"{os.path.join(path, CHECKSUMS)} is unreadable ({first_line(e)})"
    ) from None


def _source(path: str) -> tuple[str, str]:
  """(Orbax directory, subtree holding the params or "") of a params directory or training step."""
  if is_params_dir(path):
    return os.path.join(path, "params"), ""
  if is_step_dir(path):
    return os.path.join(path, _STEP_STATE), "params"
  raise ValueError(
      f"{path} is not a params checkpoint (needs config.json and params/) or a "
      "training step (WORKDIR/checkpoints/<step>)"
  )


def _step_meta(path: str) -> dict:
  meta = os.path.join(path, _STEP_META)
  try:
    with open(meta) as f:
      out = json.load(f)
    if not isinstance(out.get("model"), dict):
      raise KeyError("model")
    return out
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise ValueError(
        f"{meta} holds no model config ({first_line(e)})"
    ) from None


def lora_record(path: str | os.PathLike) -> dict | None:
  """What a LoRA run's export (its `lora.json`) or step (its run metadata) says of its adapters:
  `{"lora": LoraConfig fields, "base": the base checkpoint's path, "base_sha256": its content hash}`;
  None for a plain checkpoint."""
  path = os.path.abspath(os.fspath(path))
  if is_step_dir(path):
    return _step_meta(path).get("lora")
  try:
    with open(os.path.join(path, LORA_FILE)) as f:
      record = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise ValueError(
        f"{os.path.join(path, LORA_FILE)} is unreadable ({first_line(e)})"
    ) from None
  if not (
      isinstance(record, dict)
      and {"lora", "base", "base_sha256"} <= set(record)
  ):
    raise ValueError(
        f"{os.path.join(path, LORA_FILE)} lacks lora, base or base_sha256"
    )
  return record


def write_lora_record(path: str | os.PathLike, record: dict) -> None:
  with open(os.path.join(os.fspath(path), LORA_FILE), "w") as f:
    json.dump(record, f, indent=2, sort_keys=True)
    f.write("\n")


def read_config(path: str | os.PathLike, **runtime_kw) -> PLTConfig:
  """The model config of a directory with a config.json, or of a training step (its metadata); a
  LoRA run's (`lora_record`) carries its `LoraConfig`."""
  path = os.path.abspath(os.fspath(path))
  if not is_step_dir(path):
    cfg = PLTConfig.from_hf_file(
        os.path.join(path, "config.json"), **runtime_kw
    )
  else:
    cfg = PLTConfig.from_hf_dict(_step_meta(path)["model"], **runtime_kw)
  record = lora_record(path)
  if record is None:
    return cfg
  try:
    return cfg.replace(lora=LoraConfig(**record["lora"]))
  except (TypeError, ValueError) as e:
    raise ValueError(f"{path}: its LoRA config is invalid ({e})") from None


def _stored(directory: str, subtree: str) -> dict[str, Any]:
  """'a/b/c' -> Orbax array metadata (shape, dtype) of every stored array; reads no array data."""
  quiet_abandoned_reads()
  try:
    with ocp.StandardCheckpointer() as ckptr:
      item = ckptr.metadata(directory).item_metadata
    tree = None if item is None else item.tree
    if tree is not None and subtree:
      tree = tree[subtree]
  except Exception as e:  # noqa: BLE001 - any unreadable metadata: one line
    raise ValueError(
        f"checkpoint {directory} is unreadable ({first_line(e)})"
    ) from None
  if (
      tree is None
  ):  # its index files are missing: Orbax finds no tree to describe
    raise ValueError(
        f"checkpoint {directory} is incomplete: its Orbax index (_METADATA, "
        "manifest.ocdbt) is missing or unreadable, as after a save or copy cut short; "
        "use another checkpoint or write this one again"
    )
  return flat_paths(tree)


def params_metadata(path: str | os.PathLike) -> dict[str, jax.ShapeDtypeStruct]:
  """'a/b/c' -> shape and dtype of every stored param (reads no array data)."""
  directory, subtree = _source(os.path.abspath(os.fspath(path)))
  return {
      p: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype)
      for p, m in _stored(directory, subtree).items()
  }


def stored_dtypes(path: str | os.PathLike) -> set[str]:
  """dtype names of a checkpoint's stored params, from Orbax metadata (reads no array data)."""
  return {str(m.dtype) for m in params_metadata(path).values()}


def iter_params(path: str | os.PathLike) -> Iterator[tuple[str, jax.Array]]:
  """('a/b/c', host array) for each stored param, restored one at a time (a partial restore each),
  so the reader holds one param rather than the model.
  """
  path = os.path.abspath(os.fspath(path))
  directory, subtree = _source(path)
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  handler = ocp.PyTreeCheckpointHandler()
  sums = {} if subtree else _checksums(path)
  quiet_abandoned_reads()
  for name, m in params_metadata(path).items():
    keys = ([subtree] if subtree else []) + name.split("/")
    target: dict[str, Any] = {}
    node = target
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu)
    try:
      with ocp.Checkpointer(handler) as ckptr:
        tree = ckptr.restore(
            directory,
            args=ocp.args.PyTreeRestore(
                target,
                restore_args=jax.tree.map(
                    lambda _: ocp.ArrayRestoreArgs(sharding=cpu), target
                ),
                partial_restore=True,
            ),
        )
    except Exception as e:  # noqa: BLE001 - a missing or damaged data file: one line
      raise ValueError(
          f"checkpoint {path} is unreadable ({first_line(e)})"
      ) from None
    for k in keys:
      tree = tree[k]
    _verify(path, name, tree, sums)
    yield name, tree
    del tree


def stored_target(cfg: PLTConfig) -> Any:
  """The abstract tree a params directory of `cfg` stores: the params, or a LoRA run's adapters."""
  from loopcoder_jax.model import lora  # local: model imports are heavy
  from loopcoder_jax.model.transformer import abstract_params

  target = abstract_params(cfg)
  return target if cfg.lora is None else lora.split(target)[1]


def load_params(
    path: str | os.PathLike, shardings: Any = None, **runtime_kw
) -> tuple[PLTConfig, Any]:
  """Read a params directory, or the params of a training step. `shardings` (a pytree like params,
  or one Sharding) places the arrays; by default they go to the first local device, whatever mesh
  they were saved from. A LoRA run's hold its adapters only (`model.lora.split`), and so does what
  this returns.
  """
  path = os.path.abspath(os.fspath(path))
  directory, subtree = _source(path)
  cfg = read_config(path, **runtime_kw)
  target = stored_target(cfg)
  stored = _stored(directory, subtree)
  for name, a in flat_paths(target).items():
    if name not in stored:
      raise ValueError(
          f"checkpoint {path} holds no {name} (shape {a.shape}) for its config"
      )
    if tuple(stored[name].shape) != a.shape:
      raise ValueError(
          f"checkpoint {path}: {name} is stored with shape "
          f"{tuple(stored[name].shape)}, its config gives {a.shape}"
      )
  if shardings is None:
    shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, target)
  target = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      target,
      shardings,
  )
  item = {subtree: target} if subtree else target
  quiet_abandoned_reads()
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      params = ckptr.restore(
          directory,
          args=ocp.args.PyTreeRestore(
              item=item,
              restore_args=ocp.checkpoint_utils.construct_restore_args(item),
              partial_restore=bool(subtree),
          ),
      )
  except Exception as e:  # noqa: BLE001 - a missing or damaged data file: one line
    raise ValueError(
        f"checkpoint {path} is unreadable ({first_line(e)})"
    ) from None
  if subtree:
    return cfg, params[subtree]
  sums = _checksums(path)
  for name, x in flat_paths(params).items():
    if str(x.dtype) == str(
        stored[name].dtype
    ):  # a cast restore has other bytes
      _verify(path, name, x, sums)
  return cfg, params
