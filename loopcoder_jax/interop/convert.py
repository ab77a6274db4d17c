"""HF directories <-> our params, on top of the name table and the streaming safetensors I/O.

`load_hf` checks every key, alias and shape against the config from the headers (`hf_names`,
`safetensors_io`) before any tensor is read, then reads each tensor straight into its slot of the
preallocated stacked arrays (through a one-tensor buffer where it must be transposed or cast);
`save_hf` lays the shards out first and writes one layer of one param at a time. Orbax -> HF never
holds the model: params are restored one at a time and written as they come; HF -> Orbax holds one
copy (Orbax saves a whole tree). dtypes are kept exactly unless an output `dtype` is asked for.
Params directories (config.json + Orbax params/) go through `train/checkpoint.py`.

R >= 2 exports carry `auto_map` and the PyTorch modeling files (`IQuestPLTCoderForCausalLM`); R = 1
exports are plain Llama directories (`model_type: llama`), which any Llama loader reads.

Sources (`resolve_source`): an HF directory, a params directory, a training workdir (its params/
export, tokenizer from WORKDIR/tokenizer) or one of its steps (`WORKDIR/checkpoints/<step>`). Side
files are copied only from inside the source: a symlink out of it is refused (except into the
blob store of the Hugging Face cache a snapshot directory links into).

Outputs are built in a temp sibling and renamed into place, so a failure leaves nothing under the
final name (and a replaced directory stays whole until the new one is complete); a destination
symlink is followed, and temp siblings left by a killed conversion are cleaned up by the next one.
`overwrite` replaces only a directory that holds a checkpoint (or nothing).

Entry points: `load_hf`, `save_hf`, `convert_checkpoint` (what `scripts/convert_checkpoint.py` runs;
`loops=` upcycles on the way, see `upcycling.py`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
import contextlib
import dataclasses
import functools
import glob
import itertools
import os
import secrets
import shutil
import socket
from typing import Any

import jax
import numpy as np

from loopcoder_jax.interop import hf_names, upcycling
from loopcoder_jax.interop import safetensors_io as st
from loopcoder_jax.model.config import PLTConfig
from loopcoder_jax.train import checkpoint

HF_MODELING_DIR = os.path.join(os.path.dirname(__file__), "hf_modeling")
MODELING_FILES = ("configuration_loopcoder.py", "modeling_loopcoder.py")
AUTO_MAP = {
    "AutoConfig": "configuration_loopcoder.IQuestPLTCoderConfig",
    "AutoModelForCausalLM": "modeling_loopcoder.IQuestPLTCoderForCausalLM",
}
# Copied verbatim in both directions (plus any *.jinja chat template).
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.json",
)


# Bytes read at a time for a tensor that is transposed or cast on load.
_READ_BLOCK = 16 << 20


def _aligned_empty(shape, dtype, align=64):
  """np.empty on a 64-byte boundary: jax.device_put to CPU then aliases it instead of copying."""
  n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  raw = np.empty(n + align, np.uint8)
  start = -raw.ctypes.data % align
  return raw[start : start + n].view(dtype).reshape(shape)


def _cast_aligned(x, dtype: str):
  x = np.asarray(x)
  if x.dtype == st.DTYPES[dtype]:
    return x
  out = _aligned_empty(x.shape, st.DTYPES[dtype])
  out[...] = x
  return out


# ------------------------------------------------------------------------------------- reading HF
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
      flat[param] = _aligned_empty(
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
    path: str | os.PathLike, shardings: Any, dtype: str | None = None
) -> tuple[PLTConfig, dict]:
  """Read an HF directory straight onto `shardings` (a params-like tree of `jax.sharding.Sharding`s):
  `(cfg, params as global jax.Arrays)`.

  Each device receives only its block of each param: the block is read from the safetensors files
  (one layer's HF tensor region at a time, through the table's transpose and reshape), placed on
  the devices that hold it (replicas read it once) and released. Host memory holds about one
  device's block of one param. dtype as in `load_hf`.
  """
  src = open_hf(path, dtype)
  by_path: dict[str, list[hf_names.Slot]] = {}
  for s in src.slots:
    by_path.setdefault(s.rule.path, []).append(s)
  flat_sh = hf_names.flatten(shardings)
  missing = sorted(set(by_path) - set(flat_sh))
  if missing:
    raise ValueError(f"shardings lack param(s) {missing}")
  flat = {
      p: _sharded_param(src, slots, flat_sh[p]) for p, slots in by_path.items()
  }
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
  out = _aligned_empty(tuple(b.stop - b.start for b in block), dtype)
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


# ------------------------------------------------------------------------------------- writing HF
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


def check_params(cfg: PLTConfig, params) -> dict[str, Any]:
  """The flat params, once every path and shape matches the config's model."""
  flat = hf_names.flatten(params)
  check_shapes(cfg, {p: tuple(np.shape(x)) for p, x in flat.items()})
  return flat


