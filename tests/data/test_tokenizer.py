"""Tokenizer: byte-level BPE and SentencePiece behind one interface; HF parity; cache; errors."""

import os
import pickle

import jinja2
import pytest

from loopcoder_jax.data import tokenizer as tk

TRICKY = "def f(x):\n\tif x:  # é ✓ 世界 🙂\r\n        return x + 1   \n\n"
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "sort a list"},
]
EXPECTED_CHAT = (
    "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nsort a list"
    "<|im_end|>\n<|im_start|>assistant\n"
)


def test_bpe_round_trip_and_special_ids(bpe_dir):
  tok = tk.load_tokenizer(bpe_dir)
  assert (tok.kind, tok.vocab_size) == ("hf", 300)
  assert [tok.token_to_id(t) for t in ("<pad>", "<s>", "</s>")] == [0, 1, 2]
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.eos_ids) == (0, 1, 2, (2,))
  assert not tok.add_bos_token
  ids = tok.encode(TRICKY)
  assert ids and all(isinstance(i, int) and 3 <= i < 300 for i in ids)
  # byte level: lossless, even for unseen characters
  assert tok.decode(ids) == TRICKY
  assert tok.encode(TRICKY, add_bos=True) == [1] + ids
  assert tok.decode([1] + ids + [2]) == TRICKY  # specials skipped by default
  assert tok.decode([1] + ids, skip_special_tokens=False) == "<s>" + TRICKY
  # Training text that mentions a special token keeps it as text.
  assert 2 in tok.encode("a</s>b")
  plain = tok.encode("a</s>b", split_special=False)
  assert 2 not in plain and tok.decode(plain) == "a</s>b"
  # The file alone loads too (special ids found by name).
  alone = tk.load_tokenizer(os.path.join(bpe_dir, "tokenizer.json"))
  assert (
      alone.encode(TRICKY) == ids
      and alone.eos_id == 2
      and alone.chat_template is None
  )


def test_train_bpe_errors(tmp_path):
  with pytest.raises(ValueError, match="vocab_size must be >= 259"):
    tk.train_bpe(["abc"], 100, str(tmp_path))
  with pytest.raises(ValueError, match="yield only"):
    tk.train_bpe(["abc abc"], 1000, str(tmp_path))


def test_get_or_train_tokenizer_caches(texts, tmp_path):
  calls = []

  def texts_fn():
    calls.append(1)
    return iter(texts)

  first = tk.get_or_train_tokenizer(str(tmp_path), 300, texts_fn)
  again = tk.get_or_train_tokenizer(str(tmp_path), 300, texts_fn)
  assert len(calls) == 1 and again.encode(TRICKY) == first.encode(TRICKY)
  with pytest.raises(
      ValueError, match="vocab size 300.*vocab size 512 was asked"
  ):
    tk.get_or_train_tokenizer(str(tmp_path), 512, texts_fn)


def test_sentencepiece_llama_style(sp_dir):
  tok = tk.load_tokenizer(sp_dir)
  assert tok.kind == "sentencepiece" and tok.vocab_size == 402
  assert (tok.bos_id, tok.eos_id, tok.eos_ids) == (
      1,
      2,
      (2, 400),
  ) and tok.add_bos_token
  ids = tok.encode(TRICKY, add_bos=True)
  assert ids[0] == 1 and 1 not in ids[1:]
  assert tok.decode(ids) == TRICKY  # byte fallback covers unseen characters
  chat = "<|im_start|>user\nhi<|im_end|>"
  chat_ids = tok.encode(chat)
  assert chat_ids[0] == 401 and chat_ids[-1] == 400
  assert tok.decode(chat_ids, skip_special_tokens=False) == chat
  assert tok.decode(chat_ids) == "user\nhi"
  plain = tok.encode(chat, split_special=False)
  assert not {400, 401} & set(plain) and tok.decode(plain) == chat
  # The bare model file: ids from the SP model itself.
  bare = tk.load_tokenizer(os.path.join(sp_dir, "tokenizer.model"))
  assert (bare.vocab_size, bare.bos_id, bare.eos_ids) == (400, 1, (2,))
  assert bare.encode(TRICKY, add_bos=True) == ids


@pytest.mark.parametrize("which", ["bpe", "sp"])
def test_encode_with_offsets(which, bpe_dir, sp_dir):
  tok = tk.load_tokenizer(bpe_dir if which == "bpe" else sp_dir)
  text = f"<|im_start|>user\n{TRICKY}</s><|im_end|>x"
  ids, spans = tok.encode_with_offsets(text)
  assert ids == tok.encode(text) and len(spans) == len(ids)
  starts = [s for s, _ in spans]
  assert starts == sorted(starts) and all(
      0 <= s <= e <= len(text) for s, e in spans
  )
  assert set().union(*(range(s, e) for s, e in spans)) == set(range(len(text)))
  # Cutting between two tokens that own whole characters decodes to the text up to the cut.
  cuts = 0
  for k in range(1, len(ids)):
    (s0, e0), (s1, e1) = spans[k - 1], spans[k]
    if s0 < e0 and s1 < e1 and e0 == s1:
      cuts += 1
      got = tok.decode(ids[:k], skip_special_tokens=False)
      assert got == text[:e0], (which, k)
  assert cuts > len(ids) // 2


