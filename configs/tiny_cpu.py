"""The default: a tiny R=2 PLT coder trained on the stdlib corpus on CPU in a few minutes."""

from loopcoder_jax.train.config import base_config


def get_config():
  c = base_config()
  c.name = "tiny_cpu"
  c.model.preset = (
      "tiny"  # R = 2, the preset's; --config.model.loops=R for another
  )
  c.model.overrides = dict(
      vocab_size=2048,
      hidden_size=128,
      intermediate_size=384,
      num_hidden_layers=4,
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=32,
      plt_window_size=(64, 0),
      max_position_embeddings=1024,
  )
  c.model.runtime.attention_impl = (
      "reference"  # as fast as "xla" on CPU, and our own code
  )
  c.tokenizer.vocab_size = 2048
  c.data.seq_len = 128
  c.train.global_batch_size = 16
  c.train.total_steps = 500
  c.train.log_every = 25
  c.optim.peak_lr = (
      3e-3  # a small model takes a larger rate than the 7B recipe's 4e-4
  )
  c.checkpoint.every_steps = 100
  c.eval.max_tokens = 8192
  c.eval.batch_size = 16
  return c
