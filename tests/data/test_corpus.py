"""Built-in stdlib corpus: deterministic disjoint split, skipped files, caching."""

import os
import subprocess
import sys

import pytest

from loopcoder_jax.data import corpus


def _write(root, rel, data: bytes):
  path = os.path.join(root, rel)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


@pytest.fixture
def fake_stdlib(tmp_path, monkeypatch):
  root = str(tmp_path / "lib")
  kept = {
      f"pkg{i // 50}/mod{i}.py": f"def f{i}():\n  return {i}\n"
      for i in range(400)
  }
  kept["top.py"] = "x = 'héllo'\n"
  for rel, text in kept.items():
    _write(root, rel, text.encode("utf-8"))
  skipped = {
      "latin1.py": "s = 'caf\xe9'\n".encode("latin-1"),  # not valid UTF-8
      "empty.py": b"  \n",
      "notes.txt": b"not python\n",
      "test/test_x.py": b"x = 1\n",
      "email/tests/t.py": b"x = 1\n",
      "idlelib/idle_test/t.py": b"x = 1\n",
      "site-packages/foo/bar.py": b"x = 1\n",
      "encodings/cp.py": b"x = 1\n",
      "__pycache__/y.py": b"x = 1\n",
      "config-3.11-x86_64-linux-gnu/python-config.py": b"x = 1\n",
      "_sysconfigdata__linux.py": b"build = {}\n",
  }
  for rel, data in skipped.items():
    _write(root, rel, data)
  monkeypatch.setattr(corpus, "stdlib_root", lambda: root)
  return kept


def test_fake_stdlib_split_skips_noise_and_partitions(fake_stdlib):
  train, heldout = corpus.stdlib_files("train"), corpus.stdlib_files("heldout")
  got = dict(train + heldout)
  # every kept file exactly once, texts intact; noise skipped
  assert got == fake_stdlib
  assert not {p for p, _ in train} & {p for p, _ in heldout}
  assert [p for p, _ in train] == sorted(p for p, _ in train)
  assert 0 < len(heldout) < 0.06 * len(got)  # ~2% held out
  assert all(corpus.split_of(p) == "heldout" for p, _ in heldout)


def test_split_is_a_pure_function_of_the_path():
  # The same answer in a fresh interpreter (no hash randomisation, no random state).
  names = [f"pkg/mod{i}.py" for i in range(3000)]
  here = [corpus.split_of(n) for n in names]
  code = (
      "from loopcoder_jax.data import corpus; print(''.join('h' if corpus.split_of(f'pkg/mod{i}.py')"
      " == 'heldout' else 't' for i in range(3000)))"
  )
  other = subprocess.run(
      [sys.executable, "-c", code],
      capture_output=True,
      text=True,
      check=True,
      env={**os.environ, "PYTHONHASHSEED": "123"},
  ).stdout.strip()
  assert other == "".join("h" if s == "heldout" else "t" for s in here)
  frac = here.count("heldout") / len(here)
  assert 0.012 < frac < 0.03, frac


def test_real_stdlib_corpus():
  train, heldout = corpus.stdlib_files("train"), corpus.stdlib_files("heldout")
  assert len(train) > 100 and len(heldout) >= 1
  paths = [p for p, _ in train + heldout]
  assert len(set(paths)) == len(paths)
  assert not any(p.startswith(("test/", "site-packages/")) for p in paths)
  assert "os.py" in paths and all(p.endswith(".py") for p in paths)
  assert corpus.stdlib_files("train") == train  # cached, identical


def test_unknown_split():
  with pytest.raises(ValueError, match="unknown corpus split"):
    corpus.stdlib_files("validation")


def test_empty_split_is_an_error(tmp_path, monkeypatch):
  monkeypatch.setattr(corpus, "stdlib_root", lambda: str(tmp_path))
  with pytest.raises(ValueError, match="empty"):
    corpus.stdlib_files("train")
