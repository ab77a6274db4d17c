"""One tokenizer interface over an HF `tokenizers` model (tokenizer.json) or a SentencePiece model.

LoopCoder-V2 ships a Llama-style SentencePiece `tokenizer.model` (BOS `<s>`=1 prepended, `</s>`=2),
a chat template and extra end-of-turn ids in `generation_config.json`; the built-in tiny run trains
its own byte-level BPE (`train_bpe`, special tokens `<pad>`=0, `<s>`=1, `</s>`=2). `encode` never adds
special tokens on its own: callers say `add_bos=True` where they want BOS (as the data pipeline and the
decoder do from their configs). Special-token strings inside the text (e.g. a rendered chat) map to
their ids, as in HF; `split_special=False` encodes them as plain text instead (training data: a
source file that mentions "</s>" must not end its document there).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
import datetime
import functools
import json
import os
import re
import tempfile
from typing import Any

import sentencepiece as spm
import tokenizers

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_MODEL = "tokenizer.model"
# Side files read from a tokenizer directory and written back by `save` (verbatim).
_SIDE_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
# ids 0, 1, 2 in a `train_bpe` vocabulary
BPE_SPECIAL_TOKENS = (
    "<pad>",
    "<s>",
    "</s>",
)
# every byte plus the special tokens
_MIN_BPE_VOCAB = 256 + len(BPE_SPECIAL_TOKENS)


def _token_content(tok: Any) -> str | None:
  """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
  if isinstance(tok, dict):
    return tok.get("content")
  return tok if isinstance(tok, str) else None


def _as_id_list(value: Any) -> list[int]:
  if value is None:
    return []
  return (
      [int(v) for v in value]
      if isinstance(value, (list, tuple))
      else [int(value)]
  )


