"""The profiler contract (bitalloc.sensitivity.base.BaseProfiler), checked for every profiler in
the registry: the built-in weight profilers, the KV profiler (its own units and palette) and a
profiler a user registers (a toy defined here).

Each profiler is run once per module on a fresh tiny model and the shared assertions read that
run; determinism and subsets run it again.
"""

from typing import Any

import numpy as np
import pytest

from bitalloc.errors import BitallocError
from bitalloc.formats import fake_quantize_each, parse_palette
from bitalloc.kv import KVFormat, kv_units
from bitalloc.models import discover_units, get_linear
from bitalloc.sensitivity import (
    MEASURING_PROFILERS,
    PROFILERS,
    BaseProfiler,
    Profile,
    Statistics,
    make_profiler,
    profiler_classes,
    register_profiler,
    registered_profiler,
    unregister_profiler,
)
from bitalloc.sensitivity.monotone import bit_chains
from tests.conftest import make_tiny_llama, random_windows
from tests.sensitivity.contract import (
    assert_kv_free_format_is_zero,
    assert_metadata,
    assert_model_restored,
    assert_monotone,
    assert_save_load,
    assert_table,
)

PALETTE = parse_palette("int2-g32,int3-g32,int4-g32,int8-g32,int2-g64,int4-g64,fp16")
#: KV pairs in groups of 16 tokens (32-token windows hold two whole key groups), out of order.
KV_PALETTE = [KVFormat(2, 2, 16), KVFormat(16, 16, 16), KVFormat(8, 4, 16), KVFormat(4, 8, 16)]

#: Small, fast options per registered profiler; every registered profiler must appear here.
FAST = {
    "fisher": {"tokens": 96},
    "hessian": {"tokens": 64, "max_probes": 3, "min_probes": 2},
    "output": {"tokens": 96},
    "kfac": {"tokens": 96},
    "kl": {"tokens": 64},
    "measured": {"tokens": 64},
    "kv": {"method": "proxy", "tokens": 96},
}


def _calibration(n=4, seq_len=32):
    return random_windows(n=n, seq_len=seq_len)


class WeightErrorProfiler(BaseProfiler):
    """A user's profiler: squared weight error times a fixed scale (no calibration needed,
    but every window counts as used)."""

    name = "toy-weight-error"

    def __init__(self, scale: float = 0.5, progress: bool = True):
        if not scale > 0:
            raise BitallocError(f"scale must be positive, got {scale!r}")
        self.scale = float(scale)
        self.progress = progress

    def options(self) -> dict[str, Any]:
        return {"scale": self.scale}

    def gather(self, model, units, calibration, bar) -> Statistics:
        weights = [get_linear(model, u.name).weight.detach() for u in units]
        return Statistics(int(calibration.numel()), len(calibration), 0, weights, {"toy": True})

    def unit_losses(self, index, statistics, palette):
        w = statistics.state[index]
        return [
            self.scale * float((fq.float() - w.float()).square().mean())
            for fq in fake_quantize_each(w, palette, statistics.importance_of(index))
        ]


def _make(name, tmp_path, tag="a", **extra):
    """A registered profiler by name, with its fast options and a fresh journal when it has
    one (so that a second run really measures again)."""
    cls = profiler_classes()[name]
    options = {**FAST.get(name, {}), **extra}
    if cls.measures_on_pool:
        options["results"] = tmp_path / f"{name}-{tag}.jsonl"
    return cls(progress=False, **options)


def _inputs(cls, model):
    if cls.unit_kind == "kv":
        return kv_units(model), KV_PALETTE
    return discover_units(model), PALETTE


