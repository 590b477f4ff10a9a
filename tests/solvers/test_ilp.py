"""ILPSolver against brute force on every backend, plus budgets, limits, scaling and options."""

from __future__ import annotations

import time

import numpy as np
import pytest

from bitalloc.errors import BitallocError, InfeasibleBudgetError
from bitalloc.solvers import Problem
from bitalloc.solvers import ilp as ilp_module
from bitalloc.solvers._ilp_model import build_model, integer_budget
from bitalloc.solvers.ilp import BACKENDS, ILPSolver
from bitalloc.solvers.problem import feasibility_tolerance
from tests.solvers.brute import brute_force_choice, random_budgets


def _available(backend: str) -> bool:
    if backend != "scip":
        return True
    from ortools.linear_solver import pywraplp

    return pywraplp.Solver.CreateSolver("SCIP") is not None


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    if not _available(request.param):
        pytest.skip(f"OR-Tools build has no {request.param}")
    return request.param


def random_problem(seed: int, n_budgets: int, n_pairs: int = 0) -> Problem:
    """Up to 7 units x 4 options, budgets met by a random choice (so jointly feasible)."""
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(2, 8)), int(rng.integers(2, 5))
    if seed % 3 == 0:
        objective = rng.integers(0, 5, (n, k)).astype(float)  # exact ties
    else:
        objective = rng.exponential(1.0, (n, k))
    costs = {
        "bits": rng.integers(1, 9, (n, k)).astype(float),
        "bytes": rng.uniform(0.0, 4.0, (n, k)),  # not integral: inexact scaling for CP-SAT
        "latency": rng.integers(0, 3, (n, k)) * 0.25,  # quarter steps: exact after scaling
    }
    allowed = rng.random((n, k)) < 0.75
    allowed[np.arange(n), rng.integers(0, k, n)] = True
    budgets = random_budgets(rng, costs, allowed, n_budgets, 0.6)
    interactions = []
    for _ in range(n_pairs):
        a, b = rng.choice(n, 2, replace=False)
        table = rng.normal(0.0, 0.6, (k, k))
        interactions.append((int(a), int(b), (table + table.T) / 2 + rng.normal(0, 0.1, (k, k))))
    return Problem(objective, costs, budgets, allowed, interactions=interactions or None)


def check_optimal(problem: Problem, backend: str, **options) -> None:
    sol = ILPSolver(backend=backend, **options).solve(problem)
    best, _ = brute_force_choice(problem)
    assert problem.is_feasible(sol.choice)
    assert sol.objective == pytest.approx(best, abs=1e-9)
    assert sol.lower_bound <= best + 1e-9
    # The backend proved optimality; the reported bound is lower only by what floating point
    # may have cost: CP-SAT's rounding allowance, or the MIP backends' tolerance margin.
    if backend == "cp-sat":
        assert sol.info["backend_status"] == "OPTIMAL"
        assert sol.gap <= sol.info["objective_rounding_allowance"] + 1e-12
    else:
        assert "optimal" in sol.info["backend_status"].lower()
        assert sol.gap <= sol.info["bound_margin"] + 1e-12 * max(1.0, abs(best))
    assert sol.info["backend"] == backend
    assert sol.info["proven_gap"] == pytest.approx(sol.gap, abs=1e-12)


@pytest.mark.parametrize("n_budgets", [0, 1, 2, 3])
def test_matches_brute_force(backend, n_budgets):
    for seed in range(8):
        check_optimal(random_problem(seed, n_budgets), backend)


@pytest.mark.parametrize("n_budgets", [1, 2])
def test_interactions_match_brute_force(backend, n_budgets):
    for seed in range(8):
        problem = random_problem(100 + seed, n_budgets, n_pairs=3)
        assert problem.has_interactions
        check_optimal(problem, backend)


