"""The product's imports have no circle: drift_core, tasks and flows, read with ``ast`` (no module is
imported), every ``import`` counted wherever it stands: at the top, inside a function, under
``if TYPE_CHECKING``. A circle means the layers (drift_core below tasks below flows, and inside each
one module above another) have stopped being layers; the fix is to move code, never a lazy import."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("drift_core", "tasks", "flows")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the product modules it imports (``from a.b import c`` counts ``a.b.c`` when that
    is a module, else ``a.b``)."""
    modules = _modules()

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package[: len(package) - (node.level - 1)]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                names.add(base)
                names.update(f"{base}.{alias.name}" for alias in node.names)
        graph[name] = {m for n in names if (m := known(n)) is not None and m != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_sees_circles_and_imports_inside_functions():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []
    graph = import_graph()
    assert "tasks.plots" in graph["flows.evaluation"]  # imported inside a function there
    assert "drift_core.schemas" in graph["tasks.store"] or "drift_core.errors" in graph["tasks.store"]


def test_the_product_imports_have_no_circle():
    assert circles(import_graph()) == []


def test_drift_core_schemas_imports_only_modules_that_import_nothing_of_drift():
    """The bottom layer: the config models use a few leaves (the user-function loader, the
    presets' data) and nothing that itself builds on drift_core."""
    graph = import_graph()
    for leaf in graph["drift_core.schemas"]:
        assert graph[leaf] == set(), (leaf, graph[leaf])
