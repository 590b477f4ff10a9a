"""The int and float families: names, costs, and the clipping search, bit for bit."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitalloc.errors import BitallocError
from bitalloc.formats import (
    SUPPORTED_BITS,
    SUPPORTED_GROUP_SIZES,
    QuantFormat,
    QuantizedWeight,
    default_palette,
    dequantize,
    fake_quantize_each,
    parse_format,
    parse_palette,
    quantize_each,
)
from bitalloc.formats import int_grid as formats_module
from bitalloc.formats.int_grid import _first_minimum


def test_default_palette_names_and_order():
    names = [f.name for f in default_palette()]
    assert len(names) == 19
    assert names[0] == "int2-g128" and names[-1] == "fp16"
    assert "int3-g128" in names and "int8-g32" in names
    bits = [f.nominal_bits for f in default_palette()]
    assert bits == sorted(bits)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("int3-g128", 3.25),
        ("int4-g128", 4.25),
        ("int2-g64", 2.5),
        ("int8-g32", 9.0),
        ("fp16", 16.0),
    ],
)
def test_effective_bits_count_scales_and_zeros(name, expected):
    fmt = parse_format(name)
    assert fmt.nominal_bits == expected
    assert fmt.bits_per_weight((64, 1536)) == expected


def test_ragged_input_dimension_accounting_is_exact():
    fmt = parse_format("int3-g128")
    # 576 = 4 x 128 + 64: five groups per row, each with a 16-bit scale and a 16-bit zero.
    assert fmt.storage_bits((10, 576)) == 10 * (576 * 3 + 5 * 32)
    assert math.isclose(fmt.bits_per_weight((10, 576)), 3 + 160 / 576)
    q = fmt.quantize(torch.randn(10, 576))
    assert q.scales.shape == (10, 5) and q.zeros.shape == (10, 5)
    stored = q.codes.numel() * q.bits + (q.scales.numel() + q.zeros.numel()) * 16
    assert stored == fmt.storage_bits((10, 576))


@pytest.mark.parametrize("group", [32, 64, 128])
def test_error_falls_as_bits_rise(group):
    torch.manual_seed(0)
    w = torch.randn(48, 200) * 0.02
    errors = [
        (QuantFormat(b, group).fake_quantize(w) - w).square().mean().item()
        for b in (2, 3, 4, 5, 6, 8)
    ]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_smaller_groups_are_more_accurate():
    torch.manual_seed(1)
    w = torch.randn(32, 512) * torch.rand(1, 512) * 3  # uneven column scales
    errs = [(QuantFormat(3, g).fake_quantize(w) - w).square().mean().item() for g in (128, 64, 32)]
    assert errs[0] > errs[1] > errs[2]


def test_clipping_search_beats_min_max():
    torch.manual_seed(2)
    w = torch.randn(64, 256)
    w[0, 0] = 12.0  # one outlier stretches its group's min-max range
    fmt = QuantFormat(3, 128)
    q = fmt.quantize(w)
    searched = (dequantize(q) - w).square().sum()
    g = w.reshape(64, 2, 128)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = (hi - lo) / 7
    zero = torch.round(-lo / scale)
    minmax = ((torch.clamp(torch.round(g / scale) + zero, 0, 7) - zero) * scale - g).square().sum()
    assert searched < minmax


def test_codes_and_params_are_in_range_and_fp16():
    fmt = parse_format("int5-g64")
    q = fmt.quantize(torch.randn(8, 100))
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 31
    assert q.scales.dtype == torch.float16 and q.zeros.dtype == torch.float16
    assert torch.equal(q.zeros, torch.round(q.zeros)) and float(q.zeros.min()) >= 0


def test_constant_and_zero_groups_are_exact():
    w = torch.zeros(4, 64)
    w[1] = 0.5
    out = parse_format("int2-g32").fake_quantize(w)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, w, atol=1e-3)


def test_fake_quantize_keeps_dtype():
    w = torch.randn(8, 64, dtype=torch.float16)
    assert parse_format("int4-g32").fake_quantize(w).dtype == torch.float16
    assert parse_format("fp16").fake_quantize(w.float()).dtype == torch.float32


@pytest.mark.parametrize("bad", ["int7-g128", "int4-g100", "int4", "q4_k", "int4-g0"])
def test_unknown_formats_raise_clear_errors(bad):
    with pytest.raises(BitallocError, match="int|group|unsupported"):
        parse_format(bad)


def test_parse_palette():
    palette = parse_palette("int4-g128, fp16,int2-g64")
    assert [f.name for f in palette] == ["int2-g64", "int4-g128", "fp16"]
    with pytest.raises(BitallocError, match="more than once"):
        parse_palette(["int4-g128", "int4-g128"])
    with pytest.raises(BitallocError, match="empty"):
        parse_palette([])


def test_bad_shapes_raise():
    with pytest.raises(BitallocError, match="2-D"):
        parse_format("int4-g128").quantize(torch.randn(3, 4, 5))
    with pytest.raises(BitallocError, match="fp16"):
        parse_format("fp16").quantize(torch.randn(3, 4))


# --- the grid search, format by format and shared across formats ------------------------------
CLIP_GRID = (1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.82, 0.79, 0.76, 0.72, 0.68, 0.64, 0.6, 0.55)
INT_FORMATS = [QuantFormat(b, g) for b in SUPPORTED_BITS for g in SUPPORTED_GROUP_SIZES]


def reference_quantize(weight: torch.Tensor, fmt: QuantFormat) -> QuantizedWeight:
    """The clipping search as first written, one ratio at a time over the whole weight: a
    ratio replaces the best so far only with a strictly smaller squared error. The library's
    batched search must reproduce it code for code."""
    w = weight.detach().float()
    qmax = float(2**fmt.bits - 1)
    n_full = w.shape[1] // fmt.group_size
    blocks = []
    if n_full:
        blocks.append(w[:, : n_full * fmt.group_size].reshape(w.shape[0], n_full, -1))
    if w.shape[1] % fmt.group_size:
        blocks.append(w[:, n_full * fmt.group_size :].unsqueeze(1))
    codes, scales, zeros = [], [], []
    for x in blocks:
        lo = torch.clamp(x.amin(dim=-1), max=0.0)
        hi = torch.clamp(x.amax(dim=-1), min=0.0)
        best_err = torch.full_like(lo, float("inf"))
        best_scale, best_zero = torch.ones_like(lo), torch.zeros_like(lo)
        for ratio in CLIP_GRID:
            span = torch.clamp(hi * ratio - lo * ratio, min=1e-8)
            scale = torch.clamp((span / qmax).half().float(), min=6.2e-5)
            zero = torch.clamp(torch.round(-(lo * ratio) / scale), 0, qmax)
            q = torch.clamp(torch.round(x / scale[..., None]) + zero[..., None], 0, qmax)
            err = ((q - zero[..., None]) * scale[..., None] - x).square().sum(dim=-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
        q = torch.clamp(torch.round(x / best_scale[..., None]) + best_zero[..., None], 0, qmax)
        codes.append(q.to(torch.uint8).reshape(w.shape[0], -1))
        scales.append(best_scale.half())
        zeros.append(best_zero.half())
    return QuantizedWeight(
        torch.cat(codes, 1), torch.cat(scales, 1), torch.cat(zeros, 1), fmt.group_size, fmt.bits
    )


def assert_same(a: QuantizedWeight, b: QuantizedWeight) -> None:
    assert (a.bits, a.group_size) == (b.bits, b.group_size)
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.scales, b.scales)
    assert torch.equal(a.zeros, b.zeros)


def odd_weight(out: int, inp: int, seed: int) -> torch.Tensor:
    """Gaussian weights with outliers, an all-zero row, a constant row and a row of values so
    small that the fp16 scale reaches its floor."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen) * 0.05
    w[:, :: max(1, inp // 7)] *= 8.0
    if out >= 4:
        w[1] = 0.0
        w[2] = 0.37
        w[3] = torch.randn(inp, generator=gen) * 1e-6
    return w


# 576 = 4 x 128 + 64 (a ragged last group), 100 < every group size, 72 = 2 x 32 + 8.
@pytest.mark.parametrize("shape", [(6, 576), (5, 100), (4, 72), (3, 256), (1, 40)])
def test_shared_search_reproduces_the_reference_for_every_format(shape):
    w = odd_weight(*shape, seed=shape[0] * 1000 + shape[1])
    shared = list(quantize_each(w, INT_FORMATS))
    assert len(shared) == len(INT_FORMATS)
    for fmt, q in zip(INT_FORMATS, shared):
        expected = reference_quantize(w, fmt)
        assert_same(q, expected)
        assert_same(fmt.quantize(w), expected)


def test_chunking_does_not_change_the_result(monkeypatch):
    w = odd_weight(7, 200, seed=3)
    some = [parse_format(n) for n in ("int2-g32", "int3-g128", "int8-g64")]
    whole = [reference_quantize(w, f) for f in some]
    # Down to one row of groups per step of the search.
    monkeypatch.setattr(formats_module, "_CHUNK_ELEMENTS", 1)
    for q, expected in zip(quantize_each(w, some), whole, strict=True):
        assert_same(q, expected)


@settings(max_examples=15, deadline=None)
@given(
    out=st.integers(1, 9),
    inp=st.integers(1, 300),
    scale=st.sampled_from([1e-7, 1e-3, 1.0, 300.0]),
    seed=st.integers(0, 2**16),
    palette=st.lists(st.sampled_from(default_palette()), min_size=1, max_size=4, unique=True),
)
def test_shared_fake_quantize_equals_format_by_format(out, inp, scale, seed, palette):
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * scale
    for fmt, fq in zip(palette, fake_quantize_each(w, palette), strict=True):
        if fmt.is_float:
            assert torch.equal(fq, w.half().float())
        else:
            assert torch.equal(fq, dequantize(reference_quantize(w, fmt)))


def test_shared_fake_quantize_keeps_each_dtype_and_order():
    w = odd_weight(4, 96, seed=1).to(torch.bfloat16)
    palette = [parse_format(n) for n in ("int8-g32", "fp16", "int2-g64", "int3-g32")]
    out = list(fake_quantize_each(w, palette))
    assert [t.dtype for t in out] == [torch.bfloat16] * 4
    for fmt, fq in zip(palette, out):
        assert torch.equal(fq, fmt.fake_quantize(w))


def test_first_minimum_follows_the_sequential_rule():
    nan, inf = float("nan"), float("inf")
    # Ratios down the first dimension; three groups: a NaN first error, a tie, nothing finite.
    err = torch.tensor([[nan, 2.0, nan], [3.0, 1.0, inf], [1.0, 1.0, nan], [1.0, 5.0, inf]])
    scale = torch.arange(12, dtype=torch.float32).reshape(4, 3) + 10
    zero = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    best_scale, best_zero = _first_minimum(err, scale, zero)
    assert best_scale.tolist() == [16.0, 14.0, 1.0]
    assert best_zero.tolist() == [6.0, 4.0, 0.0]


def test_shared_quantize_refuses_fp16_and_bad_shapes():
    with pytest.raises(BitallocError, match="fp16"):
        next(quantize_each(torch.randn(3, 8), [parse_format("fp16")]))
    with pytest.raises(BitallocError, match="2-D"):
        next(fake_quantize_each(torch.randn(8), [parse_format("int4-g32")]))


# --- the search weighted by input importance --------------------------------------------------
def weighted_reference(
    weight: torch.Tensor,
    fmt: QuantFormat,
    importance: torch.Tensor,
    grid: tuple[float, ...] = CLIP_GRID,
) -> QuantizedWeight:
    """The sequential clipping search of :func:`reference_quantize`, each column's squared error
    weighted by its importance divided by the largest in its group (a group of zeros: ones).
    ``grid=(1.0,)`` is plain min-max."""
    w = weight.detach().float()
    qmax = float(2**fmt.bits - 1)
    codes, scales, zeros = [], [], []
    for start in range(0, w.shape[1], fmt.group_size):
        x = w[:, start : start + fmt.group_size]
        imp = importance[start : start + fmt.group_size].float()
        imp = imp / imp.max() if float(imp.max()) > 0 else torch.ones_like(imp)
        lo = torch.clamp(x.amin(dim=-1), max=0.0)
        hi = torch.clamp(x.amax(dim=-1), min=0.0)
        best_err = torch.full_like(lo, float("inf"))
        best_scale, best_zero = torch.ones_like(lo), torch.zeros_like(lo)
        for ratio in grid:
            span = torch.clamp(hi * ratio - lo * ratio, min=1e-8)
            scale = torch.clamp((span / qmax).half().float(), min=6.2e-5)
            zero = torch.clamp(torch.round(-(lo * ratio) / scale), 0, qmax)
            q = torch.clamp(torch.round(x / scale[:, None]) + zero[:, None], 0, qmax)
            err = (((q - zero[:, None]) * scale[:, None] - x).square() * imp).sum(dim=-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
        q = torch.clamp(torch.round(x / best_scale[:, None]) + best_zero[:, None], 0, qmax)
        codes.append(q.to(torch.uint8))
        scales.append(best_scale.half()[:, None])
        zeros.append(best_zero.half()[:, None])
    return QuantizedWeight(
        torch.cat(codes, 1), torch.cat(scales, 1), torch.cat(zeros, 1), fmt.group_size, fmt.bits
    )


def group_errors(
    weight: torch.Tensor, q: QuantizedWeight, importance: torch.Tensor | None
) -> torch.Tensor:
    """(out, n_groups) float64: each group's squared error, weighted by ``importance``."""
    err = (dequantize(q).double() - weight.double()).square()
    if importance is not None:
        err = err * importance.double()
    return torch.stack([part.sum(-1) for part in err.split(q.group_size, dim=1)], dim=1)


def skewed_importance(in_features: int, seed: int, heavy: int = 8) -> torch.Tensor:
    """Mean squared activations of a few outlier channels 100x the others'."""
    gen = torch.Generator().manual_seed(seed)
    importance = torch.rand(in_features, generator=gen) * 0.5 + 0.5
    importance[torch.randperm(in_features, generator=gen)[:heavy]] *= 100.0
    return importance


def reference_quantize_min_max(weight: torch.Tensor, fmt: QuantFormat) -> QuantizedWeight:
    """Plain min-max rounding, scale stored in fp16 and the zero a whole number."""
    return weighted_reference(weight, fmt, torch.ones(weight.shape[1]), grid=(1.0,))


def test_min_max_is_the_first_candidate_of_the_clipping_grid(monkeypatch):
    # First, so that the strict-improvement rule keeps min-max on a tie.
    assert formats_module._CLIP_GRID == CLIP_GRID and CLIP_GRID[0] == 1.0
    assert float(formats_module._RATIOS[0]) == 1.0
    # A tie everywhere keeps min-max: the only important column of each group holds a zero,
    # which every candidate stores exactly, so every candidate's weighted error is 0.
    fmt = parse_format("int2-g32")
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(5))
    w[:, ::32] = 0.0
    one_hot = torch.zeros(128)
    one_hot[::32] = 1.0
    assert_same(fmt.quantize(w, one_hot), reference_quantize_min_max(w, fmt))
    assert not torch.equal(fmt.quantize(w).scales, fmt.quantize(w, one_hot).scales)
    w = odd_weight(6, 200, seed=5)
    importance = skewed_importance(200, seed=5)
    some = [parse_format(n) for n in ("int2-g32", "int3-g128", "int4-g64")]
    # A grid of 1.0 alone is the min-max quantizer the guarantee below is measured against.
    monkeypatch.setattr(formats_module, "_CLIP_GRID", (1.0,))
    monkeypatch.setattr(formats_module, "_RATIOS", torch.ones(1, 1, 1))
    for fmt in some:
        assert_same(fmt.quantize(w), reference_quantize_min_max(w, fmt))
        assert_same(fmt.quantize(w, importance), reference_quantize_min_max(w, fmt))


@pytest.mark.parametrize("fmt", [parse_format(n) for n in ("int2-g32", "int3-g128", "int4-g128")])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_search_is_never_worse_than_min_max_per_group(fmt, seed):
    w = odd_weight(48, 576, seed=seed)
    minmax = reference_quantize_min_max(w, fmt)
    importance = skewed_importance(576, seed)
    importance[:64] = 0.0  # a group of zeros at every group size
    importance[300:310] = 0.0
    for imp in (None, importance, torch.rand(576, generator=torch.Generator().manual_seed(seed))):
        searched = group_errors(w, fmt.quantize(w, imp), imp)
        bound = group_errors(w, minmax, imp)
        # float32 sums in the search, float64 here: equal up to rounding on a near tie.
        assert bool((searched <= bound * (1 + 1e-5) + 1e-30).all())


@pytest.mark.parametrize("name", ["int3-g128", "int4-g128", "int2-g64"])
def test_skewed_importance_lowers_the_weighted_error(name):
    fmt = parse_format(name)
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(4)) * 0.02
    importance = skewed_importance(512, seed=4)
    weighted = group_errors(w, fmt.quantize(w, importance), importance)
    plain = group_errors(w, fmt.quantize(w), importance)
    minmax = group_errors(w, reference_quantize_min_max(w, fmt), importance)
    assert float(weighted.sum()) < float(plain.sum())
    assert bool((weighted <= plain * (1 + 1e-5)).all())
    assert bool((weighted <= minmax * (1 + 1e-5)).all())
    # What it trades for it: the plain squared error, which the unweighted search minimises.
    assert float(group_errors(w, fmt.quantize(w, importance), None).sum()) >= float(
        group_errors(w, fmt.quantize(w), None).sum()
    )


@pytest.mark.parametrize("shape", [(6, 576), (5, 100), (4, 72), (1, 40)])
def test_the_weighted_search_reproduces_the_reference_for_every_format(shape):
    w = odd_weight(*shape, seed=shape[0] + shape[1])
    importance = skewed_importance(shape[1], seed=shape[1], heavy=3)
    importance[: shape[1] // 3] = 0.0
    shared = list(quantize_each(w, INT_FORMATS, importance))
    for fmt, q in zip(INT_FORMATS, shared, strict=True):
        expected = weighted_reference(w, fmt, importance)
        assert_same(q, expected)
        assert_same(fmt.quantize(w, importance=importance), expected)
        assert torch.equal(fmt.fake_quantize(w, importance), dequantize(expected))


def test_equal_importance_gives_exactly_the_plain_result():
    w = odd_weight(6, 200, seed=8)
    plain = list(quantize_each(w, INT_FORMATS))
    random = torch.rand(200, generator=torch.Generator().manual_seed(8)) + 0.1
    for importance in (
        torch.ones(200),
        torch.full((200,), 3.7),
        torch.full((200,), 1e-30),
        torch.full((200,), 3e38),
        torch.full((200,), 5, dtype=torch.int64),
        torch.full((200,), 0.25, dtype=torch.float64),
        torch.zeros(200),  # no weighted error anywhere: every group gets the unweighted choice
    ):
        for q, expected in zip(quantize_each(w, INT_FORMATS, importance), plain, strict=True):
            assert_same(q, expected)
    # Only relative importances count: a power of two changes no bit.
    scaled = list(quantize_each(w, INT_FORMATS, random * 2.0**40))
    for q, expected in zip(quantize_each(w, INT_FORMATS, random), scaled, strict=True):
        assert_same(q, expected)


def test_a_group_of_zero_importance_gets_the_unweighted_choice():
    fmt = parse_format("int3-g64")
    w = odd_weight(8, 256, seed=9)
    importance = skewed_importance(256, seed=9)
    importance[64:128] = 0.0
    weighted, plain = fmt.quantize(w, importance), fmt.quantize(w)
    assert torch.equal(weighted.scales[:, 1], plain.scales[:, 1])
    assert torch.equal(weighted.zeros[:, 1], plain.zeros[:, 1])
    assert torch.equal(weighted.codes[:, 64:128], plain.codes[:, 64:128])
    assert not torch.equal(weighted.scales, plain.scales)


def test_weighted_fake_quantize_matches_the_codes_in_every_dtype():
    w = odd_weight(5, 160, seed=10).to(torch.bfloat16)
    importance = skewed_importance(160, seed=10).to(torch.float16)
    palette = [parse_format(n) for n in ("int2-g32", "fp16", "int4-g128", "int3-g64")]
    for fmt, fq in zip(palette, fake_quantize_each(w, palette, importance), strict=True):
        assert fq.dtype == torch.bfloat16
        assert torch.equal(fq, fmt.fake_quantize(w, importance))
        if not fmt.is_float:
            assert torch.equal(fq, dequantize(fmt.quantize(w, importance)).to(torch.bfloat16))


@pytest.mark.parametrize(
    "bad",
    [
        torch.ones(63),
        torch.ones(1, 64),
        -torch.ones(64),
        torch.full((64,), float("nan")),
        torch.full((64,), float("inf")),
        [1.0] * 64,
    ],
    ids=["short", "2-D", "negative", "nan", "inf", "list"],
)
def test_bad_importance_is_refused_by_every_entry_point(bad):
    fmt = parse_format("int4-g32")
    w = torch.randn(4, 64)
    with pytest.raises(BitallocError, match="importance"):
        fmt.quantize(w, importance=bad)
    with pytest.raises(BitallocError, match="importance"):
        next(quantize_each(w, [fmt], bad))
    with pytest.raises(BitallocError, match="importance"):
        next(fake_quantize_each(w, [fmt], importance=bad))
