"""Reference optimum by exhaustive enumeration, shared by the solver tests."""

from __future__ import annotations

import itertools

import numpy as np

from bitalloc.solvers import Problem
from bitalloc.solvers.problem import feasibility_tolerance


def brute_force(problem: Problem) -> float:
    """Optimal objective by enumerating every allowed choice (tiny problems only)."""
    options = [np.flatnonzero(row) for row in problem.allowed]
    choices = np.array(list(itertools.product(*options)), dtype=np.int64)
    rows = np.arange(problem.n_units)
    ok = np.ones(len(choices), dtype=bool)
    for name, bound in problem.budgets.items():
        totals = problem.costs[name][rows, choices].sum(axis=1)
        ok &= totals <= bound + feasibility_tolerance(bound)
    return float(problem.objective[rows, choices].sum(axis=1)[ok].min())
