"""LoopCoder-v2 7B with R loops: `--config=configs/loopcoder_v2_7b.py:R` (R = 1..4; without `:R`,
the preset's R = 2, or the loop count of a `--config.model.preset=config.json`).

The paper's recipe (spec section 6): Adam 0.9/0.95/1e-15, weight decay 0.1, clip 1.0, peak lr 4e-4,
5% linear warmup then cosine; bf16 compute (fp32 master weights and optimizer state) and activation
checkpointing. The paper reports neither batch size nor sequence length: 4M-token batches of 4096
are used here. Give the released tokenizer (`--config.tokenizer.path=.../tokenizer.model`) and a
real corpus (`--config.data.source=...`); docs/scaling.md lists the TPU slices each R fits on.
"""

from loopcoder_jax.model.config import PLTConfig
from loopcoder_jax.train.config import base_config


def get_config(loops: str = ""):
  c = base_config()
  c.model.preset = "loopcoder_v2_7b"
  if loops:
    r = int(loops)
    if not 1 <= r <= 4:
      raise ValueError(
          f"loopcoder_v2_7b: the paper's family is R = 1..4, got {r}"
      )
    c.model.loops = r
  r = c.model.loops or PLTConfig.loopcoder_v2_7b().plt_num_loops
  c.name = f"loopcoder_v2_7b_r{r}"
  c.model.runtime.update(
      dtype="bfloat16",
      param_dtype="float32",
      remat_policy="full",
      attention_impl="pallas",
  )
  c.tokenizer.vocab_size = 76800
  c.data.seq_len = 4096
  c.data.add_bos = True  # the released SentencePiece tokenizer prepends <s>
  c.data.read_threads = 16
  c.train.global_batch_size = 1024
  c.train.total_steps = 500000
  c.train.log_every = 10
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  c.checkpoint.every_steps = 1000
  c.checkpoint.keep = 3
  c.eval.max_tokens = 1048576
  c.eval.batch_size = 64
  c.eval.completion_tokens = 64
  return c
