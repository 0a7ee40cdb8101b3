"""The package's modules import one another without circles.

Every import counts, including those inside functions (a lazy import hides a circle, it does not
remove it); only imports under `if TYPE_CHECKING:` are left out, as they never run. Importing
`a.b.c` also runs the `__init__` of `a.b`, so a module depends on the packages above what it
imports too (but not on its own enclosing packages, which are always loaded first).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ccproxy"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_names(tree: ast.Module, name: str, is_package: bool) -> set[str]:
    """Absolute names of the modules (or module attributes) `tree` imports at run time."""
    found: set[str] = set()
    package = name if is_package else name.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
        edges: set[str] = set()
        for target in imported_names(tree, name, path.name == "__init__.py"):
            parts = target.split(".")
            # `from pkg import name` names a submodule or an attribute: keep what is a module.
            while parts and ".".join(parts) not in files:
                parts.pop()
            for i in range(1, len(parts) + 1):
                module = ".".join(parts[:i])
                if module in files and module not in own:
                    edges.add(module)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a list of modules (first repeated last), or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = GREY
        stack.append(node)
        for succ in sorted(graph.get(node, ())):
            if colour.get(succ) == GREY:
                return [*stack[stack.index(succ):], succ]
            if colour.get(succ) == WHITE:
                cycle = visit(succ)
                if cycle:
                    return cycle
        stack.pop()
        colour[node] = BLACK
        return None

    for node in sorted(graph):
        if colour[node] == WHITE:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_package_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_graph_sees_lazy_and_parent_package_imports(tmp_path: Path) -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from ccproxy.resource import ProxyResource\n"
        "def f():\n    from ccproxy.network.addresses import canonical\n"
    )
    names = imported_names(ast.parse(source), "ccproxy.http.server", False)
    assert "ccproxy.network.addresses" in names
    assert "ccproxy.resource" not in names


@pytest.mark.parametrize("graph, cyclic", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, False),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
    ({"a": {"a"}}, True),
])
def test_cycles_are_found(graph: dict[str, set[str]], cyclic: bool) -> None:
    assert (find_cycle(graph) is not None) is cyclic
