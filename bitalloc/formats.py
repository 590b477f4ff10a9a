"""The palette: quantization formats a unit may take, their exact storage cost, and
quantize / dequantize.

A format is a small frozen object with a stable name:

- ``int{b}-g{g}``: asymmetric integer codes of ``b`` bits, grouped along the input dimension in
  groups of ``g`` weights; each group stores an fp16 scale and an fp16 zero point.
- ``fp16``: the weight is kept in 16 bits.

Storage cost counts every stored bit. For a weight of shape (out, in) and ``int{b}-g{g}``::

    bits = out * in * b + out * ceil(in / g) * (16 + 16)

so ``int3-g128`` costs 3.25 bits per weight when ``g`` divides ``in`` and a little more when it
does not (576 = 4 x 128 + 64 gives 5 groups per row: 3 + 160 / 576 = 3.278 bits per weight).

Scales and zeros are chosen per group to minimise squared error over a grid of clipping ranges
(min-max rounding alone is far worse at 2-3 bits). Zero points are whole numbers in the code
range, stored as fp16 (exactly representable), so the codes and zeros can be handed to integer
kernels the way GPTQ-style checkpoints store them.

Profilers need one weight under every format of the palette: :func:`quantize_each` and
:func:`fake_quantize_each` split the weight into groups and take each group's range once per
group size, for all bit widths of that size, and give exactly what :meth:`QuantFormat.quantize`
gives format by format.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from bitalloc.errors import BitallocError

T = TypeVar("T")

SCALE_ZERO_BITS = 32  # fp16 scale + fp16 zero per group
SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)

# Shrink factors of the min-max range tried per group. The grid is finer near 1 because most
# groups at 4+ bits keep (nearly) their full range; low-bit groups gain from clipping down to ~0.5.
_CLIP_GRID = (1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.82, 0.79, 0.76, 0.72, 0.68, 0.64, 0.6, 0.55)
# The grid as a column, so that one tensor operation tries every ratio at once.
_RATIOS = torch.tensor(_CLIP_GRID, dtype=torch.float32).reshape(-1, 1, 1)
# (ratio, weight) pairs tried per step of the search: bounds its temporary memory (two float32
# tensors of this size, 32 MiB) while keeping each operation large. Every operation costs a
# thread hand-off on top of its arithmetic, which dominates on a busy machine when there are
# many small ones (one pass per ratio was twice as slow; BENCHMARKS.md).
_CHUNK_ELEMENTS = 1 << 22

_INT_NAME = re.compile(r"^int(\d+)-g(\d+)$")


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
class QuantFormat:
    """One palette entry. ``bits`` is the code width (16 for ``fp16``); ``group_size`` is None for
    ``fp16``.

    Use :func:`parse_format` to build one from its name; the constructor validates the pair.
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
    def is_float(self) -> bool:
        """True for the keep-in-16-bits format."""
        return self.group_size is None

    @property
    def nominal_bits(self) -> float:
        """Bits per weight when the group size divides the input dimension."""
        if self.is_float:
            return 16.0
        return self.bits + SCALE_ZERO_BITS / self.group_size

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

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        """Quantize a 2-D weight; scales/zeros minimise each group's squared error."""
        return next(quantize_each(weight, (self,)))

    def fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """Return Q(W) in ``weight``'s dtype: what the model computes with under this format."""
        return next(fake_quantize_each(weight, (self,)))

    def __str__(self) -> str:
        return self.name


def dequantize(q: QuantizedWeight) -> torch.Tensor:
    """Reconstruct the float32 weight (codes - zero) * scale from a :class:`QuantizedWeight`."""
    out_features, in_features = q.codes.shape
    expand = torch.arange(in_features, device=q.codes.device) // q.group_size
    scales = q.scales.to(torch.float32)[:, expand]
    zeros = q.zeros.to(torch.float32)[:, expand]
    return (q.codes.to(torch.float32) - zeros) * scales


