"""Held-out perplexity: the packed, batched figures equal a plain per-document forward; the CLI."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from loopcoder_jax import PLTForCausalLM
from loopcoder_jax.eval import perplexity
from tests import helpers
from tests.helpers import SCRIPTS, subprocess_env

DOCS = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(3):\n    print(i * i)  # squares\n",
]


def reference(cfg, params, tok, texts):
  """(summed NLL in nats, predicted tokens, predicted bytes), one unpacked forward per document."""
  docs = [tok.encode(t, split_special=False) + [tok.eos_id] for t in texts]
  # causal: padding after a document changes nothing in it
  width = max(len(d) for d in docs)
  forward = jax.jit(lambda p, t: PLTForCausalLM(cfg).apply({"params": p}, t))
  logits = forward(
      params, jnp.asarray([d + [0] * (width - len(d)) for d in docs])
  )
  total, count, num_bytes = 0.0, 0, 0
  for text, ids, row in zip(texts, docs, logits):
    logp = jax.nn.log_softmax(row[: len(ids) - 1].astype(jnp.float32))
    total -= float(
        jnp.sum(logp[jnp.arange(len(ids) - 1), jnp.asarray(ids[1:])])
    )
    count += len(ids) - 1
    # no BOS: the first token has no context; EOS has no bytes
    num_bytes += len(text.encode()) - len(tok.decode(ids[:1]).encode())
  return total, count, num_bytes


def test_matches_a_plain_forward_per_document(tiny_model, tmp_path):
  _, cfg, params, tok = tiny_model
  for i, text in enumerate(DOCS):
    (tmp_path / f"{i}.py").write_text(text)
  got = perplexity.held_out_perplexity(
      cfg, params, tok, str(tmp_path / "*.py"), seq_len=128, batch_size=2
  )
  total, count, num_bytes = reference(cfg, params, tok, DOCS)
  assert (got["tokens"], got["bytes"]) == (count, num_bytes)
  # Packing and masked padding change the rounding only: the forward, the
  # log-softmax over the vocabulary, the sum over the tokens.
  ops = helpers.forward_ops(cfg, 128) + cfg.vocab_size + count
  loss = total / count
  helpers.assert_close(got["loss_per_token"], loss, ops=ops, what="loss")
  helpers.assert_close(
      got["bits_per_byte"], total / (math.log(2) * num_bytes), ops=ops
  )
  # exp turns the loss's absolute error into a relative one
  helpers.assert_close(
      got["perplexity"],
      math.exp(loss),
      ops=ops,
      scale=math.exp(loss) * loss,
      what="perplexity",
  )


def test_bad_input(tiny_model, tmp_path):
  _, cfg, params, tok = tiny_model
  with pytest.raises(ValueError, match="max_position_embeddings"):
    perplexity.held_out_perplexity(cfg, params, tok, seq_len=4096)
  with pytest.raises(ValueError, match="matches no files"):
    perplexity.held_out_perplexity(cfg, params, tok, str(tmp_path / "*.py"))


def test_evaluate_cli_perplexity(tiny_model):
  run = subprocess.run(
      [
          sys.executable,
          os.path.join(SCRIPTS, "evaluate.py"),
          "--task=perplexity",
          f"--checkpoint={tiny_model[0]}",
          "--seq_len=128",
          "--batch_size=2",
          "--max_tokens=1000",
      ],
      capture_output=True,
      text=True,
      env=subprocess_env(),
      timeout=600,
  )
  assert run.returncode == 0, run.stderr
  summary = json.loads(run.stdout.strip().splitlines()[-1])
  _, cfg, params, tok = tiny_model
  want = perplexity.held_out_perplexity(
      cfg, params, tok, seq_len=128, batch_size=2, max_tokens=1000
  )
  assert summary == {
      "task": "perplexity",
      "data": "stdlib:heldout",
      **want,
  }  # the same program in another process: the same floats
  assert summary["tokens"] == 1000
