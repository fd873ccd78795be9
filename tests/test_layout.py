"""The package's layers import downwards only: no two sub-packages import each other, directly or round a loop."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "src" / "medpfl"


def _imports_between_subpackages() -> dict[str, set[str]]:
    """For each top-level module or sub-package of medpfl, the others it imports (lazy imports included)."""
    edges: dict[str, set[str]] = {}
    for file in PACKAGE.rglob("*.py"):
        part = file.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(file.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                pieces = name.split(".")
                if pieces[0] == "medpfl" and len(pieces) > 1 and pieces[1] != part:
                    edges.setdefault(part, set()).add(pieces[1])
    return edges


def test_no_import_cycles_between_subpackages():
    edges = _imports_between_subpackages()
    assert "fl" in edges.get("experiments", set())  # the walk sees real imports

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(p for p in edges if p in reach(p))
    assert not cycles, f"sub-packages on an import cycle: {cycles} ({ {p: sorted(edges[p]) for p in cycles} })"


def test_the_engine_layers_never_import_the_layers_that_drive_them():
    edges = _imports_between_subpackages()
    drivers = {"experiments", "cli"}
    for low in ("data", "models", "fl", "defenses", "attacks", "metrics", "report"):
        assert not edges.get(low, set()) & drivers, f"medpfl.{low} imports {sorted(edges[low] & drivers)}"
