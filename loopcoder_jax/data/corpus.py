"""Built-in corpus: the running interpreter's standard-library Python sources.

Every Python install carries these files, so the default training run needs no download. Files are
split into "train" and "heldout" by a hash of their path relative to the stdlib root (never by
random state), so the split is the same on every machine and in every process. Test suites,
site-packages, codec tables and generated data modules are skipped: they are noise for a code
model (huge literal tables, deliberately broken sources).
"""

import functools
import hashlib
import os
import sysconfig

SPLITS = ("train", "heldout")
HELDOUT_PER_MILLE = 20  # ~2% of the files are held out

# Directory names skipped anywhere below the stdlib root.
_SKIP_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "__pycache__",
        "test",
        "tests",
        "idle_test",
        "encodings",
        "pydoc_data",
    }
)
# File-name prefixes that are machine-generated (differ per build) rather than written code.
_SKIP_PREFIXES = ("_sysconfigdata",)


def stdlib_root() -> str:
  return sysconfig.get_paths()["stdlib"]


def split_of(rel_path: str) -> str:
  """'train' or 'heldout' for a path relative to the stdlib root (posix separators)."""
  digest = hashlib.sha256(rel_path.encode("utf-8")).digest()
  return (
      "heldout"
      if int.from_bytes(digest[:4], "little") % 1000 < HELDOUT_PER_MILLE
      else "train"
  )


@functools.lru_cache(maxsize=4)
def _all_files(root: str) -> tuple[tuple[str, str], ...]:
  """(relative posix path, text) for every kept *.py file under root, sorted by path."""
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    # config-3.11-x86_64-linux-gnu and friends hold build files, not library code.
    dirnames[:] = sorted(
        d
        for d in dirnames
        if d not in _SKIP_DIRS and not d.startswith("config-")
    )
    for name in sorted(filenames):
      if not name.endswith(".py") or name.startswith(_SKIP_PREFIXES):
        continue
      path = os.path.join(dirpath, name)
      try:
        with open(path, "rb") as f:
          text = f.read().decode("utf-8")
      except (UnicodeDecodeError, OSError):
        continue  # not valid UTF-8 (or unreadable): skipped by design
      if text.strip():
        out.append((os.path.relpath(path, root).replace(os.sep, "/"), text))
  out.sort()
  return tuple(out)


def stdlib_files(split: str) -> list[tuple[str, str]]:
  """(relative path, text) of the stdlib sources in `split` ("train" or "heldout"), sorted by path.

  The file list and texts are cached per process, so repeated calls are free.
  """
  if split not in SPLITS:
    raise ValueError(
        f"unknown corpus split {split!r}; expected one of {SPLITS}"
    )
  root = stdlib_root()
  files = [(p, t) for p, t in _all_files(root) if split_of(p) == split]
  if not files:
    raise ValueError(f"the stdlib corpus split {split!r} under {root} is empty")
  return files
