"""grain input pipeline: documents -> tokens -> packed rows -> shuffled batches, resumable.

Pipeline (per process): document source -> this process's shard (every process_count-th document,
read lazily, so a process only reads its own) -> shuffle documents with the seed (a new order each
epoch) -> repeat -> tokenize (+BOS, +EOS) -> shift into (inputs, targets) per document -> pack rows of
`seq_len` with grain's ConcatThenSplit packing -> window-shuffle rows -> batch.

Targets are shifted *before* packing, so every packed position predicts the true next token of its
own document: a document split across two rows keeps its targets, and the last position of a
document predicts its EOS. Rows (all [S] int32 unless noted):
  inputs, targets   token ids (pad_id where segment_ids == 0)
  segment_ids       1..n per row for its document pieces; 0 = padding
  positions         0.. within each piece (restart at 0 per document and per split piece)
  loss_mask         float32, 1 where there is a target (segment_ids > 0), else 0

Sources (`data.source`, comma-separated entries, mixable):
  stdlib | stdlib:train | stdlib:heldout   the built-in corpus (corpus.py); "stdlib" = train split
  PATH or GLOB of *.jsonl                  one document per line, text under `text_key`
  PATH or GLOB of any other file           one document per file (UTF-8 text: .py, .txt, ...);
                                           a file with a NUL byte or invalid UTF-8 in its first
                                           8 KiB is skipped (binary or another encoding) and
                                           counted; later invalid bytes decode to U+FFFD
  array_record:GLOB                        one document per record; records are UTF-8 text (raw
                                           bytes), tokenized here, so any tokenizer can be used
(The built-in corpus is small, ~10 MB: each process holds all of it but tokenizes only its shard.)
Special-token strings inside documents (a file mentioning "</s>") are tokenized as plain text.

The iterator state (`get_state()`) is a JSON-serialisable dict; `set_state` resumes exactly at the
next batch. The same config, seed and process layout always give the same batches; worker_count
is part of the layout (each worker packs its own slice), so keep it fixed across a resume. A finite
`num_epochs` ends the iterator (StopIteration) after the last full batch.
"""

from __future__ import annotations

import bisect
import codecs
from collections.abc import Callable, Iterator, Sequence
import functools
import glob
import json
import os
from typing import Any

from absl import flags
import grain
import ml_collections
import numpy as np

from loopcoder_jax.data import corpus
from loopcoder_jax.data.tokenizer import Tokenizer, check_vocab  # noqa: F401  (check_vocab re-exported)

_STDLIB = {
    "stdlib": "train",
    "stdlib:train": "train",
    "stdlib:heldout": "heldout",
}
_AR_PREFIX = "array_record:"


def default_data_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      {
          "source": "stdlib",  # see the module docstring
          "eval_source": "",  # held-out text for make_eval_batches; "" = stdlib:heldout for stdlib
          "text_key": "text",  # jsonl field holding the document
          "seq_len": 256,
          "seed": 0,
          "shuffle": True,
          "shuffle_window": 1024,  # rows; mixes the pieces of long documents across batches
          # None = forever
          "num_epochs": ml_collections.FieldReference(None, field_type=int),
          "worker_count": 0,  # grain worker processes (0 = read in this process)
          "read_threads": 2,  # threads tokenizing ahead in each reading process
          "add_eos": True,
          "add_bos": False,
          # "text": documents, next-token loss everywhere; "chat": conversations (chat.py), loss
          # on assistant tokens only, with the two keys below
          "format": "text",
          "on_bad_example": "error",  # chat: "error" stops before training, "skip" drops them
          "pack_bins": 32,  # chat: rows filled side by side by first-fit packing
      }
  )


# ---------------------------------------------------------------- document sources (random access)


class _Texts:

  def __init__(self, texts: Sequence[str]):
    self._texts = list(texts)

  def __len__(self):
    return len(self._texts)

  def __getitem__(self, i: int) -> str:
    return self._texts[i]


class _Stdlib(_Texts):
  """Pickles as its split name, so worker processes re-read (and cache) the corpus themselves."""

  def __init__(self, split: str):
    self._split = split
    super().__init__([t for _, t in corpus.stdlib_files(split)])

  def __reduce__(self):
    return (_Stdlib, (self._split,))


_SNIFF_BYTES = 8192


