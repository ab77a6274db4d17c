"""Fine-tune the README's main job on the built-in demonstration chats, on CPU in a few minutes.

    python scripts/train.py                               # the main job: <tmp>/loopcoder_runs/tiny_cpu
    python scripts/train.py --config=configs/sft_tiny.py  # -> <tmp>/loopcoder_runs/sft_tiny

Starts from the main job's workdir (another start: `--config.init.checkpoint=DIR`, an HF directory,
a params directory or a finished workdir); the model and tokenizer come from it, the optimizer
starts fresh. The data are the built-in demonstrations (complete a stdlib function from its
signature and docstring; data/demos.py) rendered with the default chat template; the run prints
the held-out assistant-token loss before and after, and a greedy chat completion of `eval.prompt`.
"""

import os
import tempfile

import ml_collections

from loopcoder_jax.train.config import base_config


def get_config():
  c = base_config()
  c.name = "sft_tiny"
  c.init.checkpoint = os.path.join(
      tempfile.gettempdir(), "loopcoder_runs", "tiny_cpu"
  )
  c.model.preset = ""  # the checkpoint's model
  c.model.loops = ml_collections.FieldReference(None, field_type=int)
  c.model.runtime.attention_impl = "reference"
  c.data.format = "chat"
  c.data.source = "demos"
  c.data.seq_len = 256
  c.train.global_batch_size = 16
  c.train.total_steps = 200
  c.train.log_every = 25
  c.optim.peak_lr = 1e-3
  c.checkpoint.every_steps = 100
  c.eval.max_tokens = 16384
  c.eval.batch_size = 16
  c.eval.prompt = (
      "Complete this Python function:\n\n"
      'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'
  )
  c.eval.completion_tokens = 64
  return c
