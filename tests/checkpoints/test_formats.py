"""What a checkpoint path holds: `resolve_source` for each layout we write or read, and the
errors for a path that holds none; side files copied only from inside the source.
"""

import json
import os

import pytest

from loopcoder_jax.checkpoints import formats


def _params_dir(path):
  os.makedirs(os.path.join(path, "params"))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({}, f)


def _step_dir(path):
  os.makedirs(os.path.join(path, "state"))
  os.makedirs(os.path.join(path, "meta"))
  with open(os.path.join(path, "meta", "metadata"), "w") as f:
    json.dump({}, f)


def test_each_layout(tmp_path):
  hf = tmp_path / "hf"
  hf.mkdir()
  (hf / "config.json").write_text("{}")
  assert formats.resolve_source(str(hf)) == (str(hf), "hf", (str(hf),))
  _params_dir(tmp_path / "p")
  p = str(tmp_path / "p")
  assert formats.resolve_source(p) == (p, "orbax", (p,))
  work = tmp_path / "work"
  _params_dir(work / "params")
  assert formats.resolve_source(str(work)) == (
      str(work / "params"),
      "orbax",
      (str(work / "params"), str(work / "tokenizer")),
  )
  step = work / "checkpoints" / "4"
  _step_dir(step)
  assert formats.resolve_source(str(step)) == (
      str(step),
      "orbax",
      (str(work / "tokenizer"),),
  )
  assert formats.detect_format(str(hf)) == "hf"


def test_unfinished_workdir_names_a_step(tmp_path):
  _step_dir(tmp_path / "checkpoints" / "8")
  (tmp_path / "checkpoints" / "12").mkdir()
  with pytest.raises(
      ValueError, match=r"without a final params/ export.*checkpoints/12"
  ):
    formats.resolve_source(str(tmp_path))
  os.rmdir(tmp_path / "checkpoints" / "12")
  fresh = tmp_path / "fresh"
  (fresh / "checkpoints").mkdir(parents=True)
  with pytest.raises(ValueError, match="holds no checkpoint step yet"):
    formats.resolve_source(str(fresh))


def test_not_a_checkpoint(tmp_path):
  with pytest.raises(
      ValueError, match="is not a checkpoint: expected a params directory"
  ):
    formats.resolve_source(str(tmp_path))


def test_side_files_stay_inside_the_source(tmp_path):
  src, outside = tmp_path / "src", tmp_path / "secret.json"
  src.mkdir()
  outside.write_text("{}")
  (src / "tokenizer.json").write_text("{}")
  (src / "chat.jinja").write_text("x")
  assert formats.side_files(str(src)) == ["tokenizer.json", "chat.jinja"]
  dst = tmp_path / "dst"
  dst.mkdir()
  assert formats.copy_side_files(str(src), str(dst)) == [
      "tokenizer.json",
      "chat.jinja",
  ]
  assert sorted(os.listdir(dst)) == ["chat.jinja", "tokenizer.json"]
  os.symlink(outside, src / "tokenizer_config.json")
  with pytest.raises(ValueError, match="is a symlink to .*outside the source"):
    formats.side_files(str(src))
