"""The contract every registered solver keeps (see BaseSolver), run over the registry.

Parametrized over ``available_solvers()``: a new solver added to the registry (by decorator or
entry point) gets these checks without editing this file. The checks live in
``tests/solvers/contract.py`` so that a solver registered elsewhere can run them too.
"""

from __future__ import annotations

import pytest

from bitalloc.solvers import available_solvers
from tests.solvers import contract

METHODS = list(available_solvers())


@pytest.fixture(params=METHODS)
def method(request) -> str:
    return request.param


def test_registered(method):
    contract.check_registered(method)


def test_feasible_allowed_and_bounds_valid(method):
    contract.check_feasible_allowed_and_bounds_valid(method)


def test_deterministic(method):
    contract.check_deterministic(method)


def test_infeasible_budget_raises_with_range(method):
    contract.check_infeasible_budget_raises_with_range(method)


def test_unbudgeted_problem_is_solved_optimally(method):
    contract.check_unbudgeted_problem_is_solved_optimally(method)


def test_too_many_budgets_rejected(method):
    contract.check_too_many_budgets_rejected(method)


def test_to_dict_is_json(method):
    contract.check_to_dict_is_json(method)


def test_structured_instances(method):
    contract.check_structured_instances(method)


def test_interactions_refused_or_optimised(method):
    contract.check_interactions_refused_or_optimised(method)


@pytest.mark.parametrize("cost_scale", contract.EXTREME_COST_SCALES)
@pytest.mark.parametrize("where", contract.EXTREME_BUDGETS)
def test_extreme_costs_and_budgets_solve_correctly(method, cost_scale, where):
    contract.check_extreme_costs_and_budgets_solve_correctly(method, cost_scale, where)


@pytest.mark.parametrize("objective_scale", contract.EXTREME_OBJECTIVE_SCALES)
def test_extreme_objectives_solve_correctly(method, objective_scale):
    contract.check_extreme_objectives_solve_correctly(method, objective_scale)


def test_costs_spanning_the_range_from_1e_6_to_1e18(method):
    contract.check_costs_spanning_the_range_from_1e_6_to_1e18(method)


def test_losses_huge_against_tiny_costs_give_no_infinite_bound(method):
    contract.check_losses_huge_against_tiny_costs_give_no_infinite_bound(method)


def test_every_check_runs_here_and_in_cases():
    """A check added to contract.py must be listed in CASES (so registered solvers get it)
    and have a test above (so the registry's solvers do)."""
    checks = {n for n in dir(contract) if n.startswith("check_")}
    listed = {check.__name__ for _, check, _ in contract.CASES}
    tested = {"check_" + n[len("test_") :] for n in globals() if n.startswith("test_")}
    assert listed == checks
    assert checks <= tested
    assert len({case_id for case_id, _, _ in contract.CASES}) == len(contract.CASES)
