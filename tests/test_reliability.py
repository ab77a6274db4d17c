"""Training and the tools under faults and bad input, as a new user meets them.

Each case asserts the one-line message (and the exit code, where a script runs), and that nothing
was lost or left behind; what already worked (resume from a damaged newest checkpoint, bit-exact)
is kept working. A finished tiny run (in-process, module-scoped) is the shared workdir;
the fault injections: a non-finite update on a save step (in-process), kill -9 during an async
save then Ctrl-C, and two trainers on one workdir (scripts/train.py in subprocesses, marked slow).
"""

import errno
import glob
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from loopcoder_jax import checkpoints, interop
from loopcoder_jax.checkpoints import hf_io, params_io
from loopcoder_jax.checkpoints import safetensors_io as st
from loopcoder_jax.data import corpus, pipeline, tokenizer
from loopcoder_jax.eval import diagnostics
from loopcoder_jax.interop import convert
from loopcoder_jax.model.config import PLTConfig
from loopcoder_jax.model.transformer import init_params
from loopcoder_jax.train import config as train_config
from loopcoder_jax.train import optim, trainer
from loopcoder_jax.train import step as train_step
from tests import helpers


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  return helpers.write_assets(str(tmp_path_factory.mktemp("assets")))


def _config(assets, **extra):
  c = train_config.base_config()
  c.model.overrides = dict(helpers.TINY)
  c.tokenizer.vocab_size = (
      320  # trained on the corpus, kept in WORKDIR/tokenizer
  )
  c.data.source = assets["source"]
  c.data.seq_len = 32
  c.data.shuffle_window = 16
  c.train.total_steps = 4
  c.train.log_every = 2
  c.checkpoint.every_steps = 2
  c.eval.max_tokens = 0
  c.eval.completion_tokens = 0
  c.metrics.update(progress_bar=False, peak_flops=-1.0, tensorboard=False)
  for k, v in extra.items():
    node = c
    *path, leaf = k.split(".")
    for p in path:
      node = node[p]
    node[leaf] = v
  return c


@pytest.fixture(scope="module")
def run(assets, tmp_path_factory):
  """A finished 4-step run: checkpoints 2 and 4, the params/ export of step 4, its tokenizer."""
  work = str(tmp_path_factory.mktemp("run") / "work")
  trainer.train(_config(assets), work)
  return work


def _copy(src, dst):
  shutil.copytree(src, dst, symlinks=True)
  return str(dst)


def _files(root):
  """{relative path: sha256} of every file under root (what a failed command must not change)."""
  out = {}
  for p in glob.glob(os.path.join(root, "**"), recursive=True):
    if os.path.isfile(p):
      with open(p, "rb") as f:
        out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _one_line_error(res, code):
  """The script exited with `code` and said why in one `error:` line, and nothing else."""
  lines = res.stderr.strip().splitlines()
  assert res.returncode == code, res.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-3000:]
  return lines[0]


def _assert_same(a, b):
  jax.tree.map(
      lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
      a,
      b,
  )


def _dead_pid():
  proc = subprocess.Popen([sys.executable, "-c", ""])
  proc.wait()
  return proc.pid


# ------------------------------------------------------------------ training: wrong results
def test_resume_refuses_another_tokenizer_or_model(assets, run, tmp_path):
  texts = [t for _, t in corpus.stdlib_files("train")[40:80]]
  other = tokenizer.train_bpe(texts, 320, str(tmp_path / "other_tok"))
  assert (
      other.vocab_size == 320
  )  # same size, other merges: only a fingerprint tells
  work = _copy(run, tmp_path / "work")
  before = _files(work)
  cases = [
      (
          {"tokenizer.path": str(tmp_path / "other_tok")},
          r"another tokenizer vocabulary \(320 tokens -> 320, same size, other tokens\)",
      ),
      (
          {"model.overrides.intermediate_size": 96},
          r"another model config \(intermediate_size 64 -> 96\)",
      ),
  ]
  for extra, match in cases:
    with pytest.raises(ValueError, match=match) as e:
      trainer.train(_config(assets, **{"train.total_steps": 6, **extra}), work)
    assert "\n" not in str(e.value)
  assert _files(work) == before  # stopped before anything was written


def test_fine_tune_with_another_tokenizer_is_refused_unless_asked(
    assets, run, tmp_path
):
  """The init checkpoint's embeddings index its own vocabulary: a tokenizer.path with other tokens
  (here the same size) fails before any weight is read, unless asked for explicitly.
  """
  texts = [t for _, t in corpus.stdlib_files("train")[40:80]]
  tokenizer.train_bpe(texts, 320, str(tmp_path / "other_tok"))
  tuned = {
      "init.checkpoint": run,
      "tokenizer.path": str(tmp_path / "other_tok"),
      "train.total_steps": 1,
  }
  with pytest.raises(ValueError) as e:
    trainer.train(_config(assets, **tuned), str(tmp_path / "sft"))
  assert "is not the tokenizer of init.checkpoint" in str(e.value)
  assert "same size, other tokens" in str(e.value)
  assert "init.allow_different_tokenizer=True" in str(e.value)
  assert "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "sft" / "checkpoints")
  # its own tokenizer is fine; asked for explicitly, another one is too
  own = {**tuned, "tokenizer.path": os.path.join(run, "tokenizer")}
  assert trainer.train(_config(assets, **own), str(tmp_path / "own"))
  allowed = {**tuned, "init.allow_different_tokenizer": True}
  summary = trainer.train(_config(assets, **allowed), str(tmp_path / "sft"))
  assert summary["end_step"] == 1