def quantize_each(
    weight: torch.Tensor, formats: Sequence[QuantFormat]
) -> Iterator[QuantizedWeight]:
    """Quantize a 2-D weight with each integer format of ``formats`` in turn (lazily, in order).

    Equal, code for code, to ``fmt.quantize(weight)`` for each format; the float32 copy, the
    split into groups and each group's range are computed once per group size and shared by
    every bit width of that size (kept while the iterator lives: at most one float32 copy of
    the weight per group size).
    """
    formats = tuple(formats)
    floats = [f.name for f in formats if f.is_float]
    if floats:
        raise BitallocError("fp16 keeps the weight as is; there are no codes to compute")
    _check_shape(tuple(weight.shape))
    w = weight.detach().to(torch.float32)
    grouped: dict[int, list[_Groups]] = {}
    for fmt in formats:
        size = int(fmt.group_size or 0)
        if size not in grouped:
            grouped[size] = _split(w, size)
        parts = [_search(g, fmt.bits) for g in grouped[size]]
        codes = torch.cat([c.reshape(w.shape[0], -1) for c, _, _ in parts], dim=1)
        scales = torch.cat([s for _, s, _ in parts], dim=1)
        zeros = torch.cat([z for _, _, z in parts], dim=1)
        yield QuantizedWeight(codes, scales, zeros, size, fmt.bits)


def fake_quantize_each(
    weight: torch.Tensor, formats: Sequence[QuantFormat]
) -> Iterator[torch.Tensor]:
    """Q(W) in ``weight``'s dtype for each format of ``formats`` (``fp16`` included), lazily
    and in order: each equal, bit for bit, to ``fmt.fake_quantize(weight)``, with the work that
    does not depend on the bit width shared as in :func:`quantize_each`."""
    formats = tuple(formats)
    _check_shape(tuple(weight.shape))
    quantized = quantize_each(weight, [f for f in formats if not f.is_float])
    for fmt in formats:
        if fmt.is_float:
            yield weight.detach().to(torch.float16).to(weight.dtype)
        else:
            yield dequantize(next(quantized)).to(weight.dtype)


@dataclass(frozen=True)
class _Groups:
    """Rows of groups of equal length and each group's range: ``x`` is (out, n_groups, g),
    ``lo``/``hi`` are (out, n_groups), the range widened to contain 0 so that zero weights (and
    constant groups) stay exact."""

    x: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor


def _split(w: torch.Tensor, group_size: int) -> list[_Groups]:
    """The float32 weight as its whole groups and, when ``group_size`` does not divide the
    input dimension, the shorter last group of every row."""
    out_features, in_features = w.shape
    n_full = in_features // group_size
    blocks = []
    if n_full:
        blocks.append(w[:, : n_full * group_size].reshape(out_features, n_full, group_size))
    if in_features % group_size:
        blocks.append(w[:, n_full * group_size :].unsqueeze(1))
    return [
        _Groups(x, torch.clamp(x.amin(dim=-1), max=0.0), torch.clamp(x.amax(dim=-1), min=0.0))
        for x in blocks
    ]


