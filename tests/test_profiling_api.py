"""profile_model / allocate with every profiler, unit filters, saved profiles and interactions."""

import numpy as np
import pytest

from bitalloc import allocate
from bitalloc.allocator import load_profile_for, prepare, profile_model, select_units
from bitalloc.errors import BitallocError
from bitalloc.sensitivity import PROFILERS
from tests.conftest import make_tiny_llama

FORMATS = "int2-g32,int3-g32,int4-g32,fp16"
FAST = {
    "fisher": {},
    "hessian": {"max_probes": 2, "min_probes": 1},
    "output": {},
    "kfac": {},
    "kl": {},
    "measured": {},
}


@pytest.fixture
def prep(tiny_model, byte_tokenizer, text_files):
    cal, ev = text_files
    return prepare(
        tiny_model,
        formats=FORMATS,
        calibration=cal,
        evaluation=ev,
        tokenizer=byte_tokenizer,
        seq_len=64,
    )


@pytest.mark.parametrize("method", sorted(PROFILERS))
def test_every_profiler_profiles_and_allocates(method, prep, isolated_cache):
    prof = profile_model(
        prep, method, calibration_tokens=128, profiler_options=FAST[method], progress=False
    )
    assert prof.metadata["method"] == method
    assert len(prof.metadata["unit_info"]) == 14 and prof.metadata["cache"] == "miss"
    again = profile_model(
        prep, method, calibration_tokens=128, profiler_options=FAST[method], progress=False
    )
    assert again.metadata["cache"] == "hit"
    np.testing.assert_array_equal(again.loss, prof.loss)


def test_units_filter(prep, isolated_cache):
    assert [u.role for u in select_units(prep.units, r"layers\.1\.mlp")] == ["gate", "up", "down"]
    prof = profile_model(prep, "output", units=r"\.1\.self_attn", progress=False)
    assert prof.units == tuple(u.name for u in prep.units[7:11])
    for bad, message in (("nothing_matches", "matches none of the 14 units"), ("(", "valid")):
        with pytest.raises(BitallocError, match=message):
            profile_model(prep, "output", units=bad, progress=False)


def test_saved_profile_for_other_weights_is_refused(prep, isolated_cache, tmp_path):
    profile_model(prep, "output", progress=False).save(tmp_path / "p.json")
    tok = prep.loaded.tokenizer
    other = prepare(make_tiny_llama(seed=1), formats=FORMATS, tokenizer=tok, seq_len=64)
    with pytest.raises(BitallocError, match="model with other weights"):
        load_profile_for(other, tmp_path / "p.json")
    narrow = prepare(prep.model, formats="int2-g64", tokenizer=tok, seq_len=64)
    with pytest.raises(BitallocError, match="no column for"):
        load_profile_for(narrow, tmp_path / "p.json")


def test_allocate_from_a_saved_profile_uses_its_formats(
    tiny_model, byte_tokenizer, text_files, isolated_cache, tmp_path
):
    cal, ev = text_files
    kwargs = dict(tokenizer=byte_tokenizer, calibration=cal, evaluation=ev, seq_len=64)
    prof = profile_model(
        prepare(tiny_model, formats="int2-g32,int4-g32", **kwargs), "output", progress=False
    )
    prof.save(tmp_path / "p.safetensors")
    alloc = allocate(tiny_model, 3.5, profile=tmp_path / "p.safetensors", progress=False, **kwargs)
    assert set(alloc.formats.values()) <= {"int2-g32", "int4-g32"}
    assert alloc.data.profile.method == "output"


def test_allocate_with_measured_interactions_uses_them(
    tiny_model, byte_tokenizer, text_files, isolated_cache, tmp_path
):
    cal, ev = text_files
    kwargs = dict(
        tokenizer=byte_tokenizer, calibration=cal, evaluation=ev, seq_len=64, formats=FORMATS
    )
    alloc = allocate(
        tiny_model, 3.5, profiler="output", interactions="neighbours", progress=False, **kwargs
    )
    assert alloc.data.solver.method == "qp"
    summary = alloc.data.profile
    assert summary.interaction_pairs == 7 and summary.interaction_formats == [
        "int2-g32",
        "int3-g32",
    ]
    units_sum = sum(u.predicted_loss for u in alloc.data.units)
    assert alloc.data.predicted_loss == pytest.approx(units_sum + summary.interaction_loss)
    assert alloc.data.predicted_loss == pytest.approx(alloc.data.solver.objective, rel=1e-9)
    prep = prepare(tiny_model, **kwargs)
    with_terms = profile_model(prep, "output", interactions="neighbours", progress=False)
    assert len(with_terms.interactions.pairs) == 7
    assert with_terms.interactions.formats == ("int2-g32", "int3-g32")
    with_terms.save(tmp_path / "terms.json")
    combined = allocate(
        tiny_model,
        3.5,
        profiler="fisher",
        interactions_from=tmp_path / "terms.json",
        solver="ilp",
        calibration_tokens=128,
        progress=False,
        **kwargs,
    )
    assert combined.data.solver.method == "ilp" and combined.data.profile.method == "fisher"
    with pytest.raises(BitallocError, match="holds none"):
        allocate(tiny_model, 3.5, interactions_from=_plain_profile(prep, tmp_path), **kwargs)


def _plain_profile(prep, tmp_path):
    path = tmp_path / "plain.json"
    profile_model(prep, "output", progress=False).save(path)
    return path


def test_calibration_shorter_than_one_window_is_refused(
    tiny_model, byte_tokenizer, tmp_path, isolated_cache
):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    # Refused while preparing (the importance reads the calibration windows), before any
    # profiling; with plain clipping, by the profiler.
    with pytest.raises(BitallocError, match="fewer than one sequence of 512"):
        prepare(tiny_model, formats=FORMATS, calibration=short, tokenizer=byte_tokenizer)
    prep = prepare(
        tiny_model, formats=FORMATS, calibration=short, tokenizer=byte_tokenizer, clipping="mse"
    )
    with pytest.raises(BitallocError, match="fewer than one sequence of 512"):
        profile_model(prep, "fisher", progress=False)
