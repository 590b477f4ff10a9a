"""The codebook family's vector formats (``vq2d-3b-g64``): exact costs with the codebook, codes
wider than 8 bits, quality against scalar Lloyd-Max, determinism, importance, and the shape
rules."""

import pytest
import torch

from bitalloc.errors import BitallocError
from bitalloc.formats import Encoded, get_family, parse_format
from bitalloc.formats import vq as vq_module
from bitalloc.formats.codebook import LloydMaxFormat
from bitalloc.formats.vq import VectorFormat, lloyd_fit, pack_wide_codes, unpack_wide_codes


@pytest.fixture(scope="module", autouse=True)
def family():
    """The built-in family (registered when bitalloc.formats is imported)."""
    return get_family("codebook")


def gaussian(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.02


def mse(fmt, w: torch.Tensor, importance: torch.Tensor | None = None) -> float:
    return (fmt.fake_quantize(w, importance) - w).square().mean().item()


def test_names_sizes_and_members():
    fmt = parse_format("vq4d-2b-g64")
    assert fmt == VectorFormat(4, 2, 64) and fmt.name == "vq4d-2b-g64"
    assert (fmt.entries, fmt.code_bits, fmt.nominal_bits) == (256, 8, 2.25)
    assert (VectorFormat(2, 3, 128).entries, VectorFormat(4, 3, 64).code_bits) == (64, 12)
    assert parse_format("VQ2D-3B-G128") == VectorFormat(2, 3, 128)
    assert fmt.ladder is None and fmt.column_quantizer(gaussian((8, 256))) is None


@pytest.mark.parametrize(
    ("name", "shape", "bits"),
    [
        ("vq2d-3b-g64", (8, 256), 8 * 256 * 3 + 8 * 4 * 16 + 64 * 2 * 16),
        ("vq2d-2b-g128", (6, 384), 6 * 384 * 2 + 6 * 3 * 16 + 16 * 2 * 16),
        ("vq4d-2b-g64", (4, 576), 4 * 576 * 2 + 4 * 9 * 16 + 256 * 4 * 16),
        ("vq4d-3b-g128", (16, 1024), 16 * 1024 * 3 + 16 * 8 * 16 + 4096 * 4 * 16),
    ],
)
def test_storage_bits_are_exact_codebook_included(name, shape, bits, monkeypatch):
    # The layout does not depend on how well the codebook is fitted: two k-means iterations.
    monkeypatch.setattr(vq_module, "KMEANS_ITERATIONS", 2)
    fmt = parse_format(name)
    assert fmt.storage_bits(shape) == bits
    assert fmt.bits_per_weight(shape) == bits / (shape[0] * shape[1])
    w = gaussian(shape, seed=1)
    encoded = fmt.encode(w)
    assert encoded.bits == bits and encoded.shape == shape
    sizes = {s.name: s.bits for s in encoded.sections}
    vectors = shape[0] * shape[1] // fmt.dim
    if fmt.code_bits > 8:  # 12-bit codes: their low 8 bits and their high 4
        assert (sizes["codes_lo"], sizes["codes_hi"]) == (vectors * 8, vectors * 4)
    else:
        assert sizes["codes"] == vectors * fmt.code_bits
    assert sizes["codebook"] == fmt.entries * fmt.dim * 16
    assert torch.equal(fmt.decode(encoded), fmt.fake_quantize(w))


def test_the_default_model_s_shapes_cost_a_fraction_of_a_bit_for_the_codebook():
    fmt = parse_format("vq4d-2b-g64")
    for shape in ((1536, 576), (576, 1536)):
        assert fmt.bits_per_weight(shape) == 2.25 + 256 * 4 * 16 / (1536 * 576)
    # 576 is not a multiple of 128: a g128 vector format cannot store it.
    assert not parse_format("vq2d-3b-g128").allows((1536, 576))
    assert parse_format("vq2d-3b-g128").allows((576, 1536))


@pytest.mark.parametrize("bits", [4, 6, 8, 12, 16])
def test_wide_codes_pack_exactly(bits):
    codes = torch.randint(0, 2**bits, (13,), generator=torch.Generator().manual_seed(bits))
    sections = pack_wide_codes("codes", codes, bits)
    assert sum(s.bits for s in sections) == 13 * bits
    encoded = Encoded("x", (1, 13), sections)
    assert torch.equal(unpack_wide_codes(encoded, "codes", 13, bits), codes)


def test_wide_codes_refuse_what_they_cannot_hold():
    with pytest.raises(BitallocError, match="outside"):
        pack_wide_codes("codes", torch.tensor([4096]), 12)
    with pytest.raises(BitallocError, match="up to 16 bits"):
        pack_wide_codes("codes", torch.tensor([1]), 17)


def test_shapes_the_format_cannot_hold_say_what_to_change():
    with pytest.raises(BitallocError, match="multiple of its group 64, got 200"):
        parse_format("vq2d-2b-g64").check_shape((8, 200))
    # 2 x 64 weights are 32 4-vectors: too few for 256 entries.
    with pytest.raises(BitallocError, match="256 entries to 32 vectors.*more entries"):
        parse_format("vq4d-2b-g64").fake_quantize(gaussian((2, 64)))
    assert parse_format("vq4d-2b-g64").allows((16, 64))
    w = gaussian((8, 128))
    w[0, 0] = float("inf")
    with pytest.raises(BitallocError, match="NaN or inf"):
        parse_format("vq2d-2b-g64").fake_quantize(w)
    encoded = parse_format("vq2d-2b-g64").encode(gaussian((8, 128)))
    with pytest.raises(BitallocError, match="cannot be decoded as vq2d-3b-g64"):
        parse_format("vq2d-3b-g64").decode(encoded)


def test_vector_codebooks_are_not_worse_than_scalar_lloyd_max_at_the_same_rate():
    w = gaussian((96, 512), seed=2)
    lm2, lm3 = (mse(LloydMaxFormat(b, 64, per_row=False), w) for b in (2, 3))
    vq22, vq23, vq42 = (mse(VectorFormat(d, r, 64), w) for d, r in ((2, 2), (2, 3), (4, 2)))
    assert vq22 <= lm2 and vq23 <= lm3
    # Four dimensions gain more than two at the same rate; more bits, less error.
    assert vq42 < vq22 and vq23 < vq22
    # Against the rate-distortion scale at 3 bits (scalar Lloyd-Max: 2.2).
    assert vq23 / (2.0**-6 * w.var().item()) < 2.2


def test_fitting_is_deterministic_with_and_without_subsampling(monkeypatch):
    w = gaussian((32, 256), seed=3)
    fmt = VectorFormat(2, 3, 64)
    full = fmt.fake_quantize(w)
    assert torch.equal(full, VectorFormat(2, 3, 64).fake_quantize(w.clone()))
    # Fewer vectors than the weight has: a seeded sample fits, every vector is assigned.
    monkeypatch.setattr(vq_module, "FIT_VECTORS", 1024)
    monkeypatch.setattr(vq_module, "FIT_VECTORS_MIN", 1024)
    sampled = fmt.fake_quantize(w)
    assert torch.equal(sampled, fmt.fake_quantize(w))
    assert not torch.equal(sampled, full)
    assert mse(fmt, w) < 1.2 * (full - w).square().mean().item()


def test_importance_lowers_the_weighted_error():
    w = gaussian((16, 256), seed=4)
    importance = torch.rand(256, generator=torch.Generator().manual_seed(5)) ** 4 * 10
    for fmt in (VectorFormat(2, 3, 64), VectorFormat(4, 2, 128)):
        plain = ((fmt.fake_quantize(w) - w).square() * importance).sum()
        weighted = ((fmt.fake_quantize(w, importance) - w).square() * importance).sum()
        assert weighted < plain
        gram = torch.full((256, 256), 0.5)
        gram.diagonal().copy_(importance)
        assert torch.equal(fmt.fake_quantize(w, gram), fmt.fake_quantize(w, importance))
        assert torch.equal(fmt.fake_quantize(w, torch.zeros(256)), fmt.fake_quantize(w))


def test_lloyd_fit_finds_the_gaussian_lloyd_max_levels():
    # Max (1960), Table I: the 4-level Gaussian quantizer has levels +-0.4528 and +-1.510.
    x = torch.randn(1, 200_000, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    levels = lloyd_fit(x, torch.ones_like(x), 4)[0]
    expected = torch.tensor([-1.510, -0.4528, 0.4528, 1.510], dtype=torch.float64)
    assert torch.allclose(levels, expected, atol=0.02)
    # Rows are fitted independently; weights count like repeated values.
    rows = torch.tensor([[0.0, 1.0, 2.0, 10.0], [5.0, 5.0, 6.0, 7.0]], dtype=torch.float64)
    fitted = lloyd_fit(rows, torch.tensor([[1.0, 1.0, 1.0, 3.0], [1.0] * 4]), 2)
    assert torch.allclose(fitted, torch.tensor([[1.0, 10.0], [5.0, 6.5]], dtype=torch.float64))
