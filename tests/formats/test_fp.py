"""The fp family (MXFP4 / NVFP4 / MXFP6 / FP8 elements with block scales): names, exact costs,
the element grids and their rounding, the scale search against the specs' choices, importance,
encodings, column-by-column quantization, and the contract every format meets."""

from __future__ import annotations

import math

import pytest
import torch

from bitalloc.errors import BitallocError
from bitalloc.formats import format_families, get_family, parse_format, registered_family
from bitalloc.formats.fp import ELEMENT_TYPES, SUPPORTED, FPFamily, FPFormat

MEMBERS = FPFamily().members()
NAMES = [f.name for f in MEMBERS]


@pytest.fixture(scope="module", autouse=True)
def fp_family():
    """The family registered for this module (it is opt-in, and may already be registered)."""
    if "fp" in {f.name for f in format_families()}:
        yield get_family("fp")
        return
    with registered_family(FPFamily()) as family:
        yield family


def gaussian(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen) * 0.02


def mse(fmt: FPFormat, w: torch.Tensor) -> float:
    return (fmt.fake_quantize(w) - w).square().mean().item()


def block_errors(q: torch.Tensor, w: torch.Tensor, block: int, weights=None) -> torch.Tensor:
    err = (q - w).square() if weights is None else (q - w).square() * weights
    return err.reshape(w.shape[0], -1, block).sum(-1)


def nearest(scaled: torch.Tensor, element: str) -> torch.Tensor:
    """Reference rounding: the nearest signed grid value by brute force (no ties in the
    random data these tests use), saturating because the grid ends at the maximum."""
    mags = ELEMENT_TYPES[element].magnitudes
    grid = torch.cat([-mags.flip(0), mags])
    return grid[(scaled[..., None] - grid).abs().argmin(-1)]


# --- names ------------------------------------------------------------------------------------
def test_names_members_and_parsing():
    assert NAMES == [
        "fp4-e2m1-mx",
        "fp4-e2m1-nv",
        "fp4-e2m1-g32",
        "fp4-e2m1-g64",
        "fp4-e2m1-g128",
        "fp6-e3m2-mx",
        "fp6-e3m2-g32",
        "fp6-e3m2-g64",
        "fp6-e3m2-g128",
        "fp6-e2m3-mx",
        "fp6-e2m3-g32",
        "fp6-e2m3-g64",
        "fp6-e2m3-g128",
        "fp8-e4m3-mx",
        "fp8-e4m3-ch",
    ]
    family = FPFamily()
    assert family.default_members() == ()
    assert family.parse(family.example) == FPFormat("e2m1", "mx")
    for fmt in MEMBERS:
        assert parse_format(fmt.name) == fmt and fmt.family == "fp" and not fmt.is_float
    # Other families' names are not this family's.
    for other in ("fp16", "f16", "int4-g128", "ct:mxfp4", "ct:nvfp4", "gguf:q4_k", "fp4"):
        assert family.parse(other) is None
    assert parse_format("fp16").family == "float"


@pytest.mark.parametrize(
    "name",
    [
        "fp4-e3m2-mx",  # bits do not match the element
        "fp5-e2m1-mx",
        "fp4-e2m1-g48",  # group not offered
        "fp8-e4m3-nv",  # NV scaling is for FP4 only
        "fp6-e3m2-ch",
        "fp8-e5m2-mx",
        "fp4-e2m1",
        "fp4-e2m1-mx-x",
    ],
)
def test_bad_names_raise_and_list_the_supported_ones(name):
    with pytest.raises(BitallocError, match="fp4-e2m1-mx"):
        parse_format(name)


def test_bad_constructor_arguments_raise():
    with pytest.raises(BitallocError, match="choose one of"):
        FPFormat("e2m1", "ch")
    with pytest.raises(BitallocError, match="choose one of"):
        FPFormat("e9m9", "mx")


# --- costs ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("fp4-e2m1-mx", 4.25),
        ("fp4-e2m1-nv", 4.5 + 32 / 4096**2),
        ("fp4-e2m1-g32", 4.5),
        ("fp4-e2m1-g128", 4.125),
        ("fp6-e3m2-mx", 6.25),
        ("fp6-e2m3-mx", 6.25),
        ("fp6-e2m3-g64", 6.25),
        ("fp8-e4m3-mx", 8.25),
        ("fp8-e4m3-ch", 8 + 32 / 4096),
    ],
)
def test_exact_bits_per_weight(name, expected):
    fmt = parse_format(name)
    assert fmt.bits_per_weight((4096, 4096)) == expected
    assert math.isclose(fmt.nominal_bits, round(expected, 4), abs_tol=1e-4)


