"""The training entry point end to end (subprocesses on one CPU device, fixed seeds).

kill -9 mid-run + rerun gives bit-identical params; SIGTERM saves, exits 143 and resumes; a diverging run
stops on the first non-finite loss and keeps its last good checkpoint; bad inputs fail in one line.
Fine-tuning from an HF directory: the same first-step loss as loading it separately, a lower
held-out assistant-token loss, resume before init, bad chat data stopped before training.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from loopcoder_jax.checkpoints import params_io
from loopcoder_jax.train import config as train_config
from loopcoder_jax.train import setup, trainer
from tests import helpers
from tests.helpers import (
    ROOT,
    TINY,
    TRAIN_SCRIPT,
    read_metrics,
    run_train,
    subprocess_env,
    train_flags,
)


def _committed(workdir, step):
  return os.path.isfile(
      os.path.join(workdir, "checkpoints", str(step), "_CHECKPOINT_METADATA")
  )


def _start_until(args, cond, timeout=240):
  proc = subprocess.Popen(
      [sys.executable, TRAIN_SCRIPT] + args,
      env=subprocess_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      cwd=ROOT,
  )
  t0 = time.time()
  while not cond():
    if proc.poll() is not None:
      out, err = proc.communicate()
      pytest.fail(
          f"training exited early ({proc.returncode}):\n{out}\n{err[-3000:]}"
      )
    if time.time() - t0 > timeout:
      proc.kill()
      pytest.fail("timed out waiting for the training run")
    time.sleep(0.05)
  return proc


@pytest.mark.slow
def test_kill9_and_sigterm_resume_bit_identical(assets, tmp_path):
  ref = run_train(
      train_flags(
          assets,
          tmp_path / "ref",
          **{
              "eval.max_tokens": 512,
              "eval.batch_size": 4,
              "data.eval_source": assets["source"],
              "eval.completion_tokens": 4,
          },
      )
  )
  assert ref.returncode == 0, ref.stderr[-3000:]
  assert (
      "held-out bits per byte" in ref.stdout
      and "greedy completion" in ref.stdout
  )

  work = tmp_path / "resumed"
  args = train_flags(assets, work)
  proc = _start_until(args, lambda: _committed(work, 8))
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  metrics = os.path.join(work, "metrics.jsonl")
  killed = os.stat(metrics).st_ino
  # the resumed run is stepping: it rewrote the log back to step 8, then logged step 9
  proc = _start_until(
      args,
      lambda: os.stat(metrics).st_ino != killed
      and len(read_metrics(work)) >= 9,
  )
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  # saved, not finished: 128 + SIGTERM, so a scheduler does not take it as done
  assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
  assert "preempted: saved step" in out and "Traceback" not in err
  saved = int(out.split("preempted: saved step ")[1].split()[0])
  assert 8 < saved < 16 and _committed(work, saved)
  final = run_train(args)
  assert final.returncode == 0, final.stderr[-3000:]
  assert f"resumed from step {saved}" in final.stdout

  _, p_ref = params_io.load_params(tmp_path / "ref" / "params")
  _, p_res = params_io.load_params(work / "params")
  jax.tree.map(
      lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
      p_ref,
      p_res,
  )
  ref_loss = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "ref")}
  # every step seen after a restart saw the same batch
  for m in read_metrics(work):
    assert m["loss"] == ref_loss[m["step"]], m["step"]


@pytest.mark.slow
def test_nan_stops_and_keeps_last_good_checkpoint(assets, tmp_path):
  res = run_train(
      train_flags(
          assets,
          tmp_path,
          **{
              "optim.peak_lr": 1e30,
              "optim.warmup_frac": 0.5,
              "checkpoint.every_steps": 1,
          },
      )
  )
  assert res.returncode == 1
  last = res.stderr.strip().splitlines()[-1]
  assert (
      last.startswith("error: non-finite")
      and "last good checkpoint: step" in last
  ), res.stderr[-2000:]
  bad_step = int(last.split(" at step ")[1].split()[0])
  good = int(last.split("last good checkpoint: step ")[1].split()[0])
  assert good == bad_step - 1
  steps = sorted(
      int(os.path.basename(p))
      for p in glob.glob(str(tmp_path / "checkpoints" / "[0-9]*"))
  )
  assert steps[-1] == good


def _config(assets, **extra):
  c = train_config.base_config()
  c.model.overrides = dict(TINY)
  c.tokenizer.path = assets["tokenizer"]
  c.data.source = assets["source"]
  c.data.seq_len = 32
  c.metrics.progress_bar = False
  for k, v in extra.items():
    node = c
    *path, leaf = k.split(".")
    for p in path:
      node = node[p]
    node[leaf] = v
  return c


# Every value `validate` checks is tested in test_config.py; here, that the trainer checks before
# building anything, and what only the trainer can see (the tokenizer's vocabulary, the data).
@pytest.mark.parametrize(
    "extra, match",
    [
        (
            {"data.seq_len": 128},
            "exceeds the model's max_position_embeddings 64",
        ),
        ({"mesh.data": 3}, "does not divide the 8 devices"),
        ({"model.overrides.vocab_size": 300}, "tokenizer vocab size 320"),
        ({"data.source": "/nonexistent/*.txt"}, "/nonexistent"),
    ],
)
def test_bad_inputs_fail_in_one_line_before_compiling(
    assets, tmp_path, extra, match
):
  with pytest.raises(ValueError, match=match) as e:
    trainer.train(_config(assets, **extra), str(tmp_path))
  assert "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "checkpoints")  # nothing was built


def test_url_workdir_is_refused_not_made_local(assets, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match="gs://bucket/run is a URL") as e:
    trainer.train(_config(assets), "gs://bucket/run")
  assert "\n" not in str(e.value)
  assert os.listdir(tmp_path) == []  # no ./gs:/bucket/run


def test_empty_corpus_and_cli_error_line(assets, tmp_path):
  empty = tmp_path / "empty"
  os.makedirs(empty)
  (empty / "a.py").write_text("")
  with pytest.raises(ValueError) as e:
    trainer.train(
        _config(assets, **{"data.source": str(empty / "*.py")}),
        str(tmp_path / "w"),
    )
  assert "\n" not in str(e.value)
  res = run_train(
      train_flags(assets, tmp_path / "cli", **{"data.seq_len": 4096}),
      timeout=120,
  )
  assert res.returncode == 2
  assert (
      res.stderr.strip()
      .splitlines()[-1]
      .startswith("error: data.seq_len 4096 exceeds")
  )


def test_sharded_batches_concatenate_shards():
  class It:

    def __init__(self, v):
      self.v, self.n = v, 0

    def __next__(self):
      self.n += 1
      return {"x": np.full((2, 3), self.v * 100 + self.n)}

    def get_state(self):
      return {"n": self.n}

    def set_state(self, s):
      self.n = s["n"]

  b = setup.ShardedBatches([It(0), It(1)])
  first = next(b)
  assert (
      first["x"].shape == (4, 3)
      and first["x"][0, 0] == 1
      and first["x"][2, 0] == 101
  )
  state = b.get_state()
  second = next(b)
  b.set_state(state)
  np.testing.assert_array_equal(next(b)["x"], second["x"])
  with pytest.raises(ValueError, match="shards per process"):
    b.set_state({"shards": [{"n": 0}]})


# ------------------------------------------------------------------------------ fine-tuning
def _sft_config(chat_assets, **extra):
  """A chat fine-tune of the tiny HF checkpoint; the explicit tiny model agrees with it."""
  c = _config(
      {"tokenizer": "", "source": chat_assets["train"]},
      **{
          "init.checkpoint": chat_assets["hf"],
          "data.format": "chat",
          "data.eval_source": chat_assets["heldout"],
          "data.pack_bins": 4,
          "train.total_steps": 2,
          "eval.max_tokens": 0,
          "eval.completion_tokens": 0,
          "metrics.peak_flops": -1.0,
          "metrics.tensorboard": False,
      },
  )
  for k, v in extra.items():
    node = c
    *path, leaf = k.split(".")
    for p in path:
      node = node[p]
    node[leaf] = v
  return c


def test_init_from_hf_dir_gives_the_same_first_step_loss(chat_assets, tmp_path):
  from loopcoder_jax.data import chat, tokenizer
  from loopcoder_jax.interop import load_hf
  from loopcoder_jax.model import sharding as shd
  from loopcoder_jax.model.transformer import PLTForCausalLM
  from loopcoder_jax.train import step as ts

  c = _sft_config(chat_assets)
  trainer.train(c, str(tmp_path))
  got = read_metrics(tmp_path)[0]["loss"]

  # the same first batch and the HF weights, loaded separately, on one device
  cfg, params = load_hf(chat_assets["hf"])
  tok = chat.with_template(tokenizer.load_tokenizer(chat_assets["hf"]))
  convs = chat.load_conversations(chat_assets["train"], tok)
  batch = next(
      chat.make_train_iterator(c.data, tok, convs, global_batch_size=8)
  )
  mesh = shd.make_mesh({"data": -1}, jax.devices()[:1])

  def loss_of(p):
    ce, n = ts.make_eval_fn(cfg, mesh)(p, ts.global_batch(batch, mesh))
    return float(ce) / float(n)

  want = loss_of(params)
  # float32 forward on 8 data shards vs one device: the forward's rounding, the
  # log-softmax over the vocabulary and the mean over the batch's tokens
  tokens = int(np.sum(batch["loss_mask"]))
  ops = helpers.forward_ops(cfg, c.data.seq_len) + cfg.vocab_size + tokens
  helpers.assert_close(got, want, ops=ops, what="first loss")
  # the fresh init the run would have without init.checkpoint scores far from it
  fresh = PLTForCausalLM(cfg).init(
      jax.random.key(c.seed), np.zeros((1, 1), np.int32)
  )["params"]
  assert abs(loss_of(fresh) - want) > 0.1 * want
  # the fine-tune keeps the checkpoint's tokenizer, with the template it rendered with
  saved = tokenizer.load_tokenizer(str(tmp_path / "tokenizer"))
  assert saved.chat_template == chat.DEFAULT_TEMPLATE
  assert saved.encode("a</s>b") == tok.encode("a</s>b")


@pytest.mark.slow
def test_tiny_finetune_lowers_heldout_loss_then_resumes(
    chat_assets, tmp_path, capsys
):
  c = _sft_config(
      chat_assets,
      **{
          "train.total_steps": 40,
          "train.log_every": 20,
          "checkpoint.every_steps": 20,
          "optim.peak_lr": 3e-3,
          "eval.max_tokens": 512,
          "eval.completion_tokens": 2,
          "eval.prompt": "12+2",
      },
  )
  summary = trainer.train(c, str(tmp_path))
  out = capsys.readouterr().out
  assert f"initialised from {chat_assets['hf']}" in out
  assert "held-out assistant-token loss: " in out and "truncated 0" in out
  assert "greedy chat completion of '12+2'" in out
  assert summary["loss_after"] < 0.7 * summary["loss_before"], summary
  assert os.path.isdir(tmp_path / "params")

  c.train.total_steps = (
      42  # the workdir's own checkpoint wins over init.checkpoint
  )
  summary = trainer.train(c, str(tmp_path))
  out = capsys.readouterr().out
  assert summary["start_step"] == 40 and "resumed from step 40" in out
  assert "initialised from" not in out


def test_bad_chat_data_stops_before_training(chat_assets, tmp_path, capsys):
  bad = tmp_path / "bad.jsonl"
  good = json.dumps(
      {
          "messages": [
              {"role": "user", "content": "1+1"},
              {"role": "assistant", "content": "2"},
          ]
      }
  )
  bad.write_text(
      f'{good}\n{{"messages": 1\n{good}\n'
      '{"messages": [{"role": "user", "content": "hi"}]}\n'
  )
  work = tmp_path / "w"
  with pytest.raises(ValueError) as e:
    trainer.train(
        _sft_config(chat_assets, **{"data.source": str(bad)}), str(work)
    )
  assert "\n" not in str(e.value) and str(e.value).startswith(
      "2 of 4 chat examples"
  )
  err = capsys.readouterr().err.splitlines()
  assert [ln.split(": ")[0] for ln in err] == [f"{bad}:2", f"{bad}:4"]
  assert not os.path.exists(work / "checkpoints")


@pytest.mark.parametrize(
    "extra, match",
    [
        (
            {"model.overrides.hidden_size": 64},
            "model.preset 'tiny' disagrees with init.checkpoint .*hidden_size 64 vs 32",
        ),
        (
            {"model.preset": "", "model.overrides": {}, "model.loops": 3},
            "model.loops 3 disagrees",
        ),
        ({"model.preset": ""}, "model.overrides need a model.preset"),
        (
            {"init.checkpoint": "/nonexistent"},
            "init.checkpoint /nonexistent is not a directory",
        ),
        ({"data.format": "chats"}, "data.format must be one of"),
        ({"data.on_bad_example": "ignore"}, "data.on_bad_example must be"),
        ({"data.pack_bins": 0}, "data.pack_bins must be >= 1"),
        ({"init.checkpoint": ""}, "data.format=chat needs a tokenizer"),
        ({"data.source": "stdlib"}, "is the text corpus"),
    ],
)
def test_bad_fine_tune_inputs_fail_in_one_line(
    chat_assets, tmp_path, extra, match
):
  with pytest.raises(ValueError, match=match) as e:
    trainer.train(_sft_config(chat_assets, **extra), str(tmp_path))
  assert "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "checkpoints")


def test_init_dir_without_config(chat_assets, tmp_path):
  os.makedirs(tmp_path / "empty")
  with pytest.raises(ValueError, match="holds no config.json"):
    trainer.train(
        _sft_config(
            chat_assets, **{"init.checkpoint": str(tmp_path / "empty")}
        ),
        str(tmp_path / "w"),
    )


@pytest.mark.parametrize("name", ["sft_tiny", "sft_loopcoder_v2_7b"])
def test_sft_configs_take_the_checkpoints_model(chat_assets, name):
  c = train_config.load_config(os.path.join(ROOT, "configs", f"{name}.py"))
  assert c.data.format == "chat" and c.init.checkpoint != chat_assets["hf"]
  c.init.checkpoint = chat_assets["hf"]
  c.data.source = c.data.source or chat_assets["train"]
  c.data.seq_len = 64  # the tiny checkpoint's max_position_embeddings
  cfg = train_config.validate(c)
  want = chat_assets["cfg"]
  assert (cfg.hidden_size, cfg.plt_num_loops) == (
      want.hidden_size,
      want.plt_num_loops,
  )
  assert cfg.runtime.attention_impl == c.model.runtime.attention_impl
  c.init.checkpoint = ""
  with pytest.raises(ValueError, match="model.preset is empty"):
    train_config.validate(c)


# ------------------------------------------------------------------------------------- LoRA
def _lora_config(chat_assets, base, **extra):
  return _sft_config(
      chat_assets,
      **{
          "init.checkpoint": str(base),
          "model.preset": "",
          "model.overrides": {},
          "lora.enabled": True,
          "lora.rank": 4,
          "checkpoint.every_steps": 2,
          **extra,
      },
  )


@pytest.fixture
def lora_base(chat_assets, tmp_path):
  """A copy of the tiny HF checkpoint the test may move or change."""
  import shutil

  return shutil.copytree(chat_assets["hf"], tmp_path / "base")


def _state_arrays(step_dir):
  """Path -> shape of every array a training step stores (from the metadata)."""
  stored = params_io._stored(str(step_dir / "state"), "")
  return {p: tuple(m.shape) for p, m in stored.items()}


@pytest.mark.slow
def test_lora_run_holds_adapters_only_and_resumes_bit_exact(
    chat_assets, lora_base, tmp_path
):
  from loopcoder_jax import checkpoints
  from loopcoder_jax.model import lora
  from loopcoder_jax.model.transformer import PLTForCausalLM

  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  trainer.train(
      _lora_config(chat_assets, lora_base, **{"train.total_steps": 4}),
      str(straight),
  )
  trainer.train(
      _lora_config(chat_assets, lora_base, **{"train.total_steps": 2}),
      str(resumed),
  )
  summary = trainer.train(
      _lora_config(chat_assets, lora_base, **{"train.total_steps": 4}),
      str(resumed),
  )
  assert summary["start_step"] == 2
  # the checkpoints and the export hold the adapters (and their Adam moments) only
  stored = _state_arrays(straight / "checkpoints" / "4")
  assert "params/layers/self_attn/q_proj_lora/a" in stored
  assert all("_lora/" in p for p, shape in stored.items() if shape), stored
  record = params_io.lora_record(str(straight / "params"))
  assert record["base"] == str(lora_base)
  assert record["base_sha256"] == checkpoints.content_hash(str(lora_base))
  # bit-exact resume: the same adapters after 4 steps, run straight or 2 + 2
  _, a_straight = params_io.load_params(str(straight / "params"))
  _, a_resumed = params_io.load_params(str(resumed / "params"))
  for x, y in zip(jax.tree.leaves(a_straight), jax.tree.leaves(a_resumed)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # the loader takes the workdir: base + adapters, merged (shared adapters), and they trained
  cfg, merged, _ = checkpoints.load(str(straight))
  assert cfg.lora is None
  base_cfg, base, _ = checkpoints.load(str(lora_base))
  lcfg = base_cfg.replace(
      lora=params_io.read_config(str(straight / "params")).lora
  )
  tokens = np.arange(12, dtype=np.int32).reshape(1, 12) % cfg.vocab_size
  applied = PLTForCausalLM(lcfg).apply(
      {"params": lora.combine(base, a_straight)}, tokens
  )
  got = PLTForCausalLM(cfg).apply({"params": merged}, tokens)
  helpers.assert_close(
      got, applied, ops=helpers.forward_ops(cfg, 12), what="merged load"
  )
  plain = PLTForCausalLM(base_cfg).apply({"params": base}, tokens)
  assert np.max(np.abs(np.asarray(got) - np.asarray(plain))) > 1e-4


@pytest.mark.slow
def test_lora_workdir_with_a_missing_or_changed_base_is_refused(
    chat_assets, lora_base, tmp_path
):
  from loopcoder_jax import checkpoints

  work = tmp_path / "w"
  c = _lora_config(chat_assets, lora_base, **{"train.total_steps": 2})
  trainer.train(c, str(work))
  adapters = str(work / "params")
  assert checkpoints.lora_record(adapters)["base"] == str(lora_base)
  # a changed base: other weights under the same path
  st = next(lora_base.glob("*.safetensors"))
  data = bytearray(st.read_bytes())
  data[-4:] = b"\x00\x00\x80\x3f"
  st.write_bytes(bytes(data))
  for call in (
      lambda: trainer.train(c, str(work)),
      lambda: checkpoints.load(str(work)),
  ):
    with pytest.raises(
        ValueError,
        match="not the base they were trained on|"
        "not the one they were trained on",
    ) as e:
      call()
    assert "\n" not in str(e.value)
  # a missing base
  lora_base.rename(tmp_path / "moved")
  with pytest.raises(
      ValueError, match="lora: the base checkpoint .* is missing"
  ):
    trainer.train(c, str(work))
  with pytest.raises(ValueError, match="which is missing") as e:
    checkpoints.load(str(work))
  assert "\n" not in str(e.value)
  assert sorted(os.listdir(work / "checkpoints")) == ["2"]


@pytest.mark.slow
def test_lora_on_an_int8_base(chat_assets, lora_base, tmp_path):
  """`lora.base_dtype=int8`: the frozen base's linear weights int8 under float32 adapters. The run
  trains the adapters, records the int8 base (the loader serves the workdir on it, adapters applied
  unmerged: what they were trained under), and a resume on a float base is refused in one line.
  """
  from loopcoder_jax import checkpoints
  from loopcoder_jax.model import lora, quant
  from loopcoder_jax.model.transformer import PLTForCausalLM

  work = tmp_path / "w"
  c = _lora_config(
      chat_assets,
      lora_base,
      **{"train.total_steps": 2, "lora.base_dtype": "int8"},
  )
  assert train_config.validate(c).runtime.quantize == "int8"
  trainer.train(c, str(work))
  record = params_io.lora_record(str(work / "params"))
  assert record["base_quantize"] == "int8"
  cfg, params, _ = checkpoints.load(str(work))
  assert cfg.runtime.quantize == "int8" and cfg.lora is not None
  assert params["layers"]["mlp"]["up_proj"]["kernel"].dtype == np.int8
  _, adapters = lora.split(params)
  assert any(np.abs(np.asarray(b)).max() > 0 for b in jax.tree.leaves(adapters))
  # the base under the adapters is the int8 model of the float base
  base_cfg, base, _ = checkpoints.load(str(lora_base))
  qcfg, qbase = quant.quantize_params(base_cfg, base)
  tokens = np.arange(12, dtype=np.int32).reshape(1, 12) % cfg.vocab_size
  want = PLTForCausalLM(qcfg.replace(lora=cfg.lora)).apply(
      {"params": lora.combine(qbase, adapters)}, tokens
  )
  got = PLTForCausalLM(cfg).apply({"params": params}, tokens)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  c.lora.base_dtype = "float"
  c.train.total_steps = 4
  with pytest.raises(ValueError, match="lora.base_dtype") as e:
    trainer.train(c, str(work))
  assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"lora.rank": 0}, r"lora.rank must be >= 1, got 0"),
        (
            {"lora.rank": 17},
            r"lora.rank 17 is above the width 16 of the k projection",
        ),
        ({"lora.targets": "q,mlp"}, r"lora.targets .*unknown \['mlp'\]"),
        ({"init.checkpoint": ""}, "lora.enabled needs init.checkpoint"),
        (
            {"lora.base_dtype": "int4"},
            r"lora.base_dtype 'int4': expected one of",
        ),
    ],
)
def test_bad_lora_inputs_fail_in_one_line(chat_assets, tmp_path, extra, match):
  c = _lora_config(chat_assets, chat_assets["hf"], **extra)
  with pytest.raises(ValueError, match=match) as e:
    trainer.train(c, str(tmp_path))
  assert "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "checkpoints")


def test_per_loop_lora_on_one_loop_fails_in_one_line(chat_assets, tmp_path):
  from loopcoder_jax.interop import save_hf
  from loopcoder_jax.model.config import PLTConfig
  from loopcoder_jax.model.transformer import init_params

  cfg = PLTConfig.tiny(loops=1, **helpers.TINY)
  save_hf(cfg, init_params(cfg, jax.random.key(0)), tmp_path / "r1")
  c = _lora_config(chat_assets, tmp_path / "r1", **{"lora.per_loop": True})
  with pytest.raises(
      ValueError, match="lora.per_loop needs a looped model"
  ) as e:
    train_config.validate(c)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["lora_tiny", "lora_loopcoder_v2_7b"])
def test_lora_configs_adapt_the_checkpoints_model(chat_assets, name):
  c = train_config.load_config(os.path.join(ROOT, "configs", f"{name}.py"))
  c.init.checkpoint = chat_assets["hf"]
  c.data.source = c.data.source or chat_assets["train"]
  c.data.seq_len = 64
  c.lora.rank = 4
  c.train.grad_accum = 1
  cfg = train_config.validate(c, num_devices=1, process_count=1)
  assert cfg.lora is not None and cfg.lora.targets == (
      "q",
      "k",
      "v",
      "o",
      "gate",
      "up",
      "down",
  )
  assert cfg.hidden_size == chat_assets["cfg"].hidden_size
