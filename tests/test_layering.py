"""The package's imports point one way: no cycles, and the leaves never reach back up.

Read from the source with :mod:`ast` (nothing is imported), counting imports inside functions
too: a lazy import that closes a cycle is still a cycle a reader has to untangle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import bitalloc

ROOT = Path(bitalloc.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = ["bitalloc", *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(module: str) -> set[str]:
    """The bitalloc modules ``module`` imports, anywhere in its body but ``TYPE_CHECKING``."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    pending: list[ast.AST] = list(ast.parse(path.read_text()).body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            pending.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                # `from pkg import submodule` imports the submodule; `from mod import name`
                # imports mod.
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
        pending.extend(ast.iter_child_nodes(node))
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: _imports(module) for module in MODULES}


def _reaches(start: str, goal: str, exact: bool = False) -> list[str] | None:
    """A chain of imports from ``start`` to ``goal`` (or, unless ``exact``, a module under
    it), or None."""
    seen = {start}
    pending = [[start]]
    while pending:
        chain = pending.pop()
        for nxt in sorted(GRAPH[chain[-1]]):
            if nxt == goal or (not exact and nxt.startswith(goal + ".")):
                return [*chain, nxt]
            if nxt not in seen:
                seen.add(nxt)
                pending.append([*chain, nxt])
    return None


def test_the_import_graph_has_no_cycle():
    for module in MODULES:
        for nxt in sorted(GRAPH[module]):
            back = _reaches(nxt, module, exact=True)
            assert back is None, f"import cycle: {module} -> {' -> '.join(back)}"


@pytest.mark.parametrize(
    ("leaf", "forbidden"),
    [
        ("bitalloc.kv", "bitalloc.allocator"),
        ("bitalloc.rl", "bitalloc.allocator"),
        ("bitalloc.stages", "bitalloc.allocator"),
        ("bitalloc.sensitivity.profile", "bitalloc.measuring"),
        ("bitalloc.sensitivity.profile", "bitalloc.jobs"),
        ("bitalloc.solvers.base", "bitalloc.solvers.registry"),
        ("bitalloc.solvers.base", "bitalloc.solvers.ilp"),
        ("bitalloc.solvers.base", "bitalloc.rl"),
        ("bitalloc.formats", "bitalloc.sensitivity"),
        ("bitalloc.config", "bitalloc.allocator"),
    ],
)
def test_lower_layers_never_import_higher_ones(leaf, forbidden):
    for module in MODULES:
        if module == leaf or module.startswith(leaf + "."):
            chain = None
            for nxt in GRAPH[module]:
                if nxt == forbidden or nxt.startswith(forbidden + "."):
                    chain = [module, nxt]
                    break
                if not nxt.startswith(leaf):
                    chain = _reaches(nxt, forbidden)
                    chain = [module, *chain] if chain else None
                    if chain:
                        break
            assert chain is None, f"{leaf} reaches {forbidden}: {' -> '.join(chain)}"


def test_the_graph_reader_sees_imports():
    # Guards the test itself: a reader that found no edges would pass everything above.
    assert "bitalloc.solvers.problem" in GRAPH["bitalloc.solvers.base"]
    assert "bitalloc.solvers.structure" in GRAPH["bitalloc.solvers.problem"]
    assert any(name.startswith("bitalloc.stages") for name in GRAPH["bitalloc.allocator"])


def test_no_benchmark_script_shadows_an_installed_package():
    # `python benchmarks/X.py` puts benchmarks/ first on the path, so a module there named
    # like an installed package hides it from every import (benchmarks/kernels.py hid the
    # `kernels` package that transformers 5.25 imports, and every benchmark failed).
    import importlib.metadata

    installed = set(importlib.metadata.packages_distributions())
    scripts = ROOT.parent / "benchmarks"
    names = {p.stem for p in scripts.glob("*.py")} | {p.name for p in scripts.iterdir()}
    assert "torch" in installed  # the check sees what is installed
    assert not names & installed, sorted(names & installed)
