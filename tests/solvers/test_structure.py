"""Pins, ties and interactions: validation, evaluation, and the reduction solvers rely on."""

from __future__ import annotations

import itertools
import pickle

import numpy as np
import pytest

from bitalloc.errors import BitallocError, InfeasibleBudgetError
from bitalloc.solvers import Problem, solve
from tests.solvers.brute import brute_force_choice

OBJ = np.array([[3.0, 1.0, 0.0], [5.0, 2.0, 1.0], [4.0, 2.0, 0.5], [1.0, 0.5, 0.0]])
BITS = np.array([[2.0, 4.0, 8.0], [20.0, 40.0, 80.0], [2.0, 4.0, 8.0], [1.0, 2.0, 4.0]])
NAMES = {"unit_names": ["q", "k", "v", "o"], "option_names": ["int2", "int4", "int8"]}


def make(**overrides) -> Problem:
    kwargs = {"objective": OBJ, "costs": {"bits": BITS}, "budgets": {"bits": 60.0}, **NAMES}
    kwargs.update(overrides)
    return Problem(**kwargs)


def test_pins_by_name_and_index_are_normalised():
    p = make(pins={"k": "int4", 3: 0})
    assert p.pins == {1: 1, 3: 0}
    assert "pins=2" in repr(p)


def test_pin_outside_allowed_names_allowed_options():
    allowed = np.ones_like(OBJ, dtype=bool)
    allowed[1, 2] = False
    with pytest.raises(BitallocError, match=r"outside its allowed options \('int2', 'int4'\)"):
        make(allowed=allowed, pins={"k": "int8"})


@pytest.mark.parametrize(
    ("pins", "message"),
    [
        ({"x": 0}, "unknown unit name 'x'"),
        ({0: "int3"}, "unknown option name 'int3'"),
        ({9: 0}, r"unit index 9 is outside \[0, 3\]"),
        ({True: 0}, "is a bool"),
        ([0, 1], "pins must be a dict"),
    ],
)
def test_bad_pins(pins, message):
    with pytest.raises(BitallocError, match=message):
        make(pins=pins)


def test_names_need_name_lists():
    with pytest.raises(BitallocError, match="has no unit_names"):
        Problem(OBJ, {"bits": BITS}, pins={"q": 0})


def test_overlapping_ties_merge_and_singletons_drop():
    p = make(ties=[["q", "k"], ["k", "v"], ["o"]])
    assert p.ties == ((0, 1, 2),)


def test_tie_with_different_allowed_options_is_rejected():
    allowed = np.ones_like(OBJ, dtype=bool)
    allowed[2, 0] = False
    with pytest.raises(BitallocError, match="mixes different allowed options"):
        make(allowed=allowed, ties=[["q", "k", "v"]])


def test_tie_with_conflicting_pins_is_rejected():
    with pytest.raises(BitallocError, match="pinned to different options"):
        make(ties=[["q", "k"]], pins={"q": 0, "k": 1})


@pytest.mark.parametrize("ties", ["qk", [["q", "nope"]], [5], {"q": "k"}])
def test_bad_ties(ties):
    with pytest.raises(BitallocError):
        make(ties=ties)


def test_interactions_are_canonical_and_evaluated():
    table = np.arange(9.0).reshape(3, 3)
    p = make(interactions={("v", "q"): table, (0, 2): np.ones((3, 3))})
    assert p.interaction_pairs.tolist() == [[0, 2]]
    # (v, q) is stored transposed as (q, v), then summed with the (q, v) table.
    assert np.array_equal(p.interaction_values[0], table.T + 1.0)
    choice = [2, 0, 1, 0]
    linear = OBJ[[0, 1, 2, 3], choice].sum()
    assert p.objective_of(choice) == pytest.approx(linear + table[1, 2] + 1.0)
    assert p.has_interactions and not make().has_interactions


@pytest.mark.parametrize(
    ("interactions", "message"),
    [
        ({("q", "q"): np.zeros((3, 3))}, "with itself"),
        ({("q", "k"): np.zeros((2, 3))}, r"shape \(2, 3\)"),
        ({("q", "k"): np.full((3, 3), np.nan)}, "non-finite"),
        ([("q", "k")], r"must be \(unit_a, unit_b, table\)"),
        ("qk", "must be a dict"),
    ],
)
def test_bad_interactions(interactions, message):
    with pytest.raises(BitallocError, match=message):
        make(interactions=interactions)


