"""The weight-format contract, run over every member of every registered family, and the
registry that families are added through.

Every check is a plain function of one format (or one family), so that the toy family of
``tests/formats/toy.py`` runs through exactly the same checks as the built-in ones.
"""

from __future__ import annotations

import pytest
import torch

from bitalloc.errors import BitallocError
from bitalloc.formats import (
    QuantFormat,
    default_palette,
    fake_quantize_each,
    format_families,
    get_family,
    parse_format,
    parse_palette,
    register_family,
    registered_family,
    unregister_family,
)
from bitalloc.formats.base import Format
from bitalloc.formats.registry import FormatFamily
from tests.formats.toy import UniformFamily, UniformFormat

BUILT_IN = [fmt for family in format_families() for fmt in family.members()]
BUILT_IN_FAMILIES = ["int", "float", "gguf", "ct", "fp", "codebook", "gptq", "rht", "trellis"]
# (out, in): every group size divides 256; 200 leaves a last partial group for every size;
# 40 is shorter than most groups; (1, 8) is a single short row.
SHAPES = [(4, 256), (6, 200), (3, 40), (1, 8)]
BAD_SHAPES = [(3, 4, 5), (8,), (0, 64), (64, 0), (-2, 64), (2.5, 64), (True, 64)]


def weight(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Gaussian weights with uneven column scales, the same for the same arguments."""
    gen = torch.Generator().manual_seed(seed)
    columns = torch.rand(1, shape[1], generator=gen) * 3 + 0.1
    return torch.randn(*shape, generator=gen) * 0.02 * columns


def fitting(fmt: Format, shapes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [s for s in shapes if fmt.allows(s)]


# --- the checks -------------------------------------------------------------------------------
def check_protocol(fmt: Format) -> None:
    assert isinstance(fmt, Format)
    assert isinstance(fmt.name, str) and fmt.name == fmt.name.strip() and str(fmt) == fmt.name
    assert fmt.family in {f.name for f in format_families()}
    assert isinstance(fmt.nominal_bits, float) and 0 < fmt.nominal_bits <= 32
    assert isinstance(fmt.is_float, bool)
    assert hash(fmt) == hash(parse_format(fmt.name))


def check_round_trip(fmt: Format) -> None:
    assert parse_format(fmt.name) == fmt
    assert parse_format(fmt.name).name == fmt.name
    assert parse_format(f"  {fmt.name.upper()} ") == fmt
    assert parse_format(fmt) is fmt
    assert get_family(fmt.family).parse(fmt.name) == fmt


def check_storage_matches_encoding(fmt: Format) -> None:
    shapes = fitting(fmt, SHAPES)
    assert shapes, f"{fmt.name} allows none of {SHAPES}"
    for seed, shape in enumerate(shapes):
        w = weight(shape, seed)
        encoded = fmt.encode(w)
        if encoded is None:
            continue
        assert encoded.shape == shape and encoded.format_name == fmt.name
        assert encoded.bits == fmt.storage_bits(shape)
        assert all(len(s.data) * 8 - s.bits in range(8) for s in encoded.sections)
        assert fmt.bits_per_weight(shape) == fmt.storage_bits(shape) / (shape[0] * shape[1])
        # The encoding is the weight the format computes with, not just a count.
        assert torch.equal(fmt.decode(encoded), fmt.fake_quantize(w))


def check_int_layout(fmt: Format) -> None:
    """The int and float families' encodings: codes at ``bits`` bits, fp16 scales and zeros
    per group (a last partial group included); fp16 stores 16 bits per weight."""
    if not isinstance(fmt, QuantFormat):
        return
    for shape in SHAPES:
        encoded = fmt.encode(weight(shape))
        sizes = {s.name: s.bits for s in encoded.sections}
        out_features, in_features = shape
        if fmt.is_float:
            assert sizes == {"weight": 16 * out_features * in_features}
            continue
        groups = out_features * -(-in_features // fmt.group_size)
        assert sizes == {
            "codes": out_features * in_features * fmt.bits,
            "scales": 16 * groups,
            "zeros": 16 * groups,
        }


def check_shape_rules(fmt: Format) -> None:
    for shape in BAD_SHAPES:
        assert not fmt.allows(shape), shape
        with pytest.raises(BitallocError):
            fmt.check_shape(shape)
        with pytest.raises(BitallocError):
            fmt.storage_bits(shape)
    with pytest.raises(BitallocError):
        fmt.fake_quantize(torch.randn(2, 3, 8))
    for shape in fitting(fmt, SHAPES):
        assert fmt.check_shape(shape) == shape
        assert fmt.storage_bits(shape) > 0


def check_fake_quantize(fmt: Format) -> None:
    shape = fitting(fmt, SHAPES)[0]
    w = weight(shape, seed=7)
    first = fmt.fake_quantize(w)
    assert torch.equal(first, fmt.fake_quantize(w.clone()))
    assert first.shape == w.shape and first.dtype == w.dtype
    assert torch.equal(fmt.fake_quantize(w, importance=None), first)
    ones = torch.ones(shape[1])
    assert fmt.fake_quantize(w, importance=ones).shape == w.shape
    # An input Gram matrix is accepted as importance; a format that weighs columns
    # independently reads its diagonal, exactly.
    x = torch.randn(4 * shape[1], shape[1], generator=torch.Generator().manual_seed(5))
    gram = x.T @ x / len(x)
    with_gram = fmt.fake_quantize(w, importance=gram)
    assert with_gram.shape == w.shape and torch.isfinite(with_gram).all()
    if not fmt.uses_gram:
        assert torch.equal(with_gram, fmt.fake_quantize(w, torch.diagonal(gram).clone()))
    for dtype in (torch.float16, torch.bfloat16):
        assert fmt.fake_quantize(w.to(dtype)).dtype == dtype
    for bad in (torch.ones(shape[1] + 1), -ones, ones * float("nan"), [1.0] * shape[1]):
        with pytest.raises(BitallocError, match="importance"):
            fmt.fake_quantize(w, importance=bad)
    if fmt.is_float:
        exact = w.half().float()
        assert torch.equal(fmt.fake_quantize(exact), exact)


def check_shared_equals_each(formats: list[Format]) -> None:
    w = weight((5, 96), seed=3)
    formats = [f for f in formats if f.allows(tuple(w.shape))]
    for fmt, out in zip(formats, fake_quantize_each(w, formats), strict=True):
        assert torch.equal(out, fmt.fake_quantize(w)), fmt.name


def check_monotone_error(members: tuple[Format, ...]) -> None:
    """A higher rung of one ladder (more bits at one int group size, a richer K-quant), or a
    smaller group at one int width, never raises the error."""
    w = weight((6, 256), seed=11)
    mse = {f: (f.fake_quantize(w) - w).square().mean().item() for f in members}
    quantized = [f for f in members if not f.is_float]
    by_ladder: dict[str, list[Format]] = {}
    by_bits: dict[object, list[Format]] = {}
    for fmt in quantized:
        if fmt.ladder is not None:
            by_ladder.setdefault(fmt.ladder[0], []).append(fmt)
        if getattr(fmt, "group_size", None) is not None:
            by_bits.setdefault(fmt.bits, []).append(fmt)
    chains = [sorted(same, key=lambda f: f.ladder[1]) for same in by_ladder.values()]
    chains += [sorted(same, key=lambda f: -f.group_size) for same in by_bits.values()]
    for chain in chains:
        errors = [mse[f] for f in chain]
        assert all(b <= a for a, b in zip(errors, errors[1:])), list(zip(chain, errors))
    # Keeping the weight in floating point is at least as good as any quantized member.
    best = min((mse[f] for f in quantized), default=float("inf"))
    assert all(mse[f] <= best for f in members if f.is_float)


FORMAT_CHECKS = [
    check_protocol,
    check_round_trip,
    check_storage_matches_encoding,
    check_int_layout,
    check_shape_rules,
    check_fake_quantize,
]


# --- the built-in families --------------------------------------------------------------------
def test_the_built_in_families_and_their_members():
    assert [f.name for f in format_families()] == BUILT_IN_FAMILIES
    # int: 6 widths x 5 group sizes; float: fp16; gguf: 18 llama.cpp types; ct: 15 schemes;
    # fp: 15 element/scaling pairs; gptq: 4 widths x 2 group sizes + one in activation order;
    # codebook: NF 6, Lloyd-Max 12, VQ 6; rht: 3 widths x 2 group sizes + one with another seed.
    assert len(BUILT_IN) == 6 * 5 + 1 + 18 + 15 + 15 + 24 + 9 + 7 + 6
    assert {f.name for f in default_palette()} < {f.name for f in BUILT_IN}


@pytest.mark.parametrize("check", FORMAT_CHECKS, ids=lambda c: c.__name__[6:])
@pytest.mark.parametrize("fmt", BUILT_IN, ids=str)
def test_every_member_meets_the_contract(fmt, check):
    check(fmt)


@pytest.mark.parametrize("family", format_families(), ids=lambda f: f.name)
def test_error_is_monotone_within_each_family(family):
    check_monotone_error(family.members())


def test_shared_fake_quantize_equals_each_over_every_member():
    check_shared_equals_each(BUILT_IN)


# --- a family added through the registry alone ------------------------------------------------
def test_a_toy_family_meets_the_same_contract_and_mixes_into_palettes():
    before = default_palette()
    with registered_family(UniformFamily()) as family:
        members = family.members()
        for fmt in members:
            for check in FORMAT_CHECKS:
                check(fmt)
        check_monotone_error(members)
        check_shared_equals_each([*members, parse_format("int3-g32"), parse_format("fp16")])
        palette = parse_palette("fp16, uniform2,int3-g128 , uniform8")
        assert [f.name for f in palette] == ["uniform2", "int3-g128", "uniform8", "fp16"]
        assert parse_palette([UniformFormat(3), "int4-g64"])[0] == UniformFormat(3)
        assert default_palette() == tuple(
            sorted([*before, UniformFormat(4)], key=lambda f: (f.nominal_bits, f.name))
        )
        # Its own shape rule, said the project's way.
        assert not UniformFormat(4).allows((8, 30))
        with pytest.raises(BitallocError, match="divisible by 4"):
            UniformFormat(4).check_shape((8, 30))
        with pytest.raises(BitallocError, match="uniform.*uniform4"):
            parse_format("nonsense")
        with pytest.raises(BitallocError, match=r"bits from \(2, 3, 4, 8\)"):
            parse_format("uniform5")
    assert "uniform" not in {f.name for f in format_families()}
    assert default_palette() == before
    with pytest.raises(BitallocError, match="unknown format 'uniform4'"):
        parse_format("uniform4")


def test_unknown_names_list_every_family_with_an_example():
    with pytest.raises(BitallocError) as caught:
        parse_format("q4_k")
    message = str(caught.value)
    assert message.startswith("unknown format 'q4_k'")
    assert "\n" not in message
    for family in format_families():
        assert f"{family.name} (" in message and repr(family.example) in message


class _Claiming(FormatFamily):
    """A family whose parser takes names it is given, to provoke registration errors."""

    description = "test only"

    def __init__(self, name: str, example: str, claims: tuple[str, ...] = ()):
        self._name, self._example, self._claims = name, example, claims

    @property
    def name(self) -> str:
        return self._name

    @property
    def example(self) -> str:
        return self._example

    def parse(self, text: str) -> Format | None:
        if text in self._claims:
            return UniformFormat(4)
        return UniformFamily().parse(text)

    def members(self) -> tuple[Format, ...]:
        return ()


def test_registration_refuses_duplicates_collisions_and_broken_families():
    with (
        registered_family(UniformFamily()),
        pytest.raises(BitallocError, match="'uniform' is already registered"),
    ):
        register_family(UniformFamily())
    with pytest.raises(BitallocError, match="already registered"):
        register_family(get_family("int"))
    # Claims an int name: 'int3-g128' would have two meanings.
    with pytest.raises(BitallocError, match="claims names of family 'int'.*int3-g128"):
        register_family(_Claiming("uniform", "uniform4", claims=("int3-g128",)))
    # Non-default members are checked too.
    with pytest.raises(BitallocError, match="claims names of family 'int'.*int2-g256"):
        register_family(_Claiming("uniform", "uniform4", claims=("int2-g256",)))
    # Its example parses to a format of another family name.
    with pytest.raises(BitallocError, match="does not parse its own name"):
        register_family(_Claiming("other", "uniform4"))
    with pytest.raises(BitallocError, match="does not parse its own name 'nope'"):
        register_family(_Claiming("uniform", "nope"))
    with pytest.raises(BitallocError, match="takes a FormatFamily"):
        register_family("uniform")  # type: ignore[arg-type]
    assert [f.name for f in format_families()] == BUILT_IN_FAMILIES


def test_a_name_two_families_parse_is_refused_at_parse_time():
    # int5-g40 is a valid int name outside the int family's listed members, so registration
    # cannot see the overlap; parsing it must not pick one family silently.
    with registered_family(_Claiming("uniform", "uniform4", claims=("int5-g40",))):
        with pytest.raises(BitallocError, match=r"several families \['int', 'uniform'\]"):
            parse_format("int5-g40")
        assert parse_format("int5-g32") == QuantFormat(5, 32)


def test_unregistering_and_the_context_manager_leave_nothing_behind():
    with pytest.raises(BitallocError, match="no format family 'uniform' is registered"):
        unregister_family("uniform")
    with pytest.raises(RuntimeError), registered_family(UniformFamily()):
        assert parse_format("uniform2") == UniformFormat(2)
        raise RuntimeError("the block fails")
    assert [f.name for f in format_families()] == BUILT_IN_FAMILIES
    family = register_family(UniformFamily())
    try:
        assert parse_format("uniform8").family == "uniform"
    finally:
        assert unregister_family("uniform") is family
    with pytest.raises(BitallocError, match="unknown format"):
        parse_format("uniform8")
