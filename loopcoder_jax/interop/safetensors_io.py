"""Streaming safetensors I/O, model-agnostic: find, inspect, read and write weight files.

Reading: `weight_files` maps every key of a directory (a single `model.safetensors`, or the shards of
`model.safetensors.index.json`) to its file; `read_headers` gives shapes and dtypes from the file
headers alone; `read_tensor` reads one tensor through its own `safe_open`, so closing it unmaps the
shard and RSS holds about one tensor, not a whole shard. PyTorch pickles (`*.bin`) are refused,
never unpickled. An index may name files inside its directory only, and a file that is not
safetensors (truncated, damaged) is a one-line ValueError naming it.

Writing: `write_safetensors` writes the header from declared shapes, then asks each `Entry` for its
tensor in turn; `write_sharded` splits entries into shards of at most a given size, plus the index.
dtypes are kept exactly (bf16 through ml_dtypes).
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


def read_tensor(fname: str, key: str) -> np.ndarray:
  """One tensor, through its own handle (closing it unmaps the shard)."""
  with _open(fname) as f:
    return f.get_tensor(key)


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
  """A tensor to write: its key, shape and dtype (known up front, for the header) and a producer."""

  key: str
  shape: tuple[int, ...]
  dtype: str
  produce: Callable[[], np.ndarray]

  @property
  def nbytes(self) -> int:
    return (
        int(np.prod(self.shape, dtype=np.int64)) * DTYPES[self.dtype].itemsize
    )


def write_safetensors(fname: str, entries: list[Entry]) -> None:
  """One safetensors file, streamed: the header (from declared shapes), then each tensor in turn."""
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for e in entries:
    header[e.key] = {
        "dtype": _ST_DTYPES[e.dtype],
        "shape": list(e.shape),
        "data_offsets": [offset, offset + e.nbytes],
    }
    offset += e.nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  with open(fname, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for e in entries:
      x = np.ascontiguousarray(e.produce())
      if x.shape != e.shape or x.dtype != DTYPES[e.dtype]:
        raise ValueError(
            f"{e.key}: produced {x.dtype}{x.shape}, declared {e.dtype}{e.shape}"
        )
      f.write(x.reshape(-1).view(np.uint8).data)
      del x


def write_sharded(
    path: str, entries: list[Entry], shard_size: int | str = DEFAULT_SHARD_SIZE
) -> list[str]:
  """Safetensors shards of at most `shard_size` bytes (a bigger tensor gets its own) plus the index."""
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
    names = [SINGLE_FILE]
  else:
    names = [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        for i in range(len(shards))
    ]
  for name, group in zip(names, shards):
    write_safetensors(os.path.join(path, name), group)
  if len(shards) > 1:
    weight_map = {e.key: n for n, g in zip(names, shards) for e in g}
    index = {
        "metadata": {"total_size": sum(e.nbytes for e in entries)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    with open(os.path.join(path, INDEX_FILE), "w") as f:
      json.dump(index, f, indent=2)
      f.write("\n")
  return names