def test_storage_formulas():
    out, inp = 24, 320
    assert parse_format("fp4-e2m1-mx").storage_bits((out, inp)) == out * inp * 4 + out * 10 * 8
    assert parse_format("fp4-e2m1-nv").storage_bits((out, inp)) == (
        out * inp * 4 + out * 20 * 8 + 32
    )
    assert parse_format("fp6-e3m2-g64").storage_bits((out, inp)) == out * inp * 6 + out * 5 * 16
    # Any width for the per-channel format: one FP32 scale per row.
    assert parse_format("fp8-e4m3-ch").storage_bits((3, 41)) == 3 * 41 * 8 + 3 * 32


@pytest.mark.parametrize(
    ("name", "shape", "block"),
    [
        ("fp4-e2m1-mx", (8, 48), 32),
        ("fp6-e2m3-mx", (8, 16), 32),
        ("fp4-e2m1-nv", (8, 40), 16),
        ("fp4-e2m1-g128", (8, 192), 128),
    ],
)
def test_widths_that_are_not_whole_blocks_raise(name, shape, block):
    fmt = parse_format(name)
    assert not fmt.allows(shape)
    with pytest.raises(BitallocError, match=f"multiple of {block}"):
        fmt.storage_bits(shape)
    with pytest.raises(BitallocError, match=f"multiple of {block}"):
        fmt.fake_quantize(torch.randn(shape))
    assert parse_format("fp8-e4m3-ch").allows(shape)


# --- element grids ----------------------------------------------------------------------------
def test_element_grids_are_the_ocp_types():
    assert ELEMENT_TYPES["e2m1"].magnitudes.tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert (ELEMENT_TYPES["e3m2"].max, ELEMENT_TYPES["e3m2"].emax) == (28.0, 4)
    assert (ELEMENT_TYPES["e2m3"].max, ELEMENT_TYPES["e2m3"].emax) == (7.5, 2)
    assert ELEMENT_TYPES["e3m2"].magnitudes[1].item() == 2.0**-4  # smallest subnormal
    assert ELEMENT_TYPES["e2m3"].magnitudes[1].item() == 2.0**-3
    # E4M3: exactly torch's float8_e4m3fn, code for code (0x7F is NaN).
    fp8 = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    assert torch.equal(ELEMENT_TYPES["e4m3"].magnitudes, fp8)
    assert (ELEMENT_TYPES["e4m3"].max, ELEMENT_TYPES["e4m3"].emax) == (448.0, 8)
    for element in ELEMENT_TYPES.values():
        mags = element.magnitudes
        assert bool((mags[1:] > mags[:-1]).all())  # code order is value order
        grid = torch.cat([-mags.flip(0), mags])
        assert torch.equal(element.decode(element.encode(grid)), grid)


def test_rounding_is_nearest_ties_to_even_and_saturates():
    e2m1 = ELEMENT_TYPES["e2m1"]
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.9, 7.0, 100.0, -5.0, -0.2, 0.26])
    expected = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, -4.0, 0.0, 0.5]
    assert e2m1.values(x).tolist() == expected
    assert not bool(torch.signbit(e2m1.values(torch.tensor([-0.1]))).any())  # +0, not -0
    for name, element in ELEMENT_TYPES.items():
        x = torch.randn(20000, generator=torch.Generator().manual_seed(1)) * element.max / 3
        x = torch.cat([x, torch.tensor([element.max * 1.5, -element.max * 9])])
        assert torch.equal(element.values(x), nearest(x, name)), name
    # E4M3 rounds as torch's float8 conversion does (round to nearest even).
    x = torch.randn(50000, generator=torch.Generator().manual_seed(2)) * 50
    x = torch.cat([x, torch.randn(1000) * 1e-3]).clamp(-448, 448)
    e4m3 = ELEMENT_TYPES["e4m3"]
    assert torch.equal(e4m3.values(x), x.to(torch.float8_e4m3fn).float())
    codes = e4m3.encode(e4m3.values(x))
    assert torch.equal(codes.view(torch.float8_e4m3fn), x.to(torch.float8_e4m3fn))


