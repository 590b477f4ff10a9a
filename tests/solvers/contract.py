"""The contract every registered solver keeps (see BaseSolver), as reusable checks.

Each ``check_*`` function takes a method name and asserts one part of the contract through
:func:`bitalloc.solvers.solve`; :data:`CASES` lists every check with its parameters.
``test_contract.py`` runs them over the registry, and a solver defined anywhere (a plugin, a
test) runs them by registering itself and looping over :data:`CASES`.
"""

from __future__ import annotations

import itertools
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bitalloc.errors import BitallocError, InfeasibleBudgetError
from bitalloc.solvers import BaseSolver, Problem, Solution, available_solvers, solve, solver_class
from tests.solvers.brute import brute_force

RL = "rl"
# Options that keep a method fast on these tiny instances without changing what it promises:
# the RL solver trains SAC, so it gets a short step budget here (nothing below depends on the
# quality of its policy, only on feasibility, bounds and determinism).
FAST: dict[str, dict[str, Any]] = {RL: {"steps": 16, "learning_starts": 12}}


def run(problem: Problem, method: str, **options: Any) -> Solution:
    """``solve`` with the method's fast options."""
    return solve(problem, method=method, **FAST.get(method, {}), **options)


def solve_repeatably(problem: Problem, method: str) -> Solution:
    """Solve ``problem``, assert that the same problem and options give the same answer, and
    return the first solution.

    The rl method is trained once: its seeded training is pinned by ``tests/rl`` (two tiny runs
    with one seed), so here the trained policy is saved and applied again from the file, and
    must reproduce the allocation the solver rolled out after training.
    """
    if method != RL:
        first = run(problem, method)
        second = run(problem, method)
        assert np.array_equal(first.choice, second.choice)
        assert first.objective == second.objective
        return first
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "policy.zip"
        first = run(problem, method, save_policy=str(path))
        if not first.info.get("trained"):
            # No budget binds, so nothing was trained: the answer is each unit's best option.
            assert np.array_equal(first.choice, run(problem, method).choice)
            return first
        again = solve(problem, method=method, policy=str(path))
    assert not again.info["trained"]
    if first.info["source"] == "policy":
        assert np.array_equal(again.choice, first.choice)
    else:
        # The info's objectives are those of the reduced problem (pinned units left out);
        # the best episode, returned instead, gives the offset to the full problem's.
        offset = first.objective - first.info["best_episode_objective"]
        expected = first.info["policy_objective"] + offset
        assert again.objective == pytest.approx(expected, rel=1e-12, abs=1e-12)
    return first


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


def check_registered(method: str) -> None:
    cls = solver_class(method)
    assert issubclass(cls, BaseSolver)
    assert cls.name == method
    assert available_solvers()[method] is cls


def _check_solution(problem: Problem, sol: Solution, method: str) -> None:
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


def check_feasible_allowed_and_bounds_valid(method: str) -> None:
    for problem in small_problems():
        _check_solution(problem, run(problem, method), method)


def check_deterministic(method: str) -> None:
    # The first solution is held to the whole contract too, so that checking determinism
    # costs one training of the rl method, not one more.
    for problem in small_problems():
        _check_solution(problem, solve_repeatably(problem, method), method)


def check_infeasible_budget_raises_with_range(method: str) -> None:
    problem = small_problems()[0]
    low, high = problem.feasible_range("bits")
    tight = Problem(problem.objective, problem.costs, {"bits": low - 1.0}, problem.allowed)
    with pytest.raises(InfeasibleBudgetError) as caught:
        run(tight, method)
    assert caught.value.feasible_range == pytest.approx((low, high))
    assert f"{low:.10g}" in str(caught.value)


def check_unbudgeted_problem_is_solved_optimally(method: str) -> None:
    problem = small_problems()[3]
    free = Problem(problem.objective, problem.costs, {}, problem.allowed)
    sol = run(free, method)
    assert sol.objective == pytest.approx(brute_force(free))


def check_too_many_budgets_rejected(method: str) -> None:
    cls = solver_class(method)
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
        run(crowded, method)


def check_to_dict_is_json(method: str) -> None:
    sol = run(small_problems()[1], method)
    text = json.dumps(sol.to_dict(), allow_nan=False)
    back = Solution.from_dict(json.loads(text))
    assert np.array_equal(back.choice, sol.choice)
    assert back.objective == sol.objective
    assert back.status == sol.status
    assert back.method == method


