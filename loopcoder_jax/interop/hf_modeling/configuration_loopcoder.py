"""Config class of the exported LoopCoder-V2 / PLT checkpoints (`IQuestPLTCoderForCausalLM`).

Self-contained (only transformers), copied next to config.json and loaded through `auto_map` with
`trust_remote_code=True`. Field names are the keys of the released config.json.
"""

from transformers import PreTrainedConfig


class IQuestPLTCoderConfig(PreTrainedConfig):
  model_type = "iquestpltcoder"

  vocab_size: int = 76800
  hidden_size: int = 5120
  intermediate_size: int = 27648
  num_hidden_layers: int = 14
  num_attention_heads: int = 40
  num_key_value_heads: int = 8
  head_dim: int | None = 128
  hidden_act: str = "silu"
  rms_norm_eps: float = 1e-5
  rope_parameters: dict | None = (
      None  # transformers folds rope_theta / rope_scaling in here
  )
  max_position_embeddings: int = 131072
  initializer_range: float = 0.02
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  pad_token_id: int | None = None
  bos_token_id: int | None = 1
  eos_token_id: int | list[int] | None = 2
  # Parallel Loop Transformer: R loops over the same layers, cross-loop parallelism input, G-SWA.
  plt_num_loops: int = 2
  # local branch: query t sees keys t-left..t
  plt_window_size: list[int] | tuple[int, ...] = (
      64,
      0,
  )
  plt_normalize_per_loop: bool = True
  plt_emb_scale: int | float | None = None  # null = 1.0
  plt_hidden_scale: int | float | None = None  # null = 1.0
  plt_gate_use_hidden_states: bool = (
      True  # False: gate from the post-RoPE query (IQuest-V1-Loop)
  )

  def __post_init__(self, **kwargs):
    if self.head_dim is None:
      self.head_dim = self.hidden_size // self.num_attention_heads
    self.plt_window_size = list(self.plt_window_size)
    super().__post_init__(**kwargs)

  def validate_architecture(self):
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"num_attention_heads={self.num_attention_heads} is not divisible by "
          f"num_key_value_heads={self.num_key_value_heads}"
      )
    if self.plt_num_loops < 1:
      raise ValueError(f"plt_num_loops must be >= 1, got {self.plt_num_loops}")
    if (
        len(self.plt_window_size) != 2
        or self.plt_window_size[1] != 0
        or self.plt_window_size[0] < 0
    ):
      raise ValueError(
          f"plt_window_size must be [left >= 0, 0], got {self.plt_window_size}"
      )
    if self.attention_bias or self.mlp_bias:
      raise ValueError(
          "attention_bias / mlp_bias are not part of this architecture"
      )


__all__ = ["IQuestPLTCoderConfig"]
