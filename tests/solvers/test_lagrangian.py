"""LagrangianSolver against brute force, plus its special cases and options."""

from __future__ import annotations

import re

import numpy as np
import pytest

from bitalloc.errors import BitallocError, InfeasibleBudgetError
from bitalloc.solvers import LagrangianSolver, Problem, solve
from tests.solvers.brute import brute_force


def random_problem(seed: int, budget_fraction: float) -> Problem:
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(1, 9)), int(rng.integers(1, 5))
    if seed % 3 == 0:
        # Small integers: plenty of exact ties in cost, objective and efficiency.
        objective = rng.integers(0, 4, (n, k)).astype(float)
        cost = rng.integers(0, 4, (n, k)).astype(float)
    else:
        objective = rng.exponential(1.0, (n, k))
        cost = rng.uniform(0.0, 10.0, (n, k))
    allowed = rng.random((n, k)) < 0.7
    allowed[np.arange(n), rng.integers(0, k, n)] = True
    low = np.where(allowed, cost, np.inf).min(axis=1).sum()
    high = np.where(allowed, cost, -np.inf).max(axis=1).sum()
    return Problem(
        objective, {"bits": cost}, {"bits": low + budget_fraction * (high - low)}, allowed
    )


@pytest.mark.parametrize("fraction", [0.0, 0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95, 1.0])
def test_matches_brute_force_bounds(fraction):
    for seed in range(40):
        problem = random_problem(seed, fraction)
        sol = LagrangianSolver().solve(problem)
        best = brute_force(problem)
        assert problem.is_feasible(sol.choice)
        assert problem.allowed[np.arange(problem.n_units), sol.choice].all()
        assert sol.lower_bound <= best + 1e-9
        assert best <= sol.objective + 1e-9
        assert sol.objective - best <= sol.gap + 1e-9
        if sol.status == "optimal":
            assert sol.objective == pytest.approx(best, abs=1e-9)


def test_fill_disabled_still_valid():
    for seed in range(30):
        problem = random_problem(seed, 0.5)
        sol = LagrangianSolver(fill=False).solve(problem)
        best = brute_force(problem)
        assert problem.is_feasible(sol.choice)
        assert sol.lower_bound <= best + 1e-9 <= sol.objective + 2e-9


def convex_problem(seed: int, n: int, k: int) -> tuple[Problem, np.ndarray]:
    """Every option on its unit's strictly convex decreasing curve; budget on a breakpoint."""
    rng = np.random.default_rng(seed)
    cost = np.cumsum(rng.integers(1, 5, (n, k)), axis=1).astype(float)
    slopes = np.sort(rng.uniform(0.1, 5.0, (n, k - 1)), axis=1)[:, ::-1]
    steps = slopes * np.diff(cost, axis=1)
    objective = np.concatenate([np.zeros((n, 1)), -np.cumsum(steps, axis=1)], axis=1) + 50.0
    lam = float(rng.uniform(0.5, 4.5))
    choice = np.argmin(objective + lam * cost, axis=1)
    budget = float(cost[np.arange(n), choice].sum())
    return Problem(objective, {"bits": cost}, {"bits": budget}), choice


@pytest.mark.parametrize(("seed", "n", "k"), [(0, 6, 3), (1, 8, 4), (2, 500, 8), (3, 5000, 6)])
def test_budget_on_breakpoint_is_optimal(seed, n, k):
    problem, expected = convex_problem(seed, n, k)
    sol = LagrangianSolver().solve(problem)
    assert sol.status == "optimal"
    assert sol.gap == pytest.approx(0.0, abs=1e-12 * abs(sol.objective))
    assert sol.objective == pytest.approx(problem.objective_of(expected), rel=1e-12)
    if n <= 8:
        assert sol.objective == pytest.approx(brute_force(problem), abs=1e-9)


def test_infeasible_budget():
    problem = Problem(
        [[1.0, 0.0], [1.0, 0.0]],
        {"bits": [[3.0, 5.0], [2.0, 7.0]]},
        {"bits": 4.0},
        allowed=[[True, True], [False, True]],
    )
    with pytest.raises(InfeasibleBudgetError, match=re.escape("smallest achievable total is 10")):
        LagrangianSolver().solve(problem)
    try:
        solve(problem)
    except InfeasibleBudgetError as exc:
        assert exc.feasible_range == (10.0, 12.0)


