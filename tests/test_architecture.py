"""The layering rules of docs/architecture.md, checked on the source itself."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "arrayquant"
MAX_LINES = 410


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        yield ".".join(parts), path


MODULES = dict(_modules())


def _imports(path, top_level_only: bool):
    """(module, names) of every ``from arrayquant... import`` in ``path``."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and (
                node.module == "arrayquant" or node.module.startswith("arrayquant.")):
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("arrayquant"):
                    yield a.name, []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it (at most ~400)"


def test_no_private_names_across_modules():
    """A module may import a private *module* of its own package (``_numpy``), but no
    module imports another module's underscore names."""
    bad = []
    for name, path in MODULES.items():
        for module, names in _imports(path, top_level_only=False):
            for n in names:
                if n.startswith("_") and n != "__version__" and f"{module}.{n}" not in MODULES:
                    bad.append(f"{name}: from {module} import {n}")
    assert not bad, bad


def test_library_never_imports_the_applications():
    bad = [f"{name} imports {module}" for name, path in MODULES.items()
           if not name.startswith("arrayquant.apps")
           for module, _ in _imports(path, top_level_only=False)
           if module.startswith("arrayquant.apps")
           and not (name == "arrayquant" and module == "arrayquant.apps.plotting")]
    assert not bad, bad


def test_no_import_cycles_at_import_time():
    """Top-level imports between arrayquant modules form no cycle (lazy imports inside
    functions are how a lower layer reaches an optional or higher one)."""
    graph = {}
    for name, path in MODULES.items():
        deps = set()
        for module, names in _imports(path, top_level_only=True):
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES] or [module]
            deps.update(t for t in targets if t in MODULES and t != name)
        graph[name] = deps
    # A package's __init__ may re-export its own submodules; that edge is not a cycle.
    for name in graph:
        graph[name] = {d for d in graph[name] if not d.startswith(name + ".")}
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == "open":
                cycle = stack[stack.index(d):] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n)