# --- the grid round-trips exactly -------------------------------------------------------------
def on_grid(fmt: FPFormat, rows: int = 8, in_features: int = 256) -> torch.Tensor:
    """Every signed grid value, cyclically, each block (row for ``ch``) holding the largest
    magnitude, times a power-of-two scale per block (for ``nv`` an E4M3 block scale times a
    power-of-two global scale that one block at 448 fixes)."""
    element = ELEMENT_TYPES[fmt.element]
    grid = torch.cat([-element.magnitudes.flip(0)[:-1], element.magnitudes])
    values = grid.repeat(rows * in_features // len(grid) + 1)[: rows * in_features]
    block = fmt.block or in_features
    blocks = values.reshape(rows, in_features // block, block).clone()
    blocks[:, :, 0] = element.max
    seen = set(blocks.unique().tolist())
    assert seen == set(grid.tolist())
    gen = torch.Generator().manual_seed(5)
    if fmt.scaling == "nv":
        normal = ELEMENT_TYPES["e4m3"].magnitudes[8:]  # 2**-6 .. 448
        scales = normal[torch.randint(len(normal), blocks.shape[:2], generator=gen)]
        scales[0, 0] = 448.0
        scales = scales * 2.0**-7
    else:
        scales = 2.0 ** torch.randint(-8, 5, blocks.shape[:2], generator=gen).float()
    return (blocks * scales[..., None]).reshape(rows, in_features)


@pytest.mark.parametrize("fmt", MEMBERS, ids=str)
def test_every_representable_value_round_trips_exactly(fmt):
    w = on_grid(fmt)
    assert torch.equal(fmt.fake_quantize(w), w)
    assert torch.equal(fmt.decode(fmt.encode(w)), w)
    ones = torch.ones(w.shape[1])
    assert torch.equal(fmt.fake_quantize(w, importance=ones), w)


# --- error ------------------------------------------------------------------------------------
def test_error_falls_from_fp4_to_fp6_to_fp8():
    w = gaussian((32, 1024))
    errors = [mse(parse_format(n), w) for n in ("fp4-e2m1-mx", "fp6-e3m2-mx", "fp6-e2m3-mx")]
    errors.append(mse(parse_format("fp8-e4m3-mx"), w))
    assert errors == sorted(errors, reverse=True) and len(set(errors)) == 4
    assert mse(parse_format("fp8-e4m3-ch"), w) < errors[1]
    for group in (32, 64, 128):
        fp4, fp6 = parse_format(f"fp4-e2m1-g{group}"), parse_format(f"fp6-e2m3-g{group}")
        assert mse(fp6, w) < mse(fp4, w) / 8


def test_e2m3_beats_e3m2_and_nv_beats_mx_on_gaussian_weights():
    w = gaussian((32, 1024), seed=1)
    assert mse(parse_format("fp6-e2m3-mx"), w) < mse(parse_format("fp6-e3m2-mx"), w) / 2
    for group in (32, 128):
        e2m3, e3m2 = parse_format(f"fp6-e2m3-g{group}"), parse_format(f"fp6-e3m2-g{group}")
        assert mse(e2m3, w) < mse(e3m2, w)
    assert mse(parse_format("fp4-e2m1-nv"), w) < mse(parse_format("fp4-e2m1-mx"), w)
    # A smaller group of fp16 scales is finer too.
    g = [mse(parse_format(f"fp4-e2m1-g{size}"), w) for size in (32, 64, 128)]
    assert g == sorted(g)


def spec_mx(w: torch.Tensor, element: str) -> torch.Tensor:
    """The OCP MX spec's quantization: X = 2**(floor(log2(amax)) - emax_elem) per 32."""
    blocks = w.reshape(w.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    scale = 2.0 ** (torch.floor(torch.log2(amax)) - ELEMENT_TYPES[element].emax)
    return (nearest(blocks / scale, element) * scale).reshape(w.shape)


def spec_nv(w: torch.Tensor) -> torch.Tensor:
    """NVIDIA's NVFP4 recipe: global amax / (6 * 448), E4M3 block scale amax / 6 / global."""
    global_scale = w.abs().amax() / (6 * 448)
    blocks = w.reshape(w.shape[0], -1, 16)
    amax = blocks.abs().amax(-1, keepdim=True)
    block_scale = (amax / 6 / global_scale).clamp(max=448).to(torch.float8_e4m3fn).float()
    scale = block_scale * global_scale
    return (nearest(blocks / scale, "e2m1") * scale).reshape(w.shape)


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("fp4-e2m1-mx", lambda w: spec_mx(w, "e2m1")),
        ("fp6-e3m2-mx", lambda w: spec_mx(w, "e3m2")),
        ("fp6-e2m3-mx", lambda w: spec_mx(w, "e2m3")),
        ("fp8-e4m3-mx", lambda w: spec_mx(w, "e4m3")),
        ("fp4-e2m1-nv", spec_nv),
    ],
)
def test_the_scale_search_is_never_worse_than_the_specs_choice(name, reference):
    fmt = parse_format(name)
    w = gaussian((16, 512), seed=3)
    w[:, :7] *= 6  # outliers, where the spec's scale saturates
    q, spec = fmt.fake_quantize(w), reference(w)
    searched, plain = block_errors(q, w, fmt.block), block_errors(spec, w, fmt.block)
    assert bool((searched <= plain * (1 + 1e-6)).all())
    # Blocks that keep the spec's scale give exactly its result; the others are strictly better.
    same = (q == spec).reshape(searched.shape[0], -1, fmt.block).all(-1)
    assert bool((searched[~same] < plain[~same]).all())
    assert bool(same.any()) and bool((~same).any())
    assert searched.sum() < plain.sum()


def test_grouped_and_channel_scales_start_from_amax():
    w = gaussian((8, 256), seed=4)
    fmt = parse_format("fp8-e4m3-ch")
    scale = w.abs().amax(-1, keepdim=True) / 448
    plain = (nearest(w / scale, "e4m3") * scale - w).square().sum(-1)
    assert bool(((fmt.fake_quantize(w) - w).square().sum(-1) <= plain * (1 + 1e-6)).all())
    fmt = parse_format("fp4-e2m1-g64")
    blocks = w.reshape(8, -1, 64)
    scale = (blocks.abs().amax(-1, keepdim=True) / 6).half().float()
    plain = block_errors((nearest(blocks / scale, "e2m1") * scale).reshape(w.shape), w, 64)
    searched = block_errors(fmt.fake_quantize(w), w, 64)
    assert bool((searched <= plain * (1 + 1e-6)).all()) and searched.sum() < plain.sum()


@pytest.mark.parametrize("fmt", MEMBERS, ids=str)
def test_importance_lowers_the_weighted_error(fmt):
    w = gaussian((8, 256), seed=6)
    gen = torch.Generator().manual_seed(7)
    importance = torch.rand(256, generator=gen) ** 4 * 10
    block = fmt.block or 256
    weighted = block_errors(fmt.fake_quantize(w, importance), w, block, importance)
    plain = block_errors(fmt.fake_quantize(w), w, block, importance)
    assert bool((weighted <= plain * (1 + 1e-6)).all())
    if fmt.scaling == "mx" and fmt.element in ("e3m2", "e4m3"):
        # A power-of-two step of the scale only moves the values of an element with several
        # exponent bits between binades; the spec's scale is nearly always the best of the
        # three, weighted or not.
        assert weighted.sum() <= plain.sum()
    else:
        assert weighted.sum() < plain.sum()
    # Equal importances are the plain result; a Gram matrix is read by its diagonal.
    assert torch.equal(fmt.fake_quantize(w, torch.full((256,), 3.0)), fmt.fake_quantize(w))
    gram = torch.diag(importance) + 0.01
    assert torch.equal(
        fmt.fake_quantize(w, gram), fmt.fake_quantize(w, torch.diagonal(gram).clone())
    )


def test_zero_and_tiny_blocks_stay_finite():
    w = gaussian((4, 256), seed=8)
    w[0] = 0.0
    w[1, :32] = 1e-30
    for fmt in MEMBERS:
        q = fmt.fake_quantize(w)
        assert bool(torch.isfinite(q).all()), fmt.name
        assert bool((q[0] == 0).all()), fmt.name
        assert torch.equal(fmt.decode(fmt.encode(w)), q), fmt.name


# --- encoding ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", MEMBERS, ids=str)
def test_encoding_sections_hold_exactly_the_stored_bits(fmt):
    shape = (12, 384)
    w = gaussian(shape, seed=9)
    encoded = fmt.encode(w)
    sizes = {s.name: s.bits for s in encoded.sections}
    out, inp = shape
    scales = out * (inp // fmt.block if fmt.block else 1)
    expected = {"codes": out * inp * fmt.bits, "scales": scales * fmt.scale_bits}
    if fmt.scaling == "nv":
        expected["global_scale"] = 32
    assert sizes == expected
    assert encoded.bits == fmt.storage_bits(shape)
    assert torch.equal(fmt.decode(encoded), fmt.fake_quantize(w))
    with pytest.raises(BitallocError, match="cannot be decoded"):
        parse_format("fp4-e2m1-mx" if fmt.name != "fp4-e2m1-mx" else "fp8-e4m3-ch").decode(encoded)


def test_stored_scales_are_the_specs_encodings():
    w = gaussian((4, 64), seed=10)
    mx = parse_format("fp8-e4m3-mx")
    encoded = mx.encode(w)
    codes = torch.frombuffer(bytearray(encoded.section("codes").data), dtype=torch.uint8)
    scales = torch.frombuffer(bytearray(encoded.section("scales").data), dtype=torch.uint8)
    # E8M0: 2**(code - 127); E4M3 codes are float8_e4m3fn bytes.
    values = codes.view(torch.float8_e4m3fn).float().reshape(4, 2, 32)
    factor = 2.0 ** (scales.float() - 127).reshape(4, 2, 1)
    assert torch.equal((values * factor).reshape(4, 64), mx.fake_quantize(w))
    nv = parse_format("fp4-e2m1-nv")
    encoded = nv.encode(w)
    global_scale = torch.frombuffer(
        bytearray(encoded.section("global_scale").data), dtype=torch.float32
    )
    assert global_scale.item() == (w.abs().amax() / (6 * 448)).item()
    block = torch.frombuffer(bytearray(encoded.section("scales").data), dtype=torch.uint8)
    assert block.numel() == 4 * 4 and int(block.max()) <= 126


# --- column by column -------------------------------------------------------------------------
def columnwise(fmt: FPFormat, w: torch.Tensor, importance=None, fit_from=None):
    cq = fmt.column_quantizer(w, importance)
    fit_from = w if fit_from is None else fit_from
    for start in range(0, w.shape[1], cq.group_size):
        cq.fit(start, fit_from[:, start : start + cq.group_size])
    columns = [cq.round(j, fit_from[:, j]) for j in range(w.shape[1])]
    return torch.stack(columns, dim=1), cq.encode()


@pytest.mark.parametrize("fmt", MEMBERS, ids=str)
def test_the_column_quantizer_equals_fake_quantize(fmt):
    w = gaussian((4, 128), seed=12)
    importance = torch.rand(128, generator=torch.Generator().manual_seed(13)) ** 3
    for imp in (None, importance):
        rounded, encoded = columnwise(fmt, w, imp)
        assert torch.equal(rounded, fmt.fake_quantize(w, imp))
        assert encoded.bits == fmt.storage_bits(tuple(w.shape))
        assert torch.equal(fmt.decode(encoded), rounded)


def test_the_nv_global_scale_is_fixed_from_the_original_weight():
    fmt = parse_format("fp4-e2m1-nv")
    w = gaussian((8, 64), seed=14)
    _, encoded = columnwise(fmt, w, fit_from=w * 0.25)
    assert encoded.section("global_scale") == fmt.encode(w).section("global_scale")


def test_the_column_quantizer_refuses_misuse():
    fmt = parse_format("fp4-e2m1-mx")
    w = gaussian((4, 64))
    cq = fmt.column_quantizer(w)
    with pytest.raises(BitallocError, match="call fit first"):
        cq.round(0, w[:, 0])
    with pytest.raises(BitallocError, match="multiples of 32"):
        cq.fit(8, w[:, 8:40])
    with pytest.raises(BitallocError, match=r"shape \(4, 32\)"):
        cq.fit(0, w[:, :16])
    cq.fit(0, w[:, :32])
    cq.round(0, w[:, 0])
    with pytest.raises(BitallocError, match="63 columns are not rounded"):
        cq.encode()
    with pytest.raises(BitallocError, match="multiple of 32"):
        fmt.column_quantizer(torch.randn(4, 40))


# --- the family (every member's contract checks run in tests/formats/test_contract.py) -------
def test_family_wide_properties():
    assert all(fmt.ladder is None for fmt in MEMBERS)
    assert set(SUPPORTED) == set(ELEMENT_TYPES)
