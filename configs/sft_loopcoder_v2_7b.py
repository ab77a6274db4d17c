"""Supervised fine-tuning of LoopCoder-V2 7B (any loop count) on chat data, on a TPU pod.

    python scripts/train.py --config=configs/sft_loopcoder_v2_7b.py \\
        --config.init.checkpoint=/ckpt/LoopCoder-V2 \\
        --config.data.source='/data/chat/*.jsonl' \\
        --config.data.eval_source=/data/chat_heldout.jsonl --workdir=/runs/sft

`init.checkpoint` is an HF directory (or a params directory / finished workdir): the model,
loop count included, and the tokenizer with its chat template come from it; the optimizer starts
fresh. Data are jsonl conversations (data/chat.py), validated in full before the first step (every
conversation is parsed and rendered once per process); the loss covers assistant tokens only.
The paper fine-tunes every loop count with one recipe but does not publish it: the values below
(Adam with the pretraining betas, 2e-5 peak, 3% warmup, cosine, 128 rows of 4096 tokens) are
common choices for a 7B model, to tune for the data at hand. Mesh and runtime as in pretraining
(configs/loopcoder_v2_7b.py): FSDP over the slice, bf16 compute on fp32 master weights.
"""

import ml_collections

from loopcoder_jax.train.config import base_config


def get_config():
  c = base_config()
  c.name = "sft_loopcoder_v2_7b"
  c.model.preset = ""  # the checkpoint's model
  c.model.loops = ml_collections.FieldReference(None, field_type=int)
  c.model.runtime.update(
      dtype="bfloat16",
      param_dtype="float32",
      remat_policy="full",
      attention_impl="pallas",
  )
  c.data.format = "chat"
  c.data.source = ""  # required: jsonl files or globs
  c.data.seq_len = 4096
  c.data.add_bos = (
      True  # kept once when the chat template already starts with <s>
  )
  c.data.read_threads = 16
  c.data.pack_bins = 256
  c.train.global_batch_size = 128
  c.train.total_steps = 20000
  c.train.log_every = 10
  c.optim.peak_lr = 2e-5
  c.optim.warmup_frac = 0.03
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  c.checkpoint.every_steps = 500
  c.checkpoint.keep = 3
  c.eval.max_tokens = 262144
  c.eval.batch_size = 64
  c.eval.prompt = (
      "Write a Python function that checks whether a string is a palindrome."
  )
  c.eval.completion_tokens = 128
  return c
