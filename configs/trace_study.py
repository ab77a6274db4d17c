"""The code-tracing loop study (`scripts/loop_study.py --task=trace`), in presets.

    --config=configs/trace_study.py          cpu: the whole plan (R = 1..4, both controls, serial
                                             R = 2 and 4) on k = 1..5; its cost on 2 idle cores is
                                             estimated in docs/loop_study.md from the quick study
    --config=configs/trace_study.py:quick    the reduced study docs/loop_study.md reports (R1, R2,
                                             R2-serial, R1-L4 on k = 1..3: under 2 hours)
    --config=configs/trace_study.py:accel    a bigger model, longer, for one accelerator
    --config=configs/trace_study.py:test     seconds, for the tests

Any key can be overridden (`--config.train.steps=2000`). The timings behind each preset are in
docs/loop_study.md.
"""

import ml_collections

from loopcoder_jax.train.optim import default_optim_config


def get_config(preset: str = "cpu"):
  c = ml_collections.ConfigDict()
  c.task = "trace"
  c.preset = preset
  # PLTConfig fields of every variant (the study sets loops, layers and plt_cross_loop)
  c.model = ml_collections.ConfigDict(
      dict(
          hidden_size=64,
          intermediate_size=256,
          num_hidden_layers=2,
          num_attention_heads=4,
          num_key_value_heads=4,
          head_dim=16,
          plt_window_size=(
              96,
              0,
          ),  # the whole row: the window is not what limits depth
          rope_theta=10000.0,
      )
  )
  # RuntimeConfig fields: on CPU, unscanned layers and XLA's attention run these small models
  # fastest (measured: docs/loop_study.md)
  c.runtime = ml_collections.ConfigDict(
      dict(scan_layers=False, attention_impl="xla")
  )
  # the lookup curriculum (data/trace.py): `drill_steps` batches of lookup drills of `drill_size`
  # constants among `drill_fill` distractor steps (packed, as many as fit a row) first, then
  # `drill_frac` of every batch
  c.data = ml_collections.ConfigDict(
      dict(
          lines=8,
          max_k=5,
          queries=2,
          seed=0,
          drill_size=3,
          drill_fill=2,
          drill_steps=600,
          drill_frac=0.3,
      )
  )
  # when R = 1 learns the lookup is random: by step 1,000 to 2,500 of 128 rows in the quick
  # studies and their probes; on 2,500 steps every seed did (docs/loop_study.md)
  c.train = ml_collections.ConfigDict(
      dict(steps=2500, batch=128, pool=100_000, save_every=250)
  )
  c.optim = default_optim_config()
  c.optim.warmup_frac = 0.05
  c.optim.weight_decay = 0.1
  c.sweep = ml_collections.ConfigDict(dict(lrs=[2e-3, 4e-3, 8e-3], seed=0))
  c.study = ml_collections.ConfigDict(
      dict(loops=[1, 2, 3, 4], controls=[2, 4], serial=[2, 4], seeds=[0, 1, 2])
  )
  c.eval = ml_collections.ConfigDict(
      dict(val_per_k=128, test_per_k=256, batch=256, diag_rows=64)
  )
  if preset == "cpu":
    pass
  elif preset == "quick":
    # Sized to finish in under 2 hours on the 2-core machine (115 minutes measured), one
    # invocation per variant (--variants) all at once (docs/loop_study.md): 6-line snippets,
    # k = 1..3, so every snippet keeps at least 3 distractor lines; the four variants that
    # answer the study's questions.
    c.data.lines = 6
    c.data.max_k = 3
    c.data.queries = 2
    c.train.steps = 2500
    c.train.batch = 128
    c.train.pool = 20_000
    c.train.save_every = 250
    c.sweep.lrs = [2e-3, 4e-3, 8e-3]
    c.eval.val_per_k = 64
    c.eval.test_per_k = 128
    c.eval.batch = 192  # val (192 rows) and test (384) in batches of one shape: one compile
    c.eval.diag_rows = 32
    c.study.loops = [1, 2]
    c.study.controls = [2]
    c.study.serial = [2]
  elif preset == "accel":
    c.model.hidden_size = 256
    c.model.intermediate_size = 1024
    c.model.num_attention_heads = 8
    c.model.num_key_value_heads = 8
    c.model.head_dim = 32
    c.model.plt_window_size = (96, 0)
    c.data.lines = 16
    c.data.max_k = 12
    c.data.drill_steps = 1000
    c.train.steps = 5000
    c.train.batch = 128
    c.train.pool = 1_000_000
    c.train.save_every = 1000
    c.sweep.lrs = [3e-4, 6e-4, 1.2e-3, 2.4e-3]
    c.study.controls = [2, 3, 4]
    c.study.serial = [2, 3, 4]
    c.eval.val_per_k = 256
    c.eval.test_per_k = 1024
  elif preset == "test":
    # seconds of training; compiles dominate, so one layer and one evaluation shape
    c.model.hidden_size = 32
    c.model.intermediate_size = 64
    c.model.head_dim = 8
    c.model.num_attention_heads = 4
    c.model.num_key_value_heads = 2
    c.model.num_hidden_layers = 1
    c.data.lines = 4
    c.data.max_k = 3
    c.data.drill_size = 2
    c.data.drill_fill = 1
    c.data.drill_steps = 2
    c.train.steps = 6
    c.train.batch = 8
    c.train.pool = 64
    c.train.save_every = 3
    c.sweep.lrs = [1e-3, 3e-3]
    c.study.loops = [2]
    c.study.controls = []
    c.study.serial = [2]
    c.study.seeds = [0, 1]
    c.eval.val_per_k = 4
    c.eval.test_per_k = 4
    c.eval.batch = 12  # val and test are 12 rows each
    c.eval.diag_rows = 4
  else:
    raise ValueError(
        f"unknown preset {preset!r}; expected cpu, quick, accel or test"
    )
  return c
