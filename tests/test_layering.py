"""The floor plan: a room imports only rooms on lower floors (docs/architecture.md).

Every import of every library module is read from its source (ast), function-local ones included,
so an import that climbs back up fails here instead of rotting unnoticed.
"""

import ast
import pathlib
import re

from tests.helpers import ROOT

# room -> floor. A room may import only rooms on a lower floor; rooms sharing a floor do not
# import each other.
FLOORS = {
    "hardware": 0,
    "cli": 0,
    "pallas_kernels": 0,
    "model": 1,
    "data": 1,
    "inference": 2,
    "checkpoints": 2,
    "train": 3,
    "interop": 3,
    "serving": 3,
    "scaling": 4,
    "eval": 4,
}
PACKAGES = ("loopcoder_jax", "pallas_kernels")


def _room(module: str) -> str | None:
  """The room a dotted module name lives in; None outside the library (or the package itself)."""
  parts = module.split(".")
  if parts[0] == "pallas_kernels":
    return "pallas_kernels"
  if parts[0] != "loopcoder_jax" or len(parts) == 1:
    return None
  return parts[1]


def _imported(tree: ast.AST) -> list[tuple[int, str]]:
  """(line, dotted name) of every absolute import; `from pkg import a` names `pkg.a`."""
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [(node.lineno, a.name) for a in node.names]
    elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
      found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
  return found


def _library_modules():
  root = pathlib.Path(ROOT)
  for package in PACKAGES:
    for path in sorted((root / package).rglob("*.py")):
      rel = path.relative_to(root)
      module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
      yield rel, module, ast.parse(path.read_text(), str(rel))


def _edges():
  """(file:line, from room, to room) for every import from one room into another."""
  for rel, module, tree in _library_modules():
    src = _room(module)
    for line, name in _imported(tree):
      dst = _room(name)
      if src is not None and dst is not None and dst != src:
        yield f"{rel}:{line}", src, dst


def test_every_room_has_a_floor():
  rooms = {_room(module) for _, module, _ in _library_modules()} - {None}
  assert rooms == set(FLOORS)


def test_imports_only_go_down():
  climbing = [
      f"{where}: {src} (floor {FLOORS[src]}) imports {dst} (floor {FLOORS[dst]})"
      for where, src, dst in _edges()
      if FLOORS[dst] >= FLOORS[src]
  ]
  assert not climbing, "\n".join(climbing)


def test_the_check_sees_local_imports():
  tree = ast.parse("def f():\n  from loopcoder_jax.train import trainer\n")
  assert [_room(name) for _, name in _imported(tree)] == ["train"]
  tree = ast.parse("from loopcoder_jax import checkpoints, model\n")
  assert [_room(name) for _, name in _imported(tree)] == [
      "checkpoints",
      "model",
  ]


def _documented_floors() -> dict[str, int]:
  """room -> floor from the floor plan table of docs/architecture.md."""
  text = (pathlib.Path(ROOT) / "docs" / "architecture.md").read_text()
  plan = text.split("## The floor plan", 1)[1].split("\n## ", 1)[0]
  floors = {}
  for floor, rooms in re.findall(r"^\| (\d+) \| ([^|]+) \|", plan, re.M):
    for room in re.findall(r"`([a-z_]+)`", rooms):
      floors[room] = int(floor)
  return floors


def test_architecture_doc_shows_this_floor_plan():
  assert _documented_floors() == FLOORS
