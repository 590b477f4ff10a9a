"""The ``int`` and ``float`` families: ``int{b}-g{g}`` and ``fp16``, and their exact cost.

- ``int{b}-g{g}``: asymmetric integer codes of ``b`` bits, grouped along the input dimension in
  groups of ``g`` weights; each group stores an fp16 scale and an fp16 zero point.
- ``fp16``: the weight is kept in 16 bits.

Storage cost counts every stored bit. For a weight of shape (out, in) and ``int{b}-g{g}``::

    bits = out * in * b + out * ceil(in / g) * (16 + 16)

so ``int3-g128`` costs 3.25 bits per weight when ``g`` divides ``in`` and a little more when it
does not (576 = 4 x 128 + 64 gives 5 groups per row: 3 + 160 / 576 = 3.278 bits per weight).

Scales and zeros are chosen per group to minimise squared error over a grid of clipping ranges
(min-max rounding alone is far worse at 2-3 bits). The grid starts at the full min-max range, so
the choice is never worse than min-max on the error it minimises. Given an ``importance`` per
input column (the mean squared activation entering the matrix, the diagonal of XᵀX / n that
llama.cpp's importance matrix holds), the error minimised is the importance-weighted one,
``sum_j importance[j] * (W[r, j] - Q(W)[r, j])**2`` over each group's columns: the output error
the calibration inputs see, up to their cross terms. The weighting is diagonal, so every group is
still chosen on its own.

Zero points are whole numbers in the code range, stored as fp16 (exactly representable), so the
codes and zeros can be handed to integer kernels the way GPTQ-style checkpoints store them.

Profilers need one weight under every format of the palette: :func:`quantize_each` and
:func:`fake_quantize_each` split the weight into groups and take each group's range once per
group size, for all bit widths of that size, and give exactly what :meth:`QuantFormat.quantize`
gives format by format.

``fp16`` is its own family, ``float``, though it is a :class:`QuantFormat` (``QuantFormat(16,
None)``, as callers build it): keeping a weight in 16 bits is not an integer quantizer, and a
palette of another family (llama.cpp types, GPTQ) includes it without including ``int``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from bitalloc.errors import BitallocError
from bitalloc.formats.base import ColumnQuantizer, Format, check_importance
from bitalloc.formats.encoding import (
    Encoded,
    pack_fp16,
    unpack_codes,
    unpack_fp16,
)
from bitalloc.formats.int_grid import (
    QuantizedWeight,
    _check_shape,
    _Groups,
    _search,
    _split,
    dequantize,
    encode_quantized,
)
from bitalloc.formats.registry import FormatFamily

SCALE_ZERO_BITS = 32  # fp16 scale + fp16 zero per group
SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
# Group sizes the constructor accepts beyond the default palette's (any positive multiple of 8
# is valid); listed so that the family's members, and the contract suite, cover some of them.
EXTRA_GROUP_SIZES = (16, 256)


_INT_NAME = re.compile(r"^int(\d+)-g(\d+)$")
_FLOAT_NAMES = ("fp16", "f16", "float16")


@dataclass(frozen=True)
class QuantFormat(Format):
    """One palette entry of the ``int`` or ``float`` family. ``bits`` is the code width (16 for
    ``fp16``); ``group_size`` is None for ``fp16``.

    Use :func:`parse_format` to build one from its name; the constructor validates the pair.
    :meth:`quantize` gives the codes and group parameters, :meth:`fake_quantize` (the
    :class:`~bitalloc.formats.base.Format` method) the dequantized weight.
    """

    bits: int
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.group_size is None:
            if self.bits != 16:
                raise BitallocError(
                    f"an ungrouped format must be fp16 (bits=16), got bits={self.bits}; "
                    f"integer formats need a group size from {SUPPORTED_GROUP_SIZES}"
                )
            return
        if self.bits not in SUPPORTED_BITS:
            raise BitallocError(
                f"unsupported code width {self.bits} bits; choose one of {SUPPORTED_BITS}"
            )
        if self.group_size <= 0 or self.group_size % 8:
            raise BitallocError(
                f"group size {self.group_size} is not a positive multiple of 8; "
                f"the palette uses {SUPPORTED_GROUP_SIZES}"
            )

    @property
    def name(self) -> str:
        """Stable name, e.g. ``int3-g128`` or ``fp16``."""
        return "fp16" if self.is_float else f"int{self.bits}-g{self.group_size}"

    @property
    def family(self) -> str:
        """``float`` for ``fp16``, ``int`` otherwise."""
        return "float" if self.is_float else "int"

    @property
    def is_float(self) -> bool:
        """True for the keep-in-16-bits format."""
        return self.group_size is None

    @property
    def ladder(self) -> tuple[str, float] | None:
        """``("int-g<group>", bits)``: more bits at one group size never quantize worse
        (None for ``fp16``)."""
        if self.is_float:
            return None
        return (f"int-g{self.group_size}", float(self.bits))

    @property
    def nominal_bits(self) -> float:
        """Bits per weight when the group size divides the input dimension."""
        if self.is_float:
            return 16.0
        return self.bits + SCALE_ZERO_BITS / self.group_size

    def check_shape(self, shape: Sequence[int]) -> tuple[int, int]:
        """``(out, in)``; any 2-D shape of positive sizes fits (a last group may be shorter)."""
        return _check_shape(shape)

    def storage_bits(self, shape: Sequence[int]) -> int:
        """Exact number of stored bits for a weight of ``shape`` = (out, in)."""
        out_features, in_features = _check_shape(shape)
        if self.is_float:
            return 16 * out_features * in_features
        n_groups = math.ceil(in_features / self.group_size)
        return out_features * (in_features * self.bits + n_groups * SCALE_ZERO_BITS)

    def bits_per_weight(self, shape: Sequence[int]) -> float:
        """Effective bits per weight for ``shape``, counting scales and zeros."""
        out_features, in_features = _check_shape(shape)
        return self.storage_bits(shape) / (out_features * in_features)

    def quantize(
        self, weight: torch.Tensor, importance: torch.Tensor | None = None
    ) -> QuantizedWeight:
        """Quantize a 2-D weight; scales/zeros minimise each group's squared error, weighted by
        ``importance`` when given (see :func:`quantize_each`)."""
        return next(quantize_each(weight, (self,), importance=importance))

    def fake_quantize(
        self, weight: torch.Tensor, importance: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return Q(W) in ``weight``'s dtype: what the model computes with under this format.

        ``importance`` (one non-negative value per input column, or None) weights the clipping
        search's squared error column by column; :func:`quantize_each` says how. It equals
        ``dequantize(self.quantize(weight, importance))``, so a packed weight built from the
        same importance computes with exactly this weight.
        """
        return next(fake_quantize_each(weight, (self,), importance=importance))

    def encode(self, weight: torch.Tensor) -> Encoded:
        """Codes packed at ``bits`` bits with fp16 scales and zeros; ``fp16``: the fp16 weight."""
        shape = _check_shape(tuple(weight.shape))
        if self.is_float:
            return Encoded(self.name, shape, (pack_fp16("weight", weight),))
        return encode_quantized(self, self.quantize(weight))

    def column_quantizer(
        self, weight: torch.Tensor, importance: torch.Tensor | None = None
    ) -> ColumnQuantizer | None:
        """The format's grid one column at a time (for ``+gptq``); None for ``fp16``."""
        from bitalloc.formats.int_columns import IntColumnQuantizer

        if self.is_float:
            return None
        return IntColumnQuantizer((self,), weight.shape, importance)

    def decode(self, encoded: Encoded) -> torch.Tensor:
        """The float32 weight that :meth:`encode` stored."""
        if encoded.format_name != self.name:
            raise BitallocError(
                f"an encoding of {encoded.format_name} cannot be decoded as {self.name}"
            )
        out_features, in_features = _check_shape(encoded.shape)
        if self.is_float:
            values = unpack_fp16(encoded.section("weight"))
            return values.to(torch.float32).reshape(out_features, in_features)
        n_groups = math.ceil(in_features / self.group_size)
        codes = unpack_codes(encoded.section("codes"), out_features * in_features, self.bits)
        q = QuantizedWeight(
            codes.to(torch.uint8).reshape(out_features, in_features),
            unpack_fp16(encoded.section("scales")).reshape(out_features, n_groups),
            unpack_fp16(encoded.section("zeros")).reshape(out_features, n_groups),
            self.group_size,
            self.bits,
        )
        return dequantize(q)

    def __str__(self) -> str:
        return self.name


