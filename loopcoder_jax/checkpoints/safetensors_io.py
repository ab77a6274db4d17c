"""Streaming safetensors I/O, model-agnostic: find, inspect, read and write weight files.

Reading: `weight_files` maps every key of a directory (a single `model.safetensors`, or the shards of
`model.safetensors.index.json`) to its file; `read_headers` gives shapes and dtypes from the file
headers alone; `read_into` reads one tensor straight into a caller's buffer with plain file reads
(no mapping, no copy), `read_tensor` into a new array, `read_block` one block of it (only that
region is read: a sharded load's per-device slices). PyTorch pickles (`*.bin`) are refused, never
unpickled. An index may name files inside its directory only, and a file that is not safetensors
(truncated, damaged) is a one-line ValueError naming it.

Writing: `ShardedWriter` lays the shards out from declared shapes (headers and index first), then
takes each tensor in any order and writes it at its offset, so a source can be streamed in whatever
order it yields tensors; `write_sharded` asks a list of `Entry`s for their tensors in turn. Shards
hold at most a given size. dtypes are kept exactly (bf16 through ml_dtypes).
"""

from __future__ import annotations

from collections.abc import Callable
import contextlib
import dataclasses
import glob
import json
import os
import re
import struct
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_SHARD_SIZE = "5GB"

# dtype name -> numpy dtype, for every dtype read and written.
DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def check_dtype(dtype: str | None) -> str | None:
  """`dtype` if it is None or a name in DTYPES; ValueError otherwise."""
  if dtype is not None and dtype not in DTYPES:
    raise ValueError(
        f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}"
    )
  return dtype


def dtype_of(x) -> str:
  """The DTYPES name of an array's dtype; ValueError for any other dtype."""
  name = np.dtype(x.dtype).name
  if name not in DTYPES:
    raise ValueError(
        f"unsupported param dtype {name}; expected one of {sorted(DTYPES)}"
    )
  return name


# ------------------------------------------------------------------------------------- reading
@contextlib.contextmanager
def _open(fname: str):
  """`safe_open(fname)`; a truncated or damaged file raises one ValueError line naming it."""
  try:
    with safe_open(fname, "numpy") as f:
      yield f
  except SafetensorError as e:
    raise ValueError(
        f"{fname} is not a readable safetensors file ({e})"
    ) from None


def _inside(path: str, name: Any, index: str) -> str:
  """`path/name` for an index entry that names a file inside `path`; ValueError otherwise."""
  if (
      not isinstance(name, str)
      or not name
      or os.path.isabs(name)
      or os.pardir in name.replace("\\", "/").split("/")
  ):
    raise ValueError(
        f"{index} names {name!r}; weight files must lie inside {path}"
    )
  return os.path.join(path, name)


def weight_files(path: str) -> dict[str, str]:
  """key -> safetensors file of a directory (from the index, or the single model file)."""
  index = os.path.join(path, INDEX_FILE)
  if os.path.isfile(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ValueError(
          f"{index} is not a valid safetensors index (needs a 'weight_map'): {e}"
      ) from None
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index}: 'weight_map' is not an object")
    files = {k: _inside(path, v, index) for k, v in weight_map.items()}
    for k, fname in files.items():
      if not os.path.isfile(fname):
        raise ValueError(
            f"{index} maps {k} to {os.path.basename(fname)}, which does not exist"
        )
    return files
  single = os.path.join(path, SINGLE_FILE)
  if os.path.isfile(single):
    with _open(single) as f:
      return {k: single for k in f.keys()}
  bins = sorted(glob.glob(os.path.join(path, "*.bin")))
  if bins:  # pickles can run code on load; we read safetensors only
    raise ValueError(
        f"{path} holds PyTorch pickle weights ({os.path.basename(bins[0])}); only safetensors are "
        "read. Convert them with transformers' save_pretrained(safe_serialization=True) first"
    )
  raise ValueError(f"{path} has no {INDEX_FILE} or {SINGLE_FILE}")


def _dtype_name(st_dtype: str, key: str) -> str:
  for name, st in _ST_DTYPES.items():
    if st == st_dtype:
      return name
  raise ValueError(
      f"{key}: unsupported tensor dtype {st_dtype} (expected one of {sorted(_ST_DTYPES.values())})"
  )


