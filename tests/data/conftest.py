"""Tokenizer fixtures shared by the data tests: a byte-level BPE and a Llama-style SentencePiece."""

import io
import json

import pytest
import sentencepiece as spm

from loopcoder_jax.data import corpus
from loopcoder_jax.data import tokenizer as tk

CHAT = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def texts():
  return [t for _, t in corpus.stdlib_files("train")[:12]]


@pytest.fixture(scope="module")
def bpe_dir(texts, tmp_path_factory):
  d = str(tmp_path_factory.mktemp("bpe"))
  tk.train_bpe(texts, 300, d)
  return d


@pytest.fixture(scope="module")
def sp_dir(texts, tmp_path_factory):
  """A tiny Llama-style SentencePiece model plus HF side files: chat markers as added tokens
  beyond the SP vocabulary, one of them an extra end-of-turn id in generation_config.json.
  """
  lines = [ln for t in texts[:3] for ln in t.splitlines() if ln.strip()]
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines),
      model_writer=buf,
      vocab_size=400,
      model_type="bpe",
      byte_fallback=True,
      unk_id=0,
      bos_id=1,
      eos_id=2,
      pad_id=-1,
      add_dummy_prefix=True,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      split_digits=True,
      allow_whitespace_only_pieces=True,
      minloglevel=2,
      num_threads=1,
  )
  d = tmp_path_factory.mktemp("sp")
  (d / "tokenizer.model").write_bytes(buf.getvalue())
  (d / "tokenizer_config.json").write_text(
      json.dumps(
          {
              "tokenizer_class": "LlamaTokenizer",
              "legacy": True,
              "add_bos_token": True,
              "bos_token": "<s>",
              "eos_token": "</s>",
              "unk_token": "<unk>",
              "chat_template": CHAT,
              "added_tokens_decoder": {
                  "400": {"content": "<|im_end|>", "special": True},
                  "401": {"content": "<|im_start|>", "special": True},
              },
          }
      )
  )
  (d / "generation_config.json").write_text(
      json.dumps({"eos_token_id": [2, 400]})
  )
  return str(d)
