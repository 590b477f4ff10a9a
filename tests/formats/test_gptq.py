"""GPTQ (``+gptq``): lower output error than rounding in the same stored layout, exactly the
base format without cross terms, side-by-side passes equal to single ones, and clear errors."""

from __future__ import annotations

import warnings

import pytest
import torch

from bitalloc.errors import BitallocError
from bitalloc.formats import QuantFormat, dequantize, fake_quantize_each, parse_format
from bitalloc.formats.gptq import GPTQFormat, inverse_factor


def correlated(n: int, tokens: int = 2048, seed: int = 0) -> torch.Tensor:
    """A Gram matrix XᵀX / tokens of inputs with strongly correlated columns."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(n) + 0.4 * torch.randn(n, n, generator=gen) / n**0.5
    x = torch.randn(tokens, n, generator=gen) @ mix * (torch.rand(n, generator=gen) * 2 + 0.2)
    return x.T @ x / tokens


def weight(out: int, n: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out, n, generator=gen) * 0.02


def output_error(w: torch.Tensor, q: torch.Tensor, gram: torch.Tensor) -> float:
    d = (w - q).double()
    return float(torch.einsum("oi,ij,oj->", d, gram.double(), d))


@pytest.mark.parametrize("name", ["int2-g32", "int3-g64", "int4-g128", "int3-g128"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_the_output_error_of_rounding(name, act_order):
    w, gram = weight(48, 256), correlated(256)
    base = parse_format(name)
    fmt = GPTQFormat(base, act_order)
    rounded = base.fake_quantize(w, torch.diagonal(gram))
    gptq = fmt.fake_quantize(w, gram)
    assert output_error(w, gptq, gram) < 0.9 * output_error(w, rounded, gram)


def test_more_bits_give_less_output_error():
    w, gram = weight(32, 256), correlated(256)
    errors = [
        output_error(w, parse_format(f"int{b}-g64+gptq").fake_quantize(w, gram), gram)
        for b in (2, 3, 4, 5, 6, 8)
    ]
    assert errors == sorted(errors, reverse=True)


@pytest.mark.parametrize("name", ["int3-g32", "int2-g128"])
def test_without_cross_terms_it_is_exactly_the_base_format(name):
    w, gram = weight(16, 200), correlated(200)
    base, fmt = parse_format(name), parse_format(f"{name}+gptq")
    vector = torch.diagonal(gram).clone()
    assert torch.equal(fmt.fake_quantize(w), base.fake_quantize(w))
    assert torch.equal(fmt.fake_quantize(w, vector), base.fake_quantize(w, vector))
    assert torch.equal(fmt.fake_quantize(w, torch.diag(vector)), base.fake_quantize(w, vector))


def test_stored_layout_and_bits_are_the_base_formats():
    w, gram = weight(24, 256), correlated(256)
    base = parse_format("int3-g64")
    fmt = parse_format("int3-g64+gptq")
    assert fmt.storage_bits((24, 256)) == base.storage_bits((24, 256))
    assert fmt.nominal_bits == base.nominal_bits and fmt.int_format == base
    q = fmt.quantize(w, gram)
    assert q.bits == 3 and q.group_size == 64 and int(q.codes.max()) <= 7
    assert torch.equal(dequantize(q), fmt.fake_quantize(w, gram))
    encoded = fmt.encode(w, gram)
    assert encoded.bits == base.storage_bits((24, 256))
    assert torch.equal(fmt.decode(encoded), fmt.fake_quantize(w, gram))
    # The same sections decode as the base format's: a plain int3-g64 weight.
    assert torch.equal(
        base.decode(type(encoded)(base.name, encoded.shape, encoded.sections)),
        fmt.fake_quantize(w, gram),
    )


def test_passes_side_by_side_equal_single_passes_bit_for_bit():
    w, gram = weight(40, 192), correlated(192)
    # Every width and group size in one stack (192 = 128 + a 64-column tail group), and both
    # visiting orders.
    names = [f"int{b}-g64+gptq" for b in (2, 3, 4, 8)] + [
        "int3-g32+gptq",
        "int2-g128+gptq",
        "int3-g64+gptq-act",
        "int4-g128+gptq-act",
        "int3-g32+gptq-act",
        "int4-g32",
        "fp16",
    ]
    formats = [parse_format(n) for n in names]
    together = list(fake_quantize_each(w, formats, gram))
    for fmt, got in zip(formats, together):
        assert torch.equal(got, fmt.fake_quantize(w, gram)), fmt.name


def test_deterministic_and_dtype_preserving():
    w, gram = weight(16, 128).to(torch.bfloat16), correlated(128)
    fmt = parse_format("int3-g32+gptq-act")
    first = fmt.fake_quantize(w, gram)
    assert first.dtype == torch.bfloat16 and first.shape == w.shape
    assert torch.equal(first, fmt.fake_quantize(w, gram))


def test_a_rank_deficient_gram_is_dampened_and_a_broken_one_refused():
    w = weight(8, 64)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(16, 64, generator=gen)  # fewer tokens than columns: singular
    singular = x.T @ x / 16
    fmt = parse_format("int3-g32+gptq")
    got = fmt.fake_quantize(w, singular)
    assert torch.isfinite(got).all()
    assert output_error(w, got, singular) <= output_error(
        w, parse_format("int3-g32").fake_quantize(w, torch.diagonal(singular)), singular
    )
    # Strongly indefinite: dampening is raised (and said), then refused when still not enough.
    indefinite = torch.eye(64) - 3.0 * torch.ones(64, 64) / 64
    indefinite.diagonal().clamp_(min=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, lam, raises = inverse_factor(indefinite)
    assert raises >= 1 and lam > 0.01 and any("dampening" in str(c.message) for c in caught)
    hopeless = -torch.ones(64, 64) * 1e6
    hopeless.diagonal().fill_(1.0)
    with pytest.raises(BitallocError, match="cannot factor"):
        fmt.fake_quantize(w, hopeless)
    nan = singular.clone()
    nan[3, 5] = float("nan")
    with pytest.raises(BitallocError, match="non-finite"):
        fmt.fake_quantize(w, nan)
    with pytest.raises(BitallocError, match="shape"):
        fmt.fake_quantize(w, torch.eye(32))


def test_dead_inputs_are_quantized_without_feedback():
    w, gram = weight(8, 64), correlated(64)
    gram[:, 5] = 0
    gram[5, :] = 0
    got = parse_format("int4-g32+gptq").fake_quantize(w, gram)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("fp16+gptq", "needs a grid"),
        ("gguf:q4_k+gptq", "column by column"),
        ("int3-g128+gptq+gptq", "once"),
        ("int7-g128+gptq", "unsupported code width"),
        ("int3-g128+gptx", "unknown format"),
    ],
)
def test_bad_names_say_what_to_change(name, match):
    with pytest.raises(BitallocError, match=match):
        parse_format(name)


def test_names_round_trip_and_family():
    for name in ("int3-g128+gptq", "int2-g32+gptq-act"):
        fmt = parse_format(name)
        assert fmt.name == name and fmt.family == "gptq" and fmt.uses_gram
        assert parse_format(fmt.name) == fmt
    assert not QuantFormat(3, 128).uses_gram