def _within(path: str, root: str) -> bool:
  return os.path.commonpath([path, root]) == root


def side_files(src: str | None) -> list[str]:
  """Names of the tokenizer, chat template and generation config files of `src`.

  ValueError for one that is a symlink out of `src` (copying it would export whatever it points
  at), unless `src` is a Hugging Face cache snapshot and the link goes into the cache's blobs/.
  """
  if not src:
    return []
  names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
  names += sorted(
      os.path.basename(p) for p in glob.glob(os.path.join(src, "*.jinja"))
  )
  root = os.path.realpath(src)
  roots = [root]
  if os.path.basename(os.path.dirname(root)) == "snapshots":
    roots.append(os.path.join(os.path.dirname(os.path.dirname(root)), "blobs"))
  for n in names:
    target = os.path.realpath(os.path.join(src, n))
    if not any(_within(target, r) for r in roots):
      raise ValueError(
          f"{os.path.join(src, n)} is a symlink to {target}, outside the source "
          f"{src}; refusing to copy it (put the file itself there)"
      )
  return names


def copy_side_files(src: str | None, dst: str) -> list[str]:
  """The `side_files` of `src`, copied verbatim into `dst`."""
  if not src:
    return []
  names = side_files(src)
  for n in names:
    shutil.copyfile(os.path.join(src, n), os.path.join(dst, n))
  return names


