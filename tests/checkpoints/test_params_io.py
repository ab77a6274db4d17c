"""The params directory: a bit-exact round trip, and a damaged weight refused by its checksum."""

import os

import jax
import numpy as np
import pytest

from loopcoder_jax.checkpoints import params_io
from loopcoder_jax.model.config import PLTConfig
from loopcoder_jax.model.transformer import init_params

CFG = PLTConfig.tiny(loops=2)


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, jax.random.key(0))


def test_params_dir_round_trip(tmp_path, params):
  params_io.save_params(tmp_path / "p", CFG, params)
  assert params_io.is_params_dir(tmp_path / "p")
  cfg, back = params_io.load_params(tmp_path / "p")
  assert cfg == CFG
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), back, params)


def test_a_damaged_weight_in_a_params_dir_is_refused(tmp_path, params):
  """Uncompressed chunks have no checksum of their own: one flipped bit of a weight (still finite)
  is caught by the checksum saved with the params, by both readers."""
  path = tmp_path / "p"
  params_io.save_params(path, CFG, params)
  emb = np.asarray(params["embed_tokens"]["embedding"])
  needle = emb.tobytes()[:64]
  [(data, at)] = [
      (f, f.read_bytes().find(needle))
      for f in (path / "params").rglob("*")
      if f.is_file() and needle in f.read_bytes()
  ]
  raw = bytearray(data.read_bytes())
  raw[at] ^= 1  # the lowest mantissa bit of the first float32
  data.write_bytes(bytes(raw))
  match = "embed_tokens/embedding does not match the checksum saved with it"
  with pytest.raises(ValueError, match=match):
    params_io.load_params(path)
  with pytest.raises(ValueError, match=match):
    dict(params_io.iter_params(path))
  # without the checksums (a directory saved before them) the damage loads silently
  os.remove(path / params_io.CHECKSUMS)
  _, damaged = params_io.load_params(path)
  want = emb.copy()
  want.view(np.uint32).flat[0] ^= 1
  np.testing.assert_array_equal(damaged["embed_tokens"]["embedding"], want)


def _failed_task_report(caplog, filename: str) -> list[str]:
  """What asyncio logs when a failed task of a coroutine defined in `filename` is collected
  unretrieved (as Orbax's reads are after a failed restore)."""
  import asyncio
  import gc
  import logging

  ns: dict = {}
  exec(
      compile(
          "async def read():\n  raise ValueError('bad')\n", filename, "exec"
      ),
      ns,
  )
  loop = asyncio.new_event_loop()
  task = loop.create_task(ns["read"]())
  loop.run_until_complete(asyncio.sleep(0.01))
  loop.close()
  caplog.clear()
  with caplog.at_level(logging.ERROR, logger="asyncio"):
    del task
    gc.collect()
  return [r.getMessage() for r in caplog.records if r.name == "asyncio"]


def test_abandoned_orbax_task_reports_are_dropped_others_kept(caplog):
  params_io.quiet_abandoned_reads()
  params_io.quiet_abandoned_reads()  # installs once
  assert not _failed_task_report(caplog, "/site-packages/orbax/checkpoint/x.py")
  [kept] = _failed_task_report(caplog, "/home/user/mine.py")
  assert "never retrieved" in kept
