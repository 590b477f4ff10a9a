"""Bit packing: integer codes of 2, 3, 4, 5, 6 or 8 bits in int32 words with no wasted bits.

Layout (``PackedWeight.qweight``, int32, shape ``(out_features, words)``). A ``b``-bit code is
split into *planes* whose widths divide 32, low bits first:

    2 -> (2,)   3 -> (2, 1)   4 -> (4,)   5 -> (4, 1)   6 -> (4, 2)   8 -> (8,)

Plane ``p`` of width ``w`` and bit offset ``o`` keeps bits ``o .. o+w-1`` of every code of a row,
``32 / w`` fields per word: field ``k`` of the row sits in word ``k // (32 / w)`` of the plane, at
shift ``(k % (32 / w)) * w``. A row's planes follow each other along the word axis, each
``ceil(in_features * w / 32)`` words long, so 32 three-bit codes take exactly three words (two of
2-bit fields and one of 1-bit fields), as GPTQ's straddling layout does; only the last word of a
plane may hold unused (zero) bits when ``in_features * w`` is not a multiple of 32.

Splitting codes into planes instead of letting them straddle word boundaries keeps every field
inside one word: unpacking is a shift and a mask per plane on the CPU, and in a Triton kernel it
is one load per plane with no cross-word case.

Per group of ``group_size`` weights along the input dimension a row stores an fp16 scale and an
fp16 zero point (``(out_features, ceil(in_features / group_size))``); the weight is
``(code - zero) * scale``, exactly what :meth:`bitalloc.formats.QuantFormat.fake_quantize`
computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bitalloc.errors import BitallocError
from bitalloc.formats import SUPPORTED_BITS, QuantFormat, QuantizedWeight

PLANES: dict[int, tuple[int, ...]] = {2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 8: (8,)}
# Bytes of one stored group parameter (fp16 scale or fp16 zero).
_PARAM_BYTES = 2


def planes(bits: int) -> tuple[int, ...]:
    """Plane widths of a ``bits``-wide code, low bits first; a clear error for other widths."""
    try:
        return PLANES[bits]
    except KeyError:
        raise BitallocError(
            f"cannot pack {bits}-bit codes; supported widths are {SUPPORTED_BITS}"
        ) from None


def plane_words(in_features: int, width: int) -> int:
    """Words one row of a ``width``-bit plane takes."""
    return math.ceil(in_features * width / 32)


def packed_words(in_features: int, bits: int) -> int:
    """Words per row of ``qweight`` for ``bits``-bit codes of a row of ``in_features``."""
    return sum(plane_words(in_features, w) for w in planes(bits))


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``(out, in)`` integer codes in ``[0, 2**bits)`` into int32 ``(out, words)``."""
    widths = planes(bits)
    if codes.dim() != 2 or codes.shape[0] == 0 or codes.shape[1] == 0:
        raise BitallocError(f"codes must be a non-empty 2-D tensor, got shape {tuple(codes.shape)}")
    c = codes.to(torch.int64)
    if int(c.min()) < 0 or int(c.max()) >= 2**bits:
        raise BitallocError(
            f"codes range over [{int(c.min())}, {int(c.max())}], outside [0, {2**bits - 1}] "
            f"for {bits}-bit packing"
        )
    rows, in_features = c.shape
    parts = []
    offset = 0
    for width in widths:
        per_word = 32 // width
        words = plane_words(in_features, width)
        field = (c >> offset) & ((1 << width) - 1)
        field = torch.nn.functional.pad(field, (0, words * per_word - in_features))
        shifts = torch.arange(per_word, dtype=torch.int64, device=c.device) * width
        # Fields never overlap, so a sum of shifted fields is their bitwise OR.
        word = (field.view(rows, words, per_word) << shifts).sum(dim=-1)
        parts.append(torch.where(word >= 2**31, word - 2**32, word).to(torch.int32))
        offset += width
    return torch.cat(parts, dim=1).contiguous()


