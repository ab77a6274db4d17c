"""LoRA on LoopCoder-V2 7B (any loop count) with chat data, on one TPU chip (or a slice).

    python scripts/train.py --config=configs/lora_loopcoder_v2_7b.py \\
        --config.init.checkpoint=/ckpt/LoopCoder-V2 \\
        --config.data.source='/data/chat/*.jsonl' \\
        --config.data.eval_source=/data/chat_heldout.jsonl --workdir=/runs/lora

The base (an HF directory, a params directory or a finished workdir) is frozen in bf16 and never
differentiated: only the rank-16 adapters on every projection (about 40M float32 parameters for
R = 2: docs/training.md) have gradients and Adam moments. `--config.lora.per_loop=True` gives each
loop its own adapters. The checkpoints hold the adapters and their optimizer state (hundreds of
MB, not the 14 GB base) and the base's path and content hash. Memory for one chip: docs/training.md
("LoRA"). Values are common LoRA choices (alpha = 2 x rank, 2e-4 peak, cosine), to tune.
"""

import ml_collections

from loopcoder_jax.train.config import base_config


def get_config():
  c = base_config()
  c.name = "lora_loopcoder_v2_7b"
  c.model.preset = ""  # the checkpoint's model
  c.model.loops = ml_collections.FieldReference(None, field_type=int)
  c.model.runtime.update(
      dtype="bfloat16",
      param_dtype="bfloat16",  # the frozen base; adapters stay float32
      remat_policy="full",
      attention_impl="pallas",
      loss_chunk=512,  # no [2048, 76800] float32 logits at once (630 MB)
  )
  c.lora.enabled = True
  c.lora.rank = 16
  c.lora.alpha = 32.0
  c.lora.dropout = 0.05
  c.data.format = "chat"
  c.data.source = ""  # required: jsonl files or globs
  c.data.seq_len = 2048
  c.data.add_bos = True
  c.data.read_threads = 16
  c.data.pack_bins = 256
  c.train.global_batch_size = 16
  c.train.grad_accum = 16  # one 2048-token row per micro-step on one chip
  c.train.total_steps = 2000
  c.train.log_every = 10
  c.optim.peak_lr = 2e-4
  c.optim.warmup_frac = 0.03
  c.optim.weight_decay = 0.0
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.checkpoint.every_steps = 200
  c.checkpoint.keep = 3
  c.eval.max_tokens = 65536
  c.eval.batch_size = 8
  c.eval.prompt = (
      "Write a Python function that checks whether a string is a palindrome."
  )
  c.eval.completion_tokens = 128
  return c