def _write_hf(
    cfg: PLTConfig,
    path: str,
    dtypes: dict[str, str],
    leaves: Iterable[tuple[str, Any]],
    shard_size,
    tokenizer_dir: str | None,
):
  """An HF directory at `path`. `dtypes`: param -> output dtype; `leaves`: (param, array) pairs in
  any order, each written as it comes (one layer at a time off the device).
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
  extra = {k: v for k, v in cfg.extra_hf.items() if k != "auto_map"}
  if cfg.plt_num_loops > 1:  # R = 1 is a Llama: no remote code needed
    extra["auto_map"] = AUTO_MAP
    for name in MODELING_FILES:
      shutil.copyfile(
          os.path.join(HF_MODELING_DIR, name), os.path.join(path, name)
      )
  cfg.replace(extra_hf=extra).to_hf_file(os.path.join(path, "config.json"))
  copy_side_files(tokenizer_dir, path)


def save_hf(
    cfg: PLTConfig,
    params,
    path: str | os.PathLike,
    *,
    shard_size: int | str = st.DEFAULT_SHARD_SIZE,
    dtype: str | None = None,
    overwrite: bool = False,
    tokenizer_dir: str | os.PathLike | None = None,
):
  """Write an HF directory: sharded safetensors + index, config.json, for R >= 2 `auto_map` and the
  PyTorch modeling files, and the tokenizer files of `tokenizer_dir`. `dtype=None` keeps each
  param's dtype.
  """
  st.check_dtype(dtype)
  st.parse_size(shard_size)
  flat = check_params(cfg, params)
  dtypes = {p: dtype or st.dtype_of(x) for p, x in flat.items()}
  with staged_dir(path, overwrite) as tmp:
    _write_hf(
        cfg,
        tmp,
        dtypes,
        flat.items(),
        shard_size,
        os.fspath(tokenizer_dir) if tokenizer_dir else None,
    )


# ------------------------------------------------------------------------------------- directories
def is_hf_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "config.json")) and any(
      os.path.isfile(os.path.join(path, n))
      for n in (st.SINGLE_FILE, st.INDEX_FILE)
  )


def check_dst(path: str, overwrite: bool) -> None:
  path = os.path.realpath(path)
  if os.path.exists(path):
    if not os.path.isdir(path):
      raise ValueError(f"destination {path} exists and is not a directory")
    names = sorted(os.listdir(path))
    if names and not overwrite:
      raise ValueError(
          f"destination {path} is not empty; pass overwrite=True (--overwrite) to replace it"
      )
    if names and not (checkpoint.is_params_dir(path) or is_hf_dir(path)):
      raise ValueError(
          f"destination {path} holds {', '.join(names[:3])}"
          f"{', ...' if len(names) > 3 else ''}, not a checkpoint; --overwrite "
          "replaces only a params or HF checkpoint directory (or an empty one)"
      )


def _tag() -> str:
  return f"{os.getpid()}@{socket.gethostname()}"


def _alive(tag: str) -> bool:
  """Whether the process named by a temp directory's tag may still run (other hosts: assume so)."""
  pid, _, host = tag.partition("@")
  if host != socket.gethostname() or not pid.isdigit():
    return True
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _clean_stale(parent: str, base: str) -> None:
  """Removes temp siblings of `base` left by a conversion that was killed (kill -9, power loss).

  A killed replacement may have left the previous checkpoint only in its `.old-` sibling: that is
  moved back when `base` is missing.
  """
  for kind in ("tmp", "old"):
    prefix = f".{base}.{kind}-"
    for name in sorted(os.listdir(parent)):
      if not name.startswith(prefix):
        continue
      tag = name[len(prefix) :].rpartition("-")[0]
      stale = os.path.join(parent, name)
      if _alive(tag):
        continue
      kept = os.path.join(stale, base)
      path = os.path.join(parent, base)
      if kind == "old" and os.path.isdir(kept) and not os.path.exists(path):
        os.rename(kept, path)
      shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike, overwrite: bool) -> Iterator[str]:
  """Yield a temp sibling of `path`; on success it replaces `path`, on failure it is removed.

  A symlink `path` is followed (the output goes where it points).
  """
  path = os.path.realpath(os.fspath(path))
  parent, base = os.path.split(path)
  os.makedirs(parent, exist_ok=True)
  _clean_stale(parent, base)
  check_dst(path, overwrite)
  tmp = os.path.join(parent, f".{base}.tmp-{_tag()}-{secrets.token_hex(4)}")
  os.mkdir(tmp)  # mode 0o777 less the umask, like any directory the user makes
  try:
    yield tmp
    if os.path.exists(path):
      old = os.path.join(parent, f".{base}.old-{_tag()}-{secrets.token_hex(4)}")
      os.mkdir(old)
      os.rename(path, os.path.join(old, base))
      os.rename(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


# ------------------------------------------------------------------------------------- conversion
def resolve_source(path: str) -> tuple[str, str, tuple[str, ...]]:
  """(weights directory, 'orbax' | 'hf', directories that may hold the tokenizer) of a checkpoint:
  a params directory, a training workdir (its params/ export), a training step or an HF directory.
  """
  if checkpoint.is_params_dir(path):
    return path, "orbax", (path,)
  if checkpoint.is_step_dir(path):
    workdir = os.path.dirname(os.path.dirname(path))
    return path, "orbax", (os.path.join(workdir, "tokenizer"),)
  export = os.path.join(path, "params")
  if checkpoint.is_params_dir(export):
    return export, "orbax", (export, os.path.join(path, "tokenizer"))
  steps = os.path.join(path, "checkpoints")
  if os.path.isdir(steps):
    found = sorted(
        (int(n) for n in os.listdir(steps) if n.isdigit()), reverse=True
    )
    where = (
        f"use one of its steps, e.g. {os.path.join(steps, str(found[0]))}"
        if found
        else "it holds no checkpoint step yet"
    )
    raise ValueError(
        f"{path} is a training workdir without a final params/ export (the run has "
        f"not finished); {where}"
    )
  if os.path.isfile(os.path.join(path, "config.json")):
    return path, "hf", (path,)
  raise ValueError(
      f"{path} is not a checkpoint: expected a params directory (config.json + params/), a "
      "finished training workdir (with a params/ export) or one of its steps "
      "(WORKDIR/checkpoints/<step>), or an HF directory (config.json + safetensors)"
  )


def detect_format(path: str) -> str:
  """'orbax' or 'hf' for a checkpoint `resolve_source` takes; ValueError otherwise."""
  return resolve_source(path)[1]


def load_orbax(
    path: str, dtype: str | None = None, shardings: Any = None
) -> tuple[PLTConfig, Any]:
  """A params directory (or training step) restored in its stored dtype (or cast to `dtype`), onto
  `shardings` (see `checkpoint.load_params`; default: the first local device).
  """
  st.check_dtype(dtype)
  if dtype is None:
    stored = checkpoint.stored_dtypes(path)
    if len(stored) != 1:
      raise ValueError(
          f"{path} holds params of mixed dtypes {sorted(stored)}; pass an explicit dtype"
      )
    dtype = stored.pop()
  return checkpoint.load_params(path, shardings, param_dtype=dtype)


def save_orbax(
    cfg: PLTConfig,
    params,
    path: str,
    *,
    overwrite: bool = False,
    tokenizer_dir: str | None = None,
    dtype: str | None = None,
):
  st.check_dtype(dtype)
  flat = check_params(cfg, params)
  if dtype is not None:
    flat = {p: _cast_aligned(x, dtype) for p, x in flat.items()}
    cfg = cfg.replace(torch_dtype=dtype)
  # Host jax arrays (aliasing load_hf's aligned numpy buffers): Orbax stages less than from numpy.
  cpu = _cpu_device()
  flat = {p: jax.device_put(x, cpu) for p, x in flat.items()}
  with staged_dir(path, overwrite) as tmp:
    checkpoint.save_params(tmp, cfg, hf_names.unflatten(flat))
    copy_side_files(tokenizer_dir, tmp)


def _cpu_device():
  try:
    return jax.devices("cpu")[0]
  except RuntimeError:  # JAX_PLATFORMS without cpu: the default device
    return None


def _orbax_to_hf(
    src: str,
    dst: str,
    *,
    shard_size,
    dtype: str | None,
    overwrite: bool,
    loops: int | None,
    gate_bias: float | None,
    tokenizer_dir: str | None,
) -> None:
  """Streamed: each param restored, written and dropped in turn (plus new gates when upcycling)."""
  cfg = checkpoint.read_config(src)
  meta = checkpoint.params_metadata(src)
  check_shapes(cfg, {p: tuple(m.shape) for p, m in meta.items()})
  dtypes = {p: dtype or st.dtype_of(m) for p, m in meta.items()}
  leaves: Iterable[tuple[str, Any]] = (
      (p, np.asarray(x)) for p, x in checkpoint.iter_params(src)
  )
  if loops is not None:
    cfg, add = upcycling.plan_loops(cfg, loops, gate_bias)
    if add:
      bias = upcycling.DEFAULT_GATE_BIAS if gate_bias is None else gate_bias
      gates = upcycling.gate_params(cfg, st.DTYPES[dtypes["norm/scale"]], bias)
      dtypes.update({p: dtypes["norm/scale"] for p in gates})
      leaves = itertools.chain(leaves, gates.items())
  with staged_dir(dst, overwrite) as tmp:
    _write_hf(cfg, tmp, dtypes, leaves, shard_size, tokenizer_dir)


def convert_checkpoint(
    src: str,
    dst: str,
    to: str,
    *,
    shard_size: int | str = st.DEFAULT_SHARD_SIZE,
    dtype: str | None = None,
    overwrite: bool = False,
    loops: int | None = None,
    gate_bias: float | None = None,
) -> str:
  """Convert `src` (format detected) to `to` in {'orbax', 'hf'} at `dst`. Returns the source format.

  `loops`: write the model with this loop count; from an R = 1 (or Llama) source that upcycles it,
  adding gates with bias `gate_bias` (see `upcycling.py`).
  """
  if to not in ("orbax", "hf"):
    raise ValueError(f"--to must be 'orbax' or 'hf', got {to!r}")
  st.check_dtype(dtype)
  st.parse_size(shard_size)
  src, dst = os.path.abspath(src), os.path.abspath(dst)
  if not os.path.isdir(src):
    raise ValueError(f"source {src} is not a directory")
  real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
  if os.path.commonpath([real_src, real_dst]) in (real_src, real_dst):
    raise ValueError(
        f"source {src} and destination {dst} must not contain each other"
    )
  weights, fmt, tok_dirs = resolve_source(src)
  # fail before reading any weights: unsafe side files, the destination, the loop settings
  tok_dir = next((d for d in tok_dirs if side_files(d)), None)
  check_dst(dst, overwrite)
  if loops is not None:
    upcycling.plan_loops(checkpoint.read_config(weights), loops, gate_bias)
  elif gate_bias is not None:
    raise ValueError("gate_bias applies only with loops (upcycling)")
  if fmt == "orbax" and to == "hf":
    _orbax_to_hf(
        weights,
        dst,
        shard_size=shard_size,
        dtype=dtype,
        overwrite=overwrite,
        loops=loops,
        gate_bias=gate_bias,
        tokenizer_dir=tok_dir,
    )
    return fmt
  cfg, params = (
      load_hf(weights, dtype) if fmt == "hf" else load_orbax(weights, dtype)
  )
  if loops is not None:
    cfg, params = upcycling.upcycle(cfg, params, loops, gate_bias=gate_bias)
  if to == "hf":
    save_hf(
        cfg,
        params,
        dst,
        shard_size=shard_size,
        overwrite=overwrite,
        tokenizer_dir=tok_dir,
    )
  else:
    save_orbax(cfg, params, dst, overwrite=overwrite, tokenizer_dir=tok_dir)
  return fmt
