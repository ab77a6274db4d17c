"""Fixtures shared by the training tests."""

import json

import jax
import numpy as np
import pytest

from loopcoder_jax.interop import save_hf
from loopcoder_jax.model.config import PLTConfig
from loopcoder_jax.model.transformer import PLTForCausalLM
from tests import helpers


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  """A small text corpus (stdlib files) and a 320-token BPE trained on it."""
  return helpers.write_assets(str(tmp_path_factory.mktemp("assets")))


def _arithmetic(lo, hi):
  return [
      {
          "messages": [
              {"role": "user", "content": f"{a}+{b}"},
              {"role": "assistant", "content": str(a + b)},
          ]
      }
      for a in range(lo, hi)
      for b in range(3)
  ]


@pytest.fixture(scope="module")
def chat_assets(assets, tmp_path_factory):
  """A tiny random model as an HF directory (with the 320-token BPE) and arithmetic chats."""
  root = tmp_path_factory.mktemp("chat")
  cfg = PLTConfig.tiny(loops=2, **helpers.TINY)
  params = PLTForCausalLM(cfg).init(
      jax.random.key(7), np.zeros((1, 1), np.int32)
  )["params"]
  # confident predictions, unlike a fresh init's near-uniform ones: its loss is its own
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 20
  save_hf(cfg, params, root / "hf", tokenizer_dir=assets["tokenizer"])
  for name, records in (
      ("train", _arithmetic(0, 40)),
      ("heldout", _arithmetic(40, 50)),
  ):
    (root / f"{name}.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records)
    )
  return {
      "hf": str(root / "hf"),
      "train": str(root / "train.jsonl"),
      "heldout": str(root / "heldout.jsonl"),
      "cfg": cfg,
  }
