"""The package's structure: no import cycle, modules of a readable size, the front end's
engine reached through its declared property.

The import graph is read from the source (``ast``): every ``import`` and ``from ... import``
of a ``sam_fused`` module, at module level or inside a function (a deferred import is
still an import), except those under ``if TYPE_CHECKING:`` (never executed). An edge goes
from a module to every ``sam_fused`` module it imports; a ``from package import name``
is an edge to the submodule ``name`` where it is one, to the package otherwise.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sam_fused"
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _runtime_nodes(tree: ast.AST):
    """Every node except what sits under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if (
            isinstance(node, ast.If)
            and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING"
        ):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def imports_of(name: str) -> set[str]:
    """The sam_fused modules module ``name`` imports at run time."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # "from package import name": the submodule when name is one, else the package
            targets = [
                f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in MODULES else origin
                for alias in node.names
            ]
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != name)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def test_the_import_graph_has_no_cycle():
    """Depth-first search; a back edge is a cycle, reported as the modules along it."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(GRAPH[node]):
            if state.get(target) == 1:
                cycle = [*path[path.index(target) :], target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def test_the_cycle_check_can_fail():
    """The reader finds a deferred import inside a function (the kind that hides cycles)."""
    assert "sam_fused.integrations.lightning" in GRAPH["sam_fused.hooks"]
    assert "sam_fused.optimizer" not in GRAPH["sam_fused.checkpoint"]  # annotations only


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_over_400_lines(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines"


def test_only_the_front_end_reads_its_private_engine():
    """The rest of the package uses ``SAM.engine``, the declared property."""
    readers = [
        name
        for name, path in MODULES.items()
        if name != "sam_fused.optimizer" and "._engine" in path.read_text()
    ]
    assert readers == []
