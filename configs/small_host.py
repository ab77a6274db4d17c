"""A ~210M-parameter R=2 PLT coder for one GPU or TPU host (bf16 compute, fp32 master weights).

Run: python scripts/train.py --config=configs/small_host.py --config.data.source=GLOB --workdir=DIR
(the stdlib corpus is the default source: enough for a smoke run, far too little for this model).
"""

from loopcoder_jax.train.config import base_config


def get_config():
  c = base_config()
  c.name = "small_host"
  # the tiny preset's field defaults, fully overridden below (R = 2, the preset's)
  c.model.preset = "tiny"
  c.model.overrides = dict(
      vocab_size=16384,
      hidden_size=1024,
      intermediate_size=2816,
      num_hidden_layers=16,
      num_attention_heads=16,
      num_key_value_heads=4,
      head_dim=64,
      plt_window_size=(64, 0),
      max_position_embeddings=4096,
      rope_theta=500000.0,
      torch_dtype="bfloat16",
  )
  c.model.runtime.update(
      dtype="bfloat16",
      param_dtype="float32",
      remat_policy="dots",
      attention_impl="xla",
  )
  c.tokenizer.vocab_size = 16384
  c.data.seq_len = 2048
  c.data.read_threads = 8
  c.train.global_batch_size = 32
  c.train.total_steps = 20000
  c.train.log_every = 50
  c.optim.peak_lr = 1e-3
  c.mesh.data = 1
  c.mesh.fsdp = -1  # FSDP over the host's chips
  c.checkpoint.every_steps = 1000
  c.eval.max_tokens = 262144
  c.eval.batch_size = 32
  c.eval.completion_tokens = 64
  return c