def test_violations_report_pins_and_ties():
    p = make(ties=[["q", "v"]], pins={"o": 2})
    problems = p.violations([0, 0, 1, 0])
    assert any("pinned unit" in m and "'o'" in m for m in problems)
    assert any("tie group" in m for m in problems)
    assert p.is_feasible([1, 0, 1, 2])


def test_min_resource_accounts_for_ties_and_pins():
    p = make(ties=[["q", "k"]], pins={"o": 2})
    # q and k together are cheapest at option 0 (22); v at 2; o pinned at 4.
    assert p.min_resource("bits") == pytest.approx(22 + 2 + 4)
    assert p.max_resource("bits") == pytest.approx(88 + 8 + 4)


def test_pickle_keeps_structure():
    p = make(ties=[["q", "k"]], pins={"o": 2}, interactions={("q", "o"): np.eye(3)})
    back = pickle.loads(pickle.dumps(p))
    assert back.ties == p.ties and back.pins == p.pins
    assert np.array_equal(back.interaction_values, p.interaction_values)
    assert not back.interaction_values.flags.writeable


def random_structured(seed: int) -> Problem:
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(3, 7)), int(rng.integers(2, 4))
    allowed = rng.random((n, k)) < 0.8
    allowed[:, 0] = True
    ties = [[0, 1]] if seed % 2 else [[0, 2], [1, 3]] if n > 3 else []
    for group in ties:
        allowed[group] = allowed[group[0]]
    pins = {n - 1: int(np.flatnonzero(allowed[n - 1])[-1])} if seed % 3 == 0 else {}
    pairs = {(int(a), int(b)): rng.normal(0, 0.5, (k, k)) for a, b in [(0, 1), (1, n - 1)]}
    return Problem(
        rng.exponential(1.0, (n, k)),
        {"bits": rng.integers(1, 9, (n, k)).astype(float)},
        {},
        allowed,
        pins=pins,
        ties=ties,
        interactions=pairs if seed % 4 else None,
    )


@pytest.mark.parametrize("seed", range(8))
def test_collapse_is_equivalent(seed):
    p = random_structured(seed)
    reduced = p.collapsed()
    assert not reduced.problem.ties and not reduced.problem.pins
    assert reduced.identity == (not p.ties and not p.pins)
    options = [np.flatnonzero(row) for row in reduced.problem.allowed]
    for choice in itertools.product(*options):
        full = reduced.expand(np.array(choice))
        assert p.is_feasible(full)
        assert p.objective_of(full) == pytest.approx(reduced.problem.objective_of(choice))
        assert p.resources(full) == pytest.approx(reduced.problem.resources(choice))
    # Every feasible original choice is the expansion of its restriction to group leaders.
    assert reduced.problem.n_units == p.n_units - sum(len(g) - 1 for g in p.ties)


@pytest.mark.parametrize("seed", range(6))
def test_lagrangian_respects_ties_and_pins(seed):
    p = random_structured(seed)
    p = Problem(
        p.objective,
        p.costs,
        {"bits": p.min_resource("bits") + 5},
        p.allowed,
        pins=p.pins,
        ties=p.ties,
    )
    sol = solve(p, method="lagrangian")
    assert p.is_feasible(sol.choice)
    best, _ = brute_force_choice(p)
    assert sol.lower_bound <= best + 1e-9 <= sol.objective + 2e-9
    assert ("reduced_units" in sol.info) == bool(p.ties or p.pins)


def test_infeasible_with_ties_names_smallest_budget():
    p = make(ties=[["q", "k"]], budgets={"bits": 20.0})
    with pytest.raises(InfeasibleBudgetError, match="smallest achievable total is 25"):
        solve(p, method="lagrangian")


def test_method_without_interactions_refuses_them():
    p = make(interactions={("q", "k"): np.ones((3, 3))})
    with pytest.raises(BitallocError, match="ignores pairwise interaction terms"):
        solve(p, method="lagrangian")