def test_chat_template(sp_dir, tmp_path):
  tok = tk.load_tokenizer(sp_dir)
  assert tok.apply_chat_template(MESSAGES) == EXPECTED_CHAT
  assert (
      tok.apply_chat_template(MESSAGES, add_generation_prompt=False)
      == EXPECTED_CHAT[: -len("<|im_start|>assistant\n")]
  )
  with pytest.raises(jinja2.TemplateError, match="unknown role tool"):
    tok.apply_chat_template([{"role": "tool", "content": "x"}])
  # chat_template.jinja overrides tokenizer_config.json, and the sandbox blocks attribute escapes.
  tok.save(str(tmp_path))
  (tmp_path / "chat_template.jinja").write_text(
      "{{ messages[0].content | upper }}"
  )
  assert (
      tk.load_tokenizer(str(tmp_path)).apply_chat_template(MESSAGES)
      == "BE BRIEF."
  )
  (tmp_path / "chat_template.jinja").write_text(
      "{{ messages.__class__.__mro__ }}"
  )
  with pytest.raises(jinja2.exceptions.SecurityError):
    tk.load_tokenizer(str(tmp_path)).apply_chat_template(MESSAGES)


def test_no_chat_template(bpe_dir):
  with pytest.raises(ValueError, match="no chat template"):
    tk.load_tokenizer(bpe_dir).apply_chat_template(MESSAGES)


def test_save_load_and_pickle(bpe_dir, sp_dir, tmp_path):
  for i, src in enumerate((bpe_dir, sp_dir)):
    tok = tk.load_tokenizer(src)
    out = tmp_path / str(i)
    tok.save(str(out))
    assert sorted(os.listdir(out)) == sorted(os.listdir(src))
    for name in os.listdir(src):  # verbatim copies, for the converter
      assert (out / name).read_bytes() == open(
          os.path.join(src, name), "rb"
      ).read()
    for other in (tk.load_tokenizer(str(out)), pickle.loads(pickle.dumps(tok))):
      assert other.encode(TRICKY, add_bos=True) == tok.encode(
          TRICKY, add_bos=True
      )
      assert other.eos_ids == tok.eos_ids and other.vocab_size == tok.vocab_size
      for special in ("a</s>b", "<|im_end|>x"):  # as grain workers see it
        assert other.encode(special, split_special=False) == tok.encode(
            special, split_special=False
        )
        assert other.encode(special) == tok.encode(special)
  # An existing generation_config.json (the model's) is kept.
  keep = tmp_path / "keep"
  keep.mkdir()
  (keep / "generation_config.json").write_text("{}")
  tk.load_tokenizer(sp_dir).save(str(keep))
  assert (keep / "generation_config.json").read_text() == "{}"


def test_matches_transformers(bpe_dir, sp_dir):
  transformers = pytest.importorskip("transformers")
  hf_sp = transformers.AutoTokenizer.from_pretrained(sp_dir)
  ours = tk.load_tokenizer(sp_dir)
  for text in (TRICKY, "x = 1", "<|im_start|>user\nhi<|im_end|>\n"):
    assert ours.encode(text, add_bos=True) == hf_sp(text)["input_ids"], text
  assert ours.apply_chat_template(MESSAGES) == hf_sp.apply_chat_template(
      MESSAGES, tokenize=False, add_generation_prompt=True
  )
  hf_bpe = transformers.AutoTokenizer.from_pretrained(bpe_dir)
  bpe = tk.load_tokenizer(bpe_dir)
  assert hf_bpe(TRICKY)["input_ids"] == bpe.encode(TRICKY)
  assert (hf_bpe.bos_token_id, hf_bpe.eos_token_id, hf_bpe.pad_token_id) == (
      1,
      2,
      0,
  )


def test_load_errors(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    tk.load_tokenizer(str(tmp_path / "missing.model"))
  with pytest.raises(
      ValueError, match="neither tokenizer.json nor tokenizer.model"
  ):
    tk.load_tokenizer(str(tmp_path))
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(ValueError, match="not a valid HF tokenizer.json"):
    tk.load_tokenizer(str(tmp_path))
  (tmp_path / "bad.model").write_bytes(b"\x00garbage")
  with pytest.raises(ValueError, match="not a valid SentencePiece"):
    tk.load_tokenizer(str(tmp_path / "bad.model"))


def test_check_vocab(bpe_dir):
  tok = tk.load_tokenizer(bpe_dir)
  tk.check_vocab(tok, 300)
  tk.check_vocab(tok, 512)
  with pytest.raises(
      ValueError,
      match="tokenizer vocab size 300 .* larger than the model's vocab_size 256",
  ):
    tk.check_vocab(tok, 256)
