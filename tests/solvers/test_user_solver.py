"""A solver defined outside bitalloc, registered by the user, held to the whole contract."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest

from bitalloc.errors import BitallocError
from bitalloc.solvers import (
    BaseSolver,
    Problem,
    available_solvers,
    registered_solver,
    solve,
    solver_names,
)
from bitalloc.solvers.base import SolverOutput
from tests.solvers import contract
from tests.solvers.brute import brute_force


class GreedyUpgrade(BaseSolver):
    """Start every unit at its cheapest option; repeatedly take the feasible change with the
    best loss saved per unit of cost added (changes that save loss at no cost first) until
    none is left. A heuristic: no lower bound."""

    name: ClassVar[str] = "test-greedy-upgrade"
    max_budgets: ClassVar[int | None] = 1

    def _solve(self, problem: Problem) -> SolverOutput:
        objective, allowed = problem.objective, problem.allowed
        if not problem.budgets:
            return SolverOutput(np.where(allowed, objective, np.inf).argmin(axis=1), None)
        (cost,) = (problem.costs[name] for name in problem.budgets)
        rows = range(problem.n_units)
        # Cheapest allowed option, the lower loss among equally cheap ones: feasible, because
        # solve() checked that the budget covers every unit at its cheapest.
        choice = np.array(
            [
                min(np.flatnonzero(allowed[i]), key=lambda j, i=i: (cost[i, j], objective[i, j]))
                for i in rows
            ]
        )
        moves = 0
        while True:
            best: tuple[float, float, int, int] | None = None
            for i in rows:
                for j in np.flatnonzero(allowed[i]):
                    saved = float(objective[i, choice[i]] - objective[i, j])
                    if saved <= 0:
                        continue
                    candidate = choice.copy()
                    candidate[i] = j
                    if not problem.is_feasible(candidate):
                        continue
                    added = float(cost[i, j] - cost[i, choice[i]])
                    # Python floats: a huge saving over a tiny cost is inf, not a warning.
                    rate = np.inf if added <= 0 else saved / added
                    if best is None or (rate, saved) > best[:2]:
                        best = (rate, saved, i, int(j))
            if best is None:
                return SolverOutput(choice, None, {"moves": moves})
            choice[best[2]] = best[3]
            moves += 1


@pytest.fixture
def greedy():
    with registered_solver(GreedyUpgrade) as cls:
        yield cls.name
    assert GreedyUpgrade.name not in solver_names()


@pytest.mark.parametrize(
    ("check", "args"),
    [pytest.param(check, args, id=case_id) for case_id, check, args in contract.CASES],
)
def test_user_solver_keeps_the_contract(greedy, check, args):
    check(greedy, *args)


def test_user_solver_is_listed_after_the_builtins_and_solves(greedy):
    names = list(available_solvers())
    assert names[:5] == ["lagrangian", "dp", "ilp", "qp", "rl"]
    assert names[-1] == greedy
    problem = contract.small_problems()[6]
    sol = solve(problem, method=greedy)
    assert sol.method == greedy and problem.is_feasible(sol.choice)
    assert sol.info["moves"] > 0
    assert sol.objective >= brute_force(problem) - 1e-9


def test_unregistered_solver_is_gone():
    problem = contract.small_problems()[0]
    with registered_solver(GreedyUpgrade):
        solve(problem, method=GreedyUpgrade.name)
    with pytest.raises(BitallocError, match="unknown solver method 'test-greedy-upgrade'"):
        solve(problem, method=GreedyUpgrade.name)
