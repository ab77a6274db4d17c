"""The training config: one rule for the loop count R, and `validate` for any device layout."""

import os

from absl import flags
from ml_collections import config_flags
import pytest

from loopcoder_jax.model.config import PLTConfig
from loopcoder_jax.train import config as train_config
from tests.helpers import ROOT, TINY

CONFIGS = os.path.join(ROOT, "configs")


def _config(**extra):
  """base_config() on the tiny test model, with dotted-key overrides."""
  c = train_config.base_config()
  c.model.overrides = dict(TINY)
  c.tokenizer.vocab_size = TINY["vocab_size"]
  c.data.seq_len = 32
  for k, v in extra.items():
    node = c
    *path, leaf = k.split(".")
    for p in path:
      node = node[p]
    node[leaf] = v
  return c


@pytest.fixture
def r3_file(tmp_path):
  """An HF config.json with plt_num_loops = 3."""
  path = tmp_path / "config.json"
  PLTConfig.tiny(loops=3, **TINY).to_hf_file(path)
  return str(path)


# ------------------------------------------------------------------------------------- loops
def test_loops_default_to_the_presets():
  c = train_config.base_config()
  assert c.model.loops is None
  assert train_config.model_config_from(c).plt_num_loops == 2
  c.model.preset = "loopcoder_v2_7b"
  assert train_config.model_config_from(c).plt_num_loops == 2


def test_a_config_files_loop_count_stands(r3_file):
  for c in (
      _config(),
      train_config.load_config(os.path.join(CONFIGS, "tiny_cpu.py")),
  ):
    c.model.preset = r3_file
    assert train_config.model_config_from(c).plt_num_loops == 3


def test_the_user_sets_the_loop_count_in_one_place(r3_file):
  for preset in ("tiny", "loopcoder_v2_7b", r3_file):
    c = _config(**{"model.preset": preset, "model.loops": 4})
    assert train_config.model_config_from(c).plt_num_loops == 4
    c = _config(**{"model.preset": preset})
    c.model.overrides = {**c.model.overrides, "plt_num_loops": 1}
    assert train_config.model_config_from(c).plt_num_loops == 1


def test_the_loop_count_set_twice_is_an_error():
  c = _config(**{"model.loops": 3})
  c.model.overrides = {**c.model.overrides, "plt_num_loops": 2}
  with pytest.raises(
      ValueError,
      match=r"loop count is set twice: model.loops=3 and "
      r"model.overrides.plt_num_loops=2; set one",
  ):
    train_config.model_config_from(c)


@pytest.mark.parametrize("loops", [0, -1])
def test_loops_below_one_are_errors(loops):
  with pytest.raises(
      ValueError, match=f"model.loops must be an integer >= 1.*got {loops}"
  ):
    train_config.validate(_config(**{"model.loops": loops}))
  c = _config()
  c.model.overrides = {**c.model.overrides, "plt_num_loops": loops}
  with pytest.raises(ValueError, match="plt_num_loops"):
    train_config.validate(c)


def test_loops_from_the_command_line(tmp_path, r3_file):
  """The unset default still takes an integer override from the command line (and only one)."""

  def parse(*args):
    argv, fv = ["prog", *args], flags.FlagValues()
    # as scripts/train.py defines it (overrides are read at definition)
    config_flags.DEFINE_config_file(
        "config",
        os.path.join(CONFIGS, "tiny_cpu.py"),
        flag_values=fv,
        lock_config=True,
        sys_argv=argv,
    )
    fv(argv)
    return fv.config

  c = parse(f"--config.model.preset={r3_file}")
  assert c.model.loops is None
  assert train_config.model_config_from(c).plt_num_loops == 3
  c = parse(f"--config.model.preset={r3_file}", "--config.model.loops=2")
  assert train_config.model_config_from(c).plt_num_loops == 2
  with pytest.raises(flags.IllegalFlagValueError, match="loops"):
    parse("--config.model.loops=two")


