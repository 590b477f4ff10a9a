"""The profiler contract (bitalloc.sensitivity.base.BaseProfiler), checked for every profiler."""

import json

import numpy as np
import pytest
import torch

from bitalloc.formats import parse_palette
from bitalloc.models import discover_units
from bitalloc.sensitivity import PROFILERS, Profile, make_profiler
from tests.conftest import random_windows

PALETTE = parse_palette("int2-g32,int3-g32,int4-g32,int8-g32,int2-g64,int4-g64,fp16")

#: Small, fast options per method; every registered profiler must appear here.
OPTIONS = {
    "fisher": {"tokens": 96},
    "hessian": {"tokens": 64, "max_probes": 3, "min_probes": 2},
    "output": {"tokens": 96},
    "kfac": {"tokens": 96},
    "kl": {"tokens": 64},
    "measured": {"tokens": 64},
}


def _calibration(n=4, seq_len=32):
    return random_windows(n=n, seq_len=seq_len)


def _profiler(name, tmp_path, tag="a", **extra):
    options = dict(OPTIONS[name], **extra)
    if name in ("kl", "measured"):
        # A fresh journal per call, so a second run really measures again.
        options["results"] = tmp_path / f"{name}-{tag}.jsonl"
    return make_profiler(name, progress=False, **options)


def test_every_profiler_is_covered():
    assert set(PROFILERS) == set(OPTIONS)


@pytest.fixture(params=sorted(OPTIONS))
def method(request):
    return request.param


def test_table_shape_values_and_metadata(method, tiny_model, tmp_path):
    units = discover_units(tiny_model)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    flags = [p.requires_grad for p in tiny_model.parameters()]
    prof = _profiler(method, tmp_path).profile(tiny_model, units, PALETTE, _calibration())
    assert prof.units == tuple(u.name for u in units)
    assert prof.formats == tuple(f.name for f in PALETTE)
    assert prof.loss.shape == (len(units), len(PALETTE))
    assert np.isfinite(prof.loss).all() and (prof.loss >= 0).all()
    for key in ("method", "tokens", "skipped_batches", "seconds"):
        assert key in prof.metadata, key
    assert prof.metadata["method"] == method
    assert 0 < prof.metadata["tokens"] <= _calibration().numel()
    json.dumps(prof.metadata)
    # The model comes back exactly as it was.
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [p.requires_grad for p in tiny_model.parameters()] == flags
    assert all(p.grad is None for p in tiny_model.parameters())
    assert not tiny_model.training


def test_more_bits_never_predict_more_loss(method, tiny_model, tmp_path):
    units = discover_units(tiny_model)
    prof = _profiler(method, tmp_path).profile(tiny_model, units, PALETTE, _calibration())
    for group in (32, 64):
        cols = [f for f in PALETTE if f.group_size == group]
        cols.sort(key=lambda f: f.bits)
        for low, high in zip(cols, cols[1:]):
            assert (prof.column(high.name) <= prof.column(low.name)).all(), (low, high)


def test_deterministic_under_a_seed(method, tiny_model, tmp_path):
    units = discover_units(tiny_model)
    first = _profiler(method, tmp_path, "a").profile(tiny_model, units, PALETTE, _calibration())
    again = _profiler(method, tmp_path, "b").profile(tiny_model, units, PALETTE, _calibration())
    np.testing.assert_array_equal(first.loss, again.loss)
    assert _profiler(method, tmp_path).options() == _profiler(method, tmp_path, "b").options()


@pytest.mark.parametrize("suffix", [".json", ".safetensors"])
def test_save_load_identical(method, suffix, tiny_model, tmp_path):
    units = discover_units(tiny_model)
    prof = _profiler(method, tmp_path).profile(tiny_model, units, PALETTE, _calibration())
    path = tmp_path / f"profile{suffix}"
    prof.save(path)
    again = Profile.load(path)
    assert again.units == prof.units and again.formats == prof.formats
    np.testing.assert_array_equal(again.loss, prof.loss)
    assert again.metadata == json.loads(json.dumps(prof.metadata))


def test_subset_of_units_in_given_order(method, tiny_model, tmp_path):
    units = discover_units(tiny_model)
    subset = [units[9], units[2], units[5]]
    prof = _profiler(method, tmp_path).profile(tiny_model, subset, PALETTE[:3], _calibration())
    assert prof.units == tuple(u.name for u in subset)
    assert prof.loss.shape == (3, 3)
