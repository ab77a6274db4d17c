"""Text-level generation (`generation.complete`), checkpoint loading, and the generate CLI."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopcoder_jax import PLTConfig, PLTForCausalLM, interop
from loopcoder_jax.checkpoints import params_io
from loopcoder_jax.data import tokenizer
from loopcoder_jax.inference import decode, generation, sampling
from loopcoder_jax.interop import convert
from loopcoder_jax.model import sharding
from loopcoder_jax.model.transformer import init_params
from tests import helpers
from tests.helpers import SCRIPTS


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  """A random tiny R=2 model saved as a params directory, with a BPE tokenizer beside it."""
  root = tmp_path_factory.mktemp("gen")
  texts = [
      "def add(a, b):\n    return a + b\n",
      "for i in range(10):\n    print(i)\n",
  ] * 50
  tok = tokenizer.train_bpe(texts, 272, str(root / "tokenizer"))
  cfg = PLTConfig.tiny(
      loops=2, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id
  )
  params = helpers.perturbed(init_params(cfg, jax.random.key(3)))
  params_io.save_params(str(root / "params"), cfg, params)
  tok.save(str(root / "params"))
  return root, cfg, params, tok


def greedy_by_full_forward(cfg, params, ids, steps):
  """Teacher-free argmax over the full forward (no cache): what the decoder must reproduce."""
  ids, width = list(ids), len(ids) + steps
  # causal: padding is harmless
  fwd = jax.jit(lambda p, t: PLTForCausalLM(cfg).apply({"params": p}, t))
  for _ in range(steps):
    nxt = int(
        fwd(params, jnp.asarray([ids + [0] * (width - len(ids))]))[
            0, len(ids) - 1
        ].argmax()
    )
    if nxt in cfg.eos_ids:
      break
    ids.append(nxt)
  return ids


def test_complete_streams_the_greedy_continuation(tiny_checkpoint):
  root, cfg, params, tok = tiny_checkpoint
  pieces = []
  texts = generation.complete(
      cfg, params, tok, ["def add("], max_new_tokens=6, on_text=pieces.append
  )
  assert "".join(pieces) == texts[0]
  ids = tok.encode("def add(", add_bos=tok.add_bos_token)
  assert texts[0] == tok.decode(
      greedy_by_full_forward(cfg, params, ids, 6)[len(ids) :]
  )


def test_load_from_params_workdir_and_hf_dirs(tiny_checkpoint, tmp_path):
  root, cfg, params, tok = tiny_checkpoint
  convert.save_hf(
      cfg, params, str(tmp_path / "hf"), tokenizer_dir=str(root / "tokenizer")
  )
  outs = []
  # a workdir holds its export in params/
  for path in (
      root / "params",
      root,
      tmp_path / "hf",
  ):
    c, p, tok2 = interop.load(path)
    assert c.to_hf_dict()["hidden_size"] == cfg.hidden_size
    outs.append(
        generation.complete(
            c,
            p,
            tok2,
            ["def add(", "for i"],
            max_new_tokens=4,
            mode="serial",
            prefill_chunk=2,
        )
    )
  assert outs[0] == outs[1] == outs[2] and len(outs[0]) == 2


def test_bad_generation_input(tiny_checkpoint, tmp_path):
  root, cfg, params, tok = tiny_checkpoint
  with pytest.raises(ValueError, match="max_position_embeddings"):
    generation.complete(cfg, params, tok, ["x"], max_new_tokens=100000)
  with pytest.raises(ValueError, match="max_new_tokens"):
    generation.complete(cfg, params, tok, ["x"], max_new_tokens=0)
  with pytest.raises(ValueError, match="no tokens"):
    generation.complete(cfg, params, tok, [""], max_new_tokens=2)
  with pytest.raises(ValueError, match="no tokenizer"):
    tokenizer.find_tokenizer(str(tmp_path))


def test_complete_on_a_mesh(tiny_checkpoint):
  root, cfg, params, tok = tiny_checkpoint
  prompts = ["def add(", "for i", "x"]
  one = generation.complete(cfg, params, tok, prompts, max_new_tokens=5)
  mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
  assert (
      generation.complete(
          cfg, params, tok, prompts, max_new_tokens=5, mesh=mesh
      )
      == one
  )
  # a single prompt streams: on a mesh the loop's host callbacks are unordered
  pieces = []
  [text] = generation.complete(
      cfg,
      params,
      tok,
      prompts[:1],
      max_new_tokens=5,
      mesh=mesh,
      on_text=pieces.append,
  )
  assert text == one[0] == "".join(pieces)


def test_generate_cli_on_a_mesh(tiny_checkpoint):
  """`--mesh=tensor=8` on 8 CPU devices prints what one device does; a mesh that does not fit the
  devices is bad input."""
  root, cfg, params, tok = tiny_checkpoint
  script = os.path.join(SCRIPTS, "generate.py")
  env = {
      **os.environ,
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
  }

  def run(mesh):
    return subprocess.run(
        [
            sys.executable,
            script,
            f"--checkpoint={root / 'params'}",
            "--prompt=def add(",
            "--max_new_tokens=5",
            f"--mesh={mesh}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )

  ok = run("tensor=8")
  assert ok.returncode == 0, ok.stderr
  expected = generation.complete(
      cfg, params, tok, ["def add("], max_new_tokens=5
  )[0]
  assert ok.stdout == "def add(" + expected + "\n"
  bad = run("tensor=3")
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1].startswith("error: mesh ")


def test_generate_cli(tiny_checkpoint):
  root, cfg, params, tok = tiny_checkpoint
  script = os.path.join(SCRIPTS, "generate.py")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  run = subprocess.run(
      [
          sys.executable,
          script,
          f"--checkpoint={root / 'params'}",
          "--prompt=def add(",
          "--max_new_tokens=5",
      ],
      capture_output=True,
      text=True,
      env=env,
      timeout=300,
  )
  assert run.returncode == 0, run.stderr
  expected = generation.complete(
      cfg, params, tok, ["def add("], max_new_tokens=5
  )[0]
  assert run.stdout == "def add(" + expected + "\n"
  bad = subprocess.run(
      [
          sys.executable,
          script,
          f"--checkpoint={root / 'params'}",
          "--prompt=x",
          "--temperature=1",
          "--top_p=2",
      ],
      capture_output=True,
      text=True,
      env=env,
      timeout=300,
  )
  # bad input: one error line, exit 2
  assert bad.returncode == 2, bad.stderr
  assert bad.stderr.strip().splitlines()[-1].startswith("error: ")
  assert "top_p" in bad.stderr.strip().splitlines()[-1]


def test_stop_strings_end_a_row_at_the_token_that_completes_one(
    tiny_checkpoint,
):
  root, cfg, params, tok = tiny_checkpoint
  prompts, n = ["def add(", "for i"], 12
  _, ids = generation.encode_prompts(tok, prompts)
  plen = max(len(i) for i in ids)
  lengths = jnp.asarray([len(i) for i in ids], jnp.int32)
  tokens = jnp.asarray([i + [0] * (plen - len(i)) for i in ids])
  stop_ids = tuple(cfg.eos_ids)

  @functools.partial(jax.jit, static_argnums=0)
  def run(rule):
    logits, cache = decode.prefill(cfg, params, tokens, lengths, plen + n)
    out, counts, _ = decode.generate(
        cfg, params, cache, logits, jax.random.key(0), sampling.Greedy(), rule
    )
    return out, counts

  free, free_counts = jax.device_get(run(sampling.StopRule(n, stop_ids)))

  def text(row, c):
    return tok.decode([t for t in row[:c].tolist() if t not in stop_ids])

  texts = [text(r, c) for r, c in zip(free, free_counts)]  # as complete()
  stop = text(free[0], n // 2)[-2:]  # row 0 has produced it by token n/2
  assert stop and free_counts[0] > n // 2
  watch = generation.StopWatch(tok, [stop], stop_ids)
  watch.reset(2)
  out, counts = jax.device_get(run(generation.TextStop(n, stop_ids, watch)))
  # each row ends at the first token whose text completes the stop string
  want = [
      next((i for i in range(1, c + 1) if stop in text(r, i)), c)
      for r, c in zip(free, free_counts)
  ]
  assert counts.tolist() == want and want[0] < free_counts[0]
  for r, f, c in zip(out, free, counts):
    assert (r[:c] == f[:c]).all()

  cut = generation.complete(
      cfg, params, tok, prompts, max_new_tokens=n, stop=[stop]
  )
  assert cut == [generation.truncate(t, [stop]) for t in texts]
  assert len(cut[0]) < len(texts[0])
  pieces = []
  streamed = generation.complete(
      cfg,
      params,
      tok,
      prompts[:1],
      max_new_tokens=n,
      stop=[stop],
      on_text=pieces.append,
  )
  assert "".join(pieces) == streamed[0] == cut[0]


def test_truncate_cuts_before_the_earliest_stop():
  stops = ["\ndef", "\nprint"]
  text = "    return 1\nprint(f())\ndef g():\n"
  assert generation.truncate(text, stops) == "    return 1"
  assert generation.truncate("    return 1\n", stops) == "    return 1\n"
  assert generation.truncate("x", []) == "x"


def test_int8_weights_serve_on_one_device_and_a_mesh(tiny_checkpoint, tmp_path):
  """`load(quantize="int8")` of an Orbax directory (restored, then quantized) and of an HF one
  (quantized param by param as read) give the same int8 weights; on one device and onto a mesh
  they decode the int8 model's own greedy continuation (its full forward's argmax: the cache, the
  per-layer CPU layout and the few-rows matmul all take the int8 weights)."""
  root, cfg, params, tok = tiny_checkpoint
  qcfg, qparams, _ = interop.load(str(root / "params"), quantize="int8")
  assert qcfg.runtime.quantize == "int8"
  assert qparams["lm_head"]["kernel"].dtype == jnp.int8
  convert.save_hf(cfg, params, str(tmp_path / "hf"))
  hcfg, hparams, _ = interop.load(
      str(tmp_path / "hf"), quantize="int8", tokenizer=str(root / "tokenizer")
  )
  assert hcfg.runtime == qcfg.runtime
  jax.tree.map(np.testing.assert_array_equal, hparams, qparams)
  ids = tok.encode("def add(", add_bos=tok.add_bos_token)
  [text] = generation.complete(
      qcfg, qparams, tok, ["def add("], max_new_tokens=5
  )
  assert text == tok.decode(
      greedy_by_full_forward(qcfg, qparams, ids, 5)[len(ids) :]
  )
  mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
  mcfg, mparams, _ = interop.load(
      str(root / "params"), quantize="int8", mesh=mesh
  )
  assert generation.complete(
      mcfg, mparams, tok, ["def add("], max_new_tokens=5, mesh=mesh
  ) == [text]


@pytest.mark.slow
def test_generate_cli_int8(tiny_checkpoint):
  root, _, _, tok = tiny_checkpoint
  qcfg, qparams, _ = interop.load(str(root / "params"), quantize="int8")
  [text] = generation.complete(
      qcfg, qparams, tok, ["def add("], max_new_tokens=5
  )
  run = subprocess.run(
      [
          sys.executable,
          os.path.join(SCRIPTS, "generate.py"),
          f"--checkpoint={root / 'params'}",
          "--prompt=def add(",
          "--max_new_tokens=5",
          "--quantize=int8",
      ],
      capture_output=True,
      text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
      timeout=300,
  )
  assert run.returncode == 0, run.stderr
  assert run.stdout == "def add(" + text + "\n"


def test_generate_cli_on_a_lora_export(tiny_checkpoint, tmp_path):
  """generate.py takes a LoRA run's export: its base (found through lora.json) with the adapters
  merged in."""
  from loopcoder_jax.model import lora

  root, cfg, _, tok = tiny_checkpoint
  lcfg, base, adapters, _, ad_dir = helpers.lora_export(
      str(tmp_path), vocab_size=cfg.vocab_size, eos_token_id=cfg.eos_token_id
  )
  run = subprocess.run(
      [
          sys.executable,
          os.path.join(SCRIPTS, "generate.py"),
          f"--checkpoint={ad_dir}",
          f"--tokenizer={root / 'tokenizer'}",
          "--prompt=def add(",
          "--max_new_tokens=5",
      ],
      capture_output=True,
      text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
      timeout=300,
  )
  assert run.returncode == 0, run.stderr
  merged = lora.merge(lcfg, lora.combine(base, adapters))
  expected = generation.complete(
      lcfg.replace(lora=None), merged, tok, ["def add("], max_new_tokens=5
  )[0]
  assert run.stdout == "def add(" + expected + "\n"