def read_headers(
    files: dict[str, str],
) -> dict[str, tuple[tuple[int, ...], str]]:
  """key -> (shape, dtype name), from the safetensors headers only (no tensor data is read)."""
  out = {}
  by_file: dict[str, list[str]] = {}
  for k, f in files.items():
    by_file.setdefault(f, []).append(k)
  for fname, keys in by_file.items():
    with _open(fname) as f:
      present = set(f.keys())
      for k in keys:
        if k not in present:
          raise ValueError(
              f"the index maps {k} to {os.path.basename(fname)}, which does not hold it"
          )
        sl = f.get_slice(k)
        out[k] = (tuple(sl.get_shape()), _dtype_name(sl.get_dtype(), k))
  return out


def _locate(fname: str, key: str) -> tuple[int, tuple[int, ...], str, int]:
  """(byte offset in the file, shape, dtype name, byte length) of tensor `key`, from the header."""
  with open(fname, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
  if key not in header:
    raise ValueError(f"{os.path.basename(fname)} does not hold {key}")
  info = header[key]
  start, end = info["data_offsets"]
  return (
      8 + n + start,
      tuple(info["shape"]),
      _dtype_name(info["dtype"], key),
      end - start,
  )


def read_into(fname: str, key: str, out: np.ndarray, start: int = 0) -> None:
  """Tensor `key`, or its rows `start .. start + len(out)` (axis 0), read into `out` (C-contiguous,
  matching dtype and trailing shape) by plain file reads: nothing else is allocated and no page of
  the file stays mapped.
  """
  offset, shape, dtype, _ = _locate(fname, key)
  fits = out.ndim == len(shape) and out.shape[1:] == shape[1:]
  if fits and shape:
    fits = 0 <= start and start + out.shape[0] <= shape[0]
  if not fits or out.dtype != DTYPES[dtype] or (not shape and start):
    raise ValueError(
        f"{key}: stored {dtype}{shape}; cannot read rows from {start} into {out.dtype}{out.shape}"
    )
  if not out.flags.c_contiguous:
    raise ValueError(f"{key}: the output buffer is not C-contiguous")
  row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * out.dtype.itemsize
  view = out.reshape(-1).view(np.uint8).data
  with open(fname, "rb") as f:
    f.seek(offset + start * row_bytes)
    done = 0
    while done < out.nbytes:
      got = f.readinto(view[done:])
      if not got:
        raise ValueError(f"{key}: {os.path.basename(fname)} is truncated")
      done += got


def read_tensor(fname: str, key: str) -> np.ndarray:
  """One tensor, as a new array."""
  _, shape, dtype, _ = _locate(fname, key)
  out = np.empty(shape, DTYPES[dtype])
  read_into(fname, key, out)
  return out


def read_block(fname: str, key: str, block: tuple[slice, ...]) -> np.ndarray:
  """One block of a tensor (a slice per axis): only that region is read from the file."""
  with _open(fname) as f:
    return f.get_slice(key)[block]


# ------------------------------------------------------------------------------------- writing
def parse_size(size: int | str) -> int:
  """Bytes from an int or a string like '5GB', '500MB', '2GiB'."""
  if isinstance(size, int) and not isinstance(size, bool):
    value = size
  else:
    m = re.fullmatch(
        r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE
    )
    if not m:
      raise ValueError(
          f"shard size {size!r} is not a size like 5GB, 500MB or 1048576"
      )
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    value = int(float(m.group(1)) * base ** "BKMGT".index(unit[0]))
  if value <= 0:
    raise ValueError(f"shard size must be positive, got {size!r}")
  return value


@dataclasses.dataclass(frozen=True)
class Entry:
  """A tensor to write: its key, shape and dtype (known up front, for the header) and, for
  `write_sharded`, a producer."""

  key: str
  shape: tuple[int, ...]
  dtype: str
  produce: Callable[[], np.ndarray] | None = None

  @property
  def nbytes(self) -> int:
    return (
        int(np.prod(self.shape, dtype=np.int64)) * DTYPES[self.dtype].itemsize
    )


class SafetensorsFile:
  """One safetensors file laid out from declared entries: the header is written on opening, then
  each tensor goes to its own offset, in any order (`write`). `close` checks every tensor came.
  """

  def __init__(self, fname: str, entries: list[Entry]):
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    self._slots: dict[str, tuple[Entry, int]] = {}
    offset = 0
    for e in entries:
      header[e.key] = {
          "dtype": _ST_DTYPES[e.dtype],
          "shape": list(e.shape),
          "data_offsets": [offset, offset + e.nbytes],
      }
      self._slots[e.key] = (e, offset)
      offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    self._start = 8 + len(raw)
    self._written: set[str] = set()
    self._f = open(fname, "wb")
    self._f.write(struct.pack("<Q", len(raw)))
    self._f.write(raw)
    self._f.truncate(self._start + offset)

  def write(self, key: str, x) -> None:
    e, offset = self._slots[key]
    x = np.ascontiguousarray(x)
    if x.shape != e.shape or x.dtype != DTYPES[e.dtype]:
      raise ValueError(
          f"{key}: produced {x.dtype}{x.shape}, declared {e.dtype}{e.shape}"
      )
    self._f.seek(self._start + offset)
    self._f.write(x.reshape(-1).view(np.uint8).data)
    self._written.add(key)

  def close(self, check: bool = True) -> None:
    self._f.close()
    missing = [k for k in self._slots if k not in self._written]
    if check and missing:
      raise ValueError(f"tensor {missing[0]} was declared but never written")


class ShardedWriter:
  """Safetensors shards of at most `shard_size` bytes (a bigger tensor gets its own) plus the index,
  laid out on entering from declared entries (their `produce` is not called); `write` then takes
  the tensors in any order. Shards and index are in the entries' order.
  """

  def __init__(
      self,
      path: str,
      entries: list[Entry],
      shard_size: int | str = DEFAULT_SHARD_SIZE,
  ):
    limit = parse_size(shard_size)
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
      if shards[-1] and size + e.nbytes > limit:
        shards.append([])
        size = 0
      shards[-1].append(e)
      size += e.nbytes
    if len(shards) == 1:
      self.names = [SINGLE_FILE]
    else:
      self.names = [
          f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
          for i in range(len(shards))
      ]
    self._path, self._shards, self._entries = path, shards, entries
    self._files: list[SafetensorsFile] = []
    self._file_of: dict[str, SafetensorsFile] = {}

  def __enter__(self) -> ShardedWriter:
    for name, group in zip(self.names, self._shards):
      f = SafetensorsFile(os.path.join(self._path, name), group)
      self._files.append(f)
      self._file_of.update({e.key: f for e in group})
    if len(self._shards) > 1:
      weight_map = {
          e.key: n for n, g in zip(self.names, self._shards) for e in g
      }
      index = {
          "metadata": {"total_size": sum(e.nbytes for e in self._entries)},
          "weight_map": dict(sorted(weight_map.items())),
      }
      with open(os.path.join(self._path, INDEX_FILE), "w") as index_file:
        json.dump(index, index_file, indent=2)
        index_file.write("\n")
    return self

  def write(self, key: str, x) -> None:
    self._file_of[key].write(key, x)

  def __exit__(self, exc_type, *_):
    for f in self._files:
      f.close(check=exc_type is None)


def _produce(e: Entry) -> np.ndarray:
  if e.produce is None:
    raise ValueError(f"{e.key}: an entry to stream has no producer")
  return e.produce()


def write_safetensors(fname: str, entries: list[Entry]) -> None:
  """One safetensors file, streamed: the header, then each entry's tensor in turn."""
  f = SafetensorsFile(fname, entries)
  try:
    for e in entries:
      f.write(e.key, _produce(e))
  except BaseException:
    f.close(check=False)
    raise
  f.close()


def write_sharded(
    path: str, entries: list[Entry], shard_size: int | str = DEFAULT_SHARD_SIZE
) -> list[str]:
  """Shards (see `ShardedWriter`) filled by asking each entry for its tensor in turn."""
  with ShardedWriter(path, entries, shard_size) as w:
    for e in entries:
      w.write(e.key, _produce(e))
  return w.names