@functools.cache
def _not_text(path: str, size: int, mtime_ns: int) -> str | None:
  """'binary' or 'non-UTF-8' for a file that is not UTF-8 text by its first bytes, else None."""
  del size, mtime_ns  # the cache key: a changed file is sniffed again
  with open(path, "rb") as f:
    head = f.read(_SNIFF_BYTES)
  if b"\0" in head:
    return "binary"
  try:  # a character cut at the end of the sniffed bytes is not an error
    codecs.getincrementaldecoder("utf-8")().decode(
        head, final=len(head) < _SNIFF_BYTES
    )
  except UnicodeDecodeError:
    return "non-UTF-8"
  return None


def _text_files(paths: Sequence[str], skipped: dict[str, int]) -> list[str]:
  """The paths that hold UTF-8 text; counts the others in `skipped` by kind."""
  kept = []
  for p in paths:
    st = os.stat(p)
    kind = _not_text(p, st.st_size, st.st_mtime_ns)
    if kind is None:
      kept.append(p)
    else:
      skipped[kind] = skipped.get(kind, 0) + 1
  return kept


class _Files:

  def __init__(self, paths: Sequence[str]):
    self._paths = list(paths)

  def __len__(self):
    return len(self._paths)

  def __getitem__(self, i: int) -> str:
    with open(self._paths[i], "rb") as f:
      return f.read().decode("utf-8", errors="replace")


class _Jsonl:
  """Lines of one .jsonl file, indexed by byte offset so any line is read without the others."""

  def __init__(self, path: str, key: str):
    self._path, self._key = path, key
    offsets, pos = [], 0
    with open(path, "rb") as f:
      for line in f:
        if line.strip():
          offsets.append(pos)
        pos += len(line)
    self._offsets = np.asarray(offsets, np.int64)
    if offsets:
      self[0]  # fail now, not mid-training, if the first line lacks the key

  def __len__(self):
    return len(self._offsets)

  def __getitem__(self, i: int) -> str:
    with open(self._path, "rb") as f:
      f.seek(int(self._offsets[i]))
      line = f.readline()
    try:
      record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(
          f"{self._path}: document {i} is not valid JSON ({e})"
      ) from None
    text = record.get(self._key) if isinstance(record, dict) else None
    if not isinstance(text, str):
      raise ValueError(
          f"{self._path}: document {i} has no string field {self._key!r} "
          "(set data.text_key)"
      )
    return text


class _ArrayRecord:

  def __init__(self, paths: Sequence[str]):
    self._source = grain.sources.ArrayRecordDataSource(list(paths))

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i: int) -> str:
    record = self._source[i]
    return (
        record.decode("utf-8", errors="replace")
        if isinstance(record, bytes)
        else str(record)
    )


class Documents:
  """Random-access concatenation of document sources: `docs[i]` is the text of document i."""

  def __init__(self, parts: Sequence[Any]):
    self._parts = [p for p in parts if len(p)]
    self._starts = np.cumsum([0] + [len(p) for p in self._parts]).tolist()

  def __len__(self):
    return self._starts[-1]

  def __getitem__(self, i: int) -> str:
    k = bisect.bisect_right(self._starts, i) - 1
    return self._parts[k][i - self._starts[k]]


def expand_paths(pattern: str) -> list[str]:
  """The files a source entry names (a path or a glob), sorted; ValueError if none."""
  if glob.has_magic(pattern):
    paths = sorted(
        p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)
    )
    if not paths:
      raise ValueError(f"data source glob {pattern!r} matches no files")
    return paths
  if os.path.isdir(pattern):
    raise ValueError(
        f"data source {pattern!r} is a directory; name its files with a glob such as "
        f"'{os.path.join(pattern, '**', '*.py')}'"
    )
  if not os.path.isfile(pattern):
    raise ValueError(f"data source file {pattern!r} does not exist")
  return [pattern]


