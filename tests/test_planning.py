"""Model-free planning: problems from profiles, ties, byte budgets, the frontier, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bitalloc.cli import main
from bitalloc.errors import BitallocError, InfeasibleBudgetError
from bitalloc.formats import parse_palette
from bitalloc.models import discover_units
from bitalloc.planning import (
    check_budget,
    describe_units,
    feasible_avg_bits,
    frontier,
    parse_budgets,
    parse_ties,
    range_decimals,
    solve_profile,
    tie_groups,
    units_from_profile,
)
from bitalloc.sensitivity import Profile
from tests.conftest import make_tiny_llama


@pytest.fixture(scope="module")
def units():
    return discover_units(make_tiny_llama(layers=3))


def synthetic_profile(units, *, describe: bool = True) -> Profile:
    """Loss falls as bits rise (about 4x per bit), scaled per unit; fp16 costs nothing."""
    palette = parse_palette(None)
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.1, 10.0, len(units))
    loss = np.array(
        [
            [
                0.0 if f.is_float else s * 4.0 ** (-f.bits) * (1 + f.group_size / 256)
                for f in palette
            ]
            for s in scale
        ]
    )
    meta = {"method": "synthetic", "model": "tiny"}
    if describe:
        meta["unit_info"] = describe_units(units)
        meta["excluded"] = {"model.embed_tokens.weight": 256 * 64}
    return Profile(tuple(u.name for u in units), tuple(f.name for f in palette), loss, meta)


def test_units_round_trip_through_the_profile(units, tmp_path):
    path = tmp_path / "p.json"
    synthetic_profile(units).save(path)
    assert units_from_profile(Profile.load(path)) == units
    with pytest.raises(BitallocError, match="does not describe its units"):
        units_from_profile(synthetic_profile(units, describe=False))


def test_solve_profile_meets_budget_and_reports_excluded(units):
    alloc = solve_profile(synthetic_profile(units), 3.5)
    assert alloc.avg_bits <= 3.5 + 1e-9
    assert alloc.data.budget.avg_bits == 3.5 and alloc.data.budget.max_bytes is None
    assert alloc.data.excluded_numel == 256 * 64
    assert alloc.data.model == "tiny"
    assert alloc.data.solver.gap is not None


def test_tie_groups_follow_fusion(units):
    groups = tie_groups(units, "qkv,gateup")
    assert len(groups) == 2 * 3
    assert {len(g) for g in groups} == {2, 3}
    assert tie_groups(units, None) == [] and tie_groups(units, "none") == []
    with pytest.raises(BitallocError, match="unknown tie kind"):
        parse_ties("qkvo")


def test_ties_hold_in_the_allocation(units):
    prof = synthetic_profile(units)
    tied = solve_profile(prof, 3.3, ties="qkv,gateup")
    free = solve_profile(prof, 3.3)
    for group in tie_groups(units, "qkv,gateup"):
        assert len({tied.formats[name] for name in group}) == 1
    assert tied.avg_bits <= 3.3 + 1e-9
    # Tying only removes choices, so the predicted loss cannot beat the untied optimum's bound.
    assert tied.data.predicted_loss >= free.data.solver.lower_bound - 1e-12


def test_max_bytes_budget(units):
    prof = synthetic_profile(units)
    numel = sum(u.numel for u in units)
    max_bytes = 3.0 * numel / 8
    alloc = solve_profile(prof, max_bytes=max_bytes)
    assert alloc.data.bytes <= max_bytes * (1 + 1e-9)
    assert alloc.data.budget.max_bytes == max_bytes and alloc.data.budget.avg_bits is None
    with pytest.raises(BitallocError, match="at most 1 budget"):
        solve_profile(prof, 4.0, max_bytes=max_bytes)  # lagrangian: one budget only
    with pytest.raises(BitallocError, match="max_bytes must be a positive number"):
        solve_profile(prof, max_bytes=-1)
    with pytest.raises(BitallocError, match="give a budget"):
        solve_profile(prof)


def test_out_of_range_budget_names_the_range(units):
    lo, hi = feasible_avg_bits(units, parse_palette(None))
    with pytest.raises(InfeasibleBudgetError, match=f"{lo:.4f}"):
        solve_profile(synthetic_profile(units), lo - 0.1)


def test_budget_just_past_a_bound_reads_as_outside(units):
    # Four decimals printed a budget just above the richest total as equal to it
    # ("avg_bits=16 is outside ... between 2.2708 and 16.0000" with the top at 15.99997).
    palette = parse_palette(None)
    lo, hi = feasible_avg_bits(units, palette)
    for budget, bound in ((hi + 2e-6, hi), (lo - 3e-7, lo)):
        with pytest.raises(InfeasibleBudgetError) as caught:
            check_budget(budget, units, palette)
        message = str(caught.value)
        d = range_decimals(budget, lo, hi)
        assert f"avg_bits={budget:.{d}f}" in message and f"{bound:.{d}f}" in message
        assert f"{budget:.{d}f}" != f"{bound:.{d}f}"


def test_range_decimals_is_the_fewest_that_tell_apart():
    assert range_decimals(1.5, 2.2708, 16.0) == 4
    assert range_decimals(16.000001, 2.0, 16.0) == 6
    assert range_decimals(2.0 - 1e-9, 2.0, 16.0) == 9
    assert range_decimals(5.0, 2.0, 16.0 - 1e-13) == 4


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("2.5:3.5:0.25", [2.5, 2.75, 3.0, 3.25, 3.5]), ("3,4.5", [3.0, 4.5]), ([3], [3.0])],
)
def test_parse_budgets(spec, expected):
    assert parse_budgets(spec) == expected


@pytest.mark.parametrize("spec", ["3:2:1", "2:3:0", "a,b", "1:2", ""])
def test_bad_budgets(spec):
    with pytest.raises(BitallocError):
        parse_budgets(spec)


def test_frontier_is_monotone_within_certified_gaps(units):
    front = frontier(synthetic_profile(units), "2.75:5:0.25")
    points = front.points
    assert [p.budget for p in points] == parse_budgets("2.75:5:0.25")
    for a, b in zip(points, points[1:]):
        # lower_bound(b) <= opt(b) <= opt(a) <= objective(a)
        assert b.allocation.data.solver.lower_bound <= a.allocation.data.predicted_loss + 1e-12
        assert b.allocation.avg_bits <= b.budget + 1e-9
    data = json.loads(json.dumps(front.to_json()))
    assert len(data["points"]) == len(points) and data["method"] == "lagrangian"
    assert len(front.table().splitlines()) == len(points) + 1


def test_frontier_checks_every_budget_first(units):
    with pytest.raises(InfeasibleBudgetError):
        frontier(synthetic_profile(units), [3.0, 99.0])


def test_cli_solve_and_frontier_from_profile(units, tmp_path, capsys):
    prof = tmp_path / "p.json"
    synthetic_profile(units).save(prof)
    out = tmp_path / "alloc.json"
    args = ["solve", "--profile", str(prof), "--avg-bits", "3.25", "--tie", "qkv,gateup"]
    assert main([*args, "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["avg_bits"] <= 3.25 + 1e-9 and len(data["units"]) == len(units)
    fronts = tmp_path / "front.json"
    cmd = ["frontier", "--profile", str(prof), "--budgets", "3,4", "--out", str(fronts)]
    assert main(cmd) == 0
    assert [p["budget"] for p in json.loads(fronts.read_text())["points"]] == [3.0, 4.0]
    capsys.readouterr()
    assert main(["solve", "--profile", str(prof)]) == 2
    assert "give a budget" in capsys.readouterr().err
    assert main(["solve", "--profile", str(prof), "--avg-bits", "3", "--option", "fill"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main(["solve", "--profile", str(prof), "--avg-bits", "3", "--option", "x=1"]) == 2
    assert "bad options for method 'lagrangian'" in capsys.readouterr().err


def test_cli_solve_problem_file(tmp_path, capsys):
    from bitalloc.solvers import Problem
    from bitalloc.solvers.io import save_problem

    path = save_problem(
        Problem([[1.0, 0.0], [2.0, 0.0]], {"bits": [[2, 4], [2, 4]]}, {"bits": 6}),
        tmp_path / "p.npz",
    )
    out = tmp_path / "sol.json"
    assert main(["solve", "--problem", str(path), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["choice"] == [0, 1]
    assert "optimal" in capsys.readouterr().out
    assert main(["solve", "--problem", str(path), "--avg-bits", "3"]) == 2
    assert "carry their own budgets" in capsys.readouterr().err


def test_measured_frontier_on_a_tiny_model(tiny_model, byte_tokenizer, text_files):
    from bitalloc.allocator import measure_frontier, prepare, profile_model

    cal, ev = text_files
    prep = prepare(
        tiny_model,
        formats="int2-g32,int4-g32,fp16",
        calibration=cal,
        evaluation=ev,
        tokenizer=byte_tokenizer,
        seq_len=64,
    )
    prof = profile_model(prep, calibration_tokens=256, use_cache=False, progress=False)
    assert units_from_profile(prof) == prep.units  # the profile describes its units
    lo, hi = feasible_avg_bits(prep.units, prep.palette)
    front = frontier(prof, [lo, (lo + hi) / 2, hi], formats=["int2-g32", "int4-g32", "fp16"])
    measured = measure_frontier(prep, front, eval_tokens=256, progress=False)
    ppl = [p.perplexity for p in measured.points]
    assert all(np.isfinite(ppl)) and measured.fp16_perplexity is not None
    # The richest budget keeps every unit in fp16: the same model, the same perplexity.
    assert set(measured.points[-1].allocation.formats.values()) == {"fp16"}
    assert ppl[-1] == pytest.approx(measured.fp16_perplexity, rel=1e-6)
    assert "perplexity" in measured.table() and json.dumps(measured.to_json())
