"""Solver inputs over the whole float range: a valid answer or the project's own error.

Costs, objectives and budgets are drawn from tiny, huge and subnormal values, zero, and
budgets at and beyond the extremes (the largest float included). Every method except ``rl``
(which trains a network per call) must either return a feasible choice whose objective and
bound agree with exhaustive search, or raise :class:`~bitalloc.errors.BitallocError`.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitalloc.errors import BitallocError
from bitalloc.solvers import Problem, solve, solver_names
from bitalloc.solvers.base import OPTIMALITY_RTOL
from tests.solvers.brute import brute_force

# By name: listing the methods imports none, so rl (torch) is not loaded just to be left out.
METHODS = [m for m in solver_names() if m != "rl"]

# Magnitudes from subnormal to the largest float; each entry is one of these times a small
# integer, so a table mixes scales as real cost tables in odd units would.
SCALES = [0.0, 5e-324, 1e-310, 1e-300, 1e-12, 1e-6, 1.0, 1e6, 1e15, 1e18, 1e150, 1e300]
BUDGET_SPOTS = ["min", "mid", "max", "above", "float_max", "zero", "tiny"]


@st.composite
def problems(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, str, float]:
    n = draw(st.integers(1, 4))
    k = draw(st.integers(1, 4))
    cost_scale = draw(st.sampled_from(SCALES))
    obj_scale = draw(st.sampled_from(SCALES))
    mixed = draw(st.booleans())
    cost = np.array(draw(st.lists(st.integers(0, 9), min_size=n * k, max_size=n * k)), float)
    cost = cost.reshape(n, k) * cost_scale
    if mixed:  # a few entries at another magnitude
        other = draw(st.sampled_from(SCALES))
        cost[draw(st.integers(0, n - 1)), draw(st.integers(0, k - 1))] = 7.0 * other
    signs = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=n * k, max_size=n * k))
    values = draw(st.lists(st.floats(0.0, 10.0), min_size=n * k, max_size=n * k))
    objective = (np.array(signs) * np.array(values)).reshape(n, k) * obj_scale
    return objective, cost, draw(st.sampled_from(BUDGET_SPOTS)), draw(st.floats(0.0, 1.0))


def _budget(cost: np.ndarray, spot: str, fraction: float) -> float:
    low, high = cost.min(axis=1).sum(), cost.max(axis=1).sum()
    return {
        "min": low,
        "mid": low + fraction * (high - low),
        "max": high,
        "above": high * 2.0 + 1.0,
        "float_max": sys.float_info.max,
        "zero": 0.0,
        "tiny": 1e-300,
    }[spot]


def _check(method: str, objective: np.ndarray, cost: np.ndarray, spot: str, frac: float) -> None:
    try:
        problem = Problem(objective, {"bits": cost}, {"bits": _budget(cost, spot, frac)})
    except BitallocError:
        return  # subnormal entries or totals past MAGNITUDE_LIMIT are refused with a message
    try:
        sol = solve(problem, method=method)
    except BitallocError:
        return
    assert problem.is_feasible(sol.choice), problem.violations(sol.choice)
    best = brute_force(problem)
    scale = max(abs(best), abs(sol.objective))
    assert np.isfinite(sol.objective)
    assert sol.objective >= best - 1e-9 * scale
    if sol.lower_bound is not None:
        assert np.isfinite(sol.lower_bound) and np.isfinite(sol.gap)
        assert sol.lower_bound <= best + 1e-9 * scale
    if sol.status == "optimal":
        # "optimal" means within OPTIMALITY_RTOL of the optimum relative to max(1, |objective|)
        # (solvers/base.py): losses of 1e-24 below a choice of 0 are inside that.
        assert sol.objective <= best + OPTIMALITY_RTOL * max(1.0, abs(sol.objective))


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=problems())
def test_solvers_answer_or_refuse_over_the_float_range(method, case):
    _check(method, *case)


@pytest.mark.parametrize("method", METHODS)
def test_budget_of_the_largest_float_is_not_binding(method):
    # ilp raised OverflowError and qp a SciPy ValueError (a traceback from the CLI).
    objective = np.array([[3.0, 1.0], [2.0, 0.5]])
    cost = np.array([[1.0, 4.0], [1.0, 8.0]])
    problem = Problem(objective, {"bits": cost}, {"bits": sys.float_info.max})
    sol = solve(problem, method=method)
    assert sol.choice.tolist() == [1, 1] and sol.status == "optimal"
    assert sol.info["budgets_not_binding"] == ["bits"]


def test_infinite_and_nan_inputs_are_refused():
    ones = np.ones((2, 2))
    for objective, cost, budget in (
        ([[np.nan, 1.0], [1.0, 1.0]], ones, 1.0),
        ([[np.inf, 1.0], [1.0, 1.0]], ones, 1.0),
        (ones, [[1.0, np.inf], [1.0, 1.0]], 1.0),
        (ones, [[1.0, np.nan], [1.0, 1.0]], 1.0),
        (ones, ones, np.inf),
        (ones, ones, np.nan),
    ):
        with pytest.raises(BitallocError):
            Problem(np.array(objective), {"bits": np.array(cost)}, {"bits": budget})
