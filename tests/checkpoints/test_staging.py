"""Staged directories: a checkpoint appears whole under its name or not at all."""

import os

import pytest

from loopcoder_jax.checkpoints import staging


def _checkpoint_in(path, text):
  """A minimal HF directory (config.json + weights), enough for `check_dst` to call it one."""
  os.makedirs(path, exist_ok=True)
  for name in ("config.json", "model.safetensors"):
    with open(os.path.join(path, name), "w") as f:
      f.write(text)


def test_success_renames_into_place_and_leaves_no_sibling(tmp_path):
  with staging.staged_dir(tmp_path / "out", overwrite=False) as tmp:
    assert (
        os.path.dirname(tmp) == str(tmp_path)
        and not (tmp_path / "out").exists()
    )
    _checkpoint_in(tmp, "new")
  assert (tmp_path / "out" / "config.json").read_text() == "new"
  assert os.listdir(tmp_path) == ["out"]


def test_failure_keeps_the_old_directory_whole(tmp_path):
  _checkpoint_in(tmp_path / "out", "old")
  with pytest.raises(OSError, match="disk full"):
    with staging.staged_dir(tmp_path / "out", overwrite=True) as tmp:
      _checkpoint_in(tmp, "half")
      raise OSError("disk full")
  assert (tmp_path / "out" / "config.json").read_text() == "old"
  assert os.listdir(tmp_path) == ["out"]


def test_overwrite_replaces_a_checkpoint(tmp_path):
  _checkpoint_in(tmp_path / "out", "old")
  with staging.staged_dir(tmp_path / "out", overwrite=True) as tmp:
    _checkpoint_in(tmp, "new")
  assert (tmp_path / "out" / "config.json").read_text() == "new"
  assert os.listdir(tmp_path) == ["out"]


def test_a_symlinked_destination_is_followed(tmp_path):
  (tmp_path / "real").mkdir()
  os.symlink(tmp_path / "real", tmp_path / "link")
  with staging.staged_dir(tmp_path / "link", overwrite=True) as tmp:
    _checkpoint_in(tmp, "new")
  assert os.path.islink(tmp_path / "link")
  assert (tmp_path / "real" / "config.json").read_text() == "new"


@pytest.mark.parametrize(
    "make, overwrite, match",
    [
        (lambda p: p.write_text("x"), True, "exists and is not a directory"),
        (
            lambda p: (p.mkdir(), (p / "a.txt").write_text("x")),
            False,
            "is not empty; pass overwrite=True",
        ),
        (
            lambda p: (p.mkdir(), (p / "notes.txt").write_text("x")),
            True,
            "holds notes.txt, not a checkpoint",
        ),
    ],
)
def test_destinations_that_are_refused(tmp_path, make, overwrite, match):
  make(tmp_path / "out")
  with pytest.raises(ValueError, match=match):
    staging.check_dst(str(tmp_path / "out"), overwrite)
  with pytest.raises(ValueError, match=match):
    with staging.staged_dir(tmp_path / "out", overwrite):
      pass
  assert os.listdir(tmp_path) == ["out"]
