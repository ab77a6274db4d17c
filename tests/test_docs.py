"""The docs match the tree: every repository path that README.md and docs/*.md cite exists.

A path is a markdown link target or an inline-code span that names a file or folder of this
repository (it starts with a top-level folder, or is a module path inside `loopcoder_jax/`).
"""

import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TOP_LEVEL = (
    "loopcoder_jax/",
    "pallas_kernels/",
    "scripts/",
    "configs/",
    "tests/",
    "docs/",
    "notebooks/",
    ".ci/",
)
# Rooms of the package, which the docs name without the `loopcoder_jax/` prefix.
ROOMS = tuple(
    f"{p.name}/"
    for p in (REPO / "loopcoder_jax").iterdir()
    if p.is_dir() and not p.name.startswith("_")
)
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_CODE = re.compile(r"`([^`\n]+)`")
_PLACEHOLDER = re.compile(r"[<>*{}$]|\.\.\.|[A-Z]{3,}/")


def _cited_paths(doc: pathlib.Path) -> set[str]:
  text = doc.read_text()
  paths = set()
  for target in _LINK.findall(text):
    if "://" in target or target.startswith(("#", "mailto:")):
      continue
    paths.add(target.split("#")[0])
  for span in _CODE.findall(text):
    for word in span.split():
      word = word.strip("'\",;()")
      word = re.split(r"::|:", word)[0].rstrip(":.")  # test ids, config args
      if word.startswith("--") or "=" in word or _PLACEHOLDER.search(word):
        continue
      if word.startswith(TOP_LEVEL + ROOMS) and "/" in word:
        paths.add(word)
  return {p for p in paths if p}


def _exists(doc: pathlib.Path, path: str) -> bool:
  bases = (doc.parent, REPO, REPO / "loopcoder_jax")
  return any((base / path).exists() for base in bases)


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_every_cited_path_exists(doc):
  missing = sorted(p for p in _cited_paths(doc) if not _exists(doc, p))
  assert not missing, f"{doc.name} cites paths that do not exist: {missing}"


def test_the_check_sees_paths():
  """The extraction finds the paths it is meant to (so an empty scan cannot pass)."""
  cited = _cited_paths(REPO / "docs" / "architecture.md")
  assert "loopcoder_jax/model/" in cited
  assert any(p.startswith("scripts/") for p in _cited_paths(REPO / "README.md"))
