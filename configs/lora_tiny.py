"""LoRA on the README's main job with the built-in demonstration chats, on CPU in a few minutes.

    python scripts/train.py                                # the main job: <tmp>/loopcoder_runs/tiny_cpu
    python scripts/train.py --config=configs/lora_tiny.py  # -> <tmp>/loopcoder_runs/lora_tiny
    python scripts/generate.py --checkpoint=<tmp>/loopcoder_runs/lora_tiny --chat --prompt=...

Like configs/sft_tiny.py, but the main job's weights stay frozen: the run trains rank-8 adapters on
every projection of the shared layers (`config.lora`; `--config.lora.per_loop=True` gives each loop
its own), and its checkpoints and export hold only the adapters plus the base's path and content
hash. The base must stay where it is, unchanged: a LoRA workdir whose base moved or changed is
refused. Every tool that loads checkpoints loads this workdir (base + adapters).
"""

import os
import tempfile

import ml_collections

from loopcoder_jax.train.config import base_config


def get_config():
  c = base_config()
  c.name = "lora_tiny"
  c.init.checkpoint = os.path.join(
      tempfile.gettempdir(), "loopcoder_runs", "tiny_cpu"
  )
  c.model.preset = ""  # the checkpoint's model
  c.model.loops = ml_collections.FieldReference(None, field_type=int)
  c.model.runtime.attention_impl = "reference"
  c.lora.enabled = True
  c.lora.rank = 8
  c.lora.alpha = 16.0
  c.data.format = "chat"
  c.data.source = "demos"
  c.data.seq_len = 256
  c.train.global_batch_size = 16
  c.train.total_steps = 200
  c.train.log_every = 25
  c.optim.peak_lr = 3e-3  # adapters take a larger rate than full fine-tuning
  c.checkpoint.every_steps = 100
  c.eval.max_tokens = 16384
  c.eval.batch_size = 16
  c.eval.prompt = (
      "Complete this Python function:\n\n"
      'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'
  )
  c.eval.completion_tokens = 64
  return c
