"""scripts/serve.py as users run it: a process on a port, answering with the weights it was told to
load."""

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from loopcoder_jax import interop
from loopcoder_jax.inference import engine
from tests.helpers import SCRIPTS, free_port
from tests.inference.conftest import serve_model  # noqa: F401  (a fixture)

PROMPT, TOKENS = "return a", 16


def _wait_healthy(proc: subprocess.Popen, url: str, timeout: float = 300):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      raise AssertionError(
          f"serve.py exited with {proc.returncode}: {proc.stderr.read()}"
      )
    try:
      if httpx.get(url + "/health", timeout=2).json()["status"] == "ok":
        return
    except httpx.HTTPError:
      pass
    time.sleep(0.5)
  raise AssertionError(f"serve.py did not answer /health in {timeout} s")


def _greedy(ckpt, quantize):
  cfg, params, tok = interop.load(ckpt, quantize=quantize)
  cfg = cfg.with_runtime(dtype=cfg.runtime.param_dtype)  # as serving.build
  eng = engine.Engine(cfg, params, tok, prefill_chunk=8)
  return eng.complete([PROMPT], max_new_tokens=TOKENS)[0]


@pytest.mark.slow
def test_serve_int8_answers_with_the_int8_weights(serve_model, tmp_path):  # noqa: F811
  """`serve.py --quantize=int8` on an HF checkpoint answers a greedy completion as the engine over
  the int8 weights does, which is not the float weights' answer (the flag reaches the loader).
  """
  cfg, params, _, tok_dir = serve_model
  ckpt = str(tmp_path / "hf")
  interop.save_hf(cfg, params, ckpt, tokenizer_dir=tok_dir)
  want = _greedy(ckpt, "int8")
  assert want != _greedy(ckpt, None)  # else the test could not tell them apart
  port = free_port()
  proc = subprocess.Popen(
      [
          sys.executable,
          os.path.join(SCRIPTS, "serve.py"),
          f"--checkpoint={ckpt}",
          "--quantize=int8",
          f"--port={port}",
          "--slots=2",
          "--prefill_chunk=8",
          "--model_name=tiny",
      ],
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  try:
    url = f"http://127.0.0.1:{port}"
    _wait_healthy(proc, url)
    body = {
        "model": "tiny",
        "prompt": PROMPT,
        "max_tokens": TOKENS,
        "temperature": 0,
    }
    r = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == want
  finally:
    proc.send_signal(signal.SIGINT)
    try:
      proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
