"""HF directories <-> our params, through the name table and the streaming safetensors I/O.

`load_hf` checks every key, alias and shape against the config from the headers (`hf_names`,
`safetensors_io`) before any tensor is read, then reads each tensor straight into its slot of the
preallocated stacked arrays (through a one-tensor buffer where it must be transposed or cast);
`load_hf_sharded` reads each device's block only. `write_hf` lays the shards out first and writes
one layer of one param at a time. dtypes are kept exactly unless an output `dtype` is asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
import dataclasses
import functools
import os
from typing import Any

import jax
import numpy as np

from loopcoder_jax.checkpoints import hf_names
from loopcoder_jax.checkpoints import safetensors_io as st
from loopcoder_jax.model.config import PLTConfig

# Bytes read at a time for a tensor that is transposed or cast on load.
_READ_BLOCK = 16 << 20


def aligned_empty(shape, dtype, align=64):
  """np.empty on a 64-byte boundary: jax.device_put to CPU then aliases it instead of copying."""
  n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  raw = np.empty(n + align, np.uint8)
  start = -raw.ctypes.data % align
  return raw[start : start + n].view(dtype).reshape(shape)


def cast_aligned(x, dtype: str):
  x = np.asarray(x)
  if x.dtype == st.DTYPES[dtype]:
    return x
  out = aligned_empty(x.shape, st.DTYPES[dtype])
  out[...] = x
  return out


# ------------------------------------------------------------------------------------- reading
def read_hf_config(path: str) -> PLTConfig:
  """config.json of an HF directory (transformers 5 key spellings accepted: see PLTConfig)."""
  return PLTConfig.from_hf_file(os.path.join(path, "config.json"))


@dataclasses.dataclass(frozen=True)
class HFSource:
  """An HF directory checked against its config: where each slot's tensor is and its dtype."""

  cfg: PLTConfig
  # checkpoint key -> safetensors file
  files: dict[str, str]
  # slot key -> the checkpoint key holding it (canonical or alias)
  keys: dict[str, str]
  slots: list[hf_names.Slot]
  # our param path -> the dtype its array gets
  dtypes: dict[str, str]
  # checkpoint key -> (shape, stored dtype)
  headers: dict[str, tuple[tuple[int, ...], str]]

  def shape(self, path: str) -> tuple[int, ...]:
    """Our (stacked) shape of a param."""
    s = next(s for s in self.slots if s.rule.path == path)
    return (
        (self.cfg.num_hidden_layers,) if s.rule.per_layer else ()
    ) + s.our_shape


def open_hf(path: str | os.PathLike, dtype: str | None = None) -> HFSource:
  """Check every key, alias, shape and dtype of an HF directory against its config, from the headers
  alone (no tensor is read). `dtype=None` keeps each tensor's stored dtype."""
  path = os.path.abspath(os.fspath(path))
  st.check_dtype(dtype)
  cfg = read_hf_config(path)
  files = st.weight_files(path)
  headers = st.read_headers(files)
  slots = hf_names.plan(cfg)
  source = hf_names.match(cfg, slots, headers)
  for s in slots:
    shape = headers[source[s.key]][0]
    if shape != s.hf_shape:
      raise ValueError(
          f"{source[s.key]}: checkpoint shape {shape} does not match the config's {s.hf_shape}"
      )

  _check_tied_head(cfg, files, headers, source)

  stored: dict[str, str] = {}  # our path -> dtype
  for s in slots:
    d = dtype or headers[source[s.key]][1]
    if stored.setdefault(s.rule.path, d) != d:
      raise ValueError(
          f"{source[s.key]} is {d} but other layers of it are {stored[s.rule.path]}; pass dtype="
      )
  dtypes = set(stored.values())
  if dtype is not None:
    cfg = cfg.replace(torch_dtype=dtype)
  if len(dtypes) == 1:
    cfg = cfg.with_runtime(param_dtype=dtypes.pop())
  return HFSource(cfg, files, source, slots, stored, headers)


