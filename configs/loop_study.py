"""The loop study's training run (scripts/loop_study.py): tiny_cpu with 2 layers, short.

The study sets the loop count, the layer count (its R = 1 control) and the seed per run. Sized so
that the default study (R = 1..4 and the control, 2 seeds: 10 runs) finishes well within two hours
on a 2-core CPU: measured, an hour of wall time on a 2-core machine shared with other jobs, 24
minutes of process CPU time (docs/loop_study.md).
"""

import os

from loopcoder_jax.train.config import load_config


def get_config():
  c = load_config(os.path.join(os.path.dirname(__file__), "tiny_cpu.py"))
  c.name = "loop_study"
  c.model.overrides.num_hidden_layers = 2
  c.model.overrides.plt_window_size = (32, 0)
  c.train.total_steps = 200
  c.checkpoint.every_steps = 50
  c.checkpoint.keep = 1
  c.eval.max_tokens = 16384
  c.eval.completion_tokens = 0
  c.metrics.tensorboard = False
  c.metrics.progress_bar = False
  c.metrics.peak_flops = -1.0  # no MFU: the study counts FLOPs itself
  return c
