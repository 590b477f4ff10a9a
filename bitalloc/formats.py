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
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
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
# Elements processed per chunk: bounds the temporary memory of the grid search.
_CHUNK_ELEMENTS = 1 << 21

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
        if self.is_float:
            raise BitallocError("fp16 keeps the weight as is; there are no codes to compute")
        _check_shape(tuple(weight.shape))
        w = weight.detach().to(torch.float32)
        in_features = w.shape[1]
        n_full = in_features // self.group_size
        parts = []
        if n_full:
            full = w[:, : n_full * self.group_size].reshape(w.shape[0], n_full, self.group_size)
            parts.append(_quantize_groups(full, self.bits))
        if in_features % self.group_size:
            tail = w[:, n_full * self.group_size :].unsqueeze(1)
            parts.append(_quantize_groups(tail, self.bits))
        codes = torch.cat([p[0].reshape(w.shape[0], -1) for p in parts], dim=1)
        scales = torch.cat([p[1] for p in parts], dim=1)
        zeros = torch.cat([p[2] for p in parts], dim=1)
        return QuantizedWeight(codes, scales, zeros, self.group_size, self.bits)

    def fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """Return Q(W) in ``weight``'s dtype: what the model computes with under this format."""
        if self.is_float:
            return weight.detach().to(torch.float16).to(weight.dtype)
        return dequantize(self.quantize(weight)).to(weight.dtype)

    def __str__(self) -> str:
        return self.name


def dequantize(q: QuantizedWeight) -> torch.Tensor:
    """Reconstruct the float32 weight (codes - zero) * scale from a :class:`QuantizedWeight`."""
    out_features, in_features = q.codes.shape
    expand = torch.arange(in_features, device=q.codes.device) // q.group_size
    scales = q.scales.to(torch.float32)[:, expand]
    zeros = q.zeros.to(torch.float32)[:, expand]
    return (q.codes.to(torch.float32) - zeros) * scales


def _quantize_groups(
    groups: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize (out, n_groups, g) with an MSE-optimal clipping ratio per group.

    Returns codes (out, n_groups, g) uint8 and fp16 scales/zeros (out, n_groups). Rows are
    processed in chunks so temporary memory stays bounded for large matrices.
    """
    out_features, n_groups, g = groups.shape
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // (n_groups * g))
    codes, scales, zeros = [], [], []
    for start in range(0, out_features, rows_per_chunk):
        c, s, z = _search_chunk(groups[start : start + rows_per_chunk], bits)
        codes.append(c)
        scales.append(s)
        zeros.append(z)
    return torch.cat(codes), torch.cat(scales), torch.cat(zeros)


def _search_chunk(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    qmax = float(2**bits - 1)
    # The range always contains 0 so that zero weights (and constant groups) stay exact.
    xmin = torch.clamp(x.amin(dim=-1), max=0.0)
    xmax = torch.clamp(x.amax(dim=-1), min=0.0)
    best_err = torch.full_like(xmin, float("inf"))
    best_scale = torch.ones_like(xmin)
    best_zero = torch.zeros_like(xmin)
    for ratio in _CLIP_GRID:
        scale, zero = _scale_zero(xmin * ratio, xmax * ratio, qmax)
        deq = (
            torch.clamp(torch.round(x / scale[..., None]) + zero[..., None], 0, qmax)
            - zero[..., None]
        ) * scale[..., None]
        err = (deq - x).square_().sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    codes = torch.clamp(torch.round(x / best_scale[..., None]) + best_zero[..., None], 0, qmax)
    return codes.to(torch.uint8), best_scale.to(torch.float16), best_zero.to(torch.float16)


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
