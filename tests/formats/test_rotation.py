"""The ``rht`` family: ``<format>+rht[-s<seed>]`` names, the format contract on its members,
exact costs, seeds, the error it removes, and importance rotated with the weight."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from bitalloc.errors import BitallocError
from bitalloc.formats import QuantFormat, get_family, parse_format
from bitalloc.formats.base import Format
from bitalloc.formats.hadamard import Rotation
from bitalloc.formats.integer import dequantize
from bitalloc.formats.rotation import RHTFamily, RotatedFormat
from tests.formats.test_contract import (
    weight,
)

MEMBERS = RHTFamily().members()


@pytest.fixture(scope="module", autouse=True)
def rht_family():
    """The built-in family (registered when bitalloc.formats is imported)."""
    return get_family("rht")


def test_error_falls_along_each_ladder_and_shared_equals_each():
    assert RotatedFormat(QuantFormat(3, 128)).ladder == ("int-g128+rht", 3.0)
    assert RotatedFormat(QuantFormat(3, 128), 7).ladder == ("int-g128+rht-s7", 3.0)


@pytest.mark.parametrize(
    ("text", "base", "seed", "name"),
    [
        ("int3-g128+rht", QuantFormat(3, 128), 0, "int3-g128+rht"),
        ("int3-g128+rht-s7", QuantFormat(3, 128), 7, "int3-g128+rht-s7"),
        ("  INT4-G32+RHT-S12 ", QuantFormat(4, 32), 12, "int4-g32+rht-s12"),
        ("int2-g64+rht-s0", QuantFormat(2, 64), 0, "int2-g64+rht"),
        ("int5-g40+rht-s007", QuantFormat(5, 40), 7, "int5-g40+rht-s7"),
    ],
)
def test_names_parse_back(text, base, seed, name):
    fmt = parse_format(text)
    assert fmt == RotatedFormat(base, seed) and fmt.name == name and fmt.family == "rht"
    assert parse_format(fmt.name) == fmt and str(fmt) == name
    assert RHTFamily().parse(name) == fmt


def test_options_inside_the_rotation_are_parsed_by_the_registry():
    fmt = parse_format("int3-g128+gptq+rht-s3")
    assert fmt.base == parse_format("int3-g128+gptq") and fmt.seed == 3
    assert fmt.name == "int3-g128+gptq+rht-s3" and fmt.stored_int_format == QuantFormat(3, 128)
    for other in ("int3-g128", "int3-g128+gptq", "fp16", "gguf:q4_k"):
        assert RHTFamily().parse(other) is None


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("fp16+rht", "floating point: a rotation gains nothing"),
        ("int3-g128+rht+rht", "rotated already"),
        ("+rht", "names no format"),
        ("int3-g128+rhtx", "unknown rotation option '\\+rhtx'"),
        ("int3-g128+rht-s", "unknown rotation option"),
        ("int3-g128+rht-s-1", "unknown rotation option"),
        ("int3-g128+rht-s99999999999999999999", "seed must be a whole number"),
        ("nonsense+rht", "before '\\+rht'.*unknown format 'nonsense'"),
        ("int7-g128+rht", "unsupported code width 7"),
    ],
)
def test_bad_names_raise_saying_what_to_change(text, match):
    with pytest.raises(BitallocError, match=match):
        parse_format(text)


def test_constructor_refuses_float_rotated_and_non_format_bases():
    with pytest.raises(BitallocError, match="floating point"):
        RotatedFormat(QuantFormat(16, None))
    with pytest.raises(BitallocError, match="rotated already"):
        RotatedFormat(RotatedFormat(QuantFormat(3, 128)))
    with pytest.raises(BitallocError, match="wraps a weight format"):
        RotatedFormat("int3-g128")  # type: ignore[arg-type]
    with pytest.raises(BitallocError, match="seed"):
        RotatedFormat(QuantFormat(3, 128), -1)


def test_costs_are_the_bases_exactly():
    for fmt in MEMBERS:
        for shape in [(4, 256), (6, 200), (11, 576), (3, 1536)]:
            assert fmt.storage_bits(shape) == fmt.base.storage_bits(shape)
            assert fmt.bits_per_weight(shape) == fmt.base.bits_per_weight(shape)
        assert fmt.nominal_bits == fmt.base.nominal_bits and not fmt.is_float
    assert parse_format("int3-g128+rht").bits_per_weight((8, 4096)) == 3.25
    assert parse_format("int3-g128+rht").column_quantizer(weight((4, 256))) is None


@pytest.mark.parametrize("width", [100, 27, 12, 4])
def test_widths_the_rotation_cannot_block_raise_naming_the_width(width):
    fmt = parse_format("int3-g32+rht")
    assert not fmt.allows((8, width))
    for call in (
        lambda: fmt.check_shape((8, width)),
        lambda: fmt.storage_bits((8, width)),
        lambda: fmt.fake_quantize(torch.randn(8, width)),
        lambda: fmt.encode(torch.randn(8, width)),
    ):
        with pytest.raises(BitallocError, match=rf"int3-g32\+rht: .*input width of {width}"):
            call()


def test_seeds_differ_and_the_same_seed_is_bit_identical():
    w = weight((16, 256), seed=5)
    a, b = parse_format("int3-g128+rht-s1"), parse_format("int3-g128+rht-s2")
    assert torch.equal(a.fake_quantize(w), a.fake_quantize(w.clone()))
    assert torch.equal(a.fake_quantize(w), parse_format("int3-g128+rht-s1").fake_quantize(w))
    assert not torch.equal(a.fake_quantize(w), b.fake_quantize(w))
    assert a.encode(w).sections == a.encode(w.clone()).sections
    assert a.encode(w).sections != b.encode(w).sections


def _outlier_weight(shape=(64, 512), columns=(3, 200, 401), seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=gen) * 0.02
    w[:, list(columns)] *= 40  # a few input channels far larger than the rest
    return w


def test_rotation_lowers_the_error_on_outlier_columns():
    w = _outlier_weight()
    # At 2 bits the outliers' energy, spread over every column, is most of the error either
    # way; from 3 bits the spread ranges win by far (3.5x and 7.6x here).
    for bits, factor in ((2, 1.0), (3, 0.5), (4, 0.5)):
        plain = QuantFormat(bits, 128)
        rotated = RotatedFormat(plain)
        plain_mse = float((plain.fake_quantize(w) - w).square().mean())
        rotated_mse = float((rotated.fake_quantize(w) - w).square().mean())
        assert rotated_mse < factor * plain_mse, (bits, rotated_mse, plain_mse)


def test_the_fake_quantized_weight_is_the_bases_on_the_rotated_weight_rotated_back():
    w = weight((6, 200), seed=2).to(torch.bfloat16)
    fmt = parse_format("int4-g32+rht-s4")
    rotation = Rotation(200, 4)
    inner = QuantFormat(4, 32).fake_quantize(rotation.apply(w.float()))
    out = fmt.fake_quantize(w)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, rotation.invert(inner).to(torch.bfloat16))
    # quantize gives the codes of W R, which dequantize to the same weight.
    q = fmt.quantize_rotated(w.float())
    assert torch.equal(rotation.invert(dequantize(q)), fmt.fake_quantize(w.float()))
    assert (q.bits, q.group_size) == (4, 32)


@dataclass(eq=False)
class _Recorder(Format):
    """A base that records the importance it is given and returns the weight unchanged."""

    seen: list

    name = "recorder"
    family = "int"
    nominal_bits = 4.0
    is_float = False

    def check_shape(self, shape):
        return QuantFormat(4, 32).check_shape(shape)

    def storage_bits(self, shape):
        return QuantFormat(4, 32).storage_bits(shape)

    def fake_quantize(self, weight, importance=None):
        self.seen.append(importance)
        return weight


def test_importance_is_rotated_consistently_with_the_weight():
    width = 64
    rotation = Rotation(width, 5)
    r = rotation.matrix()
    recorder = _Recorder([])
    fmt = RotatedFormat(recorder, 5)
    gen = torch.Generator().manual_seed(8)
    w = torch.randn(4, width, generator=gen)
    v = torch.rand(width, generator=gen) * 2
    x = torch.randn(300, width, generator=gen)
    gram = x.T @ x / 300
    fmt.fake_quantize(w, None)
    fmt.fake_quantize(w, v)
    fmt.fake_quantize(w, gram)
    none, vector, matrix = recorder.seen
    assert none is None
    # diag(v) rotates to Rᵀ diag(v) R; a per-channel weight keeps its diagonal.
    explicit = r.T @ torch.diag(v.double()) @ r
    assert vector.shape == (width,)
    assert torch.allclose(vector.double(), torch.diagonal(explicit), atol=1e-6)
    # A Gram matrix is passed on whole, as Rᵀ G R (what error feedback needs).
    assert matrix.shape == (width, width)
    assert torch.allclose(matrix.double(), r.T @ gram.double() @ r, atol=1e-5)
    # The weight the base saw was W R, and the result was rotated back.
    assert torch.allclose(fmt.fake_quantize(w), w, atol=1e-5)


def test_gram_importance_reaches_an_error_feedback_base_and_helps_it():
    gen = torch.Generator().manual_seed(3)
    w = _outlier_weight((32, 256), (10, 130), seed=3)
    mix = torch.randn(256, 256, generator=gen) / 16
    x = torch.randn(1024, 256, generator=gen) @ mix  # correlated inputs
    gram = x.T @ x / 1024

    def output_error(fmt):
        delta = fmt.fake_quantize(w, gram) - w
        return float(torch.einsum("oi,ij,oj->", delta, gram, delta))

    plain = parse_format("int3-g128+rht")
    feedback = parse_format("int3-g128+gptq+rht")
    assert output_error(feedback) < output_error(plain)
    q = feedback.quantize_rotated(w, gram)
    assert torch.equal(Rotation(256).invert(dequantize(q)), feedback.fake_quantize(w, gram))


def test_consumers_of_int_codes_do_not_mistake_rotated_codes_for_the_weight():
    # The codes of W R dequantize to Q(W R): a cache of codes that dequantizes them must not
    # serve a rotated format (it has no duck-typed int_format/quantize, so it falls back).
    from bitalloc.apply import QuantizedWeightCache

    fmt = parse_format("int3-g32+rht-s1")
    w = weight((8, 96), seed=4)
    cache = QuantizedWeightCache()
    for _ in range(2):
        assert torch.equal(cache.fake_quantize("unit", w, fmt), fmt.fake_quantize(w))
