"""Upcycling an R = 1 model to R >= 2: the gate rule and what it promises about the logits."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopcoder_jax import interop
from loopcoder_jax.checkpoints import formats, hf_io, hf_names
from loopcoder_jax.interop import convert, upcycling
from loopcoder_jax.model.config import PLTConfig
from loopcoder_jax.model.transformer import PLTForCausalLM, init_params
from tests.helpers import ROOT, SCRIPTS

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 12)))


@pytest.fixture(scope="module")
def source():
  cfg = PLTConfig.tiny(loops=1)
  params = init_params(cfg, jax.random.key(0))
  logits = PLTForCausalLM(cfg).apply({"params": params}, TOKENS)
  return cfg, params, np.asarray(logits)


def run(cfg, params):
  logits, aux = PLTForCausalLM(cfg).apply(
      {"params": params}, TOKENS, return_intermediates=True
  )
  lens = PLTForCausalLM(cfg).apply(
      {"params": params}, aux["hidden"][0], method=PLTForCausalLM.logits
  )
  return np.asarray(logits), np.asarray(lens), np.asarray(aux["gates"])


@pytest.mark.parametrize("loops", [2, 3])
@pytest.mark.parametrize("hidden", [True, False])
def test_gates_start_at_the_bias_and_loop_one_is_the_source(
    source, loops, hidden
):
  cfg, params, want = source
  cfg = cfg.replace(plt_gate_use_hidden_states=hidden)
  new_cfg, new = interop.upcycle(cfg, params, loops)
  assert new_cfg.plt_num_loops == loops
  logits, lens, gates = run(new_cfg, new)
  g0 = 1 / (1 + np.exp(-upcycling.DEFAULT_GATE_BIAS))
  # zero weights: every token, head, layer and loop gets sigmoid(bias)
  np.testing.assert_allclose(gates, g0, rtol=1e-6)
  np.testing.assert_array_equal(lens, want)  # loop 1 is untouched
  assert np.abs(logits - want).max() > 0  # loops >= 2 do change the output
  flat = hf_names.flatten(new)
  for p, v in hf_names.flatten(
      params
  ).items():  # the shared layers as they were
    assert flat[p] is v


def test_saturated_gate_without_clp_reproduces_the_source(source):
  """The rule's limit: g0 = 1 and hidden scale 0 make every loop >= 2 recompute loop 1."""
  cfg, params, want = source
  cfg = cfg.replace(plt_hidden_scale=0.0)
  new_cfg, new = upcycling.upcycle(cfg, params, 3, gate_bias=20.0)
  logits, _, gates = run(new_cfg, new)
  assert (gates == 1.0).all()
  # the same float32 operations on the same inputs: equal up to reassociation in the fused passes
  assert np.abs(logits - want).max() <= 1e-6 * np.abs(want).max()


@pytest.mark.parametrize(
    "have, loops, bias, match",
    [
        (1, 0, None, "loops must be an integer >= 1"),
        (1, 2, float("inf"), "gate_bias must be a finite number"),
        (2, 3, 1.0, "gate_bias applies only when upcycling"),
        (2, 1, None, "loops=1 would drop the gates"),
    ],
)
def test_bad_loop_settings(have, loops, bias, match):
  cfg = PLTConfig.tiny(loops=have)
  with pytest.raises(ValueError, match=match):
    upcycling.plan_loops(cfg, loops, bias)


def test_r2_to_r3_only_changes_the_count():
  cfg = PLTConfig.tiny(loops=2)
  params = init_params(cfg, jax.random.key(1))
  new_cfg, new = upcycling.upcycle(cfg, params, 3)
  assert new_cfg.plt_num_loops == 3 and new is params


def test_converter_upcycles_both_ways(source, tmp_path):
  """HF -> Orbax in memory and Orbax -> HF streamed give the same R = 2 model (the CLI's flags)."""
  cfg, params, _ = source
  convert.save_hf(cfg, params, tmp_path / "r1")
  convert.convert_checkpoint(
      str(tmp_path / "r1"), str(tmp_path / "o1"), "orbax"
  )
  cli = subprocess.run(
      [
          sys.executable,
          os.path.join(SCRIPTS, "convert_checkpoint.py"),
          f"--src={tmp_path / 'o1'}",
          f"--dst={tmp_path / 'r2'}",
          "--to=hf",
          "--loops=2",
          "--gate_bias=3",
      ],
      capture_output=True,
      text=True,
      env={
          **os.environ,
          "PYTHONPATH": os.pathsep.join(
              [ROOT, os.environ.get("PYTHONPATH", "")]
          ),
      },
  )
  assert cli.returncode == 0, cli.stderr
  convert.convert_checkpoint(
      str(tmp_path / "r1"),
      str(tmp_path / "o2"),
      "orbax",
      loops=2,
      gate_bias=3.0,
  )
  want = upcycling.upcycle(cfg, params, 2, gate_bias=3.0)[1]
  for out in (
      hf_io.load_hf(tmp_path / "r2"),
      formats.load_orbax(str(tmp_path / "o2")),
  ):
    assert out[0].plt_num_loops == 2
    got = hf_names.flatten(out[1])
    for k, v in hf_names.flatten(want).items():
      np.testing.assert_array_equal(
          np.asarray(got[k]), np.asarray(v), err_msg=k
      )
  config = json.load(open(tmp_path / "r2" / "config.json"))
  assert config["model_type"] == "iquestpltcoder" and "auto_map" in config
  bad = subprocess.run(
      [
          sys.executable,
          os.path.join(SCRIPTS, "convert_checkpoint.py"),
          f"--src={tmp_path / 'r2'}",
          f"--dst={tmp_path / 'x'}",
          "--to=orbax",
          "--gate_bias=1",
          "--loops=3",
      ],
      capture_output=True,
      text=True,
  )
  assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
      "error: gate_bias applies only when upcycling"
  )
  assert not (tmp_path / "x").exists()
