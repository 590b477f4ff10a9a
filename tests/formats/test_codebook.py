"""The codebook family's scalar formats: NormalFloat (``nf4-g64``) and Lloyd-Max
(``lm3-t-g128``, ``lm3-r-g128``): names, exact costs with codebooks, quality against uniform
int, importance, the column quantizer, and the contract on every member of the family."""

import math

import pytest
import torch

from bitalloc.errors import BitallocError
from bitalloc.formats import QuantFormat, get_family, parse_format
from bitalloc.formats.codebook import (
    CodebookFamily,
    LloydMaxFormat,
    NormalFloatFormat,
    normal_float_levels,
)
from bitalloc.formats.vq import VectorFormat

# QLoRA's published NF4 table (bitsandbytes' NF4 code, Dettmers et al. 2023, appendix E).
QLORA_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]


@pytest.fixture(scope="module", autouse=True)
def family():
    """The built-in family (registered when bitalloc.formats is imported)."""
    return get_family("codebook")


def gaussian(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.02


def mse(fmt, w: torch.Tensor, importance: torch.Tensor | None = None) -> float:
    return (fmt.fake_quantize(w, importance) - w).square().mean().item()


def weighted_error(q: torch.Tensor, w: torch.Tensor, importance: torch.Tensor) -> float:
    return ((q - w).square() * importance).sum().item()


# --- names ------------------------------------------------------------------------------------
def test_members_names_and_parsing(family):
    names = [f.name for f in family.members()]
    assert names[:6] == ["nf3-g32", "nf3-g64", "nf3-g128", "nf4-g32", "nf4-g64", "nf4-g128"]
    assert {"lm2-t-g64", "lm4-t-g128", "lm3-r-g64", "lm4-r-g128"} <= set(names)
    assert {"vq2d-2b-g64", "vq2d-3b-g128", "vq4d-2b-g64"} <= set(names)
    assert len(names) == len(set(names)) == 6 + 12 + 6
    assert family.default_members() == ()
    assert parse_format(" LM3-R-G128 ") == LloydMaxFormat(3, 128, per_row=True)
    assert parse_format("lm3-t-g32") == LloydMaxFormat(3, 32, per_row=False)
    assert parse_format("nf3-g32") == NormalFloatFormat(3, 32)
    # Not the family's patterns: left to other families.
    for other in ("int3-g128", "nf4", "lm3-g64", "vq2-2b-g64", "fp16"):
        assert family.parse(other) is None


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("nf5-g64", r"code width 5.*\(3, 4\)"),
        ("nf4-g100", r"group size 100.*\(32, 64, 128\)"),
        ("lm5-t-g64", r"code width 5.*\(2, 3, 4\)"),
        ("lm3-x-g64", "use -t .* or -r"),
        ("lm3-r-g48", "group size 48"),
        ("vq3d-2b-g64", r"dimension 3.*\(2, 4\)"),
        ("vq2d-4b-g64", r"rate .* 4.*\(2, 3\)"),
        ("vq2d-2b-g100", "group size 100"),
    ],
)
def test_bad_names_say_what_to_change(family, name, match):
    with pytest.raises(BitallocError, match=match):
        family.parse(name)


# --- exact costs ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "shape", "bits"),
    [
        ("nf4-g64", (10, 576), 10 * (576 * 4 + 9 * 16)),
        ("nf3-g128", (10, 576), 10 * (576 * 3 + 5 * 16)),  # 4.5 groups: the last is shorter
        ("nf3-g32", (1, 8), 8 * 3 + 16),
        ("lm3-t-g128", (10, 576), 10 * (576 * 3 + 5 * 16) + 8 * 16),
        ("lm4-r-g64", (10, 200), 10 * (200 * 4 + 4 * 16) + 10 * 16 * 16),
        ("lm2-r-g32", (3, 40), 3 * (40 * 2 + 2 * 16) + 3 * 4 * 16),
        ("lm2-t-g128", (96, 576), 96 * (576 * 2 + 5 * 16) + 4 * 16),
    ],
)
def test_storage_bits_are_exact_codebooks_included(name, shape, bits):
    fmt = parse_format(name)
    assert fmt.storage_bits(shape) == bits
    assert fmt.bits_per_weight(shape) == bits / (shape[0] * shape[1])
    w = gaussian(shape)
    encoded = fmt.encode(w)
    sizes = {s.name: s.bits for s in encoded.sections}
    out_features, in_features = shape
    groups = out_features * math.ceil(in_features / fmt.group)
    assert sizes["codes"] == out_features * in_features * fmt.bits
    assert sizes["scales"] == 16 * groups
    assert sum(sizes.values()) == bits
    assert torch.equal(fmt.decode(encoded), fmt.fake_quantize(w))