def test_pins_ties_and_folded_interactions(backend):
    # Pins and ties reach _solve as single-option rows and merged units. The pair inside the
    # tie group is folded by the collapse, the pair with the pinned unit by the ILP model.
    rng = np.random.default_rng(5)
    n, k = 6, 3
    objective = rng.exponential(1.0, (n, k))
    bits = rng.integers(1, 6, (n, k)).astype(float)
    interactions = [(0, 1, rng.normal(0, 1, (k, k))), (2, 3, rng.normal(0, 1, (k, k)))]
    interactions += [(4, 5, rng.normal(0, 1, (k, k))), (1, 4, rng.normal(0, 1, (k, k)))]
    problem = Problem(
        objective,
        {"bits": bits},
        {"bits": float(bits.min(axis=1).sum() + 4)},
        pins={0: 2},
        ties=[(2, 3)],
        interactions=interactions,
    )
    check_optimal(problem, backend)
    info = ILPSolver(backend=backend).solve(problem).info
    assert info["interaction_pairs_folded"] == 1
    assert info["interaction_pairs_modelled"] == 2


def test_constant_and_zero_tables_need_no_variables():
    problem = Problem(
        np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]),
        {"bits": np.array([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]])},
        {"bits": 4.0},
        interactions=[(0, 1, np.zeros((2, 2))), (1, 2, np.full((2, 2), 0.5))],
    )
    sol = ILPSolver().solve(problem)
    assert sol.info["y_variables"] == 0
    assert sol.objective == pytest.approx(brute_force_choice(problem)[0])


def test_jointly_infeasible_budgets_raise(backend):
    # Option 0 is cheap in bits, option 1 in bytes: each budget alone is met by one option
    # everywhere, both together by nothing.
    n = 5
    costs = {"bits": np.tile([1.0, 2.0], (n, 1)), "bytes": np.tile([2.0, 1.0], (n, 1))}
    problem = Problem(np.zeros((n, 2)), costs, {"bits": 6.0, "bytes": 6.0})
    with pytest.raises(InfeasibleBudgetError) as caught:
        ILPSolver(backend=backend).solve(problem)
    message = str(caught.value)
    assert "cannot all be met" in message
    assert "'bits' <= 6" in message and "'bytes' <= 6" in message
    assert "smallest achievable total on its own: 5" in message


def large_problem(n: int, seed: int = 7) -> Problem:
    """Realistic shape: sensitivity x 2^-bits objective, integer bit counts, one budget."""
    rng = np.random.default_rng(seed)
    bits_per_weight = np.array([2, 3, 4, 5, 6, 8, 12, 16])
    size = rng.integers(1, 65, n) * 1024
    objective = rng.lognormal(0, 1, (n, 1)) * 2.0 ** -bits_per_weight[None, :]
    objective = objective * rng.uniform(0.9, 1.1, (n, bits_per_weight.size))
    bits = (bits_per_weight[None, :] * size[:, None]).astype(float)
    return Problem(objective, {"bits": bits}, {"bits": 4.3 * float(size.sum())})


@pytest.mark.parametrize("backend_name", ["highs", "cp-sat"])
@pytest.mark.parametrize("limit", [1e-3, 0.1])
def test_tiny_time_limit_gives_choice_or_clear_error(backend_name, limit):
    # Which of the two outcomes happens depends on the machine's speed; both are correct.
    problem = large_problem(3000)
    try:
        sol = ILPSolver(backend=backend_name, time_limit=limit).solve(problem)
    except BitallocError as exc:
        message = str(exc)
        assert "no feasible choice" in message and "time_limit" in message
        assert "lagrangian" in message
    else:
        assert problem.is_feasible(sol.choice)
        assert sol.status in ("optimal", "feasible")
        assert sol.lower_bound is None or sol.lower_bound <= sol.objective


@pytest.mark.parametrize("limit", [1e-3, 0.5])
def test_cp_sat_time_limit_returns_hinted_choice(limit):
    # With the Lagrangian hint CP-SAT always has a feasible choice: its own if it found one
    # in time, else the hint, with whatever bound it proved.
    problem = large_problem(2000)
    sol = ILPSolver(backend="cp-sat", time_limit=limit).solve(problem)
    assert problem.is_feasible(sol.choice)
    assert sol.info["hint_used"]
    assert sol.lower_bound is None or sol.lower_bound <= sol.objective