def test_extended_run_exports_its_newest_step_and_logs_each_step_once(
    assets, run, tmp_path
):
  work = _copy(run, tmp_path / "work")
  # killed after step 4 was logged (its last line torn) but before it was saved
  shutil.rmtree(os.path.join(work, "checkpoints", "4"))
  with open(os.path.join(work, "metrics.jsonl"), "a") as f:
    f.write('{"step": 5, "lo')
  summary = trainer.train(_config(assets, **{"train.total_steps": 6}), work)
  assert summary["start_step"] == 2 and summary["end_step"] == 6
  assert [m["step"] for m in helpers.read_metrics(work)] == [1, 2, 3, 4, 5, 6]
  with open(os.path.join(work, "params", trainer.EXPORT_STEP_FILE)) as f:
    assert json.load(f) == {"step": 6}
  _, exported = params_io.load_params(os.path.join(work, "params"))
  _, newest = params_io.load_params(os.path.join(work, "checkpoints", "6"))
  _assert_same(exported, newest)
  assert not glob.glob(os.path.join(work, "params.*"))  # no staging left


def test_nonfinite_update_on_a_save_step_keeps_the_good_checkpoints(
    assets, run, tmp_path, monkeypatch
):
  """Fault injection: the update of step 6, a save step, turns a param non-finite. The loss and
  gradient norm of step 6 are the pre-update params', so only the state check can see it.
  """
  work = _copy(run, tmp_path / "work")
  before = _files(work)
  make_train_fns = train_step.make_train_fns

  def poisoned(*args, **kwargs):
    init_fn, step_fn, shardings = make_train_fns(*args, **kwargs)

    def step(state, batch):
      state, metrics = step_fn(state, batch)
      if int(state.step) == 6:
        params = dict(
            state.params,
            norm={"scale": state.params["norm"]["scale"] * jnp.inf},
        )
        state = state.replace(params=params)
      return state, metrics

    return init_fn, step, shardings

  monkeypatch.setattr(train_step, "make_train_fns", poisoned)
  # keep=2: a save at step 6 would have rotated step 2 out
  config = _config(assets, **{"train.total_steps": 8, "checkpoint.keep": 2})
  with pytest.raises(trainer.TrainingDiverged) as e:
    trainer.train(config, work)
  ckpts = os.path.join(work, "checkpoints")
  assert str(e.value).startswith(
      "non-finite params/norm/scale at step 6 after the update"
  )
  assert str(e.value).endswith(
      f"stopped without saving, last good checkpoint: step 4 in {ckpts}"
  )
  # nothing saved, rotated out or exported; only steps 5 and 6 were logged
  after = _files(work)
  assert after.pop("metrics.jsonl") != before.pop("metrics.jsonl")
  assert after == before
  assert [m["step"] for m in helpers.read_metrics(work)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("damage", ["truncated state", "garbage data state"])
def test_damaged_newest_checkpoint_resumes_bit_exact(
    assets, run, tmp_path, damage
):
  work = _copy(run, tmp_path / "work")
  step4 = os.path.join(work, "checkpoints", "4")
  if damage == "truncated state":
    for f in glob.glob(os.path.join(step4, "state", "**", "*"), recursive=True):
      if os.path.isfile(f):
        os.truncate(f, os.path.getsize(f) // 2)
  else:
    for f in glob.glob(os.path.join(step4, "data", "process_*.json")):
      with open(f, "w") as fh:
        fh.write('{"shards": [{"not": "a grain state"}]}')
  shutil.rmtree(os.path.join(work, "params"))
  trainer.train(_config(assets), work)  # resumes from step 2, saves step 4 anew
  _, want = params_io.load_params(os.path.join(run, "params"))
  _, got = params_io.load_params(os.path.join(work, "params"))
  _assert_same(got, want)
  assert os.listdir(os.path.join(work, "checkpoints_unusable")) == ["4"]
  assert [m["step"] for m in helpers.read_metrics(work)] == [1, 2, 3, 4]


def test_workdir_that_is_a_file(assets, tmp_path):
  path = tmp_path / "file"
  path.write_text("keep me")
  with pytest.raises(
      ValueError, match=f"workdir {path} exists and is not a dir"
  ):
    trainer.train(_config(assets), str(path))
  assert path.read_text() == "keep me"


def test_config_values_that_train_nonsense_are_refused(assets):
  for extra, match in [
      ({"optim.eps": 0.0}, r"optim.eps must be > 0, got 0.0"),
      ({"model.loops": 0}, r"model.loops must be an integer >= 1"),
      (
          {"optim.peak_lr": 1e39},
          r"optim.peak_lr must be > 0 and finite in float32",
      ),
  ]:
    with pytest.raises(ValueError, match=match):
      train_config.validate(_config(assets, **extra))
  # one step is a run: the schedule gives it the peak rate, not an optax error
  tx, schedule = optim.make_optimizer({}, 1)
  assert float(schedule(0)) == pytest.approx(4e-4)


def test_binary_and_non_utf8_files_are_skipped_and_counted(tmp_path):
  (tmp_path / "a.py").write_text("def f():\n  return 1\n")
  (tmp_path / "b.bin").write_bytes(b"\x7fELF\x00\x01" * 100)
  (tmp_path / "c.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
  # a multi-byte character cut by the sniffed prefix is still text
  (tmp_path / "d.txt").write_text("x" * 8191 + "\u00e9")
  lines = []
  docs = pipeline.load_documents(str(tmp_path / "*"), report=lines.append)
  assert len(docs) == 2 and docs[0].startswith("def f")
  assert lines == [
      f"data source {str(tmp_path / '*')!r}: skipped 1 binary, 1 non-UTF-8 "
      "files (not UTF-8 text)"
  ]
  with pytest.raises(ValueError, match=r"empty corpus; skipped 1 binary files"):
    pipeline.load_documents(str(tmp_path / "*.bin"))


# ------------------------------------------------------------------ checkpoints and interop
def test_nan_weights_are_refused_where_they_are_loaded(assets, run, tmp_path):
  cfg, params = params_io.load_params(os.path.join(run, "params"))
  params["norm"]["scale"] = params["norm"]["scale"].at[3].set(jnp.nan)
  nan_dir = tmp_path / "nan"
  params_io.save_params(nan_dir, cfg, params)
  with pytest.raises(
      ValueError,
      match=r"holds non-finite weights \(1 of \d+ arrays, first norm/scale\)",
  ):
    interop.load(nan_dir, tokenizer=assets["tokenizer"])


def test_damaged_orbax_files_are_one_line(run, tmp_path, capfd):
  def damage(d, how):
    for f in glob.glob(os.path.join(d, "params", "ocdbt.process_0", "d", "*")):
      if how == "deleted":
        os.remove(f)
      elif how == "truncated":
        os.truncate(f, 10)
      else:
        with open(f, "r+b") as fh:
          fh.write(b"\xff" * 64)

  for how in ("deleted", "truncated", "corrupted"):
    d = _copy(os.path.join(run, "params"), tmp_path / how)
    damage(d, how)
    with pytest.raises(ValueError, match=f"checkpoint {d} is unreadable") as e:
      params_io.load_params(d)
    # a corrupted chunk still reads (the params are stored uncompressed): its checksum fails
    why = (
        "does not match the checksum" if how == "corrupted" else "Error reading"
    )
    assert "\n" not in str(e.value) and why in str(e.value), how
  d = _copy(os.path.join(run, "params"), tmp_path / "shapes")
  with open(os.path.join(d, "config.json")) as f:
    hf = json.load(f)
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump({**hf, "intermediate_size": 96}, f)
  with pytest.raises(
      ValueError,
      match=r"layers/mlp/down_proj/kernel is stored with shape \(2, 64, 32\), "
      r"its config gives \(2, 96, 32\)",
  ):
    params_io.load_params(d)
  assert "Event loop is closed" not in capfd.readouterr().err


def test_bad_config_json_is_named(tmp_path):
  good = PLTConfig.tiny().to_hf_dict()
  for edit, match in [
      ({"hidden_size": "32"}, r"hidden_size has the wrong type \(str '32'\)"),
      ({"plt_window_size": 4}, r"plt_window_size has the wrong type \(int 4\)"),
      ({"rms_norm_eps": "small"}, r"rms_norm_eps has the wrong type"),
      (
          {"tie_word_embeddings": "no"},
          r"tie_word_embeddings has the wrong type",
      ),
      (
          {"num_key_value_heads": 3},
          r"config.json: PLTConfig.num_key_value_heads",
      ),
  ]:
    (tmp_path / "config.json").write_text(json.dumps({**good, **edit}))
    with pytest.raises(ValueError, match=match) as e:
      PLTConfig.from_hf_file(tmp_path)
    assert "\n" not in str(e.value)
  partial = {
      k: v
      for k, v in good.items()
      if k not in ("vocab_size", "num_hidden_layers")
  }
  (tmp_path / "config.json").write_text(json.dumps(partial))
  # not the 7B defaults standing in for them
  with pytest.raises(
      ValueError, match=r"config.json is missing vocab_size, num_hidden_layers$"
  ):
    PLTConfig.from_hf_file(tmp_path)


@pytest.fixture(scope="module")
def hf(run, tmp_path_factory):
  """The run as an HF directory (with its tokenizer), converted from the workdir as the README
  shows."""
  out = str(tmp_path_factory.mktemp("hf") / "hf")
  assert convert.convert_checkpoint(run, out, "hf") == "orbax"
  return out


def test_workdirs_and_their_steps_convert_and_load(assets, run, hf, tmp_path):
  _, from_hf, tok = interop.load(hf)  # the tokenizer came along
  _, from_run, _ = interop.load(run)
  assert tok.vocab_size == 320
  _assert_same(from_hf, from_run)
  # a run that has not finished: the message names a step, and that step converts and loads
  work = _copy(run, tmp_path / "unfinished")
  shutil.rmtree(os.path.join(work, "params"))
  with pytest.raises(ValueError, match="without a final params/ export") as e:
    interop.load(work)
  step = str(e.value).rsplit("e.g. ", 1)[1]
  assert step == os.path.join(work, "checkpoints", "4")
  convert.convert_checkpoint(step, str(tmp_path / "step_hf"), "hf")
  _, from_step, _ = interop.load(str(tmp_path / "step_hf"))
  _assert_same(from_step, from_run)
  _, direct, _ = interop.load(step)
  _assert_same(direct, from_run)


def test_truncated_safetensors_is_one_line(assets, hf, tmp_path):
  bad = _copy(hf, tmp_path / "bad")
  shard = os.path.join(bad, "model.safetensors")
  os.truncate(shard, os.path.getsize(shard) // 2)
  calls = [
      lambda: hf_io.load_hf(bad),
      lambda: interop.load(bad),
      lambda: convert.convert_checkpoint(bad, str(tmp_path / "out"), "orbax"),
  ]
  for call in calls:
    with pytest.raises(
        ValueError, match=f"{shard} is not a readable safetensors file"
    ) as e:
      call()
    assert "\n" not in str(e.value)
  assert sorted(os.listdir(tmp_path)) == ["bad"]  # no output, no temp directory


def test_index_naming_files_outside_the_source(hf, tmp_path):
  src = _copy(hf, tmp_path / "src")
  shutil.move(
      os.path.join(src, "model.safetensors"), tmp_path / "outside.safetensors"
  )
  with open(tmp_path / "outside.safetensors", "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    keys = [k for k in json.loads(f.read(n)) if k != "__metadata__"]
  with open(os.path.join(src, "model.safetensors.index.json"), "w") as f:
    json.dump({"weight_map": {k: "../outside.safetensors" for k in keys}}, f)
  with pytest.raises(
      ValueError,
      match="names '../outside.safetensors'; weight files must lie inside",
  ):
    convert.convert_checkpoint(src, str(tmp_path / "out"), "orbax")
  assert not os.path.exists(tmp_path / "out")


def test_side_files_linked_out_of_the_source_are_refused(hf, tmp_path):
  secret = tmp_path / "secret.txt"
  secret.write_text("not for export")
  src = _copy(hf, tmp_path / "src")
  os.remove(os.path.join(src, "tokenizer_config.json"))
  os.symlink(secret, os.path.join(src, "tokenizer_config.json"))
  with pytest.raises(
      ValueError,
      match=f"tokenizer_config.json is a symlink to {secret}, outside",
  ):
    convert.convert_checkpoint(src, str(tmp_path / "out"), "orbax")
  assert not os.path.exists(tmp_path / "out")
  # a Hugging Face cache snapshot links every file into the cache's blobs/: that is the source
  repo = tmp_path / "hub" / "models--org--tiny"
  os.makedirs(repo / "blobs")
  os.makedirs(repo / "snapshots" / "abc123")
  assert "tokenizer.json" in os.listdir(hf)
  for name in os.listdir(hf):
    shutil.copy(os.path.join(hf, name), repo / "blobs" / name)
    os.symlink(
        os.path.join("..", "..", "blobs", name),
        repo / "snapshots" / "abc123" / name,
    )
  convert.convert_checkpoint(
      str(repo / "snapshots" / "abc123"), str(tmp_path / "from_cache"), "orbax"
  )
  copied = tmp_path / "from_cache" / "tokenizer.json"
  assert copied.is_file() and not copied.is_symlink()


def test_overwrite_replaces_only_checkpoints(run, tmp_path):
  notes = tmp_path / "notes"
  notes.mkdir()
  (notes / "todo.txt").write_text("mine")
  with pytest.raises(ValueError, match="holds todo.txt, not a checkpoint") as e:
    convert.convert_checkpoint(run, str(notes), "hf", overwrite=True)
  assert "\n" not in str(e.value)
  assert (notes / "todo.txt").read_text() == "mine"
  convert.convert_checkpoint(run, str(tmp_path / "ckpt"), "orbax")
  convert.convert_checkpoint(run, str(tmp_path / "ckpt"), "hf", overwrite=True)
  assert hf_io.is_hf_dir(str(tmp_path / "ckpt"))
  assert sorted(os.listdir(tmp_path)) == ["ckpt", "notes"]  # no temp siblings


def test_stale_temp_directories_and_a_dangling_destination(run, tmp_path):
  tag = f"{_dead_pid()}@{socket.gethostname()}"
  # kill -9 mid-write: a temp sibling; mid-replace: the old checkpoint only in its .old sibling
  os.makedirs(tmp_path / f".out.tmp-{tag}-0a0a" / "params")
  convert.convert_checkpoint(run, str(tmp_path / "kept"), "hf")
  os.makedirs(tmp_path / f".kept.old-{tag}-0b0b")
  os.rename(tmp_path / "kept", tmp_path / f".kept.old-{tag}-0b0b" / "kept")
  live = tmp_path / f".out.tmp-{os.getpid()}@{socket.gethostname()}-0c0c"
  live.mkdir()  # a conversion still running: left alone
  convert.convert_checkpoint(run, str(tmp_path / "out"), "orbax")
  with pytest.raises(
      ValueError, match="is not empty"
  ):  # restored, so not replaced
    convert.convert_checkpoint(run, str(tmp_path / "kept"), "hf")
  assert hf_io.is_hf_dir(str(tmp_path / "kept"))
  assert sorted(os.listdir(tmp_path)) == sorted(["kept", "out", live.name])
  # a destination symlink to a directory that does not exist yet: written where it points
  os.symlink(tmp_path / "target" / "ckpt", tmp_path / "link")
  convert.convert_checkpoint(run, str(tmp_path / "link"), "orbax")
  assert params_io.is_params_dir(tmp_path / "target" / "ckpt")
  assert os.path.islink(tmp_path / "link")
  assert sorted(os.listdir(tmp_path / "target")) == ["ckpt"]


def test_diagnostics_tell_nan_from_not_applicable():
  result = {"step_size": [1.5, float("nan")], "kl_prev": [float("nan"), 0.25]}
  table = diagnostics.format_table(result).splitlines()
  assert table[1].split() == ["kl_prev", "-", "0.25"]
  assert table[2].split() == ["step_size", "1.5", "nan"]
  out = diagnostics.for_json(result)
  assert out["kl_prev"][0] is None and np.isnan(out["step_size"][1])


# ------------------------------------------------------------------ scripts: exit codes
def test_scripts_bad_input_exit_2_in_one_line(assets, run, hf, tmp_path):
  busy = tmp_path / "file"
  busy.write_text("x")
  assert "exists and is not a directory" in _one_line_error(
      helpers.run_train(helpers.train_flags(assets, busy)), 2
  )
  line = _one_line_error(
      helpers.run_train(
          helpers.train_flags(assets, tmp_path / "w", **{"model.loops": 0})
      ),
      2,
  )
  assert "model.loops must be an integer >= 1" in line
  line = _one_line_error(helpers.run_train(["--config.train.total_stepz=3"]), 2)
  assert "unknown config key 'total_stepz'" in line and "total_steps" in line
  line = _one_line_error(
      helpers.run_script("bench_attention.py", ["--seq_lens=0"]), 2
  )
  assert "--seq_lens" in line
  # NaN weights: no empty completion with exit 0
  cfg, params = params_io.load_params(os.path.join(run, "params"))
  params["norm"]["scale"] = params["norm"]["scale"] * jnp.inf
  params_io.save_params(tmp_path / "nan", cfg, params)
  line = _one_line_error(
      helpers.run_script(
          "generate.py",
          [
              f"--checkpoint={tmp_path / 'nan'}",
              f"--tokenizer={assets['tokenizer']}",
              "--prompt=def f():",
          ],
      ),
      2,
  )
  assert "holds non-finite weights" in line
  # a damaged Orbax file: one line, not the tracebacks of the reads it abandoned
  damaged = _copy(os.path.join(run, "params"), tmp_path / "damaged")
  for f in glob.glob(
      os.path.join(damaged, "params", "ocdbt.process_0", "d", "*")
  ):
    os.truncate(f, 10)
  line = _one_line_error(
      helpers.run_script(
          "generate.py",
          [
              f"--checkpoint={damaged}",
              f"--tokenizer={assets['tokenizer']}",
              "--prompt=def f():",
          ],
      ),
      2,
  )
  assert f"checkpoint {damaged} is unreadable (ValueError: OUT_OF_RANGE" in line
  bad = _copy(hf, tmp_path / "truncated")
  os.truncate(os.path.join(bad, "model.safetensors"), 100)
  line = _one_line_error(
      helpers.run_script(
          "diagnose.py",
          [f"--checkpoint={bad}", f"--data={assets['source']}"],
      ),
      2,
  )
  assert "model.safetensors is not a readable safetensors file" in line
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


# ------------------------------------------------------------------ fault injection (slow)
def _train_proc(args):
  return subprocess.Popen(
      [sys.executable, helpers.TRAIN_SCRIPT] + args,
      env=helpers.subprocess_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      cwd=helpers.ROOT,
  )


def _wait_for(proc, cond, timeout=240, poll=0.005):
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
    time.sleep(poll)


def _metrics(work):
  path = os.path.join(work, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith("\n")]


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
  """16 steps, never interrupted: what every interrupted run must reproduce bit for bit."""
  work = tmp_path_factory.mktemp("reference") / "work"
  res = helpers.run_train(helpers.train_flags(assets, work))
  assert res.returncode == 0, res.stderr[-3000:]
  _, params = params_io.load_params(work / "params")
  return params, {m["step"]: m["loss"] for m in helpers.read_metrics(work)}


@pytest.mark.slow
def _kill9_then_ctrl_c(args, ckpts, work):
  """kill -9 during an async save, resume, Ctrl-C the resumed run while steps remain: its
  (returncode, stdout, stderr), or None when the runs outpaced this host's polling (the kill or the
  Ctrl-C would land on the last steps, which end the run normally)."""
  proc = _train_proc(args)
  # an async save in flight: Orbax writes into a temporary directory, then renames it
  _wait_for(proc, lambda: bool(glob.glob(str(ckpts / "*tmp*"))))
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert glob.glob(str(ckpts / "*tmp*"))
  restored = max((int(n) for n in os.listdir(ckpts) if n.isdigit()), default=0)
  killed = os.stat(work / "metrics.jsonl").st_ino
  proc = _train_proc(args)
  # stepping again: the log was rewritten back to the restored step, then one more step logged
  _wait_for(
      proc,
      lambda: os.stat(work / "metrics.jsonl").st_ino != killed
      and len(_metrics(work)) > restored,
  )
  proc.send_signal(signal.SIGSTOP)  # hold it while checking that steps remain
  if len(_metrics(work)) > 16 - 3:
    proc.send_signal(signal.SIGCONT)
    proc.communicate(timeout=240)
    return None
  proc.send_signal(signal.SIGINT)  # Ctrl-C: saves as SIGTERM does, no traceback
  proc.send_signal(signal.SIGCONT)
  out, err = proc.communicate(timeout=120)
  return proc.returncode, out, err


def test_kill9_during_async_save_then_ctrl_c_resume_bit_exact(
    assets, reference, tmp_path
):
  for attempt in range(3):
    work = tmp_path / f"work{attempt}"
    args = helpers.train_flags(assets, work, **{"checkpoint.every_steps": 1})
    ckpts = work / "checkpoints"
    ran = _kill9_then_ctrl_c(args, ckpts, work)
    if ran is not None:
      break
  else:
    pytest.fail("the runs finished before the signals could land mid-run")
  returncode, out, err = ran
  assert returncode == 128 + signal.SIGINT, err[-3000:]
  assert "Traceback" not in err
  assert "took over the lock" in err and "did not release it" in err
  # the killed save's leftovers are gone
  assert not glob.glob(str(ckpts / "*tmp*"))
  saved = int(out.split("preempted: saved step ")[1].split()[0])
  assert f"saved step {saved} in {ckpts} (SIGINT)" in out
  final = helpers.run_train(args)
  assert final.returncode == 0, final.stderr[-3000:]
  assert f"resumed from step {saved}" in final.stdout
  params_ref, loss_ref = reference
  _, params = params_io.load_params(work / "params")
  _assert_same(params, params_ref)
  metrics = helpers.read_metrics(work)
  assert [m["step"] for m in metrics] == list(range(1, 17))
  assert all(m["loss"] == loss_ref[m["step"]] for m in metrics)


@pytest.mark.slow
def test_second_trainer_on_a_workdir_is_refused(assets, reference, tmp_path):
  work = tmp_path / "work"
  args = helpers.train_flags(assets, work)
  first = _train_proc(args)
  lock_file = work / "trainer.0.lock"
  _wait_for(first, lambda: lock_file.exists() and lock_file.stat().st_size > 0)
  second = helpers.run_train(args)
  line = _one_line_error(second, 1)
  assert line.startswith(
      f"error: workdir {work} is in use by another trainer (pid {first.pid} on host"
  )
  out, err = first.communicate(timeout=240)
  assert first.returncode == 0, err[-3000:]
  # the first run was not disturbed: the same params as the reference, each step logged once
  _, params = params_io.load_params(work / "params")
  _assert_same(params, reference[0])
  assert [m["step"] for m in helpers.read_metrics(work)] == list(range(1, 17))
  assert lock_file.stat().st_size == 0  # released at exit


# ------------------------------------------------ evaluation tools: checked before the work
NO_SANDBOX = '''\
"""Fault injection: the sandbox cannot be built on this machine."""
from loopcoder_jax.eval import sandbox


def run(program, limits=sandbox.Limits()):
  raise sandbox.SandboxUnavailable("cannot build the sandbox: injected")


sandbox.run = run
'''


def test_loop_study_checks_before_training(tmp_path):
  """A directory as --report, eval.max_tokens=0 (no held-out bpb to compare), no sandbox for
  --code_eval_problems: one line each, before the study directory is made."""
  shim = tmp_path / "shim"
  shim.mkdir()
  (shim / "sitecustomize.py").write_text(NO_SANDBOX)
  study = tmp_path / "study"
  cases = [
      ([f"--report={tmp_path}"], 2, f"--report={tmp_path} is a directory"),
      (
          [f"--report={tmp_path / 'no' / 'r.md'}"],
          2,
          f"directory {tmp_path / 'no'} does not exist",
      ),
      (
          ["--config.eval.max_tokens=0"],
          2,
          "eval.max_tokens=0: the study compares",
      ),
      (
          ["--code_eval_problems=2"],
          1,
          "--code_eval_problems=2: cannot build the sandbox: injected",
      ),
  ]
  env = helpers.subprocess_env()
  env["PYTHONPATH"] = os.pathsep.join([str(shim), env.get("PYTHONPATH", "")])
  for args, code, message in cases:
    res = subprocess.run(
        [sys.executable, os.path.join(helpers.SCRIPTS, "loop_study.py")]
        + [f"--study_dir={study}", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=helpers.ROOT,
    )
    assert message in _one_line_error(res, code), args
    assert not study.exists()


def test_diagnose_plots_under_a_file_before_loading(tmp_path):
  """--plots=FILE/sub: one line before the checkpoint is read (this one does not exist)."""
  a_file = tmp_path / "file"
  a_file.write_text("x")
  line = _one_line_error(
      helpers.run_script(
          "diagnose.py",
          [f"--checkpoint={tmp_path / 'none'}", f"--plots={a_file / 'sub'}"],
      ),
      2,
  )
  assert line == (
      f"error: --plots={a_file / 'sub'}: cannot make the directory (Not a directory)"
  )
  assert a_file.read_text() == "x"


def test_generate_ctrl_c_is_one_line_and_exit_130(assets, run):
  """Ctrl-C once the prompt is echoed (as the model compiles): one line, no traceback."""
  proc = subprocess.Popen(
      [
          sys.executable,
          os.path.join(helpers.SCRIPTS, "generate.py"),
          f"--checkpoint={run}",
          "--prompt=def f():",
          "--max_new_tokens=40",
      ],
      # compiled afresh: the Ctrl-C lands while it compiles
      env={**helpers.subprocess_env(), "JAX_ENABLE_COMPILATION_CACHE": "false"},
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )
  assert proc.stdout.read(len("def f():")) == "def f():"
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=240)
  assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
  assert err.strip().splitlines() == ["error: interrupted"]


def test_a_directory_where_the_lock_belongs_is_one_line(assets, tmp_path):
  work = tmp_path / "work"
  (work / "trainer.0.lock").mkdir(parents=True)
  res = helpers.run_train(helpers.train_flags(assets, work))
  line = _one_line_error(res, 2)
  assert line == (
      f"error: cannot open the workdir lock {work / 'trainer.0.lock'} (Is a directory); it "
      "must be a regular file the trainer can write: remove or fix it"
  )
  assert sorted(os.listdir(work)) == ["trainer.0.lock"]


# ------------------------------------------------------------------ storage: a full disk
def _no_space(*_, **__):
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_while_training_names_the_last_good_checkpoint(
    assets, run, tmp_path, monkeypatch
):
  """The export and a checkpoint save each fail in one line naming the kept checkpoint; nothing
  half-written is left to block the next run, which finishes the job once there is room.
  """
  work = _copy(run, tmp_path / "work")
  shutil.rmtree(os.path.join(work, "params"))
  steps = os.path.join(work, "checkpoints")

  def half_export(path, *_):
    os.makedirs(path)
    open(os.path.join(path, "config.json"), "w").close()
    _no_space()

  monkeypatch.setattr(checkpoints, "save_params", half_export)
  with pytest.raises(trainer.StorageError) as e:
    trainer.train(_config(assets), work)
  assert str(e.value) == (
      f"exporting the params of step 4 to {work}/params failed (No space left on "
      f"device); last good checkpoint: step 4 in {steps}; free space and rerun the same "
      "command to resume"
  )
  assert not os.path.exists(f"{work}/params.partial")
  monkeypatch.undo()
  monkeypatch.setattr(checkpoints.TrainCheckpointer, "save", _no_space)
  with pytest.raises(trainer.StorageError) as e:
    trainer.train(_config(assets, **{"train.total_steps": 6}), work)
  assert str(e.value) == (
      "saving a checkpoint failed (No space left on device); last good checkpoint: step "
      f"4 in {steps}; free space and rerun the same command to resume"
  )
  monkeypatch.undo()
  assert trainer.train(_config(assets), work)["end_step"] == 4
  assert trainer._exported_step(os.path.join(work, "params")) == 4


def test_a_full_disk_while_converting_is_one_line_both_ways(
    run, hf, tmp_path, monkeypatch
):
  for src, to, writer in (
      (hf, "orbax", (params_io, "save_params")),
      (run, "hf", (st.SafetensorsFile, "write")),
  ):
    monkeypatch.setattr(*writer, _no_space)
    dst = str(tmp_path / f"out_{to}")
    with pytest.raises(checkpoints.StorageError) as e:
      convert.convert_checkpoint(src, dst, to)
    assert str(e.value) == (
        f"writing {dst} failed (No space left on device); nothing was left there and "
        f"the source {os.path.abspath(src)} is unchanged"
    )
    assert sorted(os.listdir(tmp_path)) == []
    monkeypatch.undo()


def test_converters_refuse_to_write_non_finite_weights(tmp_path):
  cfg = PLTConfig.tiny(loops=1, torch_dtype="bfloat16")
  params = jax.tree.map(
      lambda x: np.asarray(x, ml_dtypes.bfloat16),
      init_params(cfg, jax.random.key(0)),
  )
  convert.save_hf(cfg, params, tmp_path / "r1")
  convert.convert_checkpoint(
      str(tmp_path / "r1"), str(tmp_path / "r1_orbax"), "orbax"
  )
  # a gate bias that overflows the checkpoint's dtype, streamed or in memory
  for src, to in ((tmp_path / "r1_orbax", "hf"), (tmp_path / "r1", "orbax")):
    with pytest.raises(ValueError) as e:
      convert.convert_checkpoint(
          str(src), str(tmp_path / "out"), to, loops=2, gate_bias=-1e40
      )
    assert str(e.value) == (
        "refusing to write a checkpoint that cannot load: "
        "layers/self_attn/plt_gate/bias would hold NaN or Inf (bfloat16): "
        "gate_bias=-1e+40 does not fit bfloat16"
    )
    assert not os.path.exists(tmp_path / "out")
  # all-NaN weights, from HF and from a params directory
  nan = jax.tree.map(lambda x: np.full_like(x, np.nan), params)
  convert.save_hf(cfg, nan, tmp_path / "nan_hf")
  params_io.save_params(
      tmp_path / "nan_orbax", cfg, jax.tree.map(jnp.asarray, nan)
  )
  for src, to in (("nan_hf", "orbax"), ("nan_orbax", "hf")):
    with pytest.raises(ValueError, match="would hold NaN or Inf") as e:
      convert.convert_checkpoint(str(tmp_path / src), str(tmp_path / "out"), to)
    assert "gate_bias" not in str(e.value)
    assert not os.path.exists(tmp_path / "out")


def test_rerunning_a_finished_run_differently_gives_a_notice(
    assets, run, tmp_path, capfd
):
  work = _copy(run, tmp_path / "work")
  other = str(tmp_path / "other.txt")
  with open(other, "w") as f:
    f.write("def f():\n  return 1\n" * 50)
  capfd.readouterr()
  summary = trainer.train(
      _config(assets, **{"train.total_steps": 2, "data.source": other}), work
  )
  assert summary["end_step"] == 4
  notices = [
      line for line in capfd.readouterr().err.splitlines() if "notice" in line
  ]
  assert notices == [
      f"notice: {work}/checkpoints holds step 4, past train.total_steps 2: nothing "
      "is trained, the export and evaluation are of step 4",
      f"notice: the checkpoints in {work}/checkpoints were trained on data.source "
      f"{assets['source']!r}; this run goes on with {other!r}",
  ]


def test_a_half_written_orbax_init_directory_names_the_cause(
    assets, run, tmp_path
):
  init = _copy(os.path.join(run, "params"), tmp_path / "init")
  os.remove(os.path.join(init, "params", "_METADATA"))
  tuned = {"init.checkpoint": init, "tokenizer.path": assets["tokenizer"]}
  with pytest.raises(ValueError) as e:
    trainer.train(_config(assets, **tuned), str(tmp_path / "sft"))
  assert str(e.value) == (
      f"checkpoint {init}/params is incomplete: its Orbax index (_METADATA, "
      "manifest.ocdbt) is missing or unreadable, as after a save or copy cut short; "
      "use another checkpoint or write this one again"
  )


@pytest.fixture
def small_disk(tmp_path):
  """A 600 KiB tmpfs (room for one tiny training checkpoint, not two); skipped where mounting is
  not permitted."""
  disk = tmp_path / "disk"
  disk.mkdir()
  mounted = subprocess.run(
      ["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(disk)],
      capture_output=True,
  )
  if mounted.returncode != 0:
    pytest.skip("mounting a tmpfs is not permitted here")
  yield disk
  subprocess.run(["umount", str(disk)], check=True)


def test_a_real_full_disk_is_one_line_and_the_run_resumes(
    assets, run, small_disk
):
  """Orbax's asynchronous save fails in its background threads (each logging a traceback) and
  again at the next save: the script says so once, naming the checkpoint kept.
  """
  work = small_disk / "work"
  args = helpers.train_flags(assets, work)
  line = _one_line_error(helpers.run_train(args), 1)
  assert line == (
      "error: saving a checkpoint failed (No space left on device); last good "
      f"checkpoint: step 4 in {work}/checkpoints; free space and rerun the same command "
      "to resume"
  )
  res = helpers.run_script(
      "convert_checkpoint.py",
      [f"--src={run}", f"--dst={small_disk}/hf", "--to=hf"],
  )
  assert _one_line_error(res, 1) == (
      f"error: writing {small_disk}/hf failed (No space left on device); nothing was "
      f"left there and the source {run} is unchanged"
  )
  assert not [n for n in os.listdir(small_disk) if "hf" in n]
  # with room again the same command resumes from the kept step; the half-written one is gone
  subprocess.run(
      ["mount", "-o", "remount,size=16m", str(small_disk)], check=True
  )
  res = helpers.run_train(args)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "resumed from step 4" in res.stdout
  assert sorted(os.listdir(work / "checkpoints")) == ["12", "16", "8"]
