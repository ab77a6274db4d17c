"""A tiny random R=2 model with a BPE tokenizer, shared by the engine, batching and server tests."""

import jax
import pytest

from loopcoder_jax import PLTConfig
from loopcoder_jax.data import tokenizer
from loopcoder_jax.model.transformer import init_params
from tests import helpers

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i)\n",
] * 50


@pytest.fixture(scope="session")
def serve_model(tmp_path_factory):
  """(cfg, params, tokenizer, tokenizer directory): 64 positions, R = 2."""
  root = tmp_path_factory.mktemp("serve_tok")
  tok = tokenizer.train_bpe(TEXTS, 272, str(root))
  cfg = PLTConfig.tiny(
      loops=2,
      vocab_size=tok.vocab_size,
      eos_token_id=tok.eos_id,
      max_position_embeddings=64,
  )
  return (
      cfg,
      helpers.perturbed(init_params(cfg, jax.random.key(3))),
      tok,
      str(root),
  )