def test_highs_proves_2000_units_quickly():
    problem = large_problem(2000)
    start = time.perf_counter()
    sol = ILPSolver(backend="highs", time_limit=120.0).solve(problem)
    elapsed = time.perf_counter() - start
    assert "Optimal" in sol.info["backend_status"]
    assert sol.gap == pytest.approx(sol.info["bound_margin"], rel=1e-6)
    assert sol.info["proven_gap_rel"] < 1e-8
    assert problem.is_feasible(sol.choice)
    assert elapsed < 60.0  # a few seconds normally; generous for a shared machine


@pytest.mark.parametrize("seed", range(6))
def test_cp_sat_bound_valid_for_awkward_floats(seed):
    rng = np.random.default_rng(300 + seed)
    n, k = 6, 4
    magnitude = rng.choice([1e-7, 3.3e2, 1.0, 2.5e-4], (n, k))
    objective = magnitude * rng.uniform(0.5, 1.5, (n, k)) * rng.choice([-1, 1], (n, k))
    costs = {"bits": rng.uniform(0.1, 3.0, (n, k))}
    problem = Problem(objective, costs, {"bits": float(costs["bits"].mean(axis=1).sum())})
    pair_table = rng.choice([1e-7, 3.3e2], (k, k)) * rng.uniform(-1, 1, (k, k))
    with_pair = Problem(objective, costs, problem.budgets, interactions=[(0, 3, pair_table)])
    for prob in (problem, with_pair):
        best, _ = brute_force_choice(prob)
        # The automatic scale, and a deliberately coarse one (largest coefficient -> ~10):
        # rounding then changes the integer model a lot, yet the bound must stay valid.
        largest = float(build_model(prob).group_max.max())
        for scale in (None, 10.0 / largest):
            sol = ILPSolver(backend="cp-sat", objective_scale=scale).solve(prob)
            assert prob.is_feasible(sol.choice)
            assert sol.lower_bound <= best + 1e-12 * abs(best)
            assert sol.objective >= best - 1e-12 * abs(best)
            if scale is None:
                assert sol.objective == pytest.approx(best, rel=1e-12, abs=1e-15)


def test_cp_sat_integer_objective_is_proven_optimal():
    problem = random_problem(0, 2)  # seed % 3 == 0: integer objective
    sol = ILPSolver(backend="cp-sat").solve(problem)
    assert sol.status == "optimal"


def test_integer_budget_scaling():
    n = 10
    bits = np.arange(n * 3, dtype=float) + 1.0
    exact = integer_budget(bits, 40.0, n)
    assert exact.exact and exact.scale == 1.0
    assert np.array_equal(exact.tight_costs, bits.astype(np.int64))
    assert exact.tight_budget == exact.relaxed_budget == 40
    quarters = integer_budget(bits * 0.25, 10.0, n)
    assert quarters.exact and quarters.scale == 4.0
    tenths = integer_budget(bits * 0.1, 10.0, n)  # 0.1 * 3 is 0.30000000000000004
    assert tenths.exact and tenths.scale == 10.0
    assert np.array_equal(tenths.tight_costs, tenths.relaxed_costs)

    rng = np.random.default_rng(0)
    cost = rng.uniform(0, 3, (n, 4))
    budget = float(cost.mean(axis=1).sum())
    scaled = integer_budget(cost.ravel(), budget, n)
    assert not scaled.exact
    tight, relaxed = scaled.tight_costs.reshape(n, 4), scaled.relaxed_costs.reshape(n, 4)
    rows = np.arange(n)
    for _ in range(2000):
        choice = rng.integers(0, 4, n)
        real = cost[rows, choice].sum()
        if tight[rows, choice].sum() <= scaled.tight_budget:
            assert real <= budget + feasibility_tolerance(budget)
        if real <= budget + feasibility_tolerance(budget):
            assert relaxed[rows, choice].sum() <= scaled.relaxed_budget