def load_hf(
    path: str | os.PathLike, dtype: str | None = None
) -> tuple[PLTConfig, dict]:
  """Read an HF directory into `(cfg, params)` (numpy, stacked layers) for `PLTForCausalLM(cfg).apply`.

  `dtype=None` keeps each tensor's stored dtype; a dtype name casts every tensor to it.
  `cfg.runtime.param_dtype` is set to the params' dtype when they share one.
  """
  src = open_hf(path, dtype)
  flat: dict[str, np.ndarray] = {}
  for s in src.slots:
    param = s.rule.path
    if param not in flat:
      flat[param] = aligned_empty(
          src.shape(param), st.DTYPES[src.dtypes[param]]
      )
    out = flat[param] if s.layer is None else flat[param][s.layer]
    key = src.keys[s.key]
    stored = src.headers[key][1]
    if not s.rule.transpose and stored == src.dtypes[param]:
      st.read_into(src.files[key], key, out.reshape(s.hf_shape))
      continue
    # transposed or cast: through a buffer of a few rows
    rows, width = s.hf_shape[0], int(np.prod(s.hf_shape[1:], dtype=np.int64))
    step = max(1, _READ_BLOCK // (width * st.DTYPES[stored].itemsize))
    for r in range(0, rows, step):
      block = np.empty(
          (min(step, rows - r),) + s.hf_shape[1:], st.DTYPES[stored]
      )
      st.read_into(src.files[key], key, block, r)
      s.rule.into_ours(block, out, r)
  return src.cfg, hf_names.unflatten(flat)


def load_hf_sharded(
    path: str | os.PathLike,
    shardings: Any,
    dtype: str | None = None,
    each: Callable[[str, jax.Array], dict[str, jax.Array]] | None = None,
) -> tuple[PLTConfig, dict]:
  """Read an HF directory straight onto `shardings` (a params-like tree of `jax.sharding.Sharding`s):
  `(cfg, params as global jax.Arrays)`.

  Each device receives only its block of each param: the block is read from the safetensors files
  (one layer's HF tensor region at a time, through the table's transpose and reshape), placed on
  the devices that hold it (replicas read it once) and released. Host memory holds about one
  device's block of one param. dtype as in `load_hf`. `each(path, param)`: what to keep of each
  param as soon as it is placed, flat paths to arrays (the int8 loader quantizes it there, so the
  float model is never whole in device memory).
  """
  src = open_hf(path, dtype)
  by_path: dict[str, list[hf_names.Slot]] = {}
  for s in src.slots:
    by_path.setdefault(s.rule.path, []).append(s)
  flat_sh = hf_names.flatten(shardings)
  missing = sorted(set(by_path) - set(flat_sh))
  if missing:
    raise ValueError(f"shardings lack param(s) {missing}")
  flat: dict[str, jax.Array] = {}
  for p, slots in by_path.items():
    x = _sharded_param(src, slots, flat_sh[p])
    flat.update({p: x} if each is None else each(p, x))
  return src.cfg, hf_names.unflatten(flat)


def _sharded_param(
    src: HFSource, slots: list[hf_names.Slot], sharding
) -> jax.Array:
  path = slots[0].rule.path
  shape, dtype = src.shape(path), st.DTYPES[src.dtypes[path]]
  groups: dict[tuple, list] = {}  # one block -> the devices holding it
  for device, index in sharding.addressable_devices_indices_map(shape).items():
    block = tuple(slice(*b.indices(n)[:2]) for b, n in zip(index, shape))
    groups.setdefault(tuple((b.start, b.stop) for b in block), []).append(
        device
    )
  arrays = []
  for bounds, devices in groups.items():
    host = _read_block(src, slots, [slice(*b) for b in bounds], dtype)
    placed = [jax.device_put(host, d) for d in devices]
    # the host block is released before the next one is read
    jax.block_until_ready(placed)
    arrays += placed
    del host
  return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def _read_hf_block(
    src: HFSource, key: str, hf_block: tuple[slice, ...]
) -> np.ndarray:
  return st.read_block(src.files[key], key, hf_block)


def _read_block(
    src: HFSource, slots: list[hf_names.Slot], block: list[slice], dtype
) -> np.ndarray:
  """One block of a param (our stacked layout), one layer's HF region at a time."""
  out = aligned_empty(tuple(b.stop - b.start for b in block), dtype)
  per_layer = slots[0].rule.per_layer
  rest = tuple(block[1:]) if per_layer else tuple(block)
  by_layer = {s.layer: s for s in slots}
  layers = range(block[0].start, block[0].stop) if per_layer else [None]
  for i, layer in enumerate(layers):
    s = by_layer[layer]
    x = s.rule.read_ours(
        functools.partial(_read_hf_block, src, src.keys[s.key]),
        s.hf_shape,
        s.our_shape,
        rest,
    ).astype(dtype, copy=False)
    if per_layer:
      out[i] = x
    else:
      out[...] = x
  return out


def _check_tied_head(cfg, files, headers, source) -> None:
  """A tied checkpoint may also store the head: it must then equal the embedding."""
  head = hf_names.TIED_HEAD
  if not (cfg.tie_word_embeddings and head in headers):
    return
  emb = source["model.embed_tokens.weight"]
  same = headers[head] == headers[emb] and np.array_equal(
      st.read_tensor(files[head], head), st.read_tensor(files[emb], emb)
  )
  if not same:
    raise ValueError(
        f"tie_word_embeddings is true but {head} differs from {emb}; set "
        "tie_word_embeddings to false in config.json to load it as a separate head"
    )


def is_hf_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "config.json")) and any(
      os.path.isfile(os.path.join(path, n))
      for n in (st.SINGLE_FILE, st.INDEX_FILE)
  )


