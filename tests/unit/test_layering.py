"""The packages' layers only point down, no module imports itself round a cycle, no file is too long.

docs/architecture.md draws the layers: ``glmtts`` (the upstream contract, form parsing, a client, the
emulator) <- ``backend`` (backend processes and talking to them) <- ``scheduler``, which is itself
``core`` (the pure scheduling core) <- ``config`` (which builds on the core's own defaults) <- ``runtime``
<- ``http``. Every import counts here,
those under ``if TYPE_CHECKING:`` and inside functions included: a layer that needs a name from above it
for its types still knows about that layer.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("glmtts", "backend", "scheduler")
MAX_LINES = 500

# A module whose name starts with the key may import from no module whose name starts with a listed prefix.
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "glmtts": ("backend", "scheduler"),
    "backend": ("scheduler",),
    "scheduler.core": ("scheduler.config", "scheduler.runtime", "scheduler.http", "scheduler.errors",
                       "scheduler.cli", "scheduler.logs", "backend", "glmtts"),
    "scheduler.config": ("scheduler.runtime", "scheduler.http", "scheduler.cli"),
    "scheduler.errors": ("scheduler.runtime", "scheduler.http", "scheduler.cli"),
    "scheduler.runtime": ("scheduler.http", "scheduler.cli"),
    "scheduler.http": ("scheduler.cli",),
}


def module_files() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: Iterable[str]) -> set[str]:
    """The project modules `name` imports: ``from a import b`` counts as ``a.b`` when that is a module."""
    modules = set(known)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules else base)
    return {target for target in found if target in modules and target != name}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(name, path, files) for name, path in files.items()}


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work: list[tuple[str, list[str]]] = [(root, sorted(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, pending = work[-1]
            if pending:
                target = pending.pop()
                if target not in graph:
                    continue
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, sorted(graph[target])))
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def violations(graph: Mapping[str, Iterable[str]]) -> list[str]:
    found = []
    for module, targets in sorted(graph.items()):
        for layer, forbidden in FORBIDDEN.items():
            if module != layer and not module.startswith(layer + "."):
                continue
            found += [f"{module} imports {target}" for target in sorted(targets)
                      if any(target == prefix or target.startswith(prefix + ".") for prefix in forbidden)]
    return found


def test_layers_only_point_down() -> None:
    assert violations(import_graph()) == []


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_file_is_over_the_line_limit(package: str) -> None:
    long = {str(path.relative_to(REPO)): lines for name, path in module_files().items()
            if name.split(".")[0] == package
            and (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}, f"over {MAX_LINES} lines: {long}"


def test_every_import_kind_is_seen(tmp_path: Path) -> None:
    """The parser sees relative, TYPE_CHECKING-only and function-level imports."""
    source = tmp_path / "mod.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from scheduler.http import app\n"
                      "def f():\n    import backend.pool\nfrom . import sibling\n", encoding="utf-8")
    known = {"scheduler.http", "scheduler.http.app", "backend.pool", "backend.sibling", "backend.mod"}
    assert imports_of("backend.mod", source, known) == {"scheduler.http.app", "backend.pool", "backend.sibling"}


def test_the_checks_catch_what_they_forbid() -> None:
    graph = {"backend.pool": {"scheduler.config"}, "scheduler.runtime.tasks": {"scheduler.http.app"},
             "scheduler.core.queue": {"scheduler.core.cost"}, "scheduler.core.cost": {"scheduler.core.queue"},
             "glmtts.form": set()}
    assert violations(graph) == ["backend.pool imports scheduler.config",
                                 "scheduler.runtime.tasks imports scheduler.http.app"]
    assert cycles(graph) == [["scheduler.core.cost", "scheduler.core.queue"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
