"""Problem files: JSON and NPZ round trips and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bitalloc.errors import BitallocError
from bitalloc.solvers import Problem, solve
from bitalloc.solvers.io import load_problem, problem_to_dict, save_problem


def rich_problem() -> Problem:
    rng = np.random.default_rng(7)
    n, k = 5, 3
    allowed = np.ones((n, k), dtype=bool)
    allowed[4, 0] = False
    return Problem(
        rng.random((n, k)),
        {"bits": rng.integers(1, 9, (n, k)).astype(float), "latency_ms": rng.random((n, k))},
        {"bits": 25.0},
        allowed,
        unit_names=[f"u{i}" for i in range(n)],
        option_names=["a", "b", "c"],
        pins={"u3": "b"},
        ties=[["u0", "u1"]],
        interactions={("u1", "u2"): rng.normal(size=(k, k))},
    )


def assert_same(a: Problem, b: Problem) -> None:
    assert np.array_equal(a.objective, b.objective)
    assert a.costs.keys() == b.costs.keys()
    for name in a.costs:
        assert np.array_equal(a.costs[name], b.costs[name])
    assert a.budgets == b.budgets
    assert np.array_equal(a.allowed, b.allowed)
    assert a.unit_names == b.unit_names and a.option_names == b.option_names
    assert a.pins == b.pins and a.ties == b.ties
    assert np.array_equal(a.interaction_pairs, b.interaction_pairs)
    assert np.array_equal(a.interaction_values, b.interaction_values)


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_round_trip(tmp_path, suffix):
    problem = rich_problem()
    path = save_problem(problem, tmp_path / f"p{suffix}")
    assert_same(problem, load_problem(path))
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_minimal_json_written_by_another_tool(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(
        json.dumps(
            {
                "objective": [[1, 0], [2, 0]],
                "costs": {"bits": [[2, 4], [2, 4]]},
                "budgets": {"bits": 6},
                "pins": {"0": 1},
            }
        )
    )
    problem = load_problem(path)
    assert problem.pins == {0: 1}
    sol = solve(problem)
    assert sol.choice.tolist() == [1, 0]


def test_minimal_npz_written_by_another_tool(tmp_path):
    path = tmp_path / "p.npz"
    np.savez(
        path,
        objective=np.array([[1.0, 0.0], [2.0, 0.0]]),
        **{"cost:bits": np.array([[2.0, 4.0], [2.0, 4.0]]), "budget:bits": np.array(6.0)},
        tie_group=np.array([0, 0]),
    )
    problem = load_problem(path)
    assert problem.ties == ((0, 1),)
    # Untied, unit 1 alone would move up (objective 1); tied, both would cost 8 > 6.
    assert solve(problem).choice.tolist() == [0, 0]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("p.txt", "{}", "must end in .json or .npz"),
        ("p.json", "{not json", "not valid JSON"),
        ("p.json", "[1, 2]", "holds a JSON array, not an object"),
        ("p.json", "[" * 100_000, "not valid JSON"),
        ("p.json", '{"objective": [[NaN]], "costs": {}}', "not valid JSON"),
        (
            "p.json",
            '{"units": [], "avg_bits": 3, "total_bits": 1, "budget": 3}',
            "is an allocation, not a solver problem file",
        ),
        ("p.json", '{"costs": {}}', "no 'objective'"),
        (
            "p.json",
            '{"objective": [[1]], "costs": {}, "extra": 1}',
            r"unknown key\(s\) \['extra'\]",
        ),
        (
            "p.json",
            '{"objective": [[1]], "costs": {}, "format": "x"}',
            "expected 'bitalloc.problem'",
        ),
        (
            "p.json",
            '{"objective": [[1]], "costs": {}, "interactions": [{"u": 1}]}',
            "each interaction",
        ),
        ("p.npz", "not a zip", "not a readable NPZ"),
    ],
)
def test_bad_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(BitallocError, match=message):
        load_problem(path)


def test_missing_file(tmp_path):
    with pytest.raises(BitallocError, match="no such problem file"):
        load_problem(tmp_path / "absent.json")


def test_dict_is_plain_json():
    text = json.dumps(problem_to_dict(rich_problem()), allow_nan=False)
    assert json.loads(text)["format"] == "bitalloc.problem"
