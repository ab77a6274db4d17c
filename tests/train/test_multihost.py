"""Multi-host for real: two JAX processes on this machine (localhost coordinator, gloo CPU
collectives, 4 fake devices each, each reading its own data shard) train exactly like one process
with 8 devices reading the same two shards."""

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import helpers
from tests.helpers import (
    ROOT,
    TRAIN_SCRIPT,
    free_port,
    read_metrics,
    subprocess_env,
    train_flags,
)


def _bpb(stdout):
  m = re.search(
      r"held-out bits per byte: ([\d.]+) before -> ([\d.]+) after", stdout
  )
  assert m, stdout
  return float(m.group(1)), float(m.group(2))


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_match_one_process_with_8_devices(assets, tmp_path):  # noqa: F811
  common = {
      "mesh.data": 2,
      "mesh.fsdp": 2,
      "mesh.tensor": 2,
      "train.total_steps": 6,
      "checkpoint.every_steps": 3,
      "eval.max_tokens": 256,
      "eval.batch_size": 4,
      "data.eval_source": assets["source"],
  }
  single = subprocess.run(
      [sys.executable, TRAIN_SCRIPT]
      + train_flags(
          assets, tmp_path / "single", **common, **{"train.data_shards": 2}
      ),
      env=subprocess_env(8),
      capture_output=True,
      text=True,
      timeout=300,
      cwd=ROOT,
  )
  assert single.returncode == 0, single.stderr[-3000:]

  # Each process writes to files: their tails say where a failed run stopped.
  # A process that dies leaves its peer blocked in a collective, so both are
  # polled and the survivor is killed at once. They compile without the shared
  # persistent cache, so neither can load a program the one-process run wrote.
  env = {**subprocess_env(4), "JAX_COMPILATION_CACHE_DIR": ""}
  port = free_port()
  procs, logs = [], []
  for i in range(2):
    flags = train_flags(
        assets,
        tmp_path / "multi",
        **common,
        **{
            "distributed.enabled": True,
            "distributed.coordinator_address": f"localhost:{port}",
            "distributed.num_processes": 2,
            "distributed.process_id": i,
        },
    )
    out, err = tmp_path / f"proc{i}.out", tmp_path / f"proc{i}.err"
    logs.append((out, err))
    with open(out, "w") as fo, open(err, "w") as fe:
      procs.append(
          subprocess.Popen(
              [sys.executable, TRAIN_SCRIPT] + flags,
              env=env,
              stdout=fo,
              stderr=fe,
              cwd=ROOT,
          )
      )

  def tails():
    return "\n".join(
        f"--- process {i}: {out.read_text()[-1000:]}\n{err.read_text()[-2000:]}"
        for i, (out, err) in enumerate(logs)
    )

  deadline = time.monotonic() + 300
  while any(p.poll() is None for p in procs):
    failed = any(p.returncode not in (None, 0) for p in procs)
    if failed or time.monotonic() > deadline:
      for p in procs:
        p.kill()
        p.wait()
      pytest.fail(
          ("a process failed" if failed else "timed out") + "\n" + tails()
      )
    time.sleep(0.5)
  assert all(p.returncode == 0 for p in procs), tails()
  outs = [(out.read_text(), err.read_text()) for out, err in logs]
  assert "8 cpu devices, 2 processes" in outs[0][0]

  ref, got = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "multi")
  assert (
      [m["step"] for m in got] == [m["step"] for m in ref] == list(range(1, 7))
  )
  # Both run the same per-device programs; only the reductions across the 8
  # devices (gradients, loss) may add in another order: 8 ops a step, carried
  # through the 6 steps and the evaluation.
  ops = 8 * 7
  for key in ("loss", "grad_norm"):
    helpers.assert_close(
        [m[key] for m in got], [m[key] for m in ref], ops=ops, what=key
    )
  # bits per byte are printed with 4 decimals: each print rounds by up to 0.5e-4
  got_bpb, want_bpb = np.array(_bpb(outs[0][0])), np.array(_bpb(single.stdout))
  assert np.abs(got_bpb - want_bpb).max() <= (
      helpers.tolerance(want_bpb, ops=ops) + 1e-4
  ), (got_bpb, want_bpb)
  # both processes wrote their own data-iterator state into the shared checkpoint
  data_dir = tmp_path / "multi" / "checkpoints" / "6" / "data"
  assert sorted(
      f for f in os.listdir(data_dir) if f.startswith("process_")
  ) == ["process_0-of-2.json", "process_1-of-2.json"]
  assert json.loads((data_dir / "process_1-of-2.json").read_text())["shards"]
