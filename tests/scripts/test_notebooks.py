"""Notebooks run top to bottom (quick mode) with library code only."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests import helpers

ROOT = pathlib.Path(helpers.ROOT)
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
  cells = [
      c
      for c in json.loads(path.read_text())["cells"]
      if c["cell_type"] == "code"
  ]
  source = "\n\n".join("".join(c["source"]) for c in cells)
  # installs live in markdown
  assert "!pip" not in source and "%" not in source.split("\n")[0]
  script = tmp_path / "notebook.py"
  script.write_text(source)
  env = {
      **os.environ,
      "JAX_PLATFORMS": "cpu",
      "LOOPCODER_NOTEBOOK_QUICK": "1",
      "LOOPCODER_NOTEBOOK_WORKDIR": str(tmp_path / "work"),
  }
  run = subprocess.run(
      [sys.executable, str(script)],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=900,
  )
  assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
  assert "R=2: 7.6" in run.stdout and "effective_rank" in run.stdout