def unpack_codes(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 codes ``(out, in_features)``."""
    widths = planes(bits)
    rows = qweight.shape[0]
    expected = packed_words(in_features, bits)
    if qweight.dim() != 2 or qweight.shape[1] != expected or qweight.dtype != torch.int32:
        raise BitallocError(
            f"packed {bits}-bit codes for {in_features} inputs must be int32 (rows, {expected}), "
            f"got {qweight.dtype} {tuple(qweight.shape)}"
        )
    codes = None
    start = 0
    offset = 0
    for width in widths:
        per_word = 32 // width
        words = plane_words(in_features, width)
        plane = qweight[:, start : start + words]
        shifts = torch.arange(per_word, dtype=torch.int32, device=qweight.device) * width
        # Arithmetic shifts fill with sign bits; the mask drops them because shift + width <= 32.
        field = ((plane.unsqueeze(-1) >> shifts) & ((1 << width) - 1)).reshape(rows, -1)
        field = field[:, :in_features].to(torch.uint8)
        codes = field if codes is None else codes | (field << offset)
        start += words
        offset += width
    return codes


@dataclass(frozen=True)
class PackedWeight:
    """A weight in packed form: ``qweight`` (see the module docstring), fp16 ``scales`` and
    ``zeros`` of shape ``(out_features, n_groups)``, and the format that produced them."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    in_features: int

    def __post_init__(self) -> None:
        check_packed(
            self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.in_features
        )

    @classmethod
    def from_quantized(cls, q: QuantizedWeight) -> PackedWeight:
        """Pack the codes of a quantized weight; scales and zeros are kept as fp16."""
        return cls(
            qweight=pack_codes(q.codes, q.bits),
            scales=q.scales.to(torch.float16).contiguous(),
            zeros=q.zeros.to(torch.float16).contiguous(),
            bits=q.bits,
            group_size=q.group_size,
            in_features=int(q.codes.shape[1]),
        )

    @classmethod
    def quantize(
        cls,
        weight: torch.Tensor,
        fmt: QuantFormat,
        importance: torch.Tensor | None = None,
    ) -> PackedWeight:
        """Quantize ``weight`` with ``fmt`` (an integer format; ``importance`` per input column
        weights its clipping search, see :meth:`QuantFormat.quantize`) and pack it."""
        if fmt.is_float:
            raise BitallocError("fp16 units are stored as fp16 weights, not packed codes")
        return cls.from_quantized(fmt.quantize(weight, importance))

    @property
    def out_features(self) -> int:
        """Rows of the weight."""
        return int(self.qweight.shape[0])

    @property
    def format(self) -> QuantFormat:
        """The palette format these tensors encode."""
        return QuantFormat(self.bits, self.group_size)

    @property
    def nbytes(self) -> int:
        """Bytes held by the packed tensors (codes, scales, zeros)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))

    def codes(self) -> torch.Tensor:
        """The uint8 codes ``(out_features, in_features)``."""
        return unpack_codes(self.qweight, self.bits, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight ``(code - zero) * scale`` as ``dtype``, computed in float32."""
        return dequantize_codes(self.codes(), self.scales, self.zeros, self.group_size, dtype)


def dequantize_codes(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(codes - zero) * scale`` per group, broadcasting over groups instead of gathering."""
    rows, in_features = codes.shape
    n_groups = scales.shape[1]
    padded = n_groups * group_size
    c = codes.to(torch.float32)
    if padded != in_features:
        c = torch.nn.functional.pad(c, (0, padded - in_features))
    c = c.view(rows, n_groups, group_size)
    w = (c - zeros.to(torch.float32).unsqueeze(-1)) * scales.to(torch.float32).unsqueeze(-1)
    return w.view(rows, padded)[:, :in_features].to(dtype)


def check_packed(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
) -> None:
    """Raise :class:`BitallocError` unless the tensors fit the format and shape they claim."""
    fmt = QuantFormat(bits, group_size)  # validates bits and group size
    if in_features <= 0:
        raise BitallocError(f"in_features must be positive, got {in_features}")
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise BitallocError(
            f"qweight must be a 2-D int32 tensor, got {qweight.dtype} {tuple(qweight.shape)}"
        )
    rows = qweight.shape[0]
    words = packed_words(in_features, bits)
    if qweight.shape[1] != words:
        raise BitallocError(
            f"qweight has {qweight.shape[1]} words per row; {fmt.name} codes of {in_features} "
            f"inputs take {words}"
        )
    n_groups = math.ceil(in_features / group_size)
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t.dtype != torch.float16 or tuple(t.shape) != (rows, n_groups):
            raise BitallocError(
                f"{name} must be float16 of shape ({rows}, {n_groups}) for {fmt.name} with "
                f"{in_features} inputs, got {t.dtype} {tuple(t.shape)}"
            )


def packed_nbytes(shape: tuple[int, int], fmt: QuantFormat) -> int:
    """Bytes the packed tensors of a weight of ``shape`` take (fp16 weight bytes for ``fp16``).

    Equals ``fmt.storage_bits(shape) / 8`` when ``in_features * plane width`` is a multiple of 32
    for every plane; otherwise the last word of each plane row adds under 4 bytes.
    """
    out_features, in_features = shape
    if fmt.is_float:
        return 2 * out_features * in_features
    n_groups = math.ceil(in_features / fmt.group_size)
    return out_features * (4 * packed_words(in_features, fmt.bits) + 2 * _PARAM_BYTES * n_groups)