def load_documents(
    source: str,
    text_key: str = "text",
    report: Callable[[str], None] | None = None,
) -> Documents:
  """Resolves a source string (see module docstring); raises ValueError on any bad entry.

  `report` gets one line counting the files skipped as binary or not UTF-8, if any.
  """
  entries = [e.strip() for e in str(source).split(",") if e.strip()]
  if not entries:
    raise ValueError("data.source is empty")
  if not text_key:
    raise ValueError("data.text_key is empty")
  parts: list[Any] = []
  skipped: dict[str, int] = {}
  for entry in entries:
    if entry in _STDLIB:
      parts.append(_Stdlib(_STDLIB[entry]))
    elif entry.startswith(_AR_PREFIX):
      parts.append(_ArrayRecord(expand_paths(entry[len(_AR_PREFIX) :])))
    else:
      paths = expand_paths(entry)
      parts += [_Jsonl(p, text_key) for p in paths if p.endswith(".jsonl")]
      plain = _text_files(
          [p for p in paths if not p.endswith(".jsonl")], skipped
      )
      if plain:
        parts.append(_Files(plain))
  docs = Documents(parts)
  note = ", ".join(f"{n} {kind}" for kind, n in sorted(skipped.items()))
  if not len(docs):
    raise ValueError(
        f"data source {source!r} holds no documents (empty corpus"
        f"{f'; skipped {note} files' if note else ''})"
    )
  if note and report is not None:
    report(f"data source {source!r}: skipped {note} files (not UTF-8 text)")
  return docs


def document_texts(source: str, text_key: str = "text") -> Iterator[str]:
  """All document texts of a source in order, e.g. to train a tokenizer on them."""
  docs = load_documents(source, text_key)
  return (docs[i] for i in range(len(docs)))


# ---------------------------------------------------------------- tokenize and pack


class _Tokenize(grain.transforms.Map):
  """text -> {"inputs": ids[:-1], "targets": ids[1:]}; None (dropped) if nothing to predict.

  More consecutive drops than the shard has documents means no document has anything to
  predict: that raises instead of letting a repeating pipeline spin forever.
  """

  def __init__(
      self, tokenizer: Tokenizer, add_bos: bool, add_eos: bool, num_docs: int
  ):
    # EOS is appended only when the tokenizer has one (`_check_common` refuses add_eos otherwise).
    self._eos = tokenizer.eos_id if add_eos else None
    self._tok, self._add_bos = tokenizer, add_bos
    self._num_docs, self._dropped_in_a_row = num_docs, 0

  def map(self, text: str):
    ids = self._tok.encode(text, add_bos=self._add_bos, split_special=False)
    if self._eos is not None:
      ids.append(self._eos)
    if len(ids) < 2:
      self._dropped_in_a_row += 1
      if self._dropped_in_a_row > self._num_docs:
        raise ValueError(
            f"none of the {self._num_docs} documents holds a token to predict "
            "(empty texts)"
        )
      return None
    self._dropped_in_a_row = 0
    arr = np.asarray(ids, np.int32)
    return {"inputs": arr[:-1], "targets": arr[1:]}


def _pack(
    ds: grain.IterDataset, seq_len: int, pad_id: int
) -> grain.IterDataset:
  packed = grain.experimental.ConcatThenSplitIterDataset(
      ds, length_struct={"inputs": seq_len, "targets": seq_len}
  )

  return packed.map(functools.partial(packed_row, pad_id=pad_id))


def packed_row(
    row: dict, pad_id: int, extra: tuple[str, ...] = ()
) -> dict[str, np.ndarray]:
  """A row as grain's packers give it -> a batch row. Outside every segment (padding): ids are
  `pad_id`, positions and the `extra` integer fields 0, and nothing is scored; inside, the loss
  mask is the row's own (chat: assistant tokens) or, when it has none, every position.
  """
  seg = row["inputs_segment_ids"].astype(np.int32)
  real = seg > 0
  mask = np.where(real, row["loss_mask"], 0) if "loss_mask" in row else real
  out = {
      "inputs": np.where(real, row["inputs"], pad_id).astype(np.int32),
      "targets": np.where(real, row["targets"], pad_id).astype(np.int32),
      "segment_ids": seg,
      "positions": np.where(real, row["inputs_positions"], 0).astype(np.int32),
      "loss_mask": mask.astype(np.float32),
  }
  for key in extra:
    out[key] = np.where(real, row[key], 0).astype(np.int32)
  return out


def _json_state(state):
  """Iterator state with tuples as lists, i.e. exactly what a JSON round trip gives back."""
  if isinstance(state, dict):
    return {k: _json_state(v) for k, v in state.items()}
  if isinstance(state, (list, tuple)):
    return [_json_state(v) for v in state]
  return state


