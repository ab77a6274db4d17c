"""Fixtures shared by the training tests."""

import os

import pytest

from loopcoder_jax.data import corpus, tokenizer


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  """A small text corpus (stdlib files) and a 320-token BPE trained on it."""
  root = tmp_path_factory.mktemp("assets")
  files = corpus.stdlib_files("train")[:40]
  os.makedirs(root / "corpus")
  for i, (_, text) in enumerate(files):
    (root / "corpus" / f"{i:03d}.py").write_text(text)
  tokenizer.train_bpe((t for _, t in files), 320, str(root / "tok"))
  return {
      "source": str(root / "corpus" / "*.py"),
      "tokenizer": str(root / "tok"),
  }
