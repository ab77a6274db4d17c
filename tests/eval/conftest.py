"""Fixtures shared by the evaluation tests."""

import jax
import pytest

from loopcoder_jax import PLTConfig
from loopcoder_jax.checkpoints import params_io
from loopcoder_jax.data import corpus, tokenizer
from loopcoder_jax.model.transformer import init_params


@pytest.fixture(scope="package")
def tiny_model(tmp_path_factory):
  """A random tiny R=2 model saved as a params dir with a BPE beside it: (dir, cfg, params, tok).

  The context holds a HumanEval prompt (a few hundred tokens of this BPE) plus a completion.
  """
  root = tmp_path_factory.mktemp("eval_model")
  texts = [t for _, t in corpus.stdlib_files("train")[:20]]
  tok = tokenizer.train_bpe(texts, 320, str(root / "tokenizer"))
  cfg = PLTConfig.tiny(
      loops=2,
      vocab_size=tok.vocab_size,
      eos_token_id=tok.eos_id,
      max_position_embeddings=1024,
  )
  params = init_params(cfg, jax.random.key(5))
  params_io.save_params(str(root / "params"), cfg, params)
  tok.save(str(root / "params"))
  return root / "params", cfg, params, tok
