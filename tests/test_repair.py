"""Verify and repair: measured loss against the additive prediction, corrected and re-solved."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bitalloc.allocation import Allocation
from bitalloc.allocator import allocation_for, build_problem, prepare, profile_model
from bitalloc.apply import fake_quantized
from bitalloc.errors import BitallocError
from bitalloc.evaluate import perplexity
from bitalloc.repair import corrected_profile, verify_and_repair
from bitalloc.sensitivity import Profile
from bitalloc.sensitivity.base import spread_windows
from bitalloc.solvers import solve

FORMATS = "int2-g32,int3-g32,int4-g32,int8-g32,fp16"
BUDGET = 3.5


@pytest.fixture
def setup(tiny_model, byte_tokenizer, text_files, isolated_cache):
    cal, ev = text_files
    prep = prepare(
        tiny_model,
        formats=FORMATS,
        calibration=cal,
        evaluation=ev,
        tokenizer=byte_tokenizer,
        seq_len=64,
    )
    prof = profile_model(prep, "fisher", calibration_tokens=256, progress=False)

    def solve_with(table):
        problem = build_problem(prep.units, prep.palette, table, BUDGET)
        return allocation_for(prep, table, solve(problem, method="lagrangian"), BUDGET)

    return prep, prof, solve_with


def _measured_increase(prep, formats, tokens):
    cal = prep.calibration_windows()
    windows = cal[spread_windows(len(cal), cal.shape[1], tokens)]
    base = perplexity(prep.model, windows).nll
    with fake_quantized(prep.model, formats):
        return perplexity(prep.model, windows).nll - base


def _repair(prep, prof, solve_with, **kw):
    kw = {"tolerance": 0.0, "slack": 0.0, "tokens": 512, "progress": False, **kw}
    first = solve_with(prof)
    best, record = verify_and_repair(
        prep.model, prep.calibration_windows(), prep.units, prof, first, solve_with, **kw
    )
    return first, best, record


def test_repair_measures_corrects_and_never_gets_worse(setup):
    prep, prof, solve_with = setup
    before = {k: v.clone() for k, v in prep.model.state_dict().items()}
    first, best, record = _repair(prep, prof, solve_with, budget=24)
    # The profile's prediction of this tiny random model is far too optimistic: repair runs.
    assert record.measured_before > record.predicted_before
    assert record.rounds[0].action == "corrected" and record.groups_measured > 0
    assert record.evaluations <= 24
    # Measurements are real: they equal an independent perplexity evaluation.
    assert record.measured_before == pytest.approx(
        _measured_increase(prep, first.formats, 512), rel=1e-4, abs=1e-6
    )
    assert record.measured_after == pytest.approx(
        _measured_increase(prep, best.formats, 512), rel=1e-4, abs=1e-6
    )
    assert record.measured_after <= record.measured_before
    assert record.changed == (best.formats != first.formats)
    assert best.avg_bits <= BUDGET + 1e-9
    assert record.predicted_after == pytest.approx(best.data.predicted_loss)
    # The model is restored.
    for k, v in prep.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_layer_groups_measure_each_layer_at_once(setup):
    prep, prof, solve_with = setup
    first, best, record = _repair(prep, prof, solve_with, groups="layer")
    assert record.groups == "layer" and record.rounds[0].action == "corrected"
    assert set(record.rounds[0].groups_measured) <= {"layer 0", "layer 1"}
    assert record.measured_after <= record.measured_before
    assert record.measured_after == pytest.approx(
        _measured_increase(prep, best.formats, 512), rel=1e-4, abs=1e-6
    )


def test_a_prediction_within_tolerance_is_kept_after_two_evaluations(setup):
    prep, prof, solve_with = setup
    first, best, record = _repair(prep, prof, solve_with, tolerance=1e6)
    assert record.evaluations == 2 and not record.changed
    assert best.formats == first.formats
    assert [r.action for r in record.rounds] == ["agrees"]


def test_the_budget_bounds_the_evaluations(setup):
    prep, prof, solve_with = setup
    _, _, record = _repair(prep, prof, solve_with, budget=5)
    assert record.evaluations <= 5
    assert record.rounds[-1].action in {"budget spent", "agrees"}


def test_bad_repair_settings(setup):
    prep, prof, solve_with = setup
    with pytest.raises(BitallocError, match="repair budget"):
        _repair(prep, prof, solve_with, budget=1)
    with pytest.raises(BitallocError, match="tolerance"):
        _repair(prep, prof, solve_with, tolerance=-0.1)
    with pytest.raises(BitallocError, match="choose unit or layer"):
        _repair(prep, prof, solve_with, groups="block")


def test_corrected_profile_puts_in_measured_terms_and_rescales_rows():
    prof = Profile(
        units=("a", "b"),
        formats=("int2-g32", "int4-g32", "fp16"),
        loss=np.array([[0.4, 0.1, 0.0], [0.2, 0.05, 0.0]]),
    )
    fixed = corrected_profile(prof, {(("a", "int4-g32"),): 0.3})
    # a's measured term is put in; its row scales by 0.3 / 0.1 = 3; b is untouched.
    np.testing.assert_allclose(fixed.loss, [[1.2, 0.3, 0.0], [0.2, 0.05, 0.0]])
    # A negative measurement (noise) counts as zero, and more bits still never cost more.
    fixed = corrected_profile(prof, {(("a", "int2-g32"),): -0.01})
    assert fixed.loss[0, 0] == 0.0 and fixed.loss[0, 1] <= fixed.loss[0, 0]
    # A group's ratio applies to all its units: (0.4 + 0.2) predicted, 0.3 measured -> x0.5.
    fixed = corrected_profile(prof, {(("a", "int2-g32"), ("b", "int2-g32")): 0.3})
    np.testing.assert_allclose(fixed.loss, [[0.2, 0.05, 0.0], [0.1, 0.025, 0.0]])


def test_allocate_verify_reports_the_repair(
    tiny_model, byte_tokenizer, text_files, isolated_cache, tmp_path
):
    from bitalloc import allocate

    cal, ev = text_files

    def verified(**kw):
        return allocate(
            tiny_model,
            BUDGET,
            tokenizer=byte_tokenizer,
            calibration=cal,
            evaluation=ev,
            formats=FORMATS,
            calibration_tokens=256,
            seq_len=64,
            eval_tokens=256,
            verify=True,
            progress=False,
            **kw,
        )

    alloc = verified(repair_tokens=512)
    r = alloc.data.repair
    assert r is not None and r.evaluations >= 2 and r.tokens == 512
    assert alloc.measured is not None and alloc.avg_bits <= BUDGET + 1e-9
    alloc.save(tmp_path / "a.json")
    assert Allocation.load(tmp_path / "a.json").data.repair == r
    measured_only = verified(repair=False)
    assert measured_only.data.repair is None and measured_only.measured is not None