class Tokenizer:
  """encode/decode, special ids and chat template over either backend. Picklable (grain workers)."""

  def __init__(
      self,
      *,
      hf: tokenizers.Tokenizer | None = None,
      sp: spm.SentencePieceProcessor | None = None,
      files: dict[str, bytes],
      name: str = "",
  ):
    if (hf is None) == (sp is None):
      raise ValueError(
          "Tokenizer needs exactly one backend (HF tokenizers or SentencePiece)"
      )
    self._hf, self._sp, self._files, self.name = hf, sp, dict(files), name
    # A twin that reads special-token strings as text (tokenizers keeps this flag per instance).
    self._hf_plain = None
    if hf is not None:
      self._hf_plain = tokenizers.Tokenizer.from_str(hf.to_str())
      self._hf_plain.encode_special_tokens = True
    tcfg = self._json_file("tokenizer_config.json")
    smap = self._json_file("special_tokens_map.json")
    gcfg = self._json_file("generation_config.json")

    # Added tokens of a SentencePiece directory (e.g. chat markers) are split out before SP sees the
    # text, like HF's slow Llama tokenizer (legacy mode); tokenizer.json handles its own.
    self._added: dict[int, tuple[str, bool]] = {}
    if sp is not None:
      for idx, tok in (tcfg.get("added_tokens_decoder") or {}).items():
        content = _token_content(tok)
        if content:
          is_special = (
              tok.get("special", True) if isinstance(tok, dict) else True
          )
          self._added[int(idx)] = (content, bool(is_special))
    self._index_added()

    def special(
        key: str, defaults: Sequence[str], backend_id: int | None
    ) -> int | None:
      for cfg in (tcfg, smap):
        content = _token_content(cfg.get(key))
        if content is not None and self.token_to_id(content) is not None:
          return self.token_to_id(content)
      if backend_id is not None and backend_id >= 0:
        return backend_id
      for content in defaults:
        if self.token_to_id(content) is not None:
          return self.token_to_id(content)
      return None

    sp_ids = (
        (sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.unk_id())
        if sp is not None
        else (None, None, None, None)
    )
    self.bos_id = special(
        "bos_token", ("<s>", "<|begin_of_text|>", "<bos>"), sp_ids[0]
    )
    self.eos_id = special(
        "eos_token",
        ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>"),
        sp_ids[1],
    )
    pad = special("pad_token", ("<pad>",), sp_ids[2])
    # Padding is always masked out; any valid id will do when the model defines none.
    self.pad_id = (
        pad
        if pad is not None
        else (self.eos_id if self.eos_id is not None else 0)
    )
    self.unk_id = special("unk_token", ("<unk>",), sp_ids[3])
    if sp is not None:
      # SentencePiece reads "<s>" in a text as characters; HF (and a chat template's
      # {{ bos_token }}) means the token: split the special ones out like added tokens.
      for idx in (self.bos_id, self.eos_id, self.unk_id):
        if idx is not None and idx not in self._added:
          self._added[idx] = (sp.id_to_piece(idx), True)
      self._index_added()
    # Whether HF would prepend BOS by default (informational: `encode` only adds it when asked).
    self.add_bos_token = tcfg.get("add_bos_token")
    if self.add_bos_token is None:
      self.add_bos_token = (
          sp is not None
          if hf is None
          else self.bos_id is not None
          and hf.encode("a").ids[:1] == [self.bos_id]
      )
    self.add_bos_token = bool(self.add_bos_token)
    eos = [] if self.eos_id is None else [self.eos_id]
    for e in _as_id_list(gcfg.get("eos_token_id")):
      if e not in eos:
        eos.append(e)
    self.eos_ids = tuple(eos)

    template = tcfg.get("chat_template")
    if isinstance(template, list):  # several named templates: HF uses "default"
      template = {t.get("name"): t.get("template") for t in template}.get(
          "default"
      )
    if "chat_template.jinja" in self._files:
      template = self._files["chat_template.jinja"].decode("utf-8")
    self.chat_template: str | None = template or None

  def _index_added(self) -> None:
    self._added_by_text = {c: i for i, (c, _) in self._added.items()}
    self._added_re = (
        re.compile(
            "|".join(
                re.escape(c)
                for c in sorted(self._added_by_text, key=len, reverse=True)
            )
        )
        if self._added_by_text
        else None
    )

  def __reduce__(self):
    # Rebuilt from its files: backend objects do not pickle every setting (encode_special_tokens).
    return (_from_files, (self._files, self.name))

  def _json_file(self, name: str) -> dict:
    if name not in self._files:
      return {}
    try:
      return json.loads(self._files[name].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{self.name}: {name} is not valid JSON ({e})") from None

  @property
  def _spm(self) -> spm.SentencePieceProcessor:
    """The SentencePiece backend (methods reach it only when there is no HF one)."""
    assert self._sp is not None
    return self._sp

  @property
  def kind(self) -> str:
    return "hf" if self._hf is not None else "sentencepiece"

  @functools.cached_property
  def vocab_size(self) -> int:
    """Number of ids the model must embed (max id + 1, added tokens included)."""
    if self._hf is not None:  # ids may have gaps: the largest one decides
      return (
          max(self._hf.get_vocab(with_added_tokens=True).values(), default=-1)
          + 1
      )
    return max([self._spm.get_piece_size()] + [i + 1 for i in self._added])

  def token_to_id(self, token: str) -> int | None:
    if self._hf is not None:
      return self._hf.token_to_id(token)
    if token in self._added_by_text:
      return self._added_by_text[token]
    idx = self._spm.piece_to_id(token)
    # piece_to_id answers unk for unknown pieces; only the real unk piece maps to it.
    return (
        idx
        if idx != self._spm.unk_id() or self._spm.id_to_piece(idx) == token
        else None
    )

  def id_to_token(self, idx: int) -> str | None:
    if self._hf is not None:
      return self._hf.id_to_token(idx)
    if idx in self._added:
      return self._added[idx][0]
    return (
        self._spm.id_to_piece(idx)
        if 0 <= idx < self._spm.get_piece_size()
        else None
    )

  def encode(
      self, text: str, add_bos: bool = False, split_special: bool = True
  ) -> list[int]:
    if self._hf is not None:
      hf = self._hf_plain if not split_special and self._hf_plain else self._hf
      ids = hf.encode(text, add_special_tokens=False).ids
    elif self._added_re is None or not split_special:
      ids = self._spm.encode(text)
    else:
      ids, start = [], 0
      for m in self._added_re.finditer(text):
        if m.start() > start:
          ids += self._spm.encode(text[start : m.start()])
        ids.append(self._added_by_text[m.group()])
        start = m.end()
      if start < len(text):
        ids += self._spm.encode(text[start:])
    if add_bos:
      if self.bos_id is None:
        raise ValueError(
            f"{self.name}: add_bos=True but the tokenizer has no BOS token"
        )
      ids = [self.bos_id] + list(ids)
    return list(ids)

  def encode_with_offsets(
      self, text: str
  ) -> tuple[list[int], list[tuple[int, int]]]:
    """`encode(text)` (special tokens split out) and each token's [start, end) character span.

    Spans may be empty (a SentencePiece dummy-prefix piece) or shared (the byte pieces of one
    character); chat masking only asks which spans overlap a range of characters.
    """
    if self._hf is not None:
      enc = self._hf.encode(text, add_special_tokens=False)
      return list(enc.ids), list(enc.offsets)
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    start = 0
    for m in self._added_re.finditer(text) if self._added_re else ():
      self._sp_spans(text[start : m.start()], start, ids, spans)
      ids.append(self._added_by_text[m.group()])
      spans.append((m.start(), m.end()))
      start = m.end()
    self._sp_spans(text[start:], start, ids, spans)
    return ids, spans

  def _sp_spans(self, chunk: str, offset: int, ids: list, spans: list) -> None:
    """Appends the SentencePiece ids of `chunk` and their character spans (+ `offset`)."""
    if not chunk:
      return
    # piece offsets are in bytes: map them to characters
    char_at = [0]
    for i, ch in enumerate(chunk):
      char_at += [i + 1] * len(ch.encode("utf-8"))
    for piece in self._spm.encode(chunk, return_type="proto").pieces:
      ids.append(piece.id)
      spans.append((offset + char_at[piece.begin], offset + char_at[piece.end]))

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    ids = [int(i) for i in ids]
    if self._hf is not None:
      return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)
    out: list[str] = []
    run: list[int] = []
    for i in ids:
      if i in self._added:
        if run:
          out.append(self._spm.decode(run))
          run = []
        content, is_special = self._added[i]
        if not (skip_special_tokens and is_special):
          out.append(content)
      else:
        run.append(i)
    if run:
      out.append(self._spm.decode(run))
    return "".join(out)

  def apply_chat_template(
      self,
      messages: Sequence[dict],
      add_generation_prompt: bool = True,
      **kwargs,
  ) -> str:
    """Renders `messages` with the model's jinja chat template, as HF's apply_chat_template does."""
    if self.chat_template is None:
      raise ValueError(
          f"{self.name}: the tokenizer has no chat template "
          "(chat_template.jinja or tokenizer_config.json 'chat_template')"
      )
    specials = {
        f"{k}_token": (self.id_to_token(v) if v is not None else None)
        for k, v in (
            ("bos", self.bos_id),
            ("eos", self.eos_id),
            ("pad", self.pad_id),
            ("unk", self.unk_id),
        )
    }
    return _compile_template(self.chat_template).render(
        messages=list(messages),
        add_generation_prompt=add_generation_prompt,
        **{**specials, **kwargs},
    )

  def with_chat_template(self, template: str) -> Tokenizer:
    """A copy that renders chats with `template` (saved with it as chat_template.jinja)."""
    return _from_files(
        {**self._files, "chat_template.jinja": template.encode("utf-8")},
        self.name,
    )

  def save(self, directory: str) -> None:
    """Writes the tokenizer files this tokenizer was loaded from (verbatim) into `directory`.

    An existing generation_config.json there is kept: it belongs to the model as much as to us.
    """
    os.makedirs(directory, exist_ok=True)
    for name, data in self._files.items():
      path = os.path.join(directory, name)
      if name == "generation_config.json" and os.path.exists(path):
        continue
      with open(path, "wb") as f:
        f.write(data)

  def __repr__(self) -> str:
    return (
        f"Tokenizer({self.kind}, vocab_size={self.vocab_size}, bos={self.bos_id}, "
        f"eos={self.eos_ids}, pad={self.pad_id}, name={self.name!r})"
    )


