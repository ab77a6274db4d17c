"""The notebooks, executed top to bottom in a Jupyter kernel (nbclient) on CPU.

Parameters are injected the way papermill does it: a cell tagged
`injected-parameters` goes right after the cell tagged `parameters` and
assigns small values (tiny models, a few steps), so the notebook runs in
seconds here with the code it runs on a TPU. The kernel has 8 fake CPU devices
(conftest's XLA_FLAGS), so the mesh paths run sharded. A last cell prints the
values each test checks: real results of the notebook (losses, steps, texts,
logits), not just that it ran.
"""

import configparser
import json
import os
import pathlib
import re

import nbclient
import nbformat
import numpy as np
import pytest

from loopcoder_jax.model.config import PLTConfig
from tests import helpers

ROOT = pathlib.Path(helpers.ROOT)
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
_MARK = "NOTEBOOK-RESULTS "
# A tiny PLT and a few steps: the notebooks' training cells in seconds.
_SMALL_TRAINING = dict(
    STEPS=6,
    HIDDEN=64,
    LAYERS=2,
    VOCAB_SIZE=320,
    SEQ_LEN=32,
    BATCH_SIZE=8,
    EVAL_TOKENS=1024,
)


def url() -> str:
  cfg = configparser.ConfigParser()
  cfg.read(ROOT / "setup.cfg")
  return cfg["metadata"]["url"]


def execute(name, tmp_path, params, results, timeout=600):
  """Runs notebooks/<name> with `params` injected; returns {expr: value} of `results`."""
  nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
  tagged = [
      i
      for i, c in enumerate(nb.cells)
      if "parameters" in c.metadata.get("tags", [])
  ]
  assert len(tagged) == 1, f"{name}: one cell tagged 'parameters'"
  unknown = set(params) - set(
      re.findall(r"^(\w+) =", nb.cells[tagged[0]].source, re.M)
  )
  assert not unknown, f"{name}: no parameters {sorted(unknown)}"
  injected = nbformat.v4.new_code_cell(
      "\n".join(f"{k} = {v!r}" for k, v in params.items()),
      metadata={"tags": ["injected-parameters"]},
  )
  report = nbformat.v4.new_code_cell(
      "import json as _json\n"
      f"print({_MARK!r} + _json.dumps({{e: eval(e) for e in {results!r}}}))"
  )
  nb.cells[tagged[0] + 1 : tagged[0] + 1] = [injected]
  nb.cells.append(report)
  nbclient.NotebookClient(
      nb,
      timeout=timeout,
      kernel_name="python3",
      resources={"metadata": {"path": str(tmp_path)}},
  ).execute()
  text = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
  return json.loads(text.split(_MARK, 1)[1])


@pytest.fixture
def kernel_env(monkeypatch):
  """The kernel inherits this process' environment: CPU, 8 devices, and the
  test compile cache (conftest)."""
  import jax

  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv(
      "JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir
  )
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  monkeypatch.setenv("MPLBACKEND", "Agg")


def check_quickstart(tmp_path):
  out = execute(
      "quickstart.ipynb",
      tmp_path,
      dict(WORKDIR=str(tmp_path / "run"), **_SMALL_TRAINING),
      [
          "summary['bpb_before']",
          "summary['bpb_after']",
          "texts",
          "diag['effective_rank']",
          "sorted(os.listdir(hf_dir))",
      ],
  )
  assert out["summary['bpb_after']"] < out["summary['bpb_before']"]
  assert len(out["texts"]) == 2 and all(
      isinstance(t, str) for t in out["texts"]
  )
  assert len(out["diag['effective_rank']"]) == 2  # R = 2
  assert "config.json" in out["sorted(os.listdir(hf_dir))"]


def check_train_tpu(tmp_path):
  steps = _SMALL_TRAINING["STEPS"]
  out = execute(
      "train_tpu.ipynb",
      tmp_path,
      dict(WORKDIR=str(tmp_path / "run"), RESUME_STEPS=3, **_SMALL_TRAINING),
      [
          "backend.name",
          "dict(mesh.shape)",
          "summary['bpb_before']",
          "summary['bpb_after']",
          "resumed['start_step']",
          "resumed['end_step']",
          "checkpoints",
          "curves",
      ],
  )
  assert out["backend.name"] == "CPU (8 devices)"
  assert out["dict(mesh.shape)"] == {"data": 8, "fsdp": 1, "tensor": 1}
  assert out["summary['bpb_after']"] < out["summary['bpb_before']"]
  assert out["resumed['start_step']"] == steps
  assert out["resumed['end_step']"] == steps + 3
  assert out["checkpoints"][-1] == steps + 3
  assert [os.path.basename(p) for p in out["curves"]] == ["training.png"]
  assert all(os.path.getsize(p) > 0 for p in out["curves"])


def check_serve_7b(tmp_path):
  out = execute(
      "serve_7b.ipynb",
      tmp_path,
      dict(SIZE="tiny", MAX_NEW_TOKENS=12, DIAG_TOKENS=512),
      [
          "dict(mesh.shape)",
          "[len(x.sharding.device_set) for x in leaves]",
          "cfg.plt_num_loops",
          "pieces",
          "streamed",
          "plain",
          "diag['effective_rank']",
      ],
  )
  assert out["dict(mesh.shape)"] == {"data": 1, "fsdp": 1, "tensor": 8}
  assert set(out["[len(x.sharding.device_set) for x in leaves]"]) == {8}
  assert out["streamed"] and len(out["pieces"]) > 1
  assert "".join(out["pieces"]) == out["streamed"] == out["plain"]
  assert len(out["diag['effective_rank']"]) == out["cfg.plt_num_loops"] == 2


