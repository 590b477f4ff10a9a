"""Reference optimum by exhaustive enumeration, shared by the solver tests."""

from __future__ import annotations

import itertools

import numpy as np

from bitalloc.solvers import Problem
from bitalloc.solvers.problem import feasibility_tolerance


def brute_force_choice(problem: Problem) -> tuple[float, np.ndarray]:
    """Optimal objective and one optimal choice, by enumerating every allowed choice.

    Honours budgets, pins, ties and interaction terms. Tiny problems only.
    """
    options = [np.flatnonzero(row) for row in problem.allowed]
    for unit, option in problem.pins.items():
        options[unit] = np.array([option])
    choices = np.array(list(itertools.product(*options)), dtype=np.int64)
    rows = np.arange(problem.n_units)
    ok = np.ones(len(choices), dtype=bool)
    for name, bound in problem.budgets.items():
        totals = problem.costs[name][rows, choices].sum(axis=1)
        ok &= totals <= bound + feasibility_tolerance(bound)
    for group in problem.ties:
        ok &= (choices[:, list(group)] == choices[:, [group[0]]]).all(axis=1)
    values = problem.objective[rows, choices].sum(axis=1)
    for (a, b), table in zip(problem.interaction_pairs, problem.interaction_values):
        values += table[choices[:, a], choices[:, b]]
    if not ok.any():
        raise ValueError("no feasible choice")
    best = int(np.flatnonzero(ok)[np.argmin(values[ok])])
    return float(values[best]), choices[best]


def brute_force(problem: Problem) -> float:
    """Optimal objective by enumerating every allowed choice (tiny problems only)."""
    return brute_force_choice(problem)[0]


def random_budgets(
    rng: np.random.Generator,
    costs: dict[str, np.ndarray],
    allowed: np.ndarray,
    count: int,
    spread: float,
) -> dict[str, float]:
    """Budgets for the first ``count`` cost tables that one random allowed choice meets.

    Each budget lies a random fraction (up to ``spread``) of the way from that choice's total
    to the dearest total, so the budgets are jointly feasible and usually binding.
    """
    n = allowed.shape[0]
    anchor = np.array([rng.choice(np.flatnonzero(row)) for row in allowed])
    budgets = {}
    for name in list(costs)[:count]:
        table = costs[name]
        used = table[np.arange(n), anchor].sum()
        top = np.where(allowed, table, 0).max(axis=1).sum()
        budgets[name] = float(used + rng.uniform(0, spread) * (top - used))
    return budgets
