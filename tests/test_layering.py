"""The import graph of src/ebt, read from the source (nothing imported): no circles, and the
lower layers never import the higher ones.

Every `import` / `from ... import` of an ebt module counts, at the top of a module or inside a
function (a late import that dodges a circle is still a circle), except those under
`if TYPE_CHECKING:` (type-only). Importing `ebt.a.b` also runs the package `ebt.a`; the root
package `ebt` (the front door, which imports the library) is left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from support import ROOT

SOURCE = ROOT / "src"
LOWER = ("models", "nn", "data", "checkpoint", "thinking")
HIGHER = ("training", "cli", "experiment")


def _modules() -> dict[str, Path]:
    modules = {}
    for path in (SOURCE / "ebt").rglob("*.py"):
        parts = list(path.relative_to(SOURCE).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = _modules()


def _known(name: str) -> str | None:
    """The module `name` runs: itself, else the nearest enclosing package that exists."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return getattr(test, "id", getattr(test, "attr", None)) == "TYPE_CHECKING"


def _imported(node: ast.stmt, package: str) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        parts = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join([*parts, base] if base else parts)
    return [
        f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
        for alias in node.names
    ]


def _statements(body: list[ast.stmt]):
    """Every statement, nested ones included, outside `if TYPE_CHECKING:` blocks."""
    for node in body:
        if isinstance(node, ast.If) and _type_checking(node):
            yield from _statements(node.orelse)
            continue
        yield node
        for field in ("body", "orelse", "finalbody", "handlers"):
            inner = getattr(node, field, None)
            if isinstance(inner, list):
                yield from _statements(inner)


def imports_of(module: str) -> set[str]:
    """The ebt modules `module` imports (with the packages those imports run)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in _statements(ast.parse(path.read_text(encoding="utf-8")).body):
        for name in _imported(node, package):
            target = _known(name) if name.startswith("ebt.") else None
            while target and target != "ebt":
                own = target == module or module.startswith(target + ".")
                if target in MODULES and not own:
                    found.add(target)
                target = target.rpartition(".")[0]
    return found


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_the_reader_sees_late_imports_and_leaves_type_only_ones_out(tmp_path: Path) -> None:
    assert {"ebt.config", "ebt.thinking.loop", "ebt.models", "ebt.cli.main"} <= set(MODULES)
    # candidate_gradient names EnergyTransformer only under TYPE_CHECKING
    assert "ebt.models.energy_transformer" not in imports_of("ebt.models.candidate_gradient")
    assert "ebt.config" in imports_of("ebt.models.builders")


def test_circles_are_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _circles(graph) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles() -> None:
    graph = {module: imports_of(module) for module in MODULES}
    assert _circles(graph) == []


@pytest.mark.parametrize("layer", LOWER)
def test_lower_layers_never_import_training_cli_or_experiment(layer: str) -> None:
    wrong = {
        f"{module} -> {target}"
        for module in MODULES
        if module.startswith(f"ebt.{layer}.") or module == f"ebt.{layer}"
        for target in imports_of(module)
        if target.split(".")[1] in HIGHER
    }
    assert wrong == set()


def test_the_networks_never_import_data() -> None:
    wrong = {
        f"{module} -> {target}"
        for module in MODULES
        if module.split(".")[1:2] in (["models"], ["nn"])
        for target in imports_of(module)
        if target.split(".")[1] == "data"
    }
    assert wrong == set()


def test_the_thinking_core_imports_only_the_config_rules_and_errors() -> None:
    """thinking/ is the ground floor: models, data and modalities call it, never the reverse."""
    allowed = {"ebt.config_checks", "ebt.errors"}
    wrong = {
        f"{module} -> {target}"
        for module in MODULES
        if module.startswith("ebt.thinking")
        for target in imports_of(module)
        if not target.startswith("ebt.thinking") and target not in allowed
    }
    assert wrong == set()
