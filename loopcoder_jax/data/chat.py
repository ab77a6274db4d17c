"""Chat data for supervised fine-tuning: validation, rendering with assistant masks, packing.

Data (`data.format = "chat"`; `data.source` / `data.eval_source`, comma-separated entries):
  demos | demos:train | demos:heldout   the built-in demonstrations (demos.py); "demos" = train
  PATH or GLOB of *.jsonl               one conversation per line, the common chat format:
      {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}

Validation (`load_conversations`) reads every line of every file before training starts. A line
that is not JSON, a message with an unknown role or empty content, and a conversation without an
assistant turn are problems; so is a conversation the chat template refuses to render. Each is
reported as one line `path:line: problem`; `data.on_bad_example = "error"` (the default) then
stops before training, `"skip"` drops those lines and reports how many.

Rendering (`tokenize`): the tokenizer's chat template (`chat_template` in tokenizer_config.json or
chat_template.jinja) renders the conversation, or `DEFAULT_TEMPLATE` when it has none; the text is
tokenized whole, special-token strings mapped to their ids, exactly as transformers'
`apply_chat_template(..., tokenize=True)` (`data.add_bos` adds BOS if the template does not;
`data.add_eos` does not apply: the template ends the turns). An assistant turn is the text that
rendering it adds to the prompt that asks for it (the messages before it, with the generation
prompt); tokens whose characters overlap an assistant turn are assistant tokens, and only they are
targets of the loss. The template must render conversations incrementally (each prefix of the
conversation renders to a prefix of the text), as common templates do; one that rewrites earlier
turns is reported as a problem of each conversation it rewrites.

Packing (`make_train_iterator`): each conversation -> inputs, targets (shifted by one), loss_mask
(1 where the target is an assistant token); whole conversations are packed into rows by first-fit
over `data.pack_bins` rows at a time (grain's FirstFitPackIterDataset), each with its own segment id
and positions from 0, so none attends to another and none is split across rows. A conversation
longer than `seq_len` tokens is truncated to fit: the `truncated` field of a row holds 1 at the
first token of each truncated conversation (the trainer counts them in its log).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools
import itertools
import json
import sys
from typing import Any

import grain
import jinja2
import ml_collections
import numpy as np

from loopcoder_jax.data import demos, pipeline
from loopcoder_jax.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
# Used when the tokenizer has no template: role headers as plain text, an assistant turn ended by
# the EOS token (the decoder's stop token), so any tokenizer with an EOS can be fine-tuned. The
# generation prompt stops at "<|assistant|>" and the newline after it opens the answer: byte-level
# BPE merges a newline with the indentation after it, never with the ">" before it, so the tokens
# of a prompt end where the answer's begin, as when the model answers a rendered prompt.
#   <|system|>\n{content}\n<|user|>\n{content}\n<|assistant|>\n{content}{eos_token}...
DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}"
    "{% else %}{{ '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
MAX_REPORTED = 20  # problem lines printed; the rest are counted
KEYS = ("inputs", "targets", "loss_mask", "truncated")


def with_template(tokenizer: Tokenizer) -> Tokenizer:
  """`tokenizer` itself when it has a chat template, else a copy carrying `DEFAULT_TEMPLATE`."""
  if tokenizer.chat_template is not None:
    return tokenizer
  if tokenizer.eos_id is None:
    raise ValueError(
        f"tokenizer {tokenizer.name} has neither a chat template nor an EOS token to end "
        "assistant turns with; give it a chat_template"
    )
  return tokenizer.with_chat_template(DEFAULT_TEMPLATE)


# ---------------------------------------------------------------- validation and rendering


def problem(record: Any) -> str | None:
  """What is wrong with one parsed line of chat data, or None."""
  if not isinstance(record, dict) or "messages" not in record:
    return 'not a JSON object with a "messages" list'
  messages = record["messages"]
  if not isinstance(messages, list) or not messages:
    return '"messages" is not a non-empty list'
  for i, m in enumerate(messages):
    if not isinstance(m, dict):
      return f"message {i} is not a JSON object"
    if m.get("role") not in ROLES:
      return f"message {i} has unknown role {m.get('role')!r} (expected one of {', '.join(ROLES)})"
    content = m.get("content")
    if not isinstance(content, str):
      return f"message {i} ({m['role']}) has no string content"
    if not content.strip():
      return f"message {i} ({m['role']}) has empty content"
  if not any(m["role"] == "assistant" for m in messages):
    return "the conversation has no assistant turn"
  return None


def render(
    tokenizer: Tokenizer, messages: Sequence[dict]
) -> tuple[str, list[tuple[int, int]]]:
  """The rendered conversation and the [start, end) character spans of its assistant turns."""
  messages = list(messages)

  def apply(msgs, gen):
    try:
      return tokenizer.apply_chat_template(msgs, add_generation_prompt=gen)
    except jinja2.TemplateError as e:
      raise ValueError(f"the chat template refuses it ({e})") from None

  text = apply(messages, False)
  spans = []
  for i, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    prompt, upto = apply(messages[:i], True), apply(messages[: i + 1], False)
    if not (upto.startswith(prompt) and text.startswith(upto)):
      raise ValueError(
          f"the chat template does not render it incrementally (the text up to message {i} "
          "is not a prefix of the whole), so its assistant tokens cannot be told apart"
      )
    spans.append((len(prompt), len(upto)))
  return text, spans


def tokenize(
    tokenizer: Tokenizer, messages: Sequence[dict], add_bos: bool = False
) -> tuple[np.ndarray, np.ndarray]:
  """(token ids [N] int32, assistant-token mask [N] bool) of a conversation.

  `add_bos` prepends BOS unless the template already starts with it.
  """
  text, spans = render(tokenizer, messages)
  ids, offsets = tokenizer.encode_with_offsets(text)
  ids_N = np.asarray(ids, np.int32)
  start_N, end_N = (
      np.fromiter(
          itertools.chain.from_iterable(offsets), np.int64, 2 * len(ids)
      )
      .reshape(-1, 2)
      .T
  )
  mask_N = np.zeros(len(ids), bool)
  for a, b in spans:
    # overlapping characters; an empty span (a dummy-prefix piece) counts where it sits
    mask_N |= np.where(
        start_N == end_N,
        (a <= start_N) & (start_N < b),
        (start_N < b) & (end_N > a),
    )
  if add_bos and (not len(ids_N) or ids_N[0] != tokenizer.bos_id):
    ids_N = np.concatenate([[tokenizer.bos_id], ids_N])
    mask_N = np.concatenate([[False], mask_N])
  return ids_N.astype(np.int32), mask_N


def example(
    tokenizer: Tokenizer,
    messages: Sequence[dict],
    seq_len: int,
    add_bos: bool = False,
) -> dict[str, np.ndarray]:
  """One conversation as a training example of at most `seq_len` positions (see module doc)."""
  ids_N, mask_N = tokenize(tokenizer, messages, add_bos)
  truncated = len(ids_N) - 1 > seq_len
  ids_N, mask_N = ids_N[: seq_len + 1], mask_N[: seq_len + 1]
  truncated_S = np.zeros(len(ids_N) - 1, np.int32)
  truncated_S[:1] = truncated
  return {
      "inputs": ids_N[:-1],
      "targets": ids_N[1:],
      "loss_mask": mask_N[1:].astype(np.float32),
      "truncated": truncated_S,
  }


# ---------------------------------------------------------------- sources


class _Demos:
  """Pickles as its split name, so grain workers rebuild (and cache) the set themselves."""

  def __init__(self, split: str):
    self._split = split
    self._convs = demos.demo_conversations(split)

  def __reduce__(self):
    return (_Demos, (self._split,))

  def __len__(self):
    return len(self._convs)

  def __getitem__(self, i: int) -> list[dict]:
    return self._convs[i]

  def where(self, i: int) -> str:
    return f"demos:{self._split} #{i}"


class _JsonlChats:
  """Validated lines of one .jsonl file, read by byte offset (no line is held in memory)."""

  def __init__(self, path: str, offsets: Sequence[int]):
    self._path, self._offsets = path, np.asarray(offsets, np.int64)

  def __len__(self):
    return len(self._offsets)

  def __getitem__(self, i: int) -> list[dict]:
    with open(self._path, "rb") as f:
      f.seek(int(self._offsets[i]))
      return json.loads(f.readline())["messages"]


class _Good:
  """The entries of a source that passed validation."""

  def __init__(self, source, keep: Sequence[int]):
    self._source, self._keep = source, list(keep)

  def __len__(self):
    return len(self._keep)

  def __getitem__(self, i: int) -> list[dict]:
    return self._source[self._keep[i]]


def _scan_jsonl(path: str, check: Callable[[Any], str | None], problems: list):
  offsets, pos = [], 0
  with open(path, "rb") as f:
    for lineno, line in enumerate(f, 1):
      if line.strip():
        try:
          record = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
          msg: str | None = f"not valid JSON ({e})"
        else:
          msg = check(record)
        if msg is None:
          offsets.append(pos)
        else:
          problems.append(f"{path}:{lineno}: {msg}")
      pos += len(line)
  return _JsonlChats(path, offsets)


def load_conversations(
    source: str,
    tokenizer: Tokenizer,
    *,
    on_bad: str = "error",
    report: Callable[[str], None] | None = None,
) -> pipeline.Documents:
  """Every conversation of `source` (see module doc), validated and rendered once.

  Problems are handed to `report` (default: stderr) one line each (the first MAX_REPORTED, then a
  count). With `on_bad="error"` any problem raises one ValueError after all files were read; with
  "skip" the bad conversations are left out and counted. `tokenizer` must carry a chat template
  (`with_template`).
  """
  report = report or functools.partial(print, file=sys.stderr)
  if on_bad not in ("error", "skip"):
    raise ValueError(
        f"data.on_bad_example must be 'error' or 'skip', got {on_bad!r}"
    )
  entries = [e.strip() for e in str(source).split(",") if e.strip()]
  if not entries:
    raise ValueError("chat data source is empty")

  def check(record):
    msg = problem(record)
    if msg is None:
      try:
        render(tokenizer, record["messages"])
      except ValueError as e:
        msg = str(e)
    return msg

  problems: list[str] = []
  parts: list[Any] = []
  total = 0
  for entry in entries:
    if entry.startswith("stdlib"):
      raise ValueError(
          f"data source {entry!r} is the text corpus; chat data is demos, demos:heldout "
          "or .jsonl files (or set data.format=text)"
      )
    if entry in demos.SOURCES:
      src = _Demos(demos.SOURCES[entry])
      found = [check({"messages": src[i]}) for i in range(len(src))]
      problems += [f"{src.where(i)}: {m}" for i, m in enumerate(found) if m]
      parts.append(_Good(src, [i for i, m in enumerate(found) if m is None]))
      total += len(src)
      continue
    for path in pipeline.expand_paths(entry):
      if not path.endswith(".jsonl"):
        raise ValueError(
            f"chat data file {path} is not a .jsonl file (one JSON conversation per line)"
        )
      before = len(problems)
      part = _scan_jsonl(path, check, problems)
      parts.append(part)
      total += len(part) + len(problems) - before
  for line in problems[:MAX_REPORTED]:
    report(line)
  if len(problems) > MAX_REPORTED:
    report(f"... and {len(problems) - MAX_REPORTED} more bad chat examples")
  if problems and on_bad == "error":
    raise ValueError(
        f"{len(problems)} of {total} chat examples in {source!r} are bad (first: "
        f"{problems[0]}); fix them or set data.on_bad_example=skip"
    )
  if problems:
    report(f"skipped {len(problems)} of {total} chat examples in {source!r}")
  convs = pipeline.Documents(parts)
  if not len(convs):
    raise ValueError(f"chat data source {source!r} holds no conversations")
  return convs


def heldout_source(data_cfg: ml_collections.ConfigDict) -> str:
  """`data.eval_source`, or the held-out demonstrations when training on the built-in ones."""
  if data_cfg.eval_source:
    return data_cfg.eval_source
  if data_cfg.source in demos.SOURCES:
    return "demos:heldout"
  raise ValueError(
      f"data.eval_source is empty and data.source {data_cfg.source!r} has no built-in "
      "held-out split; set data.eval_source (or eval.max_tokens=0)"
  )


# ---------------------------------------------------------------- tokenize and pack


class _Example(grain.transforms.Map):

  def __init__(self, tokenizer: Tokenizer, seq_len: int, add_bos: bool):
    self._tok, self._seq_len, self._add_bos = tokenizer, seq_len, add_bos

  def map(self, messages):
    return example(self._tok, messages, self._seq_len, self._add_bos)


def _pack(
    it: grain.IterDataset,
    seq_len: int,
    pad_id: int,
    bins: int,
    seed: int,
    shuffle: bool,
) -> grain.IterDataset:
  packed = grain.experimental.FirstFitPackIterDataset(
      it,
      length_struct={k: seq_len for k in KEYS},
      num_packing_bins=bins,
      seed=seed,
      shuffle_bins=shuffle,
  )

  return packed.map(
      functools.partial(
          pipeline.packed_row, pad_id=pad_id, extra=("truncated",)
      )
  )


def make_train_iterator(
    data_cfg: ml_collections.ConfigDict,
    tokenizer: Tokenizer,
    conversations: Sequence[Any],
    *,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
  """Per-process batches of packed conversations (`load_conversations`'s result).

  Rows as in pipeline.py plus `truncated`; the iterator state is JSON-serialisable and resumes
  exactly. Every process shuffles its own shard of conversations (a new order each epoch).
  """
  pipeline.check_iterator_args(
      data_cfg, tokenizer, global_batch_size, process_index, process_count
  )
  if data_cfg.pack_bins < 1:
    raise ValueError(f"data.pack_bins must be >= 1, got {data_cfg.pack_bins}")
  if len(conversations) < process_count:
    raise ValueError(
        f"chat data {data_cfg.source!r} has {len(conversations)} conversations, fewer "
        f"than the {process_count} processes reading it"
    )
  ds = grain.MapDataset.source(conversations)[process_index::process_count]
  if data_cfg.shuffle:
    ds = ds.shuffle(seed=data_cfg.seed)
  ds = ds.repeat(data_cfg.num_epochs)
  ds = ds.map(_Example(tokenizer, data_cfg.seq_len, data_cfg.add_bos))
  it = ds.to_iter_dataset(
      grain.ReadOptions(
          num_threads=data_cfg.read_threads,
          prefetch_buffer_size=max(8, 4 * data_cfg.read_threads),
      )
  )
  it = _pack(
      it,
      data_cfg.seq_len,
      tokenizer.pad_id,
      data_cfg.pack_bins,
      (data_cfg.seed * 1_000_003 + process_index) % 2**32,
      data_cfg.shuffle,
  )
  return iter(
      pipeline.batch_rows(it, data_cfg, global_batch_size // process_count)
  )


def make_eval_batches(
    conversations: Sequence[Any],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    max_tokens: int,
    add_bos: bool = False,
) -> list[dict[str, np.ndarray]]:
  """Held-out batches: conversations in order, whole, until they hold `max_tokens` positions.

  Packed first-fit in order; the last batch is padded with empty rows (loss_mask 0). The mean loss
  per assistant token is sum(token NLL * loss_mask) / sum(loss_mask).
  """
  if batch_size < 1 or max_tokens < 1 or seq_len < 2:
    raise ValueError(
        f"batch_size ({batch_size}) and max_tokens ({max_tokens}) must be >= 1 and "
        f"seq_len ({seq_len}) >= 2"
    )
  examples: list[dict[str, np.ndarray]] = []
  used = 0
  for i in range(len(conversations)):
    ex = example(tokenizer, conversations[i], seq_len, add_bos)
    if examples and used + len(ex["inputs"]) > max_tokens:
      break
    examples.append(ex)
    used += len(ex["inputs"])
  if not sum(float(ex["loss_mask"].sum()) for ex in examples):
    raise ValueError("the held-out conversations hold no assistant tokens")
  rows = list(
      _pack(
          grain.MapDataset.source(examples).to_iter_dataset(
              grain.ReadOptions(num_threads=0)
          ),
          seq_len,
          tokenizer.pad_id,
          bins=batch_size,
          seed=0,
          shuffle=False,
      )
  )
  empty = {k: np.zeros_like(v) for k, v in rows[0].items()}
  empty["inputs"][:] = empty["targets"][:] = tokenizer.pad_id
  rows += [empty] * (-len(rows) % batch_size)
  return [
      {k: np.stack([r[k] for r in rows[j : j + batch_size]]) for k in rows[0]}
      for j in range(0, len(rows), batch_size)
  ]
