"""Every script in scripts/ under one error contract (loopcoder_jax.cli).

Bad input is one `error: ...` line on stderr naming the problem and exit code
2, never a traceback; `--help` exits 0 and documents the exit codes. Scripts
that import JAX only in `main` run here with a `jax` that cannot be imported:
their flags are checked before JAX is loaded. The others check them before
compiling anything.
"""

import ast
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, SCRIPTS

# Import JAX at module level: their flag definitions or config file need it.
HEAVY = (
    "aot_compile.py",
    "bench_attention.py",
    "bench_decode.py",
    "bench_train.py",
    "loop_study.py",
    "roofline.py",
    "train.py",
)
SCRIPT_NAMES = sorted(f for f in os.listdir(SCRIPTS) if f.endswith(".py"))


@pytest.fixture(scope="module")
def no_jax(tmp_path_factory):
  """A PYTHONPATH entry whose `jax` fails on import."""
  path = tmp_path_factory.mktemp("no_jax")
  (path / "jax").mkdir()
  (path / "jax" / "__init__.py").write_text(
      "raise ImportError('JAX imported before the flags were checked')\n"
  )
  return str(path)


def run_script(name, args, no_jax=None):
  path = [ROOT, os.environ.get("PYTHONPATH", "")]
  if name not in HEAVY:
    path.insert(0, no_jax)
  env = {
      **os.environ,
      "JAX_PLATFORMS": "cpu",
      "PYTHONPATH": os.pathsep.join(p for p in path if p),
  }
  return subprocess.run(
      [sys.executable, os.path.join(SCRIPTS, name), *args],
      capture_output=True,
      text=True,
      env=env,
      timeout=120,
      cwd=ROOT,
  )


def assert_bad_input(run, *names):
  assert "Traceback" not in run.stderr, run.stderr
  lines = run.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
  for name in names:
    assert name in lines[0], (name, lines[0])
  assert run.returncode == 2, run.stderr


# One bad flag per script and the words its error line must contain.
BAD_FLAG = {
    "aot_compile.py": (["--what=train,serve"], "--what", "'serve'"),
    "bench_attention.py": (["--seq_lens=0"], "--seq_lens=0"),
    "bench_convert.py": (["--params=0"], "--params", "positive"),
    "bench_decode.py": (["--batches=1,x"], "--batches", "'x'"),
    "bench_serve.py": (["--clients=1,0"], "--clients=1,0", "less than 1"),
    "bench_torch_decode.py": (["--heads=3"], "--heads=3", "--kv_heads=4"),
    "bench_train.py": (["--loops=0"], "--loops=0"),
    "convert_checkpoint.py": (
        ["--src=a", "--dst=b", "--to=pt"],
        "--to=pt",
        "orbax|hf",
    ),
    "diagnose.py": (["--checkpoint=c", "--seq_len=x"], "--seq_len=x"),
    "evaluate.py": (["--completions=canonical", "--k=0"], "--k=0"),
    "generate.py": (
        ["--checkpoint=c", "--prompt=p", "--max_new_tokens=0"],
        "--max_new_tokens=0",
    ),
    "loop_study.py": (["--loops=1,0"], "--loops=1,0", "less than 1"),
    "roofline.py": (["--batches=1,0"], "--batches", "0 is less than 1"),
    "serve.py": (["--checkpoint=c", "--slots=0"], "--slots=0", "positive"),
    "train.py": (
        ["--config.train.total_stepz=3"],
        "--config.train.total_stepz",
        "unknown config key",
        "total_steps",
    ),
}


def test_every_script_has_a_case():
  assert sorted(BAD_FLAG) == SCRIPT_NAMES


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_bad_flag_is_one_error_line(name, no_jax):
  args, *names = BAD_FLAG[name]
  assert_bad_input(run_script(name, args, no_jax), *names)


@pytest.mark.parametrize(
    "args, names",
    [
        (["--bogus=1"], ["'bogus'"]),
        (["--prompt=p"], ["--checkpoint", "must have a value"]),
        (["--checkpoint"], ["Missing value", "--checkpoint"]),
        (["--checkpoint=c", "--prompt=p", "extra"], ["unexpected", "extra"]),
        (
            ["--checkpoint=c", "--prompt=p", "--mesh=tensor"],
            ["--mesh=tensor", "is not axis=size"],
        ),
    ],
)
def test_bad_flags(args, names, no_jax):
  assert_bad_input(run_script("generate.py", args, no_jax), *names)


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_docstring_documents_the_exit_codes(name):
  with open(os.path.join(SCRIPTS, name)) as f:
    doc = ast.get_docstring(ast.parse(f.read()))
  assert "Exit codes: 0 " in doc and "; 2 bad " in doc, doc


@pytest.mark.parametrize("name", [n for n in SCRIPT_NAMES if n not in HEAVY])
def test_help_exits_0(name, no_jax):
  run = run_script(name, ["--help"], no_jax)
  assert run.returncode == 0, run.stderr
  assert "Exit codes:" in run.stdout and f"scripts/{name}:" in run.stdout


@pytest.mark.parametrize(
    "name, args, names",
    [
        (
            "evaluate.py",
            ["--completions=canonical", "--temperature=0.8"],
            ["--temperature is for generating"],
        ),
        (
            "evaluate.py",
            ["--task=perplexity", "--checkpoint=c", "--k=1,10"],
            ["--k is for --task=humaneval"],
        ),
        (
            "diagnose.py",
            ["--checkpoint=c", f"--plots={os.path.join(__file__, 'sub')}"],
            ["--plots=", "cannot make the directory"],
        ),
    ],
)
def test_flags_that_cannot_go_together_or_paths_that_cannot_be_made(
    name, args, names, no_jax
):
  assert_bad_input(run_script(name, args, no_jax), *names)