def test_budget_at_minimum_takes_cheapest_options():
    problem = random_problem(7, 0.0)
    sol = solve(problem)
    cheapest = np.where(problem.allowed, problem.costs["bits"], np.inf).min(axis=1)
    assert sol.resources["bits"] == pytest.approx(cheapest.sum())


def test_deterministic_with_ties():
    problem = Problem(
        np.tile([4.0, 2.0, 2.0, 1.0, 1.0], (50, 1)),
        {"bits": np.tile([1.0, 2.0, 2.0, 3.0, 3.0], (50, 1))},
        {"bits": 111.0},
    )
    first = solve(problem)
    for _ in range(3):
        again = solve(problem)
        assert np.array_equal(first.choice, again.choice)
        assert again.objective == first.objective
    assert not np.isin(first.choice, [2, 4]).any()  # equal options: lowest index wins


def test_more_than_one_budget_rejected():
    problem = Problem(
        [[1.0, 0.0]], {"bits": [[1.0, 2.0]], "bytes": [[1.0, 2.0]]}, {"bits": 2.0, "bytes": 2.0}
    )
    with pytest.raises(BitallocError, match="at most 1 budget.*'ilp'"):
        solve(problem)


def test_no_budget_picks_min_objective_then_cheapest():
    problem = Problem(
        [[2.0, 1.0, 1.0, 1.0], [0.0, 3.0, 0.0, 0.0]],
        {"bits": [[1.0, 5.0, 4.0, 4.0], [9.0, 1.0, 9.0, 8.0]], "bytes": [[0, 0, 1, 0], [0] * 4]},
    )
    sol = solve(problem)
    assert sol.choice.tolist() == [3, 3]
    assert sol.status == "optimal" and sol.gap == 0.0
    assert sol.resources == {"bits": 12.0, "bytes": 0.0}


def test_slack_budget_returns_unconstrained_optimum():
    problem = random_problem(4, 1.0)
    sol = solve(problem)
    assert sol.status == "optimal"
    assert sol.info["case"] == "unconstrained"
    assert sol.info["budgets_not_binding"] == ["bits"]
    assert sol.objective == pytest.approx(
        np.where(problem.allowed, problem.objective, np.inf).min(1).sum()
    )


def test_large_instance_small_gap():
    rng = np.random.default_rng(123)
    n, k = 20_000, 8
    bits = np.sort(rng.uniform(2.0, 16.0, (n, k)), axis=1)
    size = rng.integers(1_000, 1_000_000, (n, 1)).astype(float)
    objective = size * 1e-6 * np.exp(-0.7 * bits) * rng.lognormal(0.0, 0.5, (n, k))
    cost = bits * size
    problem = Problem(objective, {"bits": cost}, {"bits": float(4.5 * size.sum())})
    sol = solve(problem)
    assert problem.is_feasible(sol.choice)
    assert sol.gap <= 1e-3 * abs(sol.objective)
    assert sol.info["case"] == "lagrangian"


def test_problem_is_not_modified():
    problem = random_problem(5, 0.4)
    before = (problem.objective.copy(), problem.costs["bits"].copy(), dict(problem.budgets))
    solve(problem)
    assert np.array_equal(problem.objective, before[0])
    assert np.array_equal(problem.costs["bits"], before[1])
    assert problem.budgets == before[2]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"max_fill_rounds": -1}, "max_fill_rounds must be >= 0"),
        ({"max_fill_rounds": 2.5}, "max_fill_rounds must be an int"),
        ({"fill": "yes"}, "fill must be True or False"),
        ({"bogus": 1}, "accepted options: fill, max_fill_rounds"),
    ],
)
def test_bad_options(options, match):
    with pytest.raises(BitallocError, match=match):
        solve(random_problem(1, 0.5), **options)


def test_unknown_method_lists_known():
    with pytest.raises(BitallocError, match="unknown solver method 'simplex'.*'lagrangian'"):
        solve(random_problem(1, 0.5), method="simplex")


def test_budget_a_rounding_error_below_minimum_is_accepted():
    rng = np.random.default_rng(0)
    objective, cost = rng.random((50, 4)), rng.random((50, 4)) * 1e6
    low = Problem(objective, {"bits": cost}).min_resource("bits")
    sol = solve(Problem(objective, {"bits": cost}, {"bits": low * (1 - 5e-10)}))
    assert sol.resources["bits"] == pytest.approx(low, rel=1e-12)
    assert sol.lower_bound <= sol.objective
    with pytest.raises(InfeasibleBudgetError):
        solve(Problem(objective, {"bits": cost}, {"bits": low * (1 - 1e-8)}))