def run_contract(name: str, tmp_path) -> Profile:
    """Every contract assertion for one registered profiler; returns its profile."""
    cls = profiler_classes()[name]
    model = make_tiny_llama()
    units, palette = _inputs(cls, model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    prof = _make(name, tmp_path).profile(model, units, palette, _calibration())
    assert_table(prof, units, palette)
    assert_metadata(prof, name, _calibration())
    assert_model_restored(model, before, flags)
    if cls.unit_kind == "kv":
        assert_kv_free_format_is_zero(prof)
        assert (prof.column(KVFormat(2, 2, 16).name) > 0).all()  # proxy: never clipped
    else:
        assert_monotone(prof, palette)
    for suffix in (".json", ".safetensors"):
        assert_save_load(prof, tmp_path / f"{name}{suffix}")
    return prof


# -- the contract over the registry ---------------------------------------------------------


def test_every_registered_profiler_has_fast_options():
    assert set(profiler_classes()) == set(FAST)
    assert set(PROFILERS) == set(FAST) - {"kv"}


@pytest.fixture(scope="module")
def contract_runs(tmp_path_factory):
    """One full contract run per registered profiler, made on first use."""
    runs: dict[str, Profile] = {}

    def get(name: str) -> Profile:
        if name not in runs:
            runs[name] = run_contract(name, tmp_path_factory.mktemp(name))
        return runs[name]

    return get


@pytest.fixture(params=sorted(FAST))
def name(request):
    return request.param


def test_contract(name, contract_runs):
    contract_runs(name)


def test_deterministic_under_equal_options(name, contract_runs, tmp_path):
    first = contract_runs(name)
    cls = profiler_classes()[name]
    model = make_tiny_llama()
    units, palette = _inputs(cls, model)
    again = _make(name, tmp_path, "b").profile(model, units, palette, _calibration())
    np.testing.assert_array_equal(first.loss, again.loss)
    assert _make(name, tmp_path).options() == _make(name, tmp_path, "b").options()


@pytest.mark.parametrize("weight_profiler", sorted(PROFILERS))
def test_every_weight_profiler_quantizes_with_the_importance_given(weight_profiler, tmp_path):
    # Equal importances give bit-identical quantization, so an equal table; skewed ones move
    # the clipping of integer formats, so the table must move too, or the profiler ignored it.
    import torch

    from bitalloc.importance import Importance, to_bfloat16_values

    model = make_tiny_llama()
    units = discover_units(model)
    palette = PALETTE[:4]
    g = torch.Generator().manual_seed(0)
    flat = Importance({u.name: torch.full((u.shape[1],), 3.0) for u in units}, 128)
    skewed = Importance(
        {u.name: to_bfloat16_values(torch.rand(u.shape[1], generator=g) ** 6) for u in units}, 128
    )
    runs = {}
    for tag, importance in (("none", None), ("flat", flat), ("skewed", skewed)):
        profiler = _make(weight_profiler, tmp_path, tag)
        runs[tag] = profiler.profile(model, units, palette, _calibration(), importance).loss
    np.testing.assert_array_equal(runs["flat"], runs["none"])
    assert not np.array_equal(runs["skewed"], runs["none"])


@pytest.mark.parametrize("weight_profiler", sorted(PROFILERS))
def test_every_weight_profiler_leaves_formats_a_unit_cannot_take_at_the_placeholder(
    weight_profiler, tmp_path
):
    # 256-wide inputs take K-quants, down_proj's 320-wide ones do not: those entries are
    # never measured and hold the placeholder 0 (build_problem masks them out).
    model = make_tiny_llama(hidden=256, intermediate=320)
    units = discover_units(model)
    palette = parse_palette("gguf:Q4_K,gguf:Q4_0,int3-g32")
    prof = _make(weight_profiler, tmp_path).profile(model, units, palette, _calibration())
    k = prof.formats.index("gguf:Q4_K")
    down = np.array([u.role == "down" for u in units])
    assert (prof.loss[down, k] == 0).all()
    assert (prof.loss[~down, k] > 0).any()  # measured where it fits (hessian clips some to 0)
    assert np.isfinite(prof.loss).all() and (prof.loss >= 0).all()


def test_subset_of_units_in_given_order(name, tiny_model, tmp_path):
    cls = profiler_classes()[name]
    units, palette = _inputs(cls, tiny_model)
    subset = [units[1], units[0]] if cls.unit_kind == "kv" else [units[9], units[2], units[5]]
    prof = _make(name, tmp_path).profile(tiny_model, subset, palette[:3], _calibration())
    assert prof.units == tuple(u.name for u in subset)
    assert prof.formats == tuple(f.name for f in palette[:3])


def test_bad_inputs_are_the_projects_error(name, tiny_model, tmp_path):
    cls = profiler_classes()[name]
    units, palette = _inputs(cls, tiny_model)
    prof = _make(name, tmp_path)
    cal = _calibration()
    with pytest.raises(BitallocError, match="no .*units"):
        prof.profile(tiny_model, [], palette, cal)
    with pytest.raises(BitallocError, match="more than once"):
        prof.profile(tiny_model, units, [palette[0], palette[1], palette[0]], cal)
    with pytest.raises(BitallocError, match="palette must be a non-empty list"):
        prof.profile(tiny_model, units, [], cal)
    with pytest.raises(BitallocError, match="tensor of token ids"):
        prof.profile(tiny_model, units, palette, cal.float())
    with pytest.raises(BitallocError, match="2\\+ tokens"):
        prof.profile(tiny_model, units, palette, cal[:, :1])


# -- a profiler a user registers ------------------------------------------------------------


def test_a_user_registered_profiler_keeps_the_contract(tmp_path):
    with registered_profiler(WeightErrorProfiler):
        assert WeightErrorProfiler.name in PROFILERS
        assert WeightErrorProfiler.name not in MEASURING_PROFILERS
        FAST[WeightErrorProfiler.name] = {"scale": 2.0}
        try:
            prof = run_contract(WeightErrorProfiler.name, tmp_path)
        finally:
            del FAST[WeightErrorProfiler.name]
        assert prof.metadata["toy"] is True
        # Built by name, as allocate(profiler=...) and --profiler build it.
        made = make_profiler(WeightErrorProfiler.name, progress=False, scale=2.0)
        assert isinstance(made, WeightErrorProfiler)
        model = make_tiny_llama()
        units = discover_units(model)
        # The table is the weight error itself: a fixed scale times the mean squared error.
        w = get_linear(model, units[3].name).weight.detach()
        fq = list(fake_quantize_each(w, [PALETTE[2]]))[0]
        expected = 2.0 * float((fq.float() - w.float()).square().mean())
        assert prof.loss[3, 2] == pytest.approx(expected, rel=1e-12)
    assert WeightErrorProfiler.name not in PROFILERS
    with pytest.raises(BitallocError, match="unknown profiler 'toy-weight-error'"):
        make_profiler(WeightErrorProfiler.name)


class RisingProfiler(WeightErrorProfiler):
    """A toy whose raw values rise with bits: the skeleton must cap them."""

    name = "toy-rising"

    def unit_losses(self, index, statistics, palette):
        return [float(f.bits) + index for f in palette]


def test_the_skeleton_caps_every_profilers_table_and_counts_it(tiny_model):
    units = discover_units(tiny_model)[:2]
    prof = RisingProfiler(progress=False).profile(tiny_model, units, PALETTE, _calibration())
    # Within each group the value of the fewest bits wins: int2-g32 and int2-g64 (2 bits).
    for cols in bit_chains(PALETTE):
        for j in cols:
            np.testing.assert_array_equal(prof.loss[:, j], prof.loss[:, cols[0]])
    np.testing.assert_array_equal(prof.column("int2-g32"), [2.0, 3.0])
    # int3, int4, int8 in g32 (3 per row), int4-g64 (1) and fp16, which joins no chain.
    assert prof.metadata["monotone_fixes"] == 2 * 4
    np.testing.assert_array_equal(prof.column("fp16"), [16.0, 17.0])


class EmptyProfiler(WeightErrorProfiler):
    """A toy whose every window is skipped."""

    name = "toy-empty"

    def gather(self, model, units, calibration, bar):
        return Statistics(0, 0, len(calibration), None)


def test_no_usable_batch_is_refused_by_the_skeleton(tiny_model):
    units = discover_units(tiny_model)[:2]
    with pytest.raises(BitallocError, match="all 4 calibration windows gave non-finite"):
        EmptyProfiler(progress=False).profile(tiny_model, units, PALETTE, _calibration())


def test_registry_errors_and_the_measuring_view():
    class Clash(WeightErrorProfiler):
        name = "fisher"

    with pytest.raises(BitallocError, match="'fisher' is already registered"):
        register_profiler(Clash)
    assert PROFILERS["fisher"] is not Clash
    with pytest.raises(BitallocError, match="subclass of BaseProfiler"):
        register_profiler(dict)
    with pytest.raises(BitallocError, match="no profiler named 'nope'"):
        unregister_profiler("nope")

    class Pooled(WeightErrorProfiler):
        name = "toy-pooled"
        measures_on_pool = True

    with registered_profiler(Pooled):
        assert "toy-pooled" in MEASURING_PROFILERS
        # Registering the same class again is a no-op, not a clash.
        register_profiler(Pooled)
    assert "toy-pooled" not in MEASURING_PROFILERS and "toy-pooled" not in PROFILERS
    assert set(MEASURING_PROFILERS) == {"kl", "measured"}