@pytest.mark.parametrize(
    "spec, loops",
    [
        ("tiny_cpu.py", 2),
        ("small_host.py", 2),
        ("loopcoder_v2_7b.py", 2),
        ("loopcoder_v2_7b.py:3", 3),
    ],
)
def test_shipped_configs(spec, loops, r3_file):
  c = train_config.load_config(os.path.join(CONFIGS, spec))
  assert train_config.model_config_from(c).plt_num_loops == loops
  c.model.preset = r3_file
  # only an explicit `:R` wins over the file
  want = loops if ":" in spec else 3
  assert train_config.model_config_from(c).plt_num_loops == want


# ------------------------------------------------------------------------------------- validate
@pytest.mark.parametrize(
    "extra, match",
    [
        (
            {"data.seq_len": 128},
            "data.seq_len 128 exceeds the model's max_position_embeddings 64",
        ),
        ({"data.seq_len": 1}, "data.seq_len must be >= 2"),
        ({"mesh.data": 3}, "does not divide the 8 devices"),
        ({"train.global_batch_size": 4}, "must be a multiple of grad_accum"),
        (
            {"tokenizer.path": "/nonexistent/tok"},
            "tokenizer.path /nonexistent/tok does not exist",
        ),
        ({"tokenizer.vocab_size": 1000}, "tokenizer.vocab_size 1000 is larger"),
        ({"model.preset": "gpt5"}, "model.preset 'gpt5'"),
        ({"model.overrides.num_key_value_heads": 3}, "num_key_value_heads"),
        ({"model.overrides.depth": 3}, r"unknown PLTConfig fields \['depth'\]"),
        ({"model.runtime.colour": 1}, "unknown RuntimeConfig fields"),
        ({"model.runtime.quantize": "int8"}, "int8 weights are frozen"),
        ({"optim.peak_lr": -1.0}, "optim.peak_lr"),
        ({"train.total_steps": 0}, "train.total_steps"),
        ({"checkpoint.keep": 0}, "checkpoint.keep"),
        ({"eval.batch_size": 3}, "eval.batch_size 3 must be a positive"),
    ],
)
def test_bad_values_fail_in_one_line(extra, match):
  c = _config(**extra)
  with pytest.raises(ValueError, match=match) as e:
    train_config.validate(c, num_devices=8, process_count=1)
  assert "\n" not in str(e.value)


def test_good_config_returns_the_model_config():
  cfg = train_config.validate(_config(), num_devices=8, process_count=1)
  assert cfg == PLTConfig.tiny(**TINY)


def test_validate_for_another_topology():
  """A compile-only topology brings its own devices, hosts and slices."""
  c = _config(**{"train.global_batch_size": 8, "eval.batch_size": 16})
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  train_config.validate(c, num_devices=8, process_count=1)
  with pytest.raises(
      ValueError,
      match=r"data_shards 16 must be a multiple of the 16 processes and divide "
      r"train.global_batch_size 8",
  ):
    train_config.validate(c, num_devices=8, process_count=16)
  # One slice of 8: {1, 2, 4}, 2 batch shards. Two slices of 4: {1, 2, 2} each, the data axis
  # across them: {2, 2, 2}, 4 batch shards.
  c = _config(**{"train.global_batch_size": 6, "eval.batch_size": 4})
  c.mesh = dict(data=1, fsdp=2, tensor=-1)
  train_config.validate(c, num_devices=8, process_count=1)
  with pytest.raises(
      ValueError,
      match=r"global_batch_size 6 must be a multiple of grad_accum \(1\) x the 4 batch "
      r"shards of mesh \{'data': 2, 'fsdp': 2, 'tensor': 2\}",
  ):
    train_config.validate(c, num_devices=8, process_count=2, num_slices=2)
  with pytest.raises(ValueError, match="do not split into 3 equal slices"):
    train_config.validate(c, num_devices=8, process_count=1, num_slices=3)