def _grain_state(state):
  """Undoes `_json_state` where grain needs it: ConcatThenSplit compares its slices to tuples."""
  if isinstance(state, dict):
    return {
        k: (
            {f: tuple(sl) for f, sl in v.items()}
            if k == "remainder_slices"
            else _grain_state(v)
        )
        for k, v in state.items()
    }
  if isinstance(state, list):
    return [_grain_state(v) for v in state]
  return state


class _JsonStateIterator(grain.DatasetIterator):
  """The pipeline's iterator with a JSON-safe state: `set_state(json.loads(json.dumps(
  it.get_state())))` resumes exactly (grain's own ConcatThenSplit state does not survive JSON).
  """

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)

  def __next__(self):
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return _json_state(self._parent.get_state())

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(_grain_state(state))


def _check_common(data_cfg, tokenizer: Tokenizer) -> None:
  if data_cfg.seq_len < 2:
    raise ValueError(f"data.seq_len must be >= 2, got {data_cfg.seq_len}")
  if data_cfg.add_eos and tokenizer.eos_id is None:
    raise ValueError(
        f"data.add_eos is set but tokenizer {tokenizer.name} has no EOS token"
    )
  if data_cfg.add_bos and tokenizer.bos_id is None:
    raise ValueError(
        f"data.add_bos is set but tokenizer {tokenizer.name} has no BOS token"
    )


def make_train_iterator(
    data_cfg: ml_collections.ConfigDict,
    tokenizer: Tokenizer,
    *,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
  """Iterator of per-process batches ([global_batch_size // process_count, seq_len] arrays).

  All config and source errors are raised here, before any tokenization.
  """
  check_iterator_args(
      data_cfg, tokenizer, global_batch_size, process_index, process_count
  )
  docs = load_documents(data_cfg.source, data_cfg.text_key)
  if len(docs) < process_count:
    raise ValueError(
        f"data source {data_cfg.source!r} has {len(docs)} documents, fewer than the "
        f"{process_count} processes reading it"
    )

  ds = grain.MapDataset.source(docs)[process_index::process_count]
  shard_len = len(ds)
  if data_cfg.shuffle:
    ds = ds.shuffle(seed=data_cfg.seed)
  ds = ds.repeat(data_cfg.num_epochs)
  ds = ds.map(
      _Tokenize(tokenizer, data_cfg.add_bos, data_cfg.add_eos, shard_len)
  )
  it = ds.to_iter_dataset(
      grain.ReadOptions(
          num_threads=data_cfg.read_threads,
          prefetch_buffer_size=max(8, 4 * data_cfg.read_threads),
      )
  )
  it = _pack(it, data_cfg.seq_len, tokenizer.pad_id)
  if data_cfg.shuffle and data_cfg.shuffle_window > 1:
    # Distinct stream per process; the doc shuffle already differs, this keeps rows independent too.
    it = grain.experimental.WindowShuffleIterDataset(
        it,
        window_size=data_cfg.shuffle_window,
        seed=(data_cfg.seed * 1_000_003 + process_index) % 2**32,
    )
  return _JsonStateIterator(
      iter(batch_rows(it, data_cfg, global_batch_size // process_count))
  )


def check_iterator_args(
    data_cfg: ml_collections.ConfigDict,
    tokenizer: Tokenizer,
    global_batch_size: int,
    process_index: int,
    process_count: int,
) -> None:
  """The config and process-layout checks every training iterator makes first."""
  _check_common(data_cfg, tokenizer)
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
        f"process_index {process_index} is not in [0, process_count={process_count})"
    )
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(
        f"global batch size {global_batch_size} is not a positive multiple of the "
        f"process count {process_count}"
    )
  if data_cfg.num_epochs is not None and data_cfg.num_epochs < 1:
    raise ValueError(
        f"data.num_epochs must be >= 1 or None (forever), got {data_cfg.num_epochs}"
    )
  if data_cfg.worker_count < 0 or data_cfg.read_threads < 0:
    raise ValueError("data.worker_count and data.read_threads must be >= 0")
  if data_cfg.shuffle and not 0 <= data_cfg.seed < 2**32:
    raise ValueError(f"data.seed must be in [0, 2**32), got {data_cfg.seed}")


def batch_rows(
    rows: grain.IterDataset, data_cfg: ml_collections.ConfigDict, batch: int
) -> grain.IterDataset:
  """Rows -> batches of `batch` rows, read by `data_cfg.worker_count` worker processes if > 0."""
  it = rows.batch(batch, drop_remainder=True)
  if data_cfg.worker_count > 0:
    # grain's workers read absl flags; notebooks never parse them
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=data_cfg.worker_count)
    )
  return it