# ------------------------------------------------------------------------------------- writing
def check_shapes(cfg: PLTConfig, shapes: dict[str, tuple[int, ...]]) -> None:
  """Every param path and shape (flat 'a/b/c' -> shape) matches the config's model."""
  want = hf_names.param_shapes(cfg)
  for p in sorted(want):
    if p not in shapes:
      raise ValueError(
          f"params are missing {p} (shape {want[p]}) for this config"
      )
  for p in sorted(shapes):
    if p not in want:
      raise ValueError(
          f"params hold unexpected {p} (shape {shapes[p]}) for this config"
      )
    if shapes[p] != want[p]:
      raise ValueError(
          f"params {p}: shape {shapes[p]} does not match the config's {want[p]}"
      )


def check_exportable(cfg: PLTConfig) -> None:
  """An HF directory's modeling files run cross-loop parallelism only: refuse a model without it."""
  if not cfg.plt_cross_loop:
    raise ValueError(
        "plt_cross_loop=False (serial looping) has no HF export: the HF modeling files run "
        "cross-loop parallelism only"
    )


def check_params(cfg: PLTConfig, params) -> dict[str, Any]:
  """The flat params, once every path and shape matches the config's model."""
  flat = hf_names.flatten(params)
  check_shapes(cfg, {p: tuple(np.shape(x)) for p, x in flat.items()})
  return flat


def write_hf(
    cfg: PLTConfig,
    path: str,
    dtypes: dict[str, str],
    leaves: Iterable[tuple[str, Any]],
    shard_size,
) -> PLTConfig:
  """The weights and config.json of an HF directory at `path`; returns the config written.

  `dtypes`: param -> output dtype; `leaves`: (param, array) pairs in any order, each written as it
  comes (one layer at a time off the device). `cfg.extra_hf` goes into config.json as it is.
  """
  slots: dict[str, list[hf_names.Slot]] = {}
  entries = []
  for s in hf_names.plan(cfg):
    slots.setdefault(s.rule.path, []).append(s)
    entries.append(st.Entry(s.key, s.hf_shape, dtypes[s.rule.path]))
  if len(set(dtypes.values())) == 1:  # config.json states the dtype written
    cfg = cfg.replace(torch_dtype=next(iter(dtypes.values())))
  with st.ShardedWriter(path, entries, shard_size) as w:
    for p, leaf in leaves:
      for s in slots[p]:
        x = s.rule.to_hf(
            np.asarray(leaf if s.layer is None else leaf[s.layer]), cfg
        )
        w.write(s.key, np.ascontiguousarray(x, st.DTYPES[dtypes[p]]))
  cfg.to_hf_file(os.path.join(path, "config.json"))
  return cfg
