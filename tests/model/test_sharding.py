"""Mesh construction and the param sharding table (cheap: abstract params only)."""

import jax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
import pytest

from loopcoder_jax.model import sharding as shd
from loopcoder_jax.model.config import PLTConfig
from loopcoder_jax.model.transformer import abstract_params


def test_make_mesh_resolves_rest_and_uses_auto_axes():
  mesh = shd.make_mesh({"data": -1, "fsdp": 2, "tensor": 2})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert all(t == AxisType.Auto for t in mesh.axis_types)
  assert dict(shd.make_mesh({"data": -1}, jax.devices()[:1]).shape) == {
      "data": 1,
      "fsdp": 1,
      "tensor": 1,
  }


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"data": 3, "fsdp": -1}, "does not divide"),
        ({"data": 2, "fsdp": 2, "tensor": 1}, "uses 4 devices"),
        ({"data": -1, "fsdp": -1}, "at most one -1"),
        ({"dp": 8}, "unknown axes"),
    ],
)
def test_make_mesh_bad_shapes_fail_in_one_line(cfg, match):
  with pytest.raises(ValueError, match=match) as e:
    shd.make_mesh(cfg)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "cfg",
    [
        PLTConfig.tiny(loops=1),
        PLTConfig.tiny(loops=2),
        PLTConfig.tiny(loops=3, plt_gate_use_hidden_states=False),
        PLTConfig.tiny(loops=2, tie_word_embeddings=True),
    ],
)
def test_every_param_has_logical_axes_of_its_rank(cfg):
  params = abstract_params(cfg)
  axes = shd.param_logical_axes(params)
  for x, a in zip(
      jax.tree.leaves(params),
      jax.tree.leaves(axes, is_leaf=lambda t: isinstance(t, tuple)),
  ):
    assert len(a) == x.ndim
  # the stacked layer axis is never sharded
  for a in jax.tree.leaves(
      axes["layers"], is_leaf=lambda t: isinstance(t, tuple)
  ):
    assert a[0] == "layers"


def test_param_shardings_follow_rules_and_skip_non_dividing_axes():
  mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  # odd vocab: the tensor axis cannot split it
  cfg = PLTConfig.tiny(loops=2, vocab_size=129)
  sh = shd.param_shardings(abstract_params(cfg), mesh, shd.DEFAULT_RULES)
  attn = sh["layers"]["self_attn"]
  assert attn["q_proj"]["kernel"].spec == P(None, "fsdp", "tensor", None)
  assert attn["o_proj"]["kernel"].spec == P(None, "tensor", None, "fsdp")
  assert sh["layers"]["mlp"]["down_proj"]["kernel"].spec == P(
      None, "tensor", "fsdp"
  )
  assert attn["plt_gate"]["kernel"].spec == P(None, None, None)
  assert sh["layers"]["input_layernorm"]["scale"].spec == P(None, None)
  # vocab 129: tensor dropped
  assert sh["embed_tokens"]["embedding"].spec == P(None, "fsdp")
  rules = dict(shd.DEFAULT_RULES) | {"mlp": ("tensor", "fsdp"), "embed": None}
  sh2 = shd.param_shardings(abstract_params(cfg), mesh, tuple(rules.items()))
  assert sh2["layers"]["mlp"]["up_proj"]["kernel"].spec == P(
      None, None, ("tensor", "fsdp")
  )


def test_unknown_param_and_unknown_rule_fail():
  with pytest.raises(ValueError, match="no entry"):
    shd.param_logical_axes(
        {"mystery": {"kernel": jax.ShapeDtypeStruct((2, 2), "float32")}}
    )
  mesh = shd.make_mesh({"data": -1})
  rules = tuple((k, v) for k, v in shd.DEFAULT_RULES if k != "heads")
  with pytest.raises(ValueError, match="'heads' has no sharding rule"):
    shd.param_shardings(abstract_params(PLTConfig.tiny()), mesh, rules)


def test_batch_sharding_splits_over_data_and_fsdp():
  mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert shd.batch_sharding(mesh).spec == P(("data", "fsdp"), None)
  assert shd.batch_shards(mesh) == 4


class _FakeDevice:

  def __init__(self, platform, device_kind):
    self.platform, self.device_kind = platform, device_kind


@pytest.mark.parametrize(
    "platform, kind, n, name",
    [
        ("tpu", "TPU v2", 8, "TPU v2-8"),  # Colab's v2-8: 4 chips, 8 cores
        ("tpu", "TPU v5 lite", 1, "TPU v5e-1"),
        ("tpu", "TPU v5 lite", 8, "TPU v5e-8"),
        ("tpu", "TPU v6 lite", 4, "TPU v6e-4"),
        ("tpu", "TPU v4", 4, "TPU v4-8"),  # megacore: one device per chip
        ("tpu", "TPU v5p", 4, "TPU v5p-8"),
        ("tpu", "TPU v3", 8, "TPU v3-8"),  # not in the peaks table: its name
        ("cpu", "cpu", 1, "CPU"),
        ("cpu", "cpu", 8, "CPU (8 devices)"),
        ("gpu", "NVIDIA H200", 1, "GPU NVIDIA H200 x1"),
    ],
)
def test_describe_backend_names_the_slice(platform, kind, n, name):
  backend = shd.describe_backend([_FakeDevice(platform, kind)] * n)
  assert backend.name == name
  assert backend.num_devices == n
  assert shd.mesh_shape(backend.train_mesh(), n) == (n, 1, 1)
  assert shd.mesh_shape(backend.serve_mesh(), n) == (1, 1, n)


def test_describe_backend_defaults_to_this_process_devices():
  backend = shd.describe_backend()
  assert backend.platform == jax.devices()[0].platform
  assert backend.num_devices == jax.device_count()
  mesh = shd.make_mesh(backend.serve_mesh())
  assert dict(mesh.shape)["tensor"] == jax.device_count()
