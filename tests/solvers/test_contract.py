"""The contract every registered solver keeps (see BaseSolver).

Parametrized over ``available_solvers()``: a new solver added to the registry gets these
checks without editing this file.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from bitalloc.errors import BitallocError, InfeasibleBudgetError
from bitalloc.solvers import BaseSolver, Problem, Solution, available_solvers, solve
from tests.solvers.brute import brute_force

METHODS = sorted(available_solvers())


def small_problems() -> list[Problem]:
    problems = []
    for seed in range(12):
        rng = np.random.default_rng(1000 + seed)
        n, k = int(rng.integers(2, 7)), int(rng.integers(2, 5))
        objective = rng.exponential(1.0, (n, k))
        costs = {"bits": rng.integers(1, 9, (n, k)).astype(float), "aux": rng.random((n, k))}
        allowed = rng.random((n, k)) < 0.75
        allowed[np.arange(n), rng.integers(0, k, n)] = True
        base = Problem(objective, costs, {}, allowed)
        low, high = base.feasible_range("bits")
        budget = low + (seed % 4) / 3 * (high - low)
        names = {"unit_names": [f"u{i}" for i in range(n)]} if seed % 2 else {}
        problems.append(Problem(objective, costs, {"bits": budget}, allowed, **names))
    return problems


@pytest.fixture(params=METHODS)
def method(request) -> str:
    return request.param


def test_registry_is_consistent():
    registry = available_solvers()
    assert "lagrangian" in registry
    for name, cls in registry.items():
        assert issubclass(cls, BaseSolver)
        assert cls.name == name
    registry.clear()  # a fresh dict per call: clearing it changes nothing
    assert available_solvers()


def test_feasible_allowed_and_bounds_valid(method):
    for problem in small_problems():
        sol = solve(problem, method=method)
        assert isinstance(sol, Solution)
        assert sol.method == method
        assert sol.choice.shape == (problem.n_units,)
        assert problem.allowed[np.arange(problem.n_units), sol.choice].all()
        assert problem.is_feasible(sol.choice)
        assert sol.objective == pytest.approx(problem.objective_of(sol.choice))
        assert sol.resources == pytest.approx(problem.resources(sol.choice))
        assert sol.status in ("optimal", "feasible")
        best = brute_force(problem)
        assert best <= sol.objective + 1e-9
        if sol.lower_bound is not None:
            assert sol.lower_bound <= best + 1e-9
            assert sol.gap == pytest.approx(sol.objective - sol.lower_bound)
            assert sol.objective - best <= sol.gap + 1e-9
        if sol.status == "optimal":
            assert sol.objective == pytest.approx(best, abs=1e-9)
        assert sol.wall_time_s >= 0.0


def test_deterministic(method):
    for problem in small_problems():
        first = solve(problem, method=method)
        second = solve(problem, method=method)
        assert np.array_equal(first.choice, second.choice)
        assert first.objective == second.objective


def test_infeasible_budget_raises_with_range(method):
    problem = small_problems()[0]
    low, high = problem.feasible_range("bits")
    tight = Problem(problem.objective, problem.costs, {"bits": low - 1.0}, problem.allowed)
    with pytest.raises(InfeasibleBudgetError) as caught:
        solve(tight, method=method)
    assert caught.value.feasible_range == pytest.approx((low, high))
    assert f"{low:.10g}" in str(caught.value)


def test_unbudgeted_problem_is_solved_optimally(method):
    problem = small_problems()[3]
    free = Problem(problem.objective, problem.costs, {}, problem.allowed)
    sol = solve(free, method=method)
    assert sol.objective == pytest.approx(brute_force(free))


def test_too_many_budgets_rejected(method):
    cls = available_solvers()[method]
    if cls.max_budgets is None:
        pytest.skip(f"{method} supports any number of budgets")
    problem = small_problems()[0]
    names = [f"c{i}" for i in range(cls.max_budgets + 1)]
    crowded = Problem(
        problem.objective,
        {name: problem.costs["bits"] for name in names},
        {name: problem.max_resource("bits") for name in names},
        problem.allowed,
    )
    with pytest.raises(BitallocError, match="budget"):
        solve(crowded, method=method)


def test_to_dict_is_json(method):
    sol = solve(small_problems()[1], method=method)
    text = json.dumps(sol.to_dict(), allow_nan=False)
    back = Solution.from_dict(json.loads(text))
    assert np.array_equal(back.choice, sol.choice)
    assert back.objective == sol.objective
    assert back.status == sol.status
    assert back.method == method
