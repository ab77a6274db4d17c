"""Optimizer recipe and schedule shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopcoder_jax.train import optim
from tests import helpers

# optax's schedules and updates: a handful of float32 operations per value
OPS = 8


def test_schedule_warmup_then_cosine_to_floor():
  # defaults: peak 4e-4, 5% warmup, floor 10%
  sched = optim.make_schedule({}, 1000)
  lr = np.array([float(sched(s)) for s in range(0, 1001)])
  assert lr[0] == 0.0
  # linear warmup (steps measured against the peak, the values' scale)
  helpers.assert_close(
      np.diff(lr[:51]), np.full(50, 4e-4 / 50), ops=OPS, scale=4e-4
  )
  # the cosine decays strictly: even the flattest steps (~1e-9) are far above
  # rounding (~5e-11)
  assert np.all(np.diff(lr[50:]) < 0)
  # peak, half-way down the cosine (0.1 + 0.9 / 2) and the floor
  helpers.assert_close(
      lr[[50, 525, 1000]], np.array([1.0, 0.55, 0.1]) * 4e-4, ops=OPS
  )


def test_decay_mask_only_matrices():
  params = {
      "layers": {
          "input_layernorm": {"scale": jnp.ones(2)},
          "self_attn": {
              "plt_gate": {"bias": jnp.ones(2), "kernel": jnp.ones((2, 2))}
          },
      },
      "embed_tokens": {"embedding": jnp.ones((3, 2))},
  }
  mask = optim.decay_mask(params)
  assert mask["layers"]["input_layernorm"]["scale"] is False
  assert mask["layers"]["self_attn"]["plt_gate"]["bias"] is False
  assert mask["layers"]["self_attn"]["plt_gate"]["kernel"] is True
  assert mask["embed_tokens"]["embedding"] is True


def test_clipped_adamw_update_matches_formula():
  # constant lr 4e-4
  tx, sched = optim.make_optimizer({"warmup_frac": 0.0, "end_lr_frac": 1.0}, 10)
  params = {
      "w": {"kernel": jnp.full((2,), 2.0)},
      "n": {"scale": jnp.full((2,), 2.0)},
  }
  # global norm 50
  grads = {
      "w": {"kernel": jnp.array([30.0, 40.0])},
      "n": {"scale": jnp.zeros(2)},
  }
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  # clip to norm 1 -> g = [0.6, 0.8]; first Adam step is sign(g) (bias-corrected, eps 1e-15); wd 0.1 on kernel
  helpers.assert_close(
      updates["w"]["kernel"], -4e-4 * (np.ones(2) + 0.1 * 2.0), ops=OPS
  )
  # zero gradient, no decay on norm scales: 0 / (0 + eps)
  np.testing.assert_array_equal(updates["n"]["scale"], 0.0)
  helpers.assert_close(sched(7), 4e-4, ops=OPS)


def test_bad_optim_config_fails():
  with pytest.raises(ValueError, match="unknown keys"):
    optim.make_optimizer({"lr": 1.0}, 10)
  with pytest.raises(ValueError, match="peak_lr"):
    optim.make_optimizer({"peak_lr": 0.0}, 10)
  with pytest.raises(ValueError, match="total_steps"):
    optim.make_optimizer({}, 0)