@functools.lru_cache(maxsize=8)
def _compile_template(source: str):
  """Same sandbox, options and helpers as transformers' chat-template renderer."""
  try:
    import jinja2  # pylint: disable=g-import-not-at-top
    import jinja2.ext  # pylint: disable=g-import-not-at-top
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(
        "chat templates need jinja2>=3.1.6: pip install 'jinja2>=3.1.6'"
    ) from None
  if tuple(int(p) for p in re.findall(r"\d+", jinja2.__version__)[:3]) < (
      3,
      1,
      6,
  ):
    # Older releases have sandbox escapes, and chat templates come from downloaded checkpoints.
    raise ImportError(
        f"chat templates need jinja2>=3.1.6, found {jinja2.__version__}"
    )

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(
      x, ensure_ascii=False, indent=None, separators=None, sort_keys=False
  ):
    return json.dumps(
        x,
        ensure_ascii=ensure_ascii,
        indent=indent,
        separators=separators,
        sort_keys=sort_keys,
    )

  env = ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
  )
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(
      fmt
  )
  return env.from_string(source)


def _read(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _from_files(files: dict[str, bytes], name: str) -> Tokenizer:
  if TOKENIZER_JSON in files:
    try:
      hf = tokenizers.Tokenizer.from_str(files[TOKENIZER_JSON].decode("utf-8"))
    # tokenizers raises a bare Exception on bad JSON.
    except Exception as e:  # noqa: BLE001
      raise ValueError(f"{name}: not a valid HF tokenizer.json ({e})") from None
    return Tokenizer(hf=hf, files=files, name=name)
  sp = spm.SentencePieceProcessor()
  try:
    sp.LoadFromSerializedProto(files[TOKENIZER_MODEL])
  # sentencepiece raises RuntimeError or OSError on a bad proto, depending on the version.
  except Exception as e:  # noqa: BLE001
    raise ValueError(
        f"{name}: not a valid SentencePiece tokenizer.model ({e})"
    ) from None
  return Tokenizer(sp=sp, files=files, name=name)


def load_tokenizer(path: str) -> Tokenizer:
  """Loads a tokenizer.json, a tokenizer.model, or a directory holding either.

  A directory may also hold tokenizer_config.json (special tokens, chat template, added tokens),
  chat_template.jinja and generation_config.json (extra end-of-turn ids -> `eos_ids`). When both
  model files are present, tokenizer.json (HF's fast tokenizer) is used, as HF does.
  """
  if os.path.isdir(path):
    files = {
        n: _read(os.path.join(path, n))
        for n in (TOKENIZER_JSON, TOKENIZER_MODEL) + _SIDE_FILES
        if os.path.isfile(os.path.join(path, n))
    }
    if TOKENIZER_JSON in files:
      files.pop(TOKENIZER_MODEL, None)
    elif TOKENIZER_MODEL not in files:
      raise ValueError(
          f"tokenizer directory {path} holds neither {TOKENIZER_JSON} nor "
          f"{TOKENIZER_MODEL}"
      )
    return _from_files(files, path)
  if not os.path.isfile(path):
    raise ValueError(f"tokenizer path {path} does not exist")
  data = _read(path)
  # By name first; otherwise a JSON document is a tokenizer.json, anything else a SP proto.
  if path.endswith(".json") or (
      not path.endswith(".model") and data.lstrip()[:1] == b"{"
  ):
    return _from_files({TOKENIZER_JSON: data}, path)
  return _from_files({TOKENIZER_MODEL: data}, path)


def train_bpe(texts: Iterable[str], vocab_size: int, path: str) -> Tokenizer:
  """Trains a byte-level BPE (`<pad>`=0, `<s>`=1, `</s>`=2) on `texts` and saves it to `path`.

  `path` is a tokenizer.json file or a directory (then `path/tokenizer.json` plus a
  tokenizer_config.json naming the special tokens). The file is written atomically, so concurrent
  processes training the same tokenizer never read a half-written file.
  """
  if vocab_size < _MIN_BPE_VOCAB:
    raise ValueError(
        f"BPE vocab_size must be >= {_MIN_BPE_VOCAB} (256 bytes + "
        f"{len(BPE_SPECIAL_TOKENS)} special tokens), got {vocab_size}"
    )
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top

  hf = tokenizers.Tokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(
      add_prefix_space=False, use_regex=True
  )
  hf.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=list(BPE_SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  hf.train_from_iterator(texts, trainer)
  got = hf.get_vocab_size(with_added_tokens=True)
  if got != vocab_size:
    raise ValueError(
        f"the training texts yield only {got} BPE tokens, fewer than vocab_size "
        f"{vocab_size}; use a smaller vocab_size or more text"
    )
  files = {TOKENIZER_JSON: hf.to_str().encode("utf-8")}
  if not path.endswith(".json"):
    files["tokenizer_config.json"] = json.dumps(
        {
            "bos_token": "<s>",
            "eos_token": "</s>",
            "pad_token": "<pad>",
            "add_bos_token": False,
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
        indent=2,
    ).encode("utf-8")
  for name, data in files.items():
    target = path if path.endswith(".json") else os.path.join(path, name)
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=os.path.dirname(os.path.abspath(target)), prefix=".tok-"
    )
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, target)
  return _from_files(files, path)


def get_or_train_tokenizer(
    workdir: str, vocab_size: int, texts_fn: Callable[[], Iterable[str]]
) -> Tokenizer:
  """The BPE tokenizer cached in `workdir/tokenizer/`, trained on `texts_fn()` on first use."""
  directory = os.path.join(workdir, "tokenizer")
  if os.path.isfile(os.path.join(directory, TOKENIZER_JSON)):
    tok = load_tokenizer(directory)
    if tok.vocab_size != vocab_size:
      raise ValueError(
          f"{directory} holds a tokenizer with vocab size {tok.vocab_size}, but "
          f"vocab size {vocab_size} was asked; use another workdir or delete it"
      )
    return tok
  return train_bpe(texts_fn(), vocab_size, directory)


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
  """Fails in one line when the tokenizer can produce ids the model cannot embed."""
  if tokenizer.vocab_size > model_vocab_size:
    raise ValueError(
        f"tokenizer vocab size {tokenizer.vocab_size} ({tokenizer.name}) is larger "
        f"than the model's vocab_size {model_vocab_size}"
    )


def find_tokenizer(*directories: str) -> Tokenizer:
  """The tokenizer of the first directory holding tokenizer.json or tokenizer.model."""
  for d in directories:
    if any(
        os.path.isfile(os.path.join(d, f))
        for f in (TOKENIZER_JSON, TOKENIZER_MODEL)
    ):
      return load_tokenizer(d)
  raise ValueError(
      f"no tokenizer (tokenizer.json or tokenizer.model) in {', '.join(directories)}"
  )