class IntFamily(FormatFamily):
    """``int<bits>-g<group>``: grouped asymmetric integer codes with fp16 scales and zeros."""

    name = "int"
    description = (
        f"'int<bits>-g<group>' with bits {SUPPORTED_BITS} and groups {SUPPORTED_GROUP_SIZES}"
    )
    example = "int3-g128"

    def parse(self, text: str) -> QuantFormat | None:
        """``int4-g128`` to ``QuantFormat(4, 128)``; unsupported bits or groups raise."""
        match = _INT_NAME.match(text)
        if not match:
            return None
        return QuantFormat(int(match.group(1)), int(match.group(2)))

    def members(self) -> tuple[QuantFormat, ...]:
        """Every code width at the default group sizes and at :data:`EXTRA_GROUP_SIZES`."""
        sizes = SUPPORTED_GROUP_SIZES + EXTRA_GROUP_SIZES
        return tuple(QuantFormat(b, g) for b in SUPPORTED_BITS for g in sizes)

    def default_members(self) -> tuple[QuantFormat, ...]:
        """Every code width at every default group size."""
        return tuple(QuantFormat(b, g) for b in SUPPORTED_BITS for g in SUPPORTED_GROUP_SIZES)


class FloatFamily(FormatFamily):
    """``fp16``: the weight kept in 16 bits (``f16`` and ``float16`` are accepted aliases)."""

    name = "float"
    description = "the weight kept in 16 bits"
    example = "fp16"

    def parse(self, text: str) -> QuantFormat | None:
        """``fp16`` (or an alias) to ``QuantFormat(16, None)``."""
        return QuantFormat(16, None) if text in _FLOAT_NAMES else None

    def members(self) -> tuple[QuantFormat, ...]:
        """Just ``fp16``."""
        return (QuantFormat(16, None),)