def check_convert_to_pytorch(tmp_path):
  # The notebook loads the export in PyTorch (the [torch] extra; not on Python 3.12+ in CI).
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  out = execute(
      "convert_to_pytorch.ipynb",
      tmp_path,
      dict(WORKDIR=str(tmp_path / "run"), NEW_TOKENS=12, **_SMALL_TRAINING),
      [
          "hf_dir",
          "jax_logits.tolist()",
          "torch_logits.tolist()",
          "cache_class",
          "jax_ids",
          "torch_ids",
      ],
  )
  cfg = PLTConfig.from_hf_file(os.path.join(out["hf_dir"], "config.json"))
  want = np.asarray(out["jax_logits.tolist()"])
  helpers.assert_close(
      out["torch_logits.tolist()"],
      want,
      ops=helpers.forward_ops(cfg, want.shape[1]),
      what="PyTorch vs JAX logits",
  )
  assert out["cache_class"] == "PLTCache"
  assert out["torch_ids"] == out["jax_ids"] and out["jax_ids"]


def check_loop_diagnostics(tmp_path):
  out = execute(
      "loop_diagnostics.ipynb",
      tmp_path,
      dict(
          WORKDIR=str(tmp_path / "run"),
          EVAL_LOOPS=[2, 3],
          DIAG_TOKENS=256,
          **_SMALL_TRAINING,
      ),
      [
          "{r: results[r]['effective_rank'] for r in EVAL_LOOPS}",
          "{r: sorted(map(os.path.basename, p)) for r, p in written.items()}",
          "WORKDIR",
      ],
  )
  ranks = out["{r: results[r]['effective_rank'] for r in EVAL_LOOPS}"]
  assert {r: len(v) for r, v in ranks.items()} == {"2": 2, "3": 3}
  assert all(v > 0 for r in ranks.values() for v in r)
  for r, names in out[
      "{r: sorted(map(os.path.basename, p)) for r, p in written.items()}"
  ].items():
    assert "gate.png" in names and len(names) == 5
    saved = os.path.join(out["WORKDIR"], "diagnostics", f"R{r}")
    with open(os.path.join(saved, "diagnostics.json")) as f:
      assert json.load(f)["loops"] == int(r)


def check_finetune_7b(tmp_path):
  out = execute(
      "finetune_7b.ipynb",
      tmp_path,
      dict(
          SIZE="tiny",
          WORKDIR=str(tmp_path / "lora"),
          STEPS=4,
          RANK=4,
          SEQ_LEN=128,
          BATCH_SIZE=8,
          NEW_TOKENS=8,
      ),
      [
          "summary['loss_before']",
          "summary['loss_after']",
          "summary['end_step']",
          "dir_bytes(export)",
          "dir_bytes(base)",
          "sorted(lora_meta)",
          "answer",
          "sorted(os.listdir(peft_dir))",
      ],
  )
  assert out["summary['end_step']"] == 4
  # the export holds the adapters, not a copy of the base (the tiny base is
  # small enough that Orbax's own files are much of either)
  assert out["dir_bytes(export)"] < out["dir_bytes(base)"]
  assert {"base", "base_sha256", "lora"} <= set(out["sorted(lora_meta)"])
  assert out["summary['loss_after']"] < out["summary['loss_before']"]
  assert out["sorted(os.listdir(peft_dir))"] == [
      "adapter_config.json",
      "adapter_model.safetensors",
  ]
  assert isinstance(out["answer"], str)


CHECKS = {
    "finetune_7b.ipynb": check_finetune_7b,
    "loop_diagnostics.ipynb": check_loop_diagnostics,
    "convert_to_pytorch.ipynb": check_convert_to_pytorch,
    "serve_7b.ipynb": check_serve_7b,
    "quickstart.ipynb": check_quickstart,
    "train_tpu.ipynb": check_train_tpu,
}


# The quickstart tours what the others cover one by one: slow (40 s with a warm
# compile cache, 90 s cold); the other four take about 2 minutes together.
SLOW = {"quickstart.ipynb"}


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(p, marks=[pytest.mark.slow] if p.name in SLOW else [])
        for p in NOTEBOOKS
    ],
    ids=[p.name for p in NOTEBOOKS],
)
def test_notebook(path, tmp_path, kernel_env):
  assert path.name in CHECKS, f"{path.name} has no test: add it to CHECKS"
  CHECKS[path.name](tmp_path)


def test_notebooks_follow_the_conventions():
  """Each opens with a markdown cell linking it in Colab, then the install
  cell from setup.cfg's url; the README links every notebook."""
  repo = url()
  assert repo.startswith("https://github.com/")
  slug = repo.removeprefix("https://github.com/")
  readme = (ROOT / "README.md").read_text()
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    colab = (
        f"https://colab.research.google.com/github/{slug}/blob/main/"
        f"notebooks/{path.name}"
    )
    assert nb.cells[0].cell_type == "markdown" and colab in nb.cells[0].source
    assert "injected-parameters" in nb.cells[0].source  # the test convention
    install = nb.cells[1]
    assert install.cell_type == "code"
    assert f'@ git+{repo}"' in install.source, path.name
    assert 'find_spec("loopcoder_jax") is None' in install.source
    assert colab in readme, f"README does not link {path.name} in Colab"
    for cell in nb.cells:
      assert not cell.get("outputs"), f"{path.name}: committed with outputs"
  linked = set(re.findall(r"notebooks/(\w+\.ipynb)", readme))
  assert linked <= {
      p.name for p in NOTEBOOKS
  }, "README links a missing notebook"
