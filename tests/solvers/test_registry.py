"""The solver registry: decorator registration, entry points loaded lazily, broken plugins."""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

import bitalloc.solvers
from bitalloc.errors import BitallocError
from bitalloc.solvers import (
    BaseSolver,
    LagrangianSolver,
    Problem,
    available_solvers,
    register_solver,
    registered_solver,
    solve,
    solver_class,
    solver_names,
    unregister_solver,
)
from bitalloc.solvers import registry as registry_module
from bitalloc.solvers.base import SolverOutput

BUILTINS = ["lagrangian", "dp", "ilp", "qp", "rl"]


class Cheapest(BaseSolver):
    """Every unit at its cheapest allowed option (feasible whenever the budget is)."""

    name: ClassVar[str] = "test-cheapest"
    max_budgets: ClassVar[int | None] = 1

    def _solve(self, problem: Problem) -> SolverOutput:
        (cost,) = [problem.costs[n] for n in problem.budgets] or [problem.objective]
        return SolverOutput(np.where(problem.allowed, cost, np.inf).argmin(axis=1), None)


class Abstract(BaseSolver):
    name: ClassVar[str] = "test-abstract"


def _problem() -> Problem:
    objective = np.array([[3.0, 1.0], [2.0, 0.5]])
    cost = np.array([[1.0, 4.0], [1.0, 8.0]])
    return Problem(objective, {"bits": cost}, {"bits": 6.0})


@pytest.fixture
def plugins(monkeypatch):
    """Replace the installed entry points by the ones a test passes (``(name, target)``
    pairs); the registry is restored afterwards."""
    monkeypatch.setattr(registry_module, "_registered", dict(registry_module._registered))

    def install(*points: tuple[str, str]) -> None:
        found = [
            importlib.metadata.EntryPoint(name, target, registry_module.ENTRY_POINT_GROUP)
            for name, target in points
        ]

        def entry_points(*, group: str):
            assert group == registry_module.ENTRY_POINT_GROUP
            return found

        monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
        monkeypatch.setattr(registry_module, "_declared", None)

    return install


def test_registry_is_consistent():
    registry = available_solvers()
    assert list(registry) == BUILTINS
    for name, cls in registry.items():
        assert issubclass(cls, BaseSolver)
        assert cls.name == name
    registry.clear()  # a fresh dict per call: clearing it changes nothing
    assert list(available_solvers()) == BUILTINS


def test_rl_is_declared_as_an_entry_point():
    points = importlib.metadata.entry_points(group="bitalloc.solvers")
    assert {(p.name, p.value) for p in points} >= {("rl", "bitalloc.rl.solver:RLSolver")}


def test_the_solver_package_imports_no_rl_and_no_concrete_solver_in_base():
    # The layering that keeps the solver package array-only: nothing under bitalloc/solvers
    # imports the rl package (an entry point brings it in), and base.py no concrete solver.
    root = Path(bitalloc.solvers.__file__).parent
    for path in root.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
        assert not {m for m in imported if m.split(".")[:2] == ["bitalloc", "rl"]}, path
        assert not {m for m in imported if m.split(".")[0] in ("torch", "stable_baselines3")}
        if path.name == "base.py":
            concrete = {f"bitalloc.solvers.{m}" for m in ("lagrangian", "dp", "ilp", "qp")}
            assert not imported & concrete, imported


def test_rl_is_imported_only_when_first_looked_up():
    code = (
        "import sys\n"
        "from bitalloc.solvers import solve, solver_class, solver_names, Problem\n"
        "p = Problem([[1.0, 0.0]], {'b': [[1.0, 2.0]]}, {'b': 1.5})\n"
        "assert solve(p, method='lagrangian').choice.tolist() == [0]\n"
        "assert solver_names() == ['lagrangian', 'dp', 'ilp', 'qp', 'rl']\n"
        "assert 'bitalloc.rl.solver' not in sys.modules\n"
        "assert solver_class('rl').__module__ == 'bitalloc.rl.solver'\n"
        "assert 'bitalloc.rl.solver' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(
        BitallocError,
        match=r"^unknown solver method 'simplex'; known methods: 'lagrangian', 'dp', 'ilp', "
        r"'qp', 'rl'$",
    ):
        solve(_problem(), method="simplex")
    with pytest.raises(BitallocError, match=r"bad options for method 'lagrangian'.*accepted"):
        solve(_problem(), method="lagrangian", nonsense=1)


