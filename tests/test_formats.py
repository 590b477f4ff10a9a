import math

import pytest
import torch

from bitalloc.errors import BitallocError
from bitalloc.formats import (
    QuantFormat,
    default_palette,
    dequantize,
    parse_format,
    parse_palette,
)


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