def test_nominal_bits_and_the_fractional_cost_of_a_codebook():
    assert parse_format("nf4-g64").nominal_bits == 4.25
    assert parse_format("lm3-t-g128").nominal_bits == 3.125
    # 1536 x 576 with g64: 9 whole groups; the codebook adds 8 x 16 bits to the whole tensor.
    assert parse_format("lm3-t-g64").bits_per_weight((1536, 576)) == 3.25 + 128 / (1536 * 576)
    assert parse_format("lm3-r-g64").bits_per_weight((1536, 576)) == 3.25 + 128 / 576


# --- the levels -------------------------------------------------------------------------------
def test_nf4_levels_are_qlora_s_table():
    levels = normal_float_levels(4)
    assert torch.allclose(levels, torch.tensor(QLORA_NF4, dtype=torch.float64), rtol=0, atol=1e-6)


def test_nf3_levels_are_the_same_construction_with_8_levels():
    levels = normal_float_levels(3)
    assert levels.shape == (8,) and levels[0] == -1 and levels[-1] == 1
    assert (levels == 0).sum() == 1 and (levels > 0).sum() == 4 and (levels < 0).sum() == 3
    assert bool((levels.diff() > 0).all())
    # The positive levels are N(0, 1) quantiles at evenly spaced probabilities, normalised.
    normal = torch.distributions.Normal(0.0, 1.0)
    top = normal.icdf(torch.tensor(0.9330357, dtype=torch.float64))
    probs = normal.cdf(levels[4:] * top)
    assert torch.allclose(probs.diff(), probs.diff()[:1].expand(3), atol=1e-9)


# --- quality ----------------------------------------------------------------------------------
def test_error_falls_as_levels_rise():
    w = gaussian((32, 512), seed=1)
    for group in (32, 64, 128):
        assert mse(NormalFloatFormat(3, group), w) > mse(NormalFloatFormat(4, group), w)
    for per_row in (False, True):
        errors = [mse(LloydMaxFormat(b, 64, per_row), w) for b in (2, 3, 4)]
        assert errors[0] > errors[1] > errors[2], errors