def structured_problems(cls: type[BaseSolver]) -> list[Problem]:
    """Small instances with ties, pins, as many budgets as the method takes (up to 3), and
    interactions when it optimises them; budgeted costs are integers."""
    problems = []
    budgets_max = 3 if cls.max_budgets is None else min(3, cls.max_budgets)
    for seed in range(10):
        rng = np.random.default_rng(2000 + seed)
        n, k = int(rng.integers(3, 8)), int(rng.integers(2, 5))
        allowed = rng.random((n, k)) < 0.8
        allowed[:, 0] = True
        ties = [[0, 1]] if seed % 2 else ([[0, 2], [3, n - 1]] if n > 4 else [[1, 2]])
        for group in ties:
            allowed[group] = allowed[group[0]]
        pins = {int(rng.integers(0, n)): 0} if seed % 3 == 0 else {}
        objective = rng.exponential(1.0, (n, k))
        names = [f"c{c}" for c in range(1 + seed % budgets_max)]
        costs = {name: rng.integers(1, 9, (n, k)).astype(float) for name in names}
        interactions = None
        if cls.supports_interactions and seed % 2 == 0:
            interactions = {
                (0, n - 1): rng.normal(0, 0.5, (k, k)),
                (1, 2): rng.normal(0, 1, (k, k)),
            }
        base = Problem(objective, costs, {}, allowed, pins=pins, ties=ties)
        budgets = {}
        for name in names:
            low, high = base.feasible_range(name)
            budgets[name] = float(np.floor(low + (0.3 + 0.2 * (seed % 3)) * (high - low)))
        problem = Problem(
            objective, costs, budgets, allowed, pins=pins, ties=ties, interactions=interactions
        )
        try:
            brute_force(problem)
        except ValueError:
            continue  # budgets that are jointly infeasible: covered by the ILP's own tests
        problems.append(problem)
    return problems


def check_structured_instances(method: str) -> None:
    cls = solver_class(method)
    problems = structured_problems(cls)
    assert len(problems) >= 6
    for problem in problems:
        sol = solve_repeatably(problem, method)
        assert problem.is_feasible(sol.choice), problem.violations(sol.choice)
        for group in problem.ties:
            assert len(set(sol.choice[list(group)].tolist())) == 1
        for unit, option in problem.pins.items():
            assert sol.choice[unit] == option
        best = brute_force(problem)
        assert sol.objective >= best - 1e-9
        if sol.lower_bound is not None:
            assert sol.lower_bound <= best + 1e-9
        if cls.exact:
            assert sol.status == "optimal"
        if sol.status == "optimal":
            assert sol.objective == pytest.approx(best, abs=1e-9)


def check_interactions_refused_or_optimised(method: str) -> None:
    cls = solver_class(method)
    problem = small_problems()[2]
    k = problem.n_options
    coupled = Problem(
        problem.objective,
        problem.costs,
        problem.budgets,
        problem.allowed,
        interactions={(0, 1): np.full((k, k), 0.5)},
    )
    if not cls.supports_interactions:
        with pytest.raises(BitallocError, match="interaction"):
            run(coupled, method)
    else:
        sol = run(coupled, method)
        assert sol.objective == pytest.approx(coupled.objective_of(sol.choice))
        assert sol.objective >= brute_force(coupled) - 1e-9


def _extreme(cost_scale: float, objective_scale: float, where: str) -> Problem:
    rng = np.random.default_rng(31)
    n, k = 5, 4
    cost = rng.integers(1, 9, (n, k)).astype(float) * cost_scale
    objective = rng.exponential(1.0, (n, k)) * objective_scale
    low, high = Problem(objective, {"bits": cost}).feasible_range("bits")
    budget = {
        "min": low,
        "mid": low + 0.4 * (high - low),
        "max": high,
        "float_max": sys.float_info.max,
    }[where]
    return Problem(objective, {"bits": cost}, {"bits": budget})


EXTREME_COST_SCALES = (1e-6, 1e15, 1e18)
EXTREME_BUDGETS = ("min", "mid", "max", "float_max")
EXTREME_OBJECTIVE_SCALES = (1e-300, 1e-9, 1e290)


def check_extreme_costs_and_budgets_solve_correctly(
    method: str, cost_scale: float, where: str
) -> None:
    # HiGHS read cost entries of 1e15 and more as infinite (ilp: "cannot all be met"); a
    # budget of the largest float overflowed (ilp: OverflowError, qp: SciPy ValueError).
    problem = _extreme(cost_scale, 1.0, where)
    sol = run(problem, method)
    best = brute_force(problem)
    assert problem.is_feasible(sol.choice)
    assert sol.objective >= best - 1e-9 * abs(best)
    if sol.lower_bound is not None:
        assert sol.lower_bound <= best * (1 + 1e-9)
    if solver_class(method).exact:
        assert sol.objective == pytest.approx(best, rel=1e-9)
    if where in ("max", "float_max"):
        assert sol.info["budgets_not_binding"] == ["bits"]


