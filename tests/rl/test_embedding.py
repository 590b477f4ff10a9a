"""Unit embeddings of the RL allocator: raw statistics, normalization, comparability, errors."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from bitalloc.errors import BitallocError
from bitalloc.models import Unit, discover_units, get_linear
from bitalloc.rl.embedding import (
    EMBEDDING_DIMS,
    normalize_embeddings,
    unit_embeddings,
    unit_statistics,
)
from tests.conftest import make_tiny_llama, random_windows

SCALE_DIMS = [0, 1, 2, 4, 7]
ZSCORED = [0, 1, 2, 3, 4, 5, 6, 7]
WEIGHT_DIMS = [4, 5, 6, 7]
ROLE = {"q": 0, "k": 1 / 6, "v": 2 / 6, "o": 3 / 6, "gate": 4 / 6, "up": 5 / 6, "down": 1}


def _scaled_copy(seed: int = 0, factor: float = 10.0, **kwargs):
    model = make_tiny_llama(seed=seed, **kwargs)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(factor)
    return model


def test_dims_are_named_in_order():
    assert len(EMBEDDING_DIMS) == 11
    assert EMBEDDING_DIMS[0] == "act_mean_abs" and EMBEDDING_DIMS[3] == "act_kurtosis"
    assert EMBEDDING_DIMS[6] == "w_outlier" and EMBEDDING_DIMS[8:] == ("depth", "role", "size")


def test_shape_dtype_and_structural_dims(tiny_model):
    units = discover_units(tiny_model)
    assert len(units) == 14
    emb = unit_embeddings(tiny_model, units, random_windows())
    assert emb.shape == (14, 11) and emb.dtype == np.float32
    assert np.all(np.isfinite(emb)) and np.all(np.abs(emb) <= 5)

    # hidden 64 (4 heads of 16, 2 kv heads), intermediate 96: the largest unit has 96 * 64.
    numel = {"q": 64 * 64, "k": 32 * 64, "v": 32 * 64, "o": 64 * 64}
    numel.update(gate=96 * 64, up=96 * 64, down=64 * 96)
    for row, unit in zip(emb, units):
        assert row[8] == np.float32(unit.layer)  # depth: layer / (2 - 1)
        assert row[9] == np.float32(ROLE[unit.role])
        assert row[10] == np.float32(math.log(numel[unit.role]) / math.log(96 * 64))


def test_rows_follow_the_order_of_units(tiny_model):
    units = discover_units(tiny_model)
    windows = random_windows()
    raw = unit_statistics(tiny_model, units, windows)
    order = np.random.default_rng(0).permutation(len(units))
    shuffled = unit_statistics(tiny_model, [units[i] for i in order], windows)
    np.testing.assert_allclose(shuffled, raw[order], rtol=1e-12)
    np.testing.assert_allclose(
        normalize_embeddings(shuffled), normalize_embeddings(raw)[order], rtol=1e-5, atol=1e-6
    )
    # A subset keeps each unit's raw statistics and structural dims.
    subset = unit_statistics(tiny_model, units[3:5], windows)
    np.testing.assert_allclose(subset, raw[3:5], rtol=1e-12)


def test_raw_statistics_match_a_direct_computation(tiny_model):
    units = discover_units(tiny_model)
    unit = next(u for u in units if u.name.endswith("1.mlp.down_proj"))
    linear = get_linear(tiny_model, unit.name)
    windows = random_windows(n=5, seq_len=24, seed=3)
    raw = unit_statistics(tiny_model, [units[0], unit], windows, batch_size=2)[1]

    seen = []
    handle = linear.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    try:
        with torch.no_grad():
            for start in range(0, 5, 2):
                tiny_model(input_ids=windows[start : start + 2], use_cache=False)
    finally:
        handle.remove()
    x = torch.cat([s.reshape(-1) for s in seen]).double().numpy()
    assert x.size == 5 * 24 * 96
    d = x - x.mean()
    kurt = np.mean(d**4) / np.mean(d**2) ** 2
    expected = [np.abs(x).mean(), x.std(), np.abs(x).max(), kurt]
    np.testing.assert_allclose(raw[:4], expected, rtol=1e-6)

    w = linear.weight.detach().double().numpy()
    dw = w - w.mean()
    w_kurt = np.mean(dw**4) / np.mean(dw**2) ** 2
    outliers = np.mean(np.abs(dw) > 3 * w.std())
    row_norm = np.linalg.norm(w, axis=1).mean() / math.sqrt(w.shape[1])
    np.testing.assert_allclose(raw[4:8], [w.std(), w_kurt, outliers, row_norm], rtol=1e-6)
    assert 0 < outliers < 0.05  # a random init has a few 3-sigma entries


def test_standardized_dims_have_zero_mean_and_unit_std(tiny_model):
    emb = unit_embeddings(tiny_model, discover_units(tiny_model), random_windows()).astype(float)
    np.testing.assert_allclose(emb[:, ZSCORED].mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(emb[:, ZSCORED].std(axis=0), 1, rtol=1e-5)


def test_normalization_is_log_then_zscore_and_clips():
    rng = np.random.default_rng(0)
    n = 200
    raw = np.column_stack(
        [
            rng.uniform(0.1, 2, (n, 3)),  # activation magnitudes
            rng.uniform(2, 20, n),  # kurtosis
            rng.uniform(0.01, 0.05, n),  # w_std
            rng.uniform(2.5, 4, n),  # w_kurtosis
            rng.uniform(0, 0.01, n),  # w_outlier
            rng.uniform(0.01, 0.05, n),  # w_row_norm
            rng.uniform(0, 1, (n, 3)),  # depth, role, size
        ]
    )
    emb = normalize_embeddings(raw)
    assert emb.dtype == np.float32 and emb.shape == (n, 11)
    logged = np.log(raw[:, 4])
    np.testing.assert_allclose(emb[:, 4], (logged - logged.mean()) / logged.std(), rtol=1e-5)
    np.testing.assert_allclose(
        emb[:, 6], (raw[:, 6] - raw[:, 6].mean()) / raw[:, 6].std(), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(emb[:, 8:], raw[:, 8:].astype(np.float32))

    # One extreme unit: its z-score (about sqrt(n - 1) = 14) is clipped to 5.
    raw[0, 6] = 1.0
    raw[1, 2] = 1e-20
    emb = normalize_embeddings(raw)
    assert emb[0, 6] == 5.0 and emb[1, 2] == -5.0
    assert np.all(np.abs(emb) <= 5)

    # A dim without spread standardizes to 0; a single unit gives zeros in every z-scored dim.
    raw[:, 5] = 3.0
    assert np.all(normalize_embeddings(raw)[:, 5] == 0)
    single = normalize_embeddings(raw[:1])
    assert np.all(single[0, ZSCORED] == 0)
    np.testing.assert_array_equal(single[0, 8:], raw[0, 8:].astype(np.float32))


def test_weight_dims_are_scale_invariant(tiny_model):
    units = discover_units(tiny_model)
    windows = random_windows()
    raw = unit_statistics(tiny_model, units, windows)
    scaled = _scaled_copy()
    raw10 = unit_statistics(scaled, units, windows)

    # The raw scale-dependent statistics change ...
    np.testing.assert_allclose(raw10[:, [4, 7]], 10 * raw[:, [4, 7]], rtol=1e-6)
    assert np.all(np.abs(raw10[:, [0, 1, 2]] / raw[:, [0, 1, 2]] - 1) > 0.5)
    # ... shape statistics do not, and neither do the normalized weight dims.
    np.testing.assert_allclose(raw10[:, [5, 6]], raw[:, [5, 6]], rtol=1e-6)
    np.testing.assert_allclose(
        normalize_embeddings(raw10)[:, WEIGHT_DIMS],
        normalize_embeddings(raw)[:, WEIGHT_DIMS],
        atol=1e-5,
    )


def test_models_of_different_sizes_give_comparable_embeddings():
    small = make_tiny_llama(seed=1, layers=2, hidden=64, intermediate=96)
    large = make_tiny_llama(seed=2, layers=4, hidden=128, intermediate=192)
    windows = random_windows(n=2, seq_len=32, seed=1)
    emb_small = unit_embeddings(small, discover_units(small), windows)
    emb_large = unit_embeddings(large, discover_units(large), windows)
    assert emb_small.shape == (14, 11) and emb_large.shape == (28, 11)
    low = np.maximum(emb_small.min(axis=0), emb_large.min(axis=0))
    high = np.minimum(emb_small.max(axis=0), emb_large.max(axis=0))
    assert np.all(low <= high), [EMBEDDING_DIMS[d] for d in np.flatnonzero(low > high)]
    np.testing.assert_array_equal(emb_large[:7, 8], 0)  # the first block is at depth 0
    np.testing.assert_array_equal(emb_large[-7:, 8], 1)

    # Raw statistics are not comparable: weights x10 move every scale-dependent dim.
    raw = unit_statistics(small, discover_units(small), windows)
    raw10 = unit_statistics(_scaled_copy(seed=1), discover_units(small), windows)
    assert not np.allclose(raw[:, SCALE_DIMS], raw10[:, SCALE_DIMS], rtol=0.1)
    assert np.all(raw10[:, 4] > 5 * raw[:, 4])


def test_other_roles_and_a_single_layer():
    model = make_tiny_llama(layers=1)
    units = discover_units(model)
    up = next(u for u in units if u.role == "up")
    custom = Unit(name=up.name, shape=up.shape, layer=0, role="w1", group=up.name)
    raw = unit_statistics(model, [*units, custom], random_windows(n=1))
    assert np.all(raw[:, 8] == 0)  # one layer: depth 0
    assert raw[-1, 9] == 0.5
    np.testing.assert_array_equal(raw[-1, :8], raw[units.index(up), :8])


def test_fused_projections_get_the_roles_they_fuse_not_the_unknown_code():
    from tests.families import phi3

    model, _ = phi3()
    units = discover_units(model)
    raw = unit_statistics(model, units, random_windows(n=1))
    codes = {u.role: raw[i, 9] for i, u in enumerate(units)}
    assert codes["qkv"] == pytest.approx(np.mean([ROLE["q"], ROLE["k"], ROLE["v"]]))
    assert codes["gateup"] == pytest.approx(np.mean([ROLE["gate"], ROLE["up"]]))
    assert codes["qkv"] != codes["o"] and codes["gateup"] != 0.5


def test_hooks_are_removed_and_mode_restored(tiny_model):
    units = discover_units(tiny_model)
    linears = [get_linear(tiny_model, u.name) for u in units]
    tiny_model.train()
    unit_statistics(tiny_model, units, random_windows(n=1))
    assert tiny_model.training
    assert all(not lin._forward_pre_hooks for lin in linears)

    def fail(*_args):
        raise RuntimeError("boom")

    handle = tiny_model.model.layers[1].register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            unit_statistics(tiny_model, units, random_windows(n=1))
    finally:
        handle.remove()
    assert all(not lin._forward_pre_hooks for lin in linears)


@pytest.mark.parametrize(
    ("units", "windows", "kwargs", "match"),
    [
        ([], random_windows(n=1), {}, "no units given"),
        (["model.layers.0.mlp.up_proj"], random_windows(n=1), {}, "must be bitalloc.models.Unit"),
        (None, random_windows(n=1).reshape(-1), {}, r"non-empty \(n, seq_len\) tensor"),
        (None, torch.zeros((0, 8), dtype=torch.long), {}, r"got shape \(0, 8\)"),
        (None, torch.zeros((2, 0), dtype=torch.long), {}, r"got shape \(2, 0\)"),
        (None, random_windows(n=1).float(), {}, "integer token ids"),
        (None, [[1, 2, 3]], {}, "got list"),
        (None, random_windows(n=1) + 1000, {}, "outside the model's vocabulary"),
        (None, random_windows(n=1), {"batch_size": 0}, "batch_size must be a positive"),
        (
            [Unit("model.layers.7.mlp.up_proj", (96, 64), 7, "up", "x")],
            random_windows(n=1),
            {},
            "does not exist in this model",
        ),
        (
            [Unit("model.layers.0.mlp", (96, 64), 0, "up", "x")],
            random_windows(n=1),
            {},
            "not a Linear layer",
        ),
    ],
)
def test_bad_inputs_raise(tiny_model, units, windows, kwargs, match):
    units = discover_units(tiny_model) if units is None else units
    with pytest.raises(BitallocError, match=match):
        unit_embeddings(tiny_model, units, windows, **kwargs)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (np.zeros((3, 10)), r"\(n_units, 11\) array"),
        (np.zeros(11), r"\(n_units, 11\) array"),
        (np.zeros((0, 11)), r"\(n_units, 11\) array"),
        (np.full((2, 11), np.nan), "NaN or infinite"),
        (np.full((2, 11), -1.0), "must be >= 0"),
        (np.full((2, 11), 2.0), r"must lie in \[0, 1\]"),
    ],
)
def test_bad_raw_statistics_raise(raw, match):
    with pytest.raises(BitallocError, match=match):
        normalize_embeddings(raw)


def test_unit_not_called_in_forward_raises(tiny_model):
    units = discover_units(tiny_model)
    orphan = torch.nn.Linear(4, 4)
    tiny_model.orphan = orphan
    stray = Unit("orphan", (4, 4), 0, "other", "orphan")
    with pytest.raises(BitallocError, match="received no input"):
        unit_statistics(tiny_model, [units[0], stray], random_windows(n=1))


@pytest.mark.slow
def test_default_model_embeddings(default_model):
    from bitalloc.data import default_text, tokenize, windows

    ids = tokenize(default_model.tokenizer, default_text().calibration)
    calib = windows(ids, 64, max_tokens=128)
    assert calib.shape == (2, 64)
    units = discover_units(default_model.model)
    started = time.perf_counter()
    emb = unit_embeddings(default_model.model, units, calib)
    seconds = time.perf_counter() - started
    assert emb.shape == (210, 11) and emb.dtype == np.float32
    assert np.all(np.isfinite(emb)) and np.all(np.abs(emb) <= 5)
    print(f"\ndefault model: 210 unit embeddings in {seconds:.2f} s (2 x 64 tokens)")
    for d, name in enumerate(EMBEDDING_DIMS):
        print(f"  {d:2d} {name:13s} [{emb[:, d].min():+.3f}, {emb[:, d].max():+.3f}]")
