"""Training checkpoints: save/restore, keep-K, corrupt-latest fallback (set aside, saved anew),
rejected states and metadata, restore onto another mesh, params of a training step.
"""

import glob
import os

import grain
import jax
import numpy as np
import pytest

from loopcoder_jax import checkpoints
from loopcoder_jax.checkpoints import params_io
from loopcoder_jax.model import sharding as shd
from loopcoder_jax.model.config import PLTConfig
from loopcoder_jax.train import optim
from loopcoder_jax.train import step as ts

CFG = PLTConfig.tiny(loops=2)


@pytest.fixture(scope="module")
def setup():
  tx, _ = optim.make_optimizer({}, 10)
  mesh1 = shd.make_mesh({"data": -1}, jax.devices()[:1])
  init_fn, _, _ = ts.make_train_fns(CFG, tx, mesh1)
  state = init_fn(jax.random.key(0))
  return tx, mesh1, state


def _iterator(advance=0):
  it = iter(grain.MapDataset.range(1000).to_iter_dataset())
  for _ in range(advance):
    next(it)
  return it


def _abstract(tx, mesh):
  abstract, sh = ts.state_shardings_for(CFG, tx, mesh, shd.DEFAULT_RULES)
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract,
      sh,
  )


def _bump(state, k):
  """A distinguishable state per step."""
  return state.replace(
      step=state.step + k, params=jax.tree.map(lambda x: x + k, state.params)
  )


def _save_steps(directory, state, steps, every=2, keep=2):
  ck = checkpoints.TrainCheckpointer(directory, every_steps=every, keep=keep)
  saved = [
      s for s in steps if ck.save(s, _bump(state, s), _iterator(s), {"step": s})
  ]
  ck.close()
  return saved


def test_save_every_keep_latest_and_resume_data(tmp_path, setup):
  tx, mesh1, state = setup
  saved = _save_steps(tmp_path, state, range(1, 8))
  assert saved == [2, 4, 6]
  ck = checkpoints.TrainCheckpointer(tmp_path, every_steps=2, keep=2)
  assert ck.all_steps() == [4, 6]
  it = _iterator()
  step, restored, meta = ck.restore(_abstract(tx, mesh1), it)
  ck.close()
  assert step == 6 and meta == {"step": 6} and int(restored.step) == 6
  assert next(it) == 6  # the data iterator resumes at the next element
  jax.tree.map(
      lambda a, b: np.testing.assert_array_equal(a, b),
      restored.params,
      _bump(state, 6).params,
  )
  # Adam state comes back as optax structures, not lists
  assert jax.tree.structure(restored.opt_state) == jax.tree.structure(
      state.opt_state
  )


def test_corrupt_latest_falls_back_with_one_line(tmp_path, setup):
  tx, mesh1, state = setup
  _save_steps(tmp_path, state, [2, 4], keep=3)
  for f in glob.glob(
      os.path.join(tmp_path, "4", "state", "**", "*"), recursive=True
  ):
    if os.path.isfile(f):
      open(f, "wb").close()  # truncated to 0 bytes
  lines = []
  ck = checkpoints.TrainCheckpointer(
      tmp_path, every_steps=2, keep=3, log=lines.append
  )
  step, restored, _ = ck.restore(_abstract(tx, mesh1), _iterator())
  ck.close()
  assert step == 2 and int(restored.step) == 2
  assert len(lines) == 1 and "\n" not in lines[0]
  assert (
      "step 4" in lines[0]
      and "unreadable" in lines[0]
      and "using step 2" in lines[0]
  )


def test_rejected_state_is_set_aside_and_its_step_saved_anew(tmp_path, setup):
  tx, mesh1, state = setup
  _save_steps(tmp_path, state, [2, 4], keep=3)
  lines = []
  ck = checkpoints.TrainCheckpointer(
      tmp_path, every_steps=2, keep=3, log=lines.append
  )
  step, restored, _ = ck.restore(
      _abstract(tx, mesh1),
      _iterator(),
      check_state=lambda s: "is bad" if int(s.step) == 4 else None,
  )
  assert step == 2 and ck.all_steps() == [2]
  assert lines == [
      f"checkpoint step 4 in {tmp_path} is bad; using step 2, it is moved to "
      f"{tmp_path}_unusable"
  ]
  assert os.path.isdir(f"{tmp_path}_unusable/4/state")  # kept, not deleted
  # the run passes step 4 again: saved, not refused as existing
  assert ck.save(4, restored, _iterator(), {}, force=True)
  ck.close()
  assert checkpoints.TrainCheckpointer(
      tmp_path, every_steps=2, keep=3
  ).all_steps() == [2, 4]


def test_check_meta_stops_before_any_state_is_read(tmp_path, setup):
  tx, mesh1, state = setup
  _save_steps(tmp_path, state, [2])
  ck = checkpoints.TrainCheckpointer(tmp_path, every_steps=2, keep=3)

  def check(meta):
    raise ValueError(f"written by step {meta['step']}")

  with pytest.raises(ValueError, match="written by step 2"):
    ck.restore(_abstract(tx, mesh1), _iterator(), check_meta=check)
  ck.close()
  assert os.listdir(tmp_path) == ["2"]


def test_nothing_readable_fails_and_empty_dir_is_fresh(tmp_path, setup):
  tx, mesh1, state = setup
  ck = checkpoints.TrainCheckpointer(tmp_path / "empty", every_steps=1, keep=1)
  assert ck.restore(_abstract(tx, mesh1), _iterator()) is None
  ck.close()
  _save_steps(tmp_path / "bad", state, [2])
  for f in glob.glob(os.path.join(tmp_path, "bad", "2", "state", "*")):
    if os.path.isfile(f):
      os.remove(f)
  ck = checkpoints.TrainCheckpointer(
      tmp_path / "bad", every_steps=1, keep=1, log=lambda _: None
  )
  with pytest.raises(ValueError, match="no usable checkpoint"):
    ck.restore(_abstract(tx, mesh1), _iterator())
  ck.close()


def test_restore_onto_a_different_mesh(tmp_path, setup):
  tx, _, state = setup
  _save_steps(tmp_path, state, [2])
  mesh8 = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  ck = checkpoints.TrainCheckpointer(tmp_path, every_steps=2, keep=2)
  _, restored, _ = ck.restore(_abstract(tx, mesh8), _iterator())
  ck.close()
  q = restored.params["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding.mesh.shape == mesh8.shape
  assert q.sharding.spec == jax.sharding.PartitionSpec(
      None, "fsdp", "tensor", None
  )
  jax.tree.map(
      lambda a, b: np.testing.assert_array_equal(a, b),
      restored.params,
      _bump(state, 2).params,
  )
  mu = [x for x in jax.tree.leaves(restored.opt_state) if x.shape == q.shape]
  # q's two Adam moments (mu and nu)
  assert len(mu) == 2
  assert all(m.sharding.is_equivalent_to(q.sharding, q.ndim) for m in mu)


def test_params_of_a_training_step(tmp_path, setup):
  _, _, state = setup
  ck = checkpoints.TrainCheckpointer(tmp_path, every_steps=2, keep=2)
  ck.save(2, _bump(state, 2), _iterator(), {"model": CFG.to_hf_dict()})
  ck.close()
  step_dir = tmp_path / "2"
  assert params_io.is_step_dir(step_dir)
  assert params_io.stored_dtypes(step_dir) == {"float32"}
  cfg, params = params_io.load_params(step_dir)
  assert cfg == CFG
  jax.tree.map(
      lambda a, b: np.testing.assert_array_equal(a, b),
      params,
      _bump(state, 2).params,
  )
