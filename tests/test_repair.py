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
from bitalloc.repair import REGIME_NATS, corrected_profile, rank_agreement, verify_and_repair
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


def _scaled(prof, factor):
    return Profile(
        units=prof.units, formats=prof.formats, loss=prof.loss * factor, metadata=prof.metadata
    )


def test_a_pessimistic_prediction_is_repaired_too(setup):
    """Repair acts on disagreement both ways: a prediction far above the measurement is as
    wrong as one far below (before, anything below counted as agreement)."""
    prep, prof, solve_with = setup
    first = solve_with(prof)
    measured = _measured_increase(prep, first.formats, 512)
    # Scaled so the first choice is predicted at 3x its measured increase, under the regime
    # limit, so the first round rescales terms rather than refining by measurement.
    factor = 3 * measured / first.data.predicted_loss
    high = _scaled(prof, factor)
    start = solve_with(high)
    assert start.data.predicted_loss < REGIME_NATS
    best, record = verify_and_repair(
        prep.model, prep.calibration_windows(), prep.units, high, start, solve_with,
        tokens=512, progress=False, budget=12,
    )  # fmt: skip
    assert record.measured_before < record.predicted_before / 1.1
    assert record.rounds[0].direction == "pessimistic"
    assert record.rounds[0].action == "corrected" and record.groups_measured > 0
    assert record.measured_after <= record.measured_before


def test_every_measured_candidate_is_beaten_or_returned(setup):
    """The result is the best measured of the first choice, the candidates and every repair
    round, labelled, with the reason; a candidate equal to the first choice is not measured."""
    prep, prof, solve_with = setup
    first = solve_with(prof)
    # A candidate that must measure better: near-lossless int8 (its budget is the caller's
    # business; verify_and_repair compares what it is given).
    problem = build_problem(prep.units, prep.palette, prof, 8.0)
    rich = allocation_for(prep, prof, solve(problem, method="lagrangian"), 8.0)
    best, record = verify_and_repair(
        prep.model, prep.calibration_windows(), prep.units, prof, first, solve_with,
        candidates=[("same", solve_with(prof)), ("rich", rich)], tokens=512, budget=6,
        progress=False,
    )  # fmt: skip
    assert set(record.candidates) == {"rich"}
    assert record.candidates["rich"] == pytest.approx(
        _measured_increase(prep, rich.formats, 512), rel=1e-4, abs=1e-6
    )
    assert record.chosen == "rich" and best.formats == rich.formats and record.changed
    assert "rich" in record.reason and record.measured_after == record.candidates["rich"]
    seen = [record.measured_before, *(r.measured for r in record.rounds)]
    assert record.measured_after <= min(seen)
    assert record.predicted_after == pytest.approx(rich.data.predicted_loss)
    assert record.evaluations <= 6


def test_a_profile_outside_its_regime_is_refined_by_measurement(setup):
    """A prediction beyond REGIME_NATS marks the profile untrusted: repair measures the units
    that matter under their chosen format and its neighbours and puts those in as measured."""
    prep, prof, solve_with = setup
    first = solve_with(prof)
    huge = _scaled(prof, 10 * REGIME_NATS / first.data.predicted_loss)
    start = solve_with(huge)
    best, record = verify_and_repair(
        prep.model, prep.calibration_windows(), prep.units, huge, start, solve_with,
        tokens=512, progress=False, budget=12,
    )  # fmt: skip
    assert record.regime is not None and "beyond" in record.regime
    refined = [r for r in record.rounds if r.action == "refined"]
    assert refined and refined[0].direction == "pessimistic"
    # Each refined unit is measured under at most three formats (chosen, cheaper, richer).
    assert record.evaluations <= 12 and 2 + 3 * len(refined[0].groups_measured) <= 12
    assert record.measured_after <= record.measured_before


def test_uniform_candidates_and_the_evaluation_split_check(setup):
    """The plan's uniform candidates fit the budget, richest first; a within-budget uniform
    baseline that measures a lower evaluation perplexity than the result replaces it."""
    from bitalloc.records import Budget, Measured
    from bitalloc.stages.plan import Plan
    from bitalloc.stages.verify import never_worse_than_baselines

    prep, prof, solve_with = setup
    plan = Plan(prep=prep, budget=Budget(avg_bits=4.0), ties=None, method="lagrangian")
    found = plan.uniform_candidates(prof)
    assert [label for label, _ in found] == ["uniform int3-g32", "uniform int2-g32"]
    for label, cand in found:
        assert cand.avg_bits <= 4.0 + 1e-9 and set(cand.formats.values()) == {label[8:]}
    first = solve_with(prof)
    _, record = verify_and_repair(
        prep.model, prep.calibration_windows(), prep.units, prof, first, solve_with,
        candidates=found, tokens=512, budget=4, progress=False, tolerance=1e6,
    )  # fmt: skip
    measured = Measured(
        perplexity=30.0,
        baselines={"int2-g32": 40.0, "int3-g32": 20.0, "int4-g32": 10.0, "fp16": 8.0},
        baseline_avg_bits={"int2-g32": 3.0, "int3-g32": 4.0, "int4-g32": 5.0, "fp16": 16.0},
        eval_tokens=256,
        seq_len=64,
        measured_loss_increase=float(np.log(30 / 8)),
        predicted_loss_increase=float(first.data.predicted_loss),
    )
    returned, m, r = never_worse_than_baselines(first, measured, record, found)
    # int4-g32 measured best but is over the budget, so it is no candidate; int3-g32 is.
    assert returned.formats == found[0][1].formats and m.perplexity == 20.0
    assert m.measured_loss_increase == pytest.approx(np.log(20 / 8))
    assert r.chosen == "uniform int3-g32" and "evaluation split" in r.reason and r.changed
    assert r.measured_after == record.candidates["uniform int3-g32"]
    assert r.predicted_after == pytest.approx(returned.data.predicted_loss)
    # Nothing better within the budget: unchanged.
    worse = measured.model_copy(update={"perplexity": 15.0})
    assert never_worse_than_baselines(first, worse, record, found) == (first, worse, record)


def test_rank_agreement_is_spearmans_rho():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    for n in (2, 5, 30):
        a = rng.integers(0, 4, n).astype(float)  # ties
        b = rng.normal(size=n)
        expected = spearmanr(a, b).statistic
        if np.isnan(expected):
            expected = 1.0
        assert rank_agreement(a, b) == pytest.approx(expected)
    assert rank_agreement([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert rank_agreement([1, 1, 1], [3, 2, 1]) == 1.0


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
    # Never worse than a uniform baseline within the budget that it measured.
    within = [n for n, b in alloc.measured.baseline_avg_bits.items() if b <= BUDGET + 1e-9]
    assert all(alloc.measured.perplexity <= alloc.measured.baselines[n] for n in within)
    measured_only = verified(repair=False)
    assert measured_only.data.repair is None and measured_only.measured is not None