@pytest.mark.parametrize("group", [64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lloyd_max_beats_uniform_int_on_gaussian_weights(bits, group):
    w = gaussian((256, 512), seed=2)
    lloyd = mse(LloydMaxFormat(bits, group, per_row=False), w)
    assert lloyd < mse(QuantFormat(bits, group), w)
    # NormalFloat, a codebook for exactly this distribution, does too at 4 bits.
    if bits == 4:
        assert mse(NormalFloatFormat(4, group), w) < mse(QuantFormat(4, group), w)


def test_lloyd_max_3_bit_error_against_the_rate_distortion_scale():
    # Lloyd-Max's 3-bit Gaussian quantizer reaches 0.0345 sigma**2, 2.2 x 2**(-6) sigma**2.
    w = gaussian((512, 512), seed=3)
    ratio = mse(LloydMaxFormat(3, 128, per_row=False), w) / (2.0**-6 * w.var().item())
    assert ratio < 2.5, ratio


def test_per_row_codebooks_fit_rows_of_different_shapes_better():
    gen = torch.Generator().manual_seed(4)
    gaussian_rows = torch.randn(16, 256, generator=gen)
    heavy_rows = torch.distributions.StudentT(2.5).sample((16, 256))
    uniform_rows = torch.rand(16, 256, generator=gen) * 2 - 1
    w = torch.cat([gaussian_rows, heavy_rows, uniform_rows]) * 0.02
    for bits in (2, 3, 4):
        per_row = mse(LloydMaxFormat(bits, 128, per_row=True), w)
        assert per_row < mse(LloydMaxFormat(bits, 128, per_row=False), w)


def test_the_scale_search_never_does_worse_than_absmax():
    # Heavy tails: shrinking the absmax pays. The search keeps absmax unless strictly better.
    w = torch.distributions.StudentT(3.0).sample((32, 256)) * 0.02
    for fmt in (NormalFloatFormat(3, 64), NormalFloatFormat(4, 128)):
        codes, scales, books = fmt.quantize(w)
        absmax = w.abs().reshape(32, -1, fmt.group).amax(-1).half().float()
        assert bool((scales <= absmax).all()) and bool((scales < absmax).any())
        x = w / absmax.repeat_interleave(fmt.group, 1)
        plain = books[0][(x[..., None] - books[0]).abs().argmin(-1)]
        plain = plain * absmax.repeat_interleave(fmt.group, 1)
        assert mse(fmt, w) < (plain - w).square().mean().item()


# --- importance -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["nf3-g64", "nf4-g128", "lm2-t-g64", "lm3-r-g128"])
def test_importance_lowers_the_weighted_error(name):
    fmt = parse_format(name)
    w = gaussian((48, 256), seed=5)
    importance = torch.rand(256, generator=torch.Generator().manual_seed(6)) ** 4 * 10
    plain = weighted_error(fmt.fake_quantize(w), w, importance)
    assert weighted_error(fmt.fake_quantize(w, importance), w, importance) < plain
    # A Gram matrix is read through its diagonal; equal weights change nothing.
    gram = torch.full((256, 256), 0.01)
    gram.diagonal().copy_(importance)
    assert torch.equal(fmt.fake_quantize(w, gram), fmt.fake_quantize(w, importance))
    assert torch.equal(fmt.fake_quantize(w, torch.ones(256)), fmt.fake_quantize(w))
    assert torch.equal(fmt.fake_quantize(w, torch.zeros(256)), fmt.fake_quantize(w))


# --- the column quantizer ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["nf3-g64", "nf4-g32", "lm3-t-g64", "lm4-r-g128", "lm2-r-g32"])
@pytest.mark.parametrize("weighted", [False, True])
def test_column_quantizer_equals_fake_quantize(name, weighted):
    fmt = parse_format(name)
    w = gaussian((12, 200), seed=7)  # 200 leaves a last, shorter group for every size
    importance = torch.rand(200) + 0.1 if weighted else None
    quantizer = fmt.column_quantizer(w, importance)
    assert quantizer.group_size == fmt.group
    for start in range(0, 200, fmt.group):
        quantizer.fit(start, w[:, start : start + fmt.group])
    columns = [quantizer.round(j, w[:, j]) for j in range(200)]
    expected = fmt.fake_quantize(w, importance)
    assert torch.equal(torch.stack(columns, dim=1), expected)
    encoded = quantizer.encode()
    assert encoded.bits == fmt.storage_bits((12, 200))
    assert torch.equal(fmt.decode(encoded), expected)


def test_column_quantizer_refuses_misuse():
    fmt = parse_format("lm3-t-g64")
    w = gaussian((4, 128))
    quantizer = fmt.column_quantizer(w)
    with pytest.raises(BitallocError, match="fit the group of column 70"):
        quantizer.round(70, w[:, 70])
    with pytest.raises(BitallocError, match="does not start a group"):
        quantizer.fit(3, w[:, 3:67])
    quantizer.fit(0, w[:, :64])
    quantizer.round(0, w[:, 0])
    with pytest.raises(BitallocError, match="round every column"):
        quantizer.encode()


# --- bad input --------------------------------------------------------------------------------
def test_a_codebook_with_more_levels_than_weights_is_refused():
    with pytest.raises(BitallocError, match="16 levels to a row of 8 weights.*more levels"):
        parse_format("lm4-r-g32").check_shape((4, 8))
    assert not parse_format("lm4-r-g32").allows((100, 8))
    assert parse_format("lm3-r-g32").allows((1, 8))
    with pytest.raises(BitallocError, match="16 levels to 8 weights"):
        parse_format("lm4-t-g32").fake_quantize(torch.randn(1, 8))
    assert parse_format("lm4-t-g32").allows((2, 8))
    with pytest.raises(BitallocError, match="more levels"):
        parse_format("lm4-r-g32").storage_bits((4, 8))


def test_non_finite_weights_and_foreign_encodings_are_refused():
    w = gaussian((4, 64))
    w[1, 3] = float("nan")
    for name in ("nf4-g32", "lm3-t-g64"):
        with pytest.raises(BitallocError, match="NaN or inf"):
            parse_format(name).fake_quantize(w)
    encoded = parse_format("nf4-g32").encode(gaussian((4, 64)))
    with pytest.raises(BitallocError, match="encoding of nf4-g32 cannot be decoded as nf3-g32"):
        parse_format("nf3-g32").decode(encoded)


def test_results_are_deterministic_and_keep_device_and_dtype():
    w = gaussian((32, 192), seed=8)
    for name in ("nf4-g64", "lm3-t-g64", "lm2-r-g128"):
        first = parse_format(name).fake_quantize(w)
        assert torch.equal(first, parse_format(name).fake_quantize(w.clone()))
        half = parse_format(name).fake_quantize(w.half())
        assert half.dtype == torch.float16 and half.device == w.device


# --- the contract, member by member -----------------------------------------------------------

MEMBERS = CodebookFamily().members()


def test_error_is_monotone_and_shared_quantizing_matches(family):
    members = family.members()
    assert all(fmt.ladder is None for fmt in members)
    assert all(
        fmt.column_quantizer(gaussian((4, 256))) is None
        for fmt in members
        if isinstance(fmt, VectorFormat)
    )
