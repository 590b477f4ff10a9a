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
import operator
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from bitalloc.errors import BitallocError
from bitalloc.formats.base import ColumnQuantizer, Format, check_importance
from bitalloc.formats.encoding import (
    Encoded,
    pack_codes,
    pack_fp16,
    unpack_codes,
    unpack_fp16,
)
from bitalloc.formats.registry import FormatFamily

SCALE_ZERO_BITS = 32  # fp16 scale + fp16 zero per group
SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
# Group sizes the constructor accepts beyond the default palette's (any positive multiple of 8
# is valid); listed so that the family's members, and the contract suite, cover some of them.
EXTRA_GROUP_SIZES = (16, 256)

# Shrink factors of the min-max range tried per group. The grid is finer near 1 because most
# groups at 4+ bits keep (nearly) their full range; low-bit groups gain from clipping down to ~0.5.
# 1.0 comes first and must stay first: it is plain min-max (the range as stored, fp16 scale and
# whole zero), and a later ratio wins only with a strictly smaller error, so the search is never
# worse than min-max, weighted or not, and a tie keeps min-max.
_CLIP_GRID = (1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.82, 0.79, 0.76, 0.72, 0.68, 0.64, 0.6, 0.55)
# The grid as a column, so that one tensor operation tries every ratio at once.
_RATIOS = torch.tensor(_CLIP_GRID, dtype=torch.float32).reshape(-1, 1, 1)
# (ratio, weight) pairs tried per step of the search: bounds its temporary memory (one float32
# buffer of this size, 4 MiB, reused by every step) while keeping each operation large. Every
# operation costs a thread hand-off on top of its arithmetic, which dominates on a busy machine
# when there are many small ones (one pass per ratio was twice as slow); a buffer that fits in a
# core's L2 cache is what makes the seven passes over it fast (2x on one thread against 16 MiB,
# BENCHMARKS.md).
_CHUNK_ELEMENTS = 1 << 20

_INT_NAME = re.compile(r"^int(\d+)-g(\d+)$")
_FLOAT_NAMES = ("fp16", "f16", "float16")


@dataclass(frozen=True)
class QuantizedWeight:
    """Codes and per-group parameters of a weight quantized with an integer format.

    ``codes`` is (out, in) uint8 in [0, 2**bits - 1]; ``scales`` and ``zeros`` are (out, n_groups)
    fp16, with the last group possibly shorter than ``group_size``.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int
    bits: int


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


def encode_quantized(fmt: QuantFormat, q: QuantizedWeight) -> Encoded:
    """The stored form of integer codes and group parameters under ``fmt``."""
    sections = (
        pack_codes("codes", q.codes, fmt.bits),
        pack_fp16("scales", q.scales),
        pack_fp16("zeros", q.zeros),
    )
    return Encoded(fmt.name, (int(q.codes.shape[0]), int(q.codes.shape[1])), sections)


def dequantize(q: QuantizedWeight) -> torch.Tensor:
    """Reconstruct the float32 weight (codes - zero) * scale from a :class:`QuantizedWeight`."""
    out_features, in_features = q.codes.shape
    g = q.group_size
    n_full = in_features // g
    scales = q.scales.to(torch.float32)
    zeros = q.zeros.to(torch.float32)
    # Broadcast each group's scale and zero over its codes rather than gather them per weight:
    # the same two operations on the same values (so the same bits), without two float copies
    # of the weight's size (5-14x faster).
    out = torch.empty((out_features, in_features), dtype=torch.float32, device=q.codes.device)
    if n_full:
        body = out[:, : n_full * g].view(out_features, n_full, g)
        codes = q.codes[:, : n_full * g].reshape(out_features, n_full, g)
        torch.sub(codes, zeros[:, :n_full, None], out=body).mul_(scales[:, :n_full, None])
    if in_features % g:
        tail = out[:, n_full * g :]
        torch.sub(q.codes[:, n_full * g :], zeros[:, n_full:], out=tail).mul_(scales[:, n_full:])
    return out


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


@dataclass(frozen=True)
class _Groups:
    """Rows of groups of equal length and each group's range: ``x`` is (out, n_groups, g),
    ``lo``/``hi`` are (out, n_groups), the range widened to contain 0 so that zero weights (and
    constant groups) stay exact. ``weights`` is None or (n_groups, g): each column's share of
    the squared error, shared by every row."""

    x: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    weights: torch.Tensor | None = None


def _split(
    w: torch.Tensor, group_size: int, importance: torch.Tensor | None = None
) -> list[_Groups]:
    """The float32 weight as its whole groups and, when ``group_size`` does not divide the
    input dimension, the shorter last group of every row, each with its columns' weights."""
    out_features, in_features = w.shape
    n_full = in_features // group_size
    blocks = []
    if n_full:
        blocks.append((slice(0, n_full * group_size), n_full, group_size))
    if in_features % group_size:
        blocks.append((slice(n_full * group_size, in_features), 1, in_features % group_size))
    groups = []
    for cols, n_groups, size in blocks:
        x = w[:, cols].reshape(out_features, n_groups, size)
        lo = torch.clamp(x.amin(dim=-1), max=0.0)
        hi = torch.clamp(x.amax(dim=-1), min=0.0)
        weights = None
        if importance is not None:
            weights = _group_weights(importance[cols], n_groups, size)
        groups.append(_Groups(x, lo, hi, weights))
    return groups