def quantize_each(
    weight: torch.Tensor,
    formats: Sequence[Format],
    importance: torch.Tensor | None = None,
) -> Iterator[QuantizedWeight]:
    """Quantize a 2-D weight with each integer format of ``formats`` in turn (lazily, in order).

    Equal, code for code, to ``fmt.quantize(weight, importance)`` for each format; the float32
    copy, the split into groups and each group's range are computed once per group size and
    shared by every bit width of that size (kept while the iterator lives: at most one float32
    copy of the weight per group size).

    ``importance`` is None (each group minimises its plain squared error) or a 1-D tensor of
    ``in`` finite, non-negative values, one per input column, of any real dtype and device (it
    is used in float32 on the weight's device): each group then minimises
    ``sum_j importance[j] * (W[r, j] - Q(W)[r, j])**2`` over its columns. Only each group's
    relative importances matter: giving every column the same value gives exactly the result
    without importance, and so does scaling by a power of two that keeps the values normal
    float32 numbers. A group whose importance is all zero has no weighted error to minimise and
    gets the unweighted choice.
    """
    formats = tuple(formats)
    others = [f.name for f in formats if not isinstance(f, QuantFormat)]
    if others:
        raise BitallocError(
            f"quantize_each computes integer codes; {others} are not int formats "
            "(use each format's fake_quantize)"
        )
    floats = [f.name for f in formats if f.is_float]
    if floats:
        raise BitallocError("fp16 keeps the weight as is; there are no codes to compute")
    _, in_features = _check_shape(tuple(weight.shape))
    importance = check_importance(importance, in_features)
    w = weight.detach().to(torch.float32)
    if importance is not None:
        importance = importance.to(w.device)
    grouped: dict[int, list[_Groups]] = {}
    for fmt in formats:
        size = int(fmt.group_size or 0)
        if size not in grouped:
            grouped[size] = _split(w, size, importance)
        parts = [_search(g, fmt.bits) for g in grouped[size]]
        codes = torch.cat([c.reshape(w.shape[0], -1) for c, _, _ in parts], dim=1)
        scales = torch.cat([s for _, s, _ in parts], dim=1)
        zeros = torch.cat([z for _, _, z in parts], dim=1)
        yield QuantizedWeight(codes, scales, zeros, size, fmt.bits)


def fake_quantize_each(
    weight: torch.Tensor,
    formats: Sequence[Format],
    importance: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Q(W) in ``weight``'s dtype for each format of ``formats`` (``fp16`` and formats of other
    families included), lazily and in order: each equal, bit for bit, to
    ``fmt.fake_quantize(weight, importance)``, with the work that does not depend on the bit
    width of int formats shared as in :func:`quantize_each`, and formats whose class has a
    ``fake_quantize_many(weight, formats, importance)`` (GPTQ) computed together, on first
    need."""
    formats = tuple(formats)
    _, in_features = _check_shape(tuple(weight.shape))
    vector = check_importance(importance, in_features)
    quantized = quantize_each(weight, [f for f in formats if _is_int(f)], vector)
    together: dict[type, list[Format]] = {}
    for fmt in formats:
        if not isinstance(fmt, QuantFormat) and hasattr(type(fmt), "fake_quantize_many"):
            together.setdefault(type(fmt), []).append(fmt)
    done: dict[int, torch.Tensor] = {}
    for index, fmt in enumerate(formats):
        if _is_int(fmt):
            yield dequantize(next(quantized)).to(weight.dtype)
        elif isinstance(fmt, QuantFormat):
            yield weight.detach().to(torch.float16).to(weight.dtype)
        elif type(fmt) in together:
            if index not in done:
                members = together.pop(type(fmt))
                results = type(fmt).fake_quantize_many(weight, members, importance)
                positions = [i for i, f in enumerate(formats) if type(f) is type(fmt)]
                done.update(zip(positions, results))
            yield done.pop(index)
        elif index in done:
            yield done.pop(index)
        else:
            yield fmt.fake_quantize(weight, importance)


def _is_int(fmt: Format) -> bool:
    return isinstance(fmt, QuantFormat) and not fmt.is_float