def make_eval_batches(
    data_cfg_or_texts,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    max_tokens: int,
) -> tuple[list[dict[str, np.ndarray]], int]:
  """Held-out batches covering at most `max_tokens` predicted tokens, plus their UTF-8 byte count.

  `data_cfg_or_texts` is a data config (its `eval_source`, or the stdlib held-out split when the
  source is the built-in corpus; its add_bos/add_eos) or a sequence of texts (no BOS, EOS added).
  Documents are taken in order, unshuffled; the last one is cut to fit `max_tokens`. The byte count
  covers exactly the text of the predicted (target) tokens: everything but a document's first token
  (which has no context) unless BOS is added; EOS targets are scored but carry no bytes, so
    bits per byte = sum(token NLL in nats * loss_mask) / (ln 2 * num_bytes).
  The last batch is padded with empty rows (loss_mask 0).
  """
  if isinstance(data_cfg_or_texts, ml_collections.ConfigDict):
    cfg = data_cfg_or_texts
    source = cfg.eval_source or (
        "stdlib:heldout" if cfg.source in _STDLIB else ""
    )
    if not source:
      raise ValueError(
          f"data.eval_source is empty and data.source {cfg.source!r} has no built-in "
          "held-out split; set data.eval_source"
      )
    docs, add_bos, add_eos = (
        load_documents(source, cfg.text_key),
        cfg.add_bos,
        cfg.add_eos,
    )
  else:
    texts = (
        [data_cfg_or_texts]
        if isinstance(data_cfg_or_texts, str)
        else list(data_cfg_or_texts)
    )
    if not texts:
      raise ValueError("make_eval_batches got no texts")
    docs, add_bos, add_eos = Documents([_Texts(texts)]), False, True
  _check_common(
      ml_collections.ConfigDict(
          {"seq_len": seq_len, "add_bos": add_bos, "add_eos": add_eos}
      ),
      tokenizer,
  )
  if batch_size < 1 or max_tokens < 1:
    raise ValueError(
        f"batch_size ({batch_size}) and max_tokens ({max_tokens}) must be >= 1"
    )

  def utf8_len(ids):
    return len(tokenizer.decode(ids).encode("utf-8"))

  pieces, num_bytes, budget = [], 0, max_tokens
  for i in range(len(docs)):
    if budget <= 0:
      break
    text_ids = tokenizer.encode(docs[i], split_special=False)
    ids = (
        ([tokenizer.bos_id] if add_bos else [])
        + text_ids
        + ([tokenizer.eos_id] if add_eos else [])
    )
    n = min(len(ids) - 1, budget)  # targets kept: ids[1 : n + 1]
    if n < 1:
      continue
    budget -= n
    # index in text_ids of the first text token that is a target
    start = 0 if add_bos else 1
    end = min(len(text_ids), n + 1 - int(add_bos))
    if end > start:
      num_bytes += utf8_len(text_ids[:end]) - utf8_len(text_ids[:start])
    arr = np.asarray(ids[: n + 1], np.int32)
    pieces.append({"inputs": arr[:-1], "targets": arr[1:]})
  if not pieces:
    raise ValueError("the evaluation texts hold no tokens to predict")

  rows = list(
      _pack(
          grain.MapDataset.source(pieces).to_iter_dataset(
              grain.ReadOptions(num_threads=0)
          ),
          seq_len,
          tokenizer.pad_id,
      )
  )
  empty = {k: np.zeros_like(v) for k, v in rows[0].items()}
  empty["inputs"][:] = empty["targets"][:] = tokenizer.pad_id
  rows += [empty] * (-len(rows) % batch_size)
  batches = [
      {k: np.stack([r[k] for r in rows[j : j + batch_size]]) for k in rows[0]}
      for j in range(0, len(rows), batch_size)
  ]
  return batches, num_bytes
