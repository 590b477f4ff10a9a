"""Validation and evaluation of Problem, and Solution serialisation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bitalloc.errors import BitallocError
from bitalloc.solvers import Problem, Solution
from bitalloc.solvers.problem import feasibility_tolerance

OBJ = [[3.0, 1.0, 0.0], [5.0, 2.0, 1.0]]
BITS = [[2.0, 4.0, 8.0], [20.0, 40.0, 80.0]]


def make(**overrides) -> Problem:
    kwargs = {"objective": OBJ, "costs": {"bits": BITS}, "budgets": {"bits": 50.0}}
    kwargs.update(overrides)
    return Problem(**kwargs)


def test_valid_problem_basics():
    p = make(unit_names=["a", "b"], option_names=["q2", "q4", "q8"])
    assert p.n_units == 2
    assert p.n_options == 3
    assert p.allowed.dtype == bool and p.allowed.all()
    assert p.unit_names == ("a", "b")
    assert "n_units=2" in repr(p)


def test_arrays_are_read_only_copies():
    obj = np.array(OBJ)
    p = make(objective=obj)
    obj[0, 0] = 99.0  # the caller's array stays writable and is not shared
    assert p.objective[0, 0] == 3.0
    for arr in (p.objective, p.costs["bits"], p.allowed):
        with pytest.raises(ValueError):
            arr[0, 0] = 0


def test_objective_of_and_resources():
    p = make(costs={"bits": BITS, "bytes": np.array(BITS) / 8})
    choice = [2, 0]
    assert p.objective_of(choice) == pytest.approx(0.0 + 5.0)
    assert p.resources(choice) == pytest.approx({"bits": 28.0, "bytes": 3.5})


def test_min_max_resource_respect_allowed():
    allowed = np.array([[True, True, False], [False, True, True]])
    p = make(allowed=allowed)
    assert p.min_resource("bits") == pytest.approx(2.0 + 40.0)
    assert p.max_resource("bits") == pytest.approx(4.0 + 80.0)
    assert p.feasible_range("bits") == pytest.approx((42.0, 84.0))
    with pytest.raises(BitallocError, match="unknown cost 'flops'"):
        p.min_resource("flops")


def test_check_feasible():
    allowed = np.array([[True, True, False], [True, True, True]])
    p = make(allowed=allowed)
    p.check_feasible([0, 1])  # 2 + 40 = 42 <= 50
    assert p.is_feasible([0, 1])
    with pytest.raises(BitallocError, match="over its budget"):
        p.check_feasible([0, 2])
    with pytest.raises(BitallocError, match="disallowed option"):
        p.check_feasible([2, 0])
    assert len(p.violations([2, 2])) == 2


def test_budget_tolerance_absorbs_rounding_only():
    p = make(budgets={"bits": 42.0 * (1 - 1e-12)})
    assert p.is_feasible([0, 1])
    p = make(budgets={"bits": 41.9})
    assert not p.is_feasible([0, 1])


@pytest.mark.parametrize(
    ("choice", "match"),
    [
        ([0], r"shape \(1,\)"),
        ([0.0, 1.0], "integer option indices"),
        ([0, 3], r"must lie in \[0, 2\]"),
        ([-1, 0], "unit 0"),
    ],
)
def test_bad_choice(choice, match):
    with pytest.raises(BitallocError, match=match):
        make().objective_of(choice)


def test_cost_shape_mismatch_names_table_and_shapes():
    with pytest.raises(BitallocError, match=r"costs\['bits'\] has shape \(2, 2\).*\(2, 3\)"):
        make(costs={"bits": [[1.0, 2.0], [3.0, 4.0]]})


def test_objective_must_be_2d_and_nonempty():
    with pytest.raises(BitallocError, match="must be 2-D"):
        make(objective=[1.0, 2.0, 3.0])
    with pytest.raises(BitallocError, match="at least one unit"):
        Problem(np.zeros((0, 3)), {})
    with pytest.raises(BitallocError, match="array of numbers"):
        make(objective=[["a", "b", "c"], ["d", "e", "f"]])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_objective_names_first_offender(bad):
    obj = np.array(OBJ)
    obj[1, 2] = bad
    with pytest.raises(BitallocError, match=r"objective at unit 1 \('b'\), option 2 \('q8'\)"):
        make(objective=obj, unit_names=["a", "b"], option_names=["q2", "q4", "q8"])


@pytest.mark.parametrize("bad", [-1.0, np.nan, np.inf])
def test_bad_cost_value(bad):
    bits = np.array(BITS)
    bits[0, 1] = bad
    with pytest.raises(BitallocError, match=r"costs\['bits'\] at unit 0, option 1.*non-negative"):
        make(costs={"bits": bits})


def test_budget_for_unknown_cost():
    with pytest.raises(BitallocError, match=r"budget 'bytes' names an unknown cost.*'bits'"):
        make(budgets={"bytes": 10.0})


@pytest.mark.parametrize("bad", [np.nan, np.inf, "lots"])
def test_bad_budget_value(bad):
    with pytest.raises(BitallocError, match="budget 'bits'"):
        make(budgets={"bits": bad})


def test_unit_without_allowed_option():
    allowed = np.array([[True, False, False], [False, False, False]])
    with pytest.raises(BitallocError, match=r"unit 1 \('b'\) has no allowed option"):
        make(allowed=allowed, unit_names=["a", "b"])


def test_allowed_shape_and_dtype():
    with pytest.raises(BitallocError, match=r"allowed has shape \(2, 2\)"):
        make(allowed=np.ones((2, 2), dtype=bool))
    with pytest.raises(BitallocError, match="bool array"):
        make(allowed=np.full((2, 3), 0.5))
    p = make(allowed=np.array([[1, 0, 1], [0, 1, 1]]))
    assert p.allowed.dtype == bool and not p.allowed[0, 1]


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("unit_names", ["a"], "unit_names has 1 entries but the objective has 2"),
        ("option_names", ["x", "y"], "option_names has 2 entries but the objective has 3"),
        ("unit_names", "ab", "not a single string"),
        ("unit_names", ["a", 3], r"unit_names\[1\] is 3, not a string"),
    ],
)
def test_bad_names(field, value, match):
    with pytest.raises(BitallocError, match=match):
        make(**{field: value})


def test_costs_and_budgets_types():
    with pytest.raises(BitallocError, match="costs must be a dict"):
        make(costs=[BITS])
    with pytest.raises(BitallocError, match="non-empty string"):
        make(costs={"": BITS}, budgets={})


def test_no_costs_is_valid():
    p = Problem(objective=OBJ, costs={})
    assert p.resources([0, 0]) == {}
    assert p.is_feasible([0, 0])


def test_solution_round_trips_through_json():
    sol = Solution(
        choice=np.array([1, 0]),
        objective=3.5,
        resources={"bits": 12.0},
        status="feasible",
        lower_bound=3.0,
        gap=0.5,
        wall_time_s=0.01,
        method="lagrangian",
        info={"multiplier": np.float64(0.25), "rounds": np.int64(3), "x": float("inf")},
    )
    data = json.loads(json.dumps(sol.to_dict(), allow_nan=False))
    assert data["info"] == {"multiplier": 0.25, "rounds": 3, "x": None}
    back = Solution.from_dict(data)
    assert back.choice.tolist() == [1, 0]
    assert back.to_dict() == data
    with pytest.raises(BitallocError, match="not a serialised Solution"):
        Solution.from_dict({"choice": [0]})


def test_pickle_round_trip_keeps_arrays_read_only():
    import pickle

    p = pickle.loads(pickle.dumps(make(unit_names=["a", "b"])))
    assert p.unit_names == ("a", "b") and p.budgets == {"bits": 50.0}
    assert np.array_equal(p.costs["bits"], BITS)
    assert not p.objective.flags.writeable and not p.costs["bits"].flags.writeable


@pytest.mark.parametrize("label", ["unit_names", "option_names"])
def test_duplicate_names_are_refused(label):
    # A pin or tie by a repeated name used to apply to its first holder only.
    names = {"unit_names": ["a", "b", "a"], "option_names": ["x", "x"]}
    with pytest.raises(BitallocError, match=rf"{label}\[\d\] repeats"):
        Problem(np.zeros((3, 2)), {"bits": np.ones((3, 2))}, **{label: names[label]})


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("objective", "below the smallest normal float"),
        ("cost", "below the smallest normal float"),
        ("huge_objective", "adds up to"),
        ("huge_cost", "adds up to"),
    ],
)
def test_subnormal_entries_and_overflowing_totals_are_refused(table, message):
    objective, cost = np.ones((3, 2)), np.ones((3, 2))
    if table == "objective":
        objective[1, 1] = 5e-324
    elif table == "cost":
        cost[2, 0] = 1e-310
    elif table == "huge_objective":
        objective[:, 0] = -1e300  # each row fine, the sum overflows what solvers can add
    else:
        cost[:, 1] = 1e300
    with pytest.raises(BitallocError, match=message):
        Problem(objective, {"bits": cost})


def test_subnormal_budget_and_interaction_are_refused():
    with pytest.raises(BitallocError, match="round it to 0"):
        Problem(np.ones((2, 2)), {"bits": np.ones((2, 2))}, {"bits": 1e-320})
    with pytest.raises(BitallocError, match=r"interactions at pair \(0, 1\)"):
        Problem(
            np.ones((2, 2)), {"bits": np.ones((2, 2))}, interactions={(0, 1): [[0, 1e-315], [0, 0]]}
        )


def test_tolerance_is_relative_for_tiny_budgets():
    # With a floor of 1e-9 an absolute tolerance let costs of 1e-12 exceed the budget a
    # thousandfold; it is now 1e-9 of the budget.
    problem = Problem(np.array([[1.0, 0.0]]), {"bits": np.array([[1e-12, 2e-12]])}, {"bits": 1e-12})
    assert not problem.is_feasible([1])
    assert problem.is_feasible([0])
    assert feasibility_tolerance(1e-12) == pytest.approx(1e-21)
