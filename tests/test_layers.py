"""The package's import rules (docs/architecture.md), read from the source with ``ast``: no import cycle between
mechscope's modules, nothing in the library imports the applications layer, and no function-level import of
mechscope (the old way to dodge a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

import mechscope

ROOT = Path(mechscope.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(node: ast.Import | ast.ImportFrom, here: str, is_package: bool) -> list[str]:
    """The mechscope modules an import statement names (``from a import b`` counts ``a.b`` when it is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("mechscope")]
    base = node.module or ""
    if node.level:
        package = here.split(".") if is_package else here.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
    if not base.startswith("mechscope"):
        return []
    return [base] + [f"{base}.{a.name}" for a in node.names]


def import_graph() -> tuple[nx.DiGraph, list[tuple[str, str, int]]]:
    """Top-level imports between modules, and the function-level ones as ``(module, imported, line)``."""
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(files)
    nested = []
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        # a package's ``if TYPE_CHECKING:`` imports are its static re-exports (the names load lazily: mechscope._lazy)
        checking = [n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"]
        top = {id(n) for n in [*tree.body, *(m for n in checking for m in n.body)]}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            targets = [t for t in imported(node, name, path.name == "__init__.py") if t in files and t != name]
            if id(node) in top:
                graph.add_edges_from((name, t) for t in targets)
            elif targets:
                nested += [(name, t, node.lineno) for t in targets]
    return graph, nested


def test_the_rules_are_read_from_real_imports():
    """The graph this module checks is the package's: a known import is in it (so an empty graph cannot pass)."""
    graph, _ = import_graph()
    assert graph.has_edge("mechscope.cooccurrence.pipeline", "mechscope.cooccurrence.outputs")
    assert graph.has_edge("mechscope.apps.commands", "mechscope.apps.main_job")
    assert graph.number_of_nodes() > 80


def test_no_import_cycles():
    graph, _ = import_graph()
    # a package's __init__ re-exports its modules: an edge from a module to its own package's __init__ is the
    # only way back, and would be a cycle; so every cycle found here is a real one
    assert list(nx.simple_cycles(graph)) == []


def test_the_library_never_imports_the_applications_layer():
    graph, _ = import_graph()
    apps = ("mechscope.apps", "mechscope.__main__")  # ``python -m mechscope`` is the command line's entry point
    wrong = [(a, b) for a, b in graph.edges if b.startswith("mechscope.apps") and not a.startswith(apps)]
    assert wrong == []


def test_no_function_level_imports_of_mechscope():
    _, nested = import_graph()
    assert nested == []
