import json
import math

import numpy as np
import pytest

from bitalloc.apply import fake_quantized
from bitalloc.errors import BitallocError
from bitalloc.evaluate import perplexity
from bitalloc.formats import parse_palette
from bitalloc.models import discover_units
from bitalloc.planning import build_problem, default_method
from bitalloc.sensitivity import Interactions, Profile, measure_interactions, select_pairs
from bitalloc.solvers import solve
from tests.conftest import random_windows


def _calibration(n=4, seq_len=32):
    return random_windows(n=n, seq_len=seq_len)


def _loss(model, ids):
    return math.log(perplexity(model, ids).perplexity)


def test_pair_selection(tiny_model, tmp_path):
    units = discover_units(tiny_model)  # 2 layers x 7 roles
    neighbours = select_pairs(units, "neighbours")
    assert len(neighbours) == 7
    assert ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj") in neighbours
    loss = np.arange(len(units) * 2, dtype=float).reshape(-1, 2)
    top = select_pairs(units, "top:3", loss)
    assert top == [(units[i].name, units[j].name) for i, j in ((11, 12), (11, 13), (12, 13))]
    lines = tmp_path / "pairs.txt"
    lines.write_text(f"{units[0].name}, {units[5].name}\n\n{units[1].name},{units[2].name}\n")
    assert select_pairs(units, str(lines)) == [
        (units[0].name, units[5].name),
        (units[1].name, units[2].name),
    ]
    listed = tmp_path / "pairs.json"
    listed.write_text(json.dumps([[units[3].name, units[4].name]]))
    assert select_pairs(units, str(listed)) == [(units[3].name, units[4].name)]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("top:1", "K >= 2"),
        ("top:x", "K >= 2"),
        ("/no/such/pairs.txt", "give neighbours, top:K"),
        ([("model.layers.0.mlp.up_proj", "model.layers.0.mlp.up_proj")], "two different"),
        ([("model.layers.0.mlp.up_proj", "nope")], "not a unit of this model"),
        ([], "selects no pairs"),
    ],
)
def test_bad_pair_selections_raise(tiny_model, spec, message):
    with pytest.raises(BitallocError, match=message):
        select_pairs(discover_units(tiny_model), spec, np.ones((14, 2)))


def test_top_k_needs_a_profile(tiny_model):
    with pytest.raises(BitallocError, match="need a profile"):
        select_pairs(discover_units(tiny_model), "top:2")


def test_measured_terms_equal_joint_minus_single_increases(tiny_model, tmp_path):
    units = discover_units(tiny_model)
    cal = _calibration()
    pairs = [(units[0].name, units[7].name), (units[6].name, units[13].name)]
    formats = parse_palette("int2-g32,int3-g32")
    terms = measure_interactions(
        tiny_model,
        units,
        pairs,
        formats,
        cal,
        tokens=64,
        results=tmp_path / "j.jsonl",
        progress=False,
    )
    used = cal[[0, 2]]
    base = _loss(tiny_model, used)
    for p, (a, b) in enumerate(pairs):
        for f, fmt in enumerate(formats):
            with fake_quantized(tiny_model, {a: fmt}):
                la = _loss(tiny_model, used) - base
            with fake_quantized(tiny_model, {b: fmt}):
                lb = _loss(tiny_model, used) - base
            with fake_quantized(tiny_model, {a: fmt, b: fmt}):
                lab = _loss(tiny_model, used) - base
            assert terms.single_increase[p, 0, f] == pytest.approx(la, abs=3e-6)
            assert terms.single_increase[p, 1, f] == pytest.approx(lb, abs=3e-6)
            assert terms.pair_increase[p, f] == pytest.approx(lab - la - lb, abs=6e-6)


def _synthetic(rho, singles):
    singles = np.asarray(singles, dtype=float)
    pair = rho * np.sqrt(singles[0] * singles[1])  # rows: unit a, unit b; columns: formats
    return Interactions((("a", "b"),), ("f1", "f2"), pair[None], singles[None])


def test_rho_is_the_least_squares_coefficient_and_is_bounded():
    exact = _synthetic(0.5, [[1.0, 0.2], [4.0, 0.8]])
    assert exact.rho[0] == pytest.approx(0.5)
    assert _synthetic(-3.0, [[1.0, 0.2], [4.0, 0.8]]).rho[0] == -1.0
    zero = Interactions((("a", "b"),), ("f",), [[0.1]], [[[0.0], [1.0]]])
    assert zero.rho[0] == 0.0


def test_tables_scale_with_the_profile_in_use():
    terms = _synthetic(0.5, [[1.0, 0.2], [4.0, 0.8]])
    loss = np.array([[4.0, 1.0, 0.0], [9.0, 4.0, 0.0], [1.0, 1.0, 1.0]])
    tables = terms.tables(["a", "b", "c"], ["x", "y", "z"], loss)
    np.testing.assert_allclose(tables[("a", "b")], 0.5 * np.sqrt(np.outer(loss[0], loss[1])))
    with pytest.raises(BitallocError, match="another model"):
        terms.tables(["a", "c"], ["x"], np.ones((2, 1)))


def test_profile_round_trip_and_combination(tmp_path):
    terms = _synthetic(0.3, [[1.0, 0.5], [2.0, 0.1]])
    base = Profile(("a", "b"), ("int2-g32", "fp16"), np.array([[1.0, 0.0], [2.0, 0.0]]))
    combined = base.with_interactions(Profile(("a", "b"), ("x",), [[0], [0]], {}, terms))
    for suffix in (".json", ".safetensors"):
        path = tmp_path / f"p{suffix}"
        combined.save(path)
        again = Profile.load(path)
        assert again.interactions.pairs == terms.pairs
        np.testing.assert_array_equal(again.interactions.pair_increase, terms.pair_increase)
        np.testing.assert_array_equal(again.interactions.rho, terms.rho)
    with pytest.raises(BitallocError, match="holds no interaction terms"):
        base.with_interactions(base)
    with pytest.raises(BitallocError, match="not a unit of this profile"):
        Profile(("a", "c"), ("fp16",), np.zeros((2, 1)), {}, terms)


def test_problems_carry_the_terms_and_default_to_a_solver_that_uses_them(tiny_model):
    units = discover_units(tiny_model)
    palette = parse_palette("int2-g32,int4-g32")
    names = tuple(u.name for u in units)
    loss = np.tile([1.0, 0.1], (len(units), 1))
    a, b = names[3], names[10]  # two o_proj: promoted only when they interact
    # rho = 2: quantizing both to int2 costs 2 more than the sum of their own losses.
    terms = Interactions(((a, b),), ("int2-g32",), [[2.0]], [[[1.0], [1.0]]])
    plain = Profile(names, ("int2-g32", "int4-g32"), loss)
    prof = plain.with_interactions(terms)
    problem = build_problem(units, palette, prof, 3.3)
    assert (
        problem.has_interactions and not build_problem(units, palette, plain, 3.3).has_interactions
    )
    assert default_method(prof, None) == "qp" and default_method(prof, "ilp") == "ilp"
    assert default_method(plain, None) == "lagrangian"
    with pytest.raises(BitallocError, match="interaction"):
        solve(problem, method="lagrangian")
    without = solve(build_problem(units, palette, plain, 3.3), method="ilp").choice
    assert without[3] == 0 and without[10] == 0
    for method in ("ilp", "qp"):
        choice = solve(problem, method=method).choice
        assert not (choice[3] == 0 and choice[10] == 0), method