def test_cp_sat_falls_back_to_tight_costs(monkeypatch):
    # Relaxed costs of zero make the first model ignore the budget; its choice is over the
    # real budget, so the solver must re-solve with the tight costs. The relaxed model's
    # bound (here of the unconstrained problem) stays valid.
    real = ilp_module.integer_budget

    def loose(cost, budget, n_units):
        scaled = real(cost, budget, n_units)
        return type(scaled)(
            scaled.scale,
            scaled.exact,
            np.zeros_like(scaled.relaxed_costs),
            scaled.relaxed_budget,
            scaled.tight_costs,
            scaled.tight_budget,
        )

    monkeypatch.setattr(ilp_module, "integer_budget", loose)
    problem = random_problem(4, 1)
    # Binding, yet above the cheapest total: at that total every option but the cheapest is
    # removed before the backend runs, and nothing is left to go over.
    low = problem.min_resource("bits")
    free = problem.costs["bits"][np.arange(problem.n_units), problem.objective.argmin(axis=1)]
    budget = max(low + 1.0, float(free.sum()) - 1.0)
    problem = Problem(problem.objective, problem.costs, {"bits": budget})
    sol = ILPSolver(backend="cp-sat").solve(problem)
    best, _ = brute_force_choice(problem)
    assert sol.info["cost_model"] == "relaxed+tight"
    assert problem.is_feasible(sol.choice)
    assert sol.objective == pytest.approx(best, abs=1e-9)
    assert sol.lower_bound <= best + 1e-9


def test_mip_retries_when_over_budget(monkeypatch):
    # Pretend the first choice was over budget by the solver's tolerance.
    real = ilp_module.budget_excess
    calls = []

    def first_over(model, x):
        calls.append(1)
        return {"bits": 0.5} if len(calls) == 1 else real(model, x)

    monkeypatch.setattr(ilp_module, "budget_excess", first_over)
    problem = random_problem(1, 1)
    sol = ILPSolver(backend="highs").solve(problem)
    assert sol.info["budget_retries"] == 1
    assert problem.is_feasible(sol.choice)
    assert sol.lower_bound <= brute_force_choice(problem)[0] + 1e-9


def test_deterministic_and_info():
    problem = random_problem(2, 2, n_pairs=2)
    for backend_name in ("highs", "cp-sat"):
        first = ILPSolver(backend=backend_name).solve(problem)
        second = ILPSolver(backend=backend_name).solve(problem)
        assert np.array_equal(first.choice, second.choice)
        for key in ("variables", "constraints", "backend_status", "nodes", "proven_gap_rel"):
            assert key in first.info
    info = ILPSolver(backend="cp-sat").solve(problem).info
    assert set(info["cost_scales"]) == {"bits", "bytes"}
    assert info["objective_scale"] > 0


def test_unbudgeted_problem():
    problem = random_problem(3, 0, n_pairs=2)
    for backend_name in ("highs", "cp-sat"):
        sol = ILPSolver(backend=backend_name).solve(problem)
        assert sol.objective == pytest.approx(brute_force_choice(problem)[0], abs=1e-9)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"backend": "gurobi"}, "unknown ILP backend 'gurobi'"),
        ({"backend": "cbc"}, "unknown ILP backend 'cbc'"),
        ({"time_limit": -1.0}, "time_limit must be > 0"),
        ({"time_limit": 0}, "time_limit must be > 0"),
        ({"time_limit": float("nan")}, "time_limit must be finite"),
        ({"time_limit": "10"}, "time_limit must be a number"),
        ({"mip_rel_gap": -0.1}, "mip_rel_gap must be >= 0"),
        ({"num_workers": 0}, "num_workers must be an int >= 1"),
        ({"num_workers": 2.0}, "num_workers must be an int >= 1"),
        ({"objective_scale": 0.0}, "objective_scale must be > 0"),
        ({"random_seed": 1.5}, "random_seed must be an int"),
        ({"hint": "yes"}, "hint must be True or False"),
    ],
)
def test_option_validation(options, match):
    with pytest.raises(BitallocError, match=match):
        ILPSolver(**options)


def test_objective_scale_overflow_is_reported():
    problem = random_problem(1, 1)
    with pytest.raises(BitallocError, match="objective_scale"):
        ILPSolver(backend="cp-sat", objective_scale=1e30).solve(problem)


def test_class_attributes():
    assert ILPSolver.name == "ilp"
    assert ILPSolver.max_budgets is None
    assert ILPSolver.supports_interactions is True
    ILPSolver(time_limit=None)  # no limit is allowed