def test_decorator_registers_and_unregister_removes():
    try:
        assert register_solver(Cheapest) is Cheapest
        register_solver(Cheapest)  # the same class again: a module imported twice
        assert solver_names()[-1] == "test-cheapest"
        assert solve(_problem(), method="test-cheapest").choice.tolist() == [0, 0]
    finally:
        assert unregister_solver("test-cheapest") is Cheapest
    assert "test-cheapest" not in available_solvers()
    with pytest.raises(BitallocError, match="no solver is registered as 'test-cheapest'"):
        unregister_solver("test-cheapest")


def test_registering_a_taken_name_or_a_non_solver_is_refused():
    class Impostor(Cheapest):
        name: ClassVar[str] = "lagrangian"

    with pytest.raises(BitallocError, match="'lagrangian' is already registered by"):
        register_solver(Impostor)
    assert solver_class("lagrangian") is LagrangianSolver
    with pytest.raises(BitallocError, match="is not a solver"):
        register_solver(dict)
    with pytest.raises(BitallocError, match="does not implement _solve"):
        register_solver(Abstract)

    class Nameless(Cheapest):
        name: ClassVar[str] = " "

    with pytest.raises(BitallocError, match="needs a class attribute name"):
        register_solver(Nameless)
    assert list(available_solvers()) == BUILTINS


def test_context_manager_unregisters_on_error():
    with pytest.raises(RuntimeError), registered_solver(Cheapest):
        assert "test-cheapest" in solver_names()
        raise RuntimeError("boom")
    assert "test-cheapest" not in solver_names()
    with registered_solver(LagrangianSolver):  # registered before: left registered
        pass
    assert solver_class("lagrangian") is LagrangianSolver


def test_an_entry_point_solver_is_loaded_on_first_lookup(plugins):
    plugins(("test-plugin", "tests.solvers.plugin_solver:PluginSolver"))
    sys.modules.pop("tests.solvers.plugin_solver", None)
    assert solver_names()[-1] == "test-plugin"
    assert "tests.solvers.plugin_solver" not in sys.modules
    sol = solve(_problem(), method="test-plugin")
    assert sol.method == "test-plugin" and sol.choice.tolist() == [0, 0]
    # The built-in rl still comes from bitalloc itself without its entry point.
    assert list(available_solvers()) == [*BUILTINS, "test-plugin"]


def test_a_broken_entry_point_fails_only_when_used(plugins):
    plugins(("test-broken", "tests.solvers.no_such_module:Solver"))
    problem = _problem()
    assert solve(problem, method="lagrangian").status == "optimal"
    assert solver_names()[-1] == "test-broken"
    message = r"'test-broken' cannot be loaded: entry point test-broken = tests\.solvers\.no_"
    with pytest.raises(BitallocError, match=message + r".*ModuleNotFoundError"):
        solve(problem, method="test-broken")
    with pytest.raises(BitallocError, match=message):
        available_solvers()
    # A method that ignores interactions still says which do, skipping the broken plugin.
    coupled = Problem(
        problem.objective, problem.costs, problem.budgets, interactions={(0, 1): np.eye(2)}
    )
    with pytest.raises(BitallocError, match=r"use a method that optimises them \('ilp', 'qp'\)"):
        solve(coupled, method="lagrangian")


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("json:dumps", "is not a solver"),
        ("tests.solvers.plugin_solver:PluginSolver", "names a solver called 'test-plugin'"),
        ("tests.solvers.plugin_solver:Missing", "AttributeError"),
    ],
)
def test_an_entry_point_to_something_else_is_refused(plugins, target, message):
    plugins(("test-other", target))
    with pytest.raises(BitallocError, match=message):
        solver_class("test-other")
    assert solve(_problem(), method="dp").status == "optimal"


def test_two_entry_points_for_one_name(plugins):
    same = ("test-plugin", "tests.solvers.plugin_solver:PluginSolver")
    plugins(same, same)  # one package found twice on the path: one solver
    assert solver_class("test-plugin").name == "test-plugin"
    plugins(("test-two", "a.b:C"), ("test-two", "d.e:F"))
    with pytest.raises(BitallocError, match="'test-two' is declared by several entry points"):
        solver_class("test-two")
