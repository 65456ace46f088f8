"""The package's modules import each other without a cycle (module-level and function-level imports alike).

A lazy import inside a function hides a cycle from Python but not from a reader: which module owns
what stops being clear. The graph is read from the source with ``ast``, so nothing is imported.

A module-level ``__getattr__`` that forwards moved names (PEP 562) counts too: the demo generators live in
data/demo/ and import the dataset modules, so the dataset modules do not forward to them.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = "selfmedmae_components"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py")) if "__pycache__" not in p.parts}


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its source (``import a.b``, ``from a import b``,
    ``from .b import c``, ``from . import b``), each as the most specific module the statement names."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        while target and target not in modules:  # `import a.b.C` names the module a.b
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if not source.split(".")[0] == PACKAGE:
                continue
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_graph_sees_every_kind_of_import(tmp_path):
    """The parser itself: absolute, relative, `from . import x`, and imports inside functions (a module-level
    `__getattr__` too)."""
    modules = {f"{PACKAGE}.{m}": tmp_path for m in ("a", "b", "c", "d", "f", "sub", "sub.e")}
    src = tmp_path / "e.py"
    src.write_text(
        "import selfmedmae_components.a\n"
        "from .. import b\n"
        "def f():\n    from ..c import thing\n"
        "class K:\n    def g(self):\n        from selfmedmae_components.d import other\n"
        "import torch\n"
        "def __getattr__(name):\n    from .. import f\n    return getattr(f, name)\n"  # a PEP 562 alias
    )
    assert imported_modules(f"{PACKAGE}.sub.e", src, modules) == {f"{PACKAGE}.{m}" for m in "abcdf"}
    assert find_cycle({"x": {"y"}, "y": {"z"}, "z": {"x"}}) == ["x", "y", "z", "x"]
    assert find_cycle({"x": {"y"}, "y": set()}) is None


def test_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 20 and f"{PACKAGE}.engines" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_one_unwrap_helper():
    """DDP / compiled wrappers are unwrapped by ``wrappers.unwrap`` only, not by copies of it."""
    copy = re.compile(r"hasattr\(\w+, [\"']module[\"']\)")
    files = [*ROOT.rglob("*.py"), *(ROOT.parent / "tools").glob("*.py")]
    assert [str(p) for p in files if copy.search(p.read_text())] == []
