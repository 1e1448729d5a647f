"""Arrows point one way (STYLE.md 13): no import cycle among the modules of conftok and ray_jobs.

Each module's imports are read with ``ast`` (every ``import`` statement in the file, also those
inside functions: a lazy import still ties two modules together) and resolved to the project's
modules; a cycle is a strongly connected group of two or more modules. A package's
``__init__`` counts as the module named like the package; the implicit import of a parent
package when a submodule loads is not an arrow of its own.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("conftok", "ray_jobs")


def project_modules(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under the packages."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest project module that ``name`` (a dotted path) starts with, or None."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def imported_modules(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that ``module`` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from . import x`, `from ..a import b`
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            # `from pkg import name`: name is a submodule (an arrow to it) or an attribute of pkg.
            names = [f"{source}.{alias.name}" for alias in node.names if alias.name != "*"] or [source]
        else:
            continue
        for name in names:
            target = _resolve(name, modules)
            if target is not None and target != module:
                out.add(target)
    return out


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    modules = project_modules(root, packages)
    return {m: imported_modules(m, p, modules) for m, p in modules.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each cycle as a path ``[a, b, ..., a]``, one per strongly connected group (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(group, graph) for group in groups]


def _cycle_in(group: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the group's first module (breadth-first inside the group)."""
    start = min(group)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:  # back at the start: walk the parents from v
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(group)}")  # a group always has one


def test_no_import_cycles():
    graph = import_graph(REPO_ROOT)
    assert {"conftok.modeling", "conftok._unsloth", "ray_jobs.tune", "ray_jobs.report"} <= set(graph)
    cycles = import_cycles(graph)
    assert not cycles, "import cycles (move what both sides share into a module below them):\n" + "\n".join(
        "  " + " -> ".join(c) for c in cycles)


def test_the_two_circles_are_broken_through_modules_below():
    graph = import_graph(REPO_ROOT)
    assert "ray_jobs.results" in graph["ray_jobs.tune"] and "ray_jobs.results" in graph["ray_jobs.report"]
    assert "ray_jobs.tune" not in graph["ray_jobs.report"]
    assert "conftok.lora_targets" in graph["conftok.modeling"] and "conftok.lora_targets" in graph["conftok._unsloth"]
    assert "conftok.modeling" not in graph["conftok._unsloth"]
    assert "conftok._unsloth" in graph["conftok.modeling"]  # the lazy import is seen (function level)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize("files, expected", [
    # a lazy import inside a function closes the circle too
    ({"pkg/__init__.py": "", "pkg/a.py": "from pkg.b import f\n",
      "pkg/b.py": "def f():\n    from pkg import a\n"}, [["pkg.a", "pkg.b", "pkg.a"]]),
    # relative imports, three modules
    ({"pkg/__init__.py": "", "pkg/a.py": "from . import b\n", "pkg/b.py": "from .c import x\n",
      "pkg/c.py": "import pkg.a\nx = 1\n"}, [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]),
    # across packages, through a package __init__ re-export
    ({"pkg/__init__.py": "from pkg.a import g\n", "pkg/a.py": "import other.j\ndef g(): pass\n",
      "other/__init__.py": "", "other/j.py": "from pkg import g\n"}, [["other.j", "pkg", "pkg.a", "other.j"]]),
    # one-way arrows (also a submodule importing its package's __init__): no cycle
    ({"pkg/__init__.py": "from pkg.a import g\n", "pkg/a.py": "from pkg import low\ndef g(): pass\n",
      "pkg/low.py": "import json\n", "pkg/b.py": "from pkg import g\nfrom pkg.a import g\n"}, []),
])
def test_cycle_detector(tmp_path, files, expected):
    _write(tmp_path, files)
    packages = sorted({name.split("/")[0] for name in files})
    assert import_cycles(import_graph(tmp_path, packages)) == expected