def _search(groups: _Groups, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize the groups with the clipping ratio of least squared error per group.

    Returns codes (out, n_groups, g) uint8 and fp16 scales/zeros (out, n_groups). Every ratio
    is tried in one pass over a chunk of rows (chunks bound the temporary memory).
    """
    out_features, n_groups, g = groups.x.shape
    qmax = float(2**bits - 1)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // (len(_CLIP_GRID) * n_groups * g))
    codes, scales, zeros = [], [], []
    for start in range(0, out_features, rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        x = groups.x[rows]
        # (ratios, rows, n_groups): every candidate range of every group.
        scale, zero = _scale_zero(groups.lo[rows] * _RATIOS, groups.hi[rows] * _RATIOS, qmax)
        s, z = scale[..., None], zero[..., None]
        # clamp(round(x / s) + z, 0, qmax) - z is round(x / s) clamped to [-z, qmax - z]: every
        # term is a whole number far below 2**24, so both give the same float32 values.
        err = (x / s).round_().clamp_(min=-z, max=qmax - z).mul_(s).sub_(x).square_().sum(-1)
        best_scale, best_zero = _first_minimum(err, scale, zero)
        c = torch.clamp(torch.round(x / best_scale[..., None]) + best_zero[..., None], 0, qmax)
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
    # argmin returns the first index of a repeated minimum, the tie rule above.
    pick = err.argmin(dim=0, keepdim=True)
    found = err.gather(0, pick)[0] < inf
    best_scale = torch.where(found, scale.gather(0, pick)[0], 1.0)
    best_zero = torch.where(found, zero.gather(0, pick)[0], 0.0)
    return best_scale, best_zero


def _scale_zero(
    lo: torch.Tensor, hi: torch.Tensor, qmax: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and whole-number zero for the range [lo, hi], as they will be stored (fp16).

    Rounding the scale to fp16 here (not afterwards) makes the search pick what is stored.
    """
    span = torch.clamp(hi - lo, min=1e-8)
    scale = (span / qmax).to(torch.float16).to(torch.float32)
    # fp16 underflow would make the scale zero; the smallest normal fp16 keeps division finite.
    scale = torch.clamp(scale, min=6.2e-5)
    zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return scale, zero


def _check_shape(shape: Sequence[int]) -> tuple[int, int]:
    if len(shape) != 2 or shape[0] <= 0 or shape[1] <= 0:
        raise BitallocError(f"expected a 2-D weight shape (out, in), got {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def parse_format(name: str | QuantFormat) -> QuantFormat:
    """Build a format from its name (``int4-g128``, ``fp16``); formats pass through."""
    if isinstance(name, QuantFormat):
        return name
    text = str(name).strip().lower()
    if text in ("fp16", "f16", "float16"):
        return QuantFormat(16, None)
    match = _INT_NAME.match(text)
    if not match:
        raise BitallocError(
            f"unknown format {name!r}; use 'fp16' or 'int<bits>-g<group>' such as 'int3-g128' "
            f"(bits {SUPPORTED_BITS}, groups {SUPPORTED_GROUP_SIZES})"
        )
    return QuantFormat(int(match.group(1)), int(match.group(2)))


def default_palette() -> tuple[QuantFormat, ...]:
    """Every integer format (bits x group sizes) plus ``fp16``, cheapest first."""
    formats = [QuantFormat(b, g) for b in SUPPORTED_BITS for g in SUPPORTED_GROUP_SIZES]
    formats.append(QuantFormat(16, None))
    return tuple(sorted(formats, key=lambda f: (f.nominal_bits, f.name)))


def parse_format_list(
    items: Iterable[Any] | str, parse: Callable[[Any], T], *, what: str, example: str
) -> tuple[T, ...]:
    """``items`` (a comma list or an iterable of names or formats) parsed with ``parse``; an
    empty list or one naming a format twice raises :class:`BitallocError` naming ``what``."""
    if isinstance(items, str):
        items = [part for part in items.split(",") if part.strip()]
    parsed = tuple(parse(item) for item in items)
    if not parsed:
        raise BitallocError(f"the {what} is empty; pass at least one format such as {example!r}")
    names = [f.name for f in parsed]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise BitallocError(f"the {what} lists {duplicates} more than once; list each format once")
    return parsed


def parse_palette(formats: Iterable[str | QuantFormat] | None) -> tuple[QuantFormat, ...]:
    """Normalise a user's palette (names or formats); None gives :func:`default_palette`."""
    if formats is None:
        return default_palette()
    palette = parse_format_list(formats, parse_format, what="palette", example="int4-g128")
    return tuple(sorted(palette, key=lambda f: (f.nominal_bits, f.name)))