def _group_weights(importance: torch.Tensor, n_groups: int, size: int) -> torch.Tensor:
    """``importance`` as (n_groups, size), each group divided by its largest value.

    A positive factor per group leaves that group's choice unchanged; dividing by the maximum
    makes every weight at most 1 (no overflow however large the importances are) and turns a
    group of equal importances into exact ones, whose products and sums are those of the
    unweighted search, bit for bit. A group of zeros would weigh every candidate at zero (min-max
    by the tie rule, however poor for the weight): it gets ones, the unweighted choice.
    """
    grouped = importance.reshape(n_groups, size)
    top = grouped.amax(dim=-1, keepdim=True)
    return torch.where(top > 0, grouped / top, 1.0)


def _search(
    groups: _Groups, bits: int, row_qmax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize the groups with the clipping ratio of least squared error per group, each
    column's squared error weighted by ``groups.weights`` when there are weights.

    Returns codes (out, n_groups, g) uint8 and fp16 scales/zeros (out, n_groups). Every ratio
    is tried in one pass over a chunk of rows (chunks bound the temporary memory).
    ``row_qmax`` (one largest code per row, float32) replaces ``bits`` for rows of several
    widths searched together; each row gets what a search at its own width gives.
    """
    out_features, n_groups, g = groups.x.shape
    qmax = float(2**bits - 1)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // (len(_CLIP_GRID) * n_groups * g))
    # One buffer for every chunk: a fresh multi-MiB tensor per operation costs its page faults
    # on every call, as much as the arithmetic (BENCHMARKS.md).
    buffer = torch.empty(
        (len(_CLIP_GRID), min(rows_per_chunk, out_features), n_groups, g), device=groups.x.device
    )
    ratios = _RATIOS.to(groups.x.device)
    codes, scales, zeros = [], [], []
    for start in range(0, out_features, rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        x = groups.x[rows]
        if row_qmax is not None:
            qmax = row_qmax[rows].reshape(-1, 1)  # broadcasts as (rows, n_groups)
        # (ratios, rows, n_groups): every candidate range of every group.
        scale, zero = _scale_zero(groups.lo[rows] * ratios, groups.hi[rows] * ratios, qmax)
        s, z = scale[..., None], zero[..., None]
        err = buffer[:, : x.shape[0]]
        # clamp(round(x / s) + z, 0, qmax) - z is round(x / s) clamped to [-z, qmax - z]: every
        # term is a whole number far below 2**24, so both give the same float32 values.
        # maximum/minimum take the bounds as tensors at half the cost of clamp_ with tensors.
        torch.div(x, s, out=err).round_()
        torch.maximum(err, -z, out=err)
        torch.minimum(err, (qmax if row_qmax is None else qmax[..., None]) - z, out=err)
        err = err.mul_(s).sub_(x).square_()
        if groups.weights is not None:
            # The weighting is diagonal: one multiply per candidate, the search is unchanged.
            err = err.mul_(groups.weights)
        err = err.sum(-1)
        best_scale, best_zero = _first_minimum(err, scale, zero)
        c = torch.round(x / best_scale[..., None]) + best_zero[..., None]
        c = (
            torch.clamp(c, 0, qmax)
            if row_qmax is None
            else c.clamp_(min=0).minimum(qmax[..., None])
        )
        codes.append(c.to(torch.uint8))
        scales.append(best_scale.to(torch.float16))
        zeros.append(best_zero.to(torch.float16))
    return torch.cat(codes), torch.cat(scales), torch.cat(zeros)


def _first_minimum(
    err: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the (scale, zero) of the first candidate with the least error, over the
    leading (ratio) dimension.

    Ratios are ranked as a sequential search would: a later one wins only with a strictly
    smaller error, NaN never wins, and a group whose every error is NaN or inf (non-finite
    weights) keeps scale 1 and zero 0.
    """
    inf = float("inf")
    err = torch.where(err < inf, err, inf)
    # argmin returns the first index of a repeated minimum, the tie rule above. Ratios moved
    # last and made contiguous first: argmin over a strided leading dimension is 5x slower.
    pick = err.movedim(0, -1).contiguous().argmin(dim=-1).unsqueeze(0)
    found = err.gather(0, pick)[0] < inf
    best_scale = torch.where(found, scale.gather(0, pick)[0], 1.0)
    best_zero = torch.where(found, zero.gather(0, pick)[0], 0.0)
    return best_scale, best_zero


def _scale_zero(
    lo: torch.Tensor, hi: torch.Tensor, qmax: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and whole-number zero for the range [lo, hi], as they will be stored (fp16).

    Rounding the scale to fp16 here (not afterwards) makes the search pick what is stored.
    """
    span = torch.clamp(hi - lo, min=1e-8)
    scale = (span / qmax).to(torch.float16).to(torch.float32)
    # fp16 underflow would make the scale zero; the smallest normal fp16 keeps division finite.
    scale = torch.clamp(scale, min=6.2e-5)
    zero = torch.round(-lo / scale)
    if isinstance(qmax, torch.Tensor):
        return scale, zero.clamp_(min=0).minimum(qmax)
    return scale, torch.clamp(zero, 0, qmax)


def _check_shape(shape: Sequence[int]) -> tuple[int, int]:
    # Whole numbers only: a float or bool size would be truncated into a different shape.
    try:
        given = tuple(shape)
    except TypeError:
        given = (shape,)
    try:
        dims = [operator.index(d) for d in given if not isinstance(d, bool)]
    except TypeError:
        dims = []
    if len(given) != 2 or len(dims) != 2 or dims[0] <= 0 or dims[1] <= 0:
        raise BitallocError(f"expected a 2-D weight shape (out, in), got {given}")
    return dims[0], dims[1]
