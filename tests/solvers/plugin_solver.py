"""A solver as a third-party package would ship it: not decorated, found by its entry point
(``tests/solvers/test_registry.py`` declares one pointing here)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from bitalloc.solvers import BaseSolver, Problem
from bitalloc.solvers.base import SolverOutput


class PluginSolver(BaseSolver):
    """Every unit at its cheapest allowed option under the single budget."""

    name: ClassVar[str] = "test-plugin"
    max_budgets: ClassVar[int | None] = 1

    def _solve(self, problem: Problem) -> SolverOutput:
        (cost,) = [problem.costs[n] for n in problem.budgets] or [problem.objective]
        return SolverOutput(np.where(problem.allowed, cost, np.inf).argmin(axis=1), None)