def check_extreme_objectives_solve_correctly(method: str, objective_scale: float) -> None:
    problem = _extreme(1.0, objective_scale, "mid")
    sol = run(problem, method)
    best = brute_force(problem)
    assert problem.is_feasible(sol.choice)
    assert np.isfinite(sol.objective) and sol.objective >= best * (1 - 1e-9)
    if sol.lower_bound is not None:
        assert np.isfinite(sol.gap) and sol.lower_bound <= best * (1 + 1e-9)
    if solver_class(method).exact:
        assert sol.objective == pytest.approx(best, rel=1e-9)


def check_costs_spanning_the_range_from_1e_6_to_1e18(method: str) -> None:
    rng = np.random.default_rng(5)
    cost = 10.0 ** rng.uniform(-6, 18, (5, 4))
    objective = rng.exponential(1.0, (5, 4))
    low, high = Problem(objective, {"bits": cost}).feasible_range("bits")
    for fraction in (0.0, 1e-12, 0.3, 0.9):
        problem = Problem(objective, {"bits": cost}, {"bits": low + fraction * (high - low)})
        sol = run(problem, method)
        assert problem.is_feasible(sol.choice)
        # The budget's tolerance (1e-9 of ~1e18) exceeds whole small costs, so the optimum
        # lies between that of the loose budget and that of the budget met to rounding only.
        loose = brute_force(problem)
        choices = np.array(list(itertools.product(range(4), repeat=5)))
        totals = cost[np.arange(5), choices].sum(axis=1)
        within = totals <= problem.budgets["bits"] * (1 + 1e-15)
        strict = objective[np.arange(5), choices].sum(axis=1)[within].min()
        assert sol.objective >= loose - 1e-12
        if solver_class(method).exact:
            assert sol.objective <= strict + 1e-12


def check_losses_huge_against_tiny_costs_give_no_infinite_bound(method: str) -> None:
    # Found by the fuzz suite: multipliers of 1e15 / 1e-300 overflow; qp reported -inf and
    # lagrangian NaN as the lower bound. A method without a usable bound reports none.
    objective = np.array([[0.0, -1e15, 0.0, 0.0], [0.0, 0.0, 0.0, -1e15], [0.0, 0.0, 0.0, 0.0]])
    cost = np.zeros((3, 4))
    cost[0, 1] = cost[1, 3] = 1e-300
    problem = Problem(objective, {"bits": cost}, {"bits": 1e-300})
    if method == RL:
        # Its rewards leave float range: the project's error, not torch's.
        with pytest.raises(BitallocError, match="diverged"):
            run(problem, method)
        return
    sol = run(problem, method)
    assert problem.is_feasible(sol.choice)
    assert sol.objective == pytest.approx(brute_force(problem), rel=1e-12)
    if sol.lower_bound is not None:
        assert np.isfinite(sol.lower_bound) and np.isfinite(sol.gap)
        assert sol.lower_bound <= sol.objective


#: Every check with its parameters: ``(id, check, extra arguments after the method)``.
CASES: list[tuple[str, Callable[..., None], tuple[Any, ...]]] = [
    ("registered", check_registered, ()),
    ("feasible", check_feasible_allowed_and_bounds_valid, ()),
    ("deterministic", check_deterministic, ()),
    ("infeasible", check_infeasible_budget_raises_with_range, ()),
    ("unbudgeted", check_unbudgeted_problem_is_solved_optimally, ()),
    ("too-many-budgets", check_too_many_budgets_rejected, ()),
    ("to-dict", check_to_dict_is_json, ()),
    ("structured", check_structured_instances, ()),
    ("interactions", check_interactions_refused_or_optimised, ()),
    *(
        (
            f"extreme-costs-{scale:g}-{where}",
            check_extreme_costs_and_budgets_solve_correctly,
            (scale, where),
        )
        for scale in EXTREME_COST_SCALES
        for where in EXTREME_BUDGETS
    ),
    *(
        (f"extreme-objectives-{scale:g}", check_extreme_objectives_solve_correctly, (scale,))
        for scale in EXTREME_OBJECTIVE_SCALES
    ),
    ("spanning-costs", check_costs_spanning_the_range_from_1e_6_to_1e18, ()),
    ("huge-losses", check_losses_huge_against_tiny_costs_give_no_infinite_bound, ()),
]
