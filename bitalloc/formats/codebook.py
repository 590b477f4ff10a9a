"""The ``codebook`` family: non-uniform scalar codebooks (NormalFloat, Lloyd-Max) and a small
vector quantizer (:mod:`bitalloc.formats.vq`), with every stored bit counted, codebooks included.

- ``nf{3,4}-g{32,64,128}``: NormalFloat codes (QLoRA, Dettmers et al. 2023, arXiv:2305.14314).
  The levels are quantiles of N(0, 1), asymmetric so that 0 is a level: ``2**(b-1)`` positive
  quantiles at probabilities evenly spaced from ``offset`` down to 1/2 (exclusive),
  ``2**(b-1) - 1`` negative ones likewise, 0, all divided by the largest so they span [-1, 1].
  ``offset`` is the mean of ``1 - 1/(2 (2**b - 1))`` and ``1 - 1/(2 * 2**b)`` rounded to 7
  decimals, which for b = 4 is QLoRA's published 0.9677083 and gives its NF4 table (to 1e-7).
  NF3 is the same construction with 8 levels (offset 0.9330357): 4 positive, 3 negative and 0.
  The levels are constants of the format and are not stored.
- ``lm{2,3,4}-t-g{32,64,128}`` and ``lm{2,3,4}-r-g{32,64,128}``: Lloyd-Max codebooks (Max 1960,
  "Quantizing for minimum distortion"; Lloyd 1982, "Least squares quantization in PCM") of
  ``2**b`` fp16 levels fitted to the weight itself: one for the whole tensor (``-t``) or one per
  output row (``-r``).

Both store a code per weight and an fp16 scale per group of ``g`` weights along a row; the weight
is ``scale * level[code]``. Storage, for a weight of shape (out, in) and ``n_g = ceil(in / g)``
groups per row (a last group may be shorter):

==================== =======================================================================
format               bits
==================== =======================================================================
``nf{b}-g{g}``       ``out * in * b + out * n_g * 16``
``lm{b}-t-g{g}``     ``out * in * b + out * n_g * 16 + 2**b * 16``
``lm{b}-r-g{g}``     ``out * in * b + out * n_g * 16 + out * 2**b * 16``
``vq{d}d-{R}b-g{g}`` ``out * in * R + out * (in / g) * 16 + 2**(d R) * d * 16`` (vq.py)
==================== =======================================================================

so ``nf4-g64`` is 4.25 bits per weight, and ``lm3-t-g128`` on a 1536 x 576 weight (4.5 groups
of 128 per row: five scales) 3 + 80 / 576 + 128 / 884736 = 3.1390. A Lloyd-Max codebook needs
at least as many weights as levels: ``lm4-r`` refuses rows of fewer than 16 weights and ``lm4-t``
tensors of fewer than 16 (:class:`~bitalloc.errors.BitallocError`, saying so).

Scales are searched like the int family's clipping: candidates ``absmax * r`` for ``r`` in
:data:`SHRINK_GRID` rounded to fp16, 1.0 (plain absmax, QLoRA's choice) first, a later one
winning only with a strictly smaller squared error, weighted per column by ``importance`` when
given, so the search never does worse than absmax. A Lloyd-Max codebook is fitted first, to the
weight divided by its absmax scales, by 1-D weighted k-means
(:func:`~bitalloc.formats.vq.lloyd_fit`); the scales are then searched with it (on Gaussian
weights the search lowers Lloyd-Max's error by 3-5%, enough to beat int's clipped asymmetric grid
at every width and group). A per-row fit also starts from the per-tensor levels, so no row's
codebook fits it worse than the tensor's would. A value divided by its scale ``s`` contributes
``s**2 * importance[column] * (x - level)**2`` to the error, so the fit weighs it by ``s**2``
(times the importance when given): it minimises the error of the weight, not of the normalised
values. Rounding is to the nearest level by the midpoints of the sorted levels; a value on a
midpoint takes the lower level.

Both quantize column by column (:meth:`column_quantizer`: a Lloyd-Max codebook is fitted on the
weight given there, ``fit`` searches a group's scale). No format here is on a ladder: NF4's levels
do not contain NF3's, and a refitted codebook of more levels is not guaranteed better on every
weight, so no rung could promise to be at least as good as the one below.

The family lists NF at groups 32, 64 and 128, Lloyd-Max at 64 and 128 (32 parses), and the
vector formats of :mod:`~bitalloc.formats.vq`; it is opt-in (no default palette member).
Computation is on the CPU in float32 (Lloyd's sums in float64); the result comes back on the
weight's device and in its dtype.
"""

from __future__ import annotations

import functools
import math
import re
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bitalloc.errors import BitallocError
from bitalloc.formats.base import ColumnQuantizer, Format, check_importance
from bitalloc.formats.encoding import Encoded, pack_codes, pack_fp16, unpack_codes, unpack_fp16
from bitalloc.formats.integer import _check_shape
from bitalloc.formats.registry import FormatFamily
from bitalloc.formats.vq import (
    FAMILY,
    GROUP_SIZES,
    SCALE_BITS,
    checked_weight,
    expand_groups,
    fp16_scales,
    group_scales,
    lloyd_fit,
    parse_vq,
    vq_members,
)

NF_BITS = (3, 4)
LM_BITS = (2, 3, 4)
LM_MEMBER_GROUP_SIZES = (64, 128)
# Shrink ratios of the absmax. 1.0 must stay first (see the module docstring). Eight ratios keep
# nearly all of the gain of a grid three times finer (NF3/NF4 on Gaussian and t-distributed
# weights: within 0.5% of its error) at a third of the cost of int's fourteen.
SHRINK_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65)
_RATIOS = torch.tensor(SHRINK_GRID, dtype=torch.float32).reshape(-1, 1)
# Candidate-weight elements a step of the scale search works on (16 MiB of float32).
_STEP_ELEMENTS = 1 << 22

_NF_NAME = re.compile(r"^nf(\d+)-g(\d+)$")
_LM_NAME = re.compile(r"^lm(\d+)-([a-z]+)-g(\d+)$")
_LM_KINDS = {"t": False, "r": True}


def normal_float_levels(bits: int) -> torch.Tensor:
    """The ``2**bits`` NormalFloat levels in [-1, 1], ascending, as float64 (see the module
    docstring for the construction)."""
    count = 2**bits
    offset = round(1 - (1 / (2 * (count - 1)) + 1 / (2 * count)) / 2, 7)
    half = count // 2

    def quantiles(n: int) -> torch.Tensor:
        # n probabilities from offset towards 1/2, which is left out (it would give 0 twice).
        probs = torch.linspace(offset, 0.5, n + 1, dtype=torch.float64)[:-1]
        return torch.special.ndtri(probs)

    values = torch.cat([-quantiles(half - 1), torch.zeros(1, dtype=torch.float64), quantiles(half)])
    values = values.sort().values
    return values / values.max()


@functools.cache
def _nf_books(bits: int) -> torch.Tensor:
    # Computed once per width; callers only read it.
    return normal_float_levels(bits).to(torch.float32)[None]


def nearest(books: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Index (int64) of the nearest level for each value of ``x`` (..., rows, n): ``books`` is
    (1, K), one codebook for every row, or (rows, K), one per row, ascending. The index is the
    number of midpoints between levels below the value, so a value on a midpoint takes the
    lower level."""
    mids = (books[:, :-1] + books[:, 1:]) / 2
    # K - 1 comparisons per value (K <= 16 here) cost less than a binary search per value
    # (torch.searchsorted: 1.3x to 1.6x slower, measured on 7 M values).
    # One codebook: plain numbers; one per row: a column per midpoint, against each row.
    bounds = mids[0].tolist() if books.shape[0] == 1 else list(mids.T[:, :, None])
    codes = torch.zeros(x.shape, dtype=torch.uint8)
    for bound in bounds:
        codes.add_(x > bound)
    return codes.long()


def lookup(books: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The levels ``codes`` (..., rows, n) index in ``books`` (1 or rows, K)."""
    if books.shape[0] == 1:
        return books[0][codes]
    return books.expand(*codes.shape[:-1], -1).gather(-1, codes)


def search_scales(
    weight: torch.Tensor, importance: torch.Tensor | None, books: torch.Tensor, group: int
) -> torch.Tensor:
    """The fp16 scale (float32 values) of each group of ``group`` columns of ``weight`` (out,
    in), the last possibly shorter: (out, n_groups). Each is the first shrink of the group's
    absmax with the least (importance-weighted) squared error when rounded to ``books``; a
    group whose importance is all zero is searched unweighted.

    Whole groups are searched together, as many at a time as keep a step's buffers near
    :data:`_STEP_ELEMENTS`; a group's result does not depend on which others share its step
    (every operation is per element, or a sum over the group's own columns), so one group alone
    (the column quantizer's ``fit``) gets what the whole weight gets.
    """
    out_features, in_features = weight.shape
    full = in_features // group
    per_step = max(1, _STEP_ELEMENTS // (len(SHRINK_GRID) * out_features * group))
    spans = [(a, min(a + per_step, full)) for a in range(0, full, per_step)]
    parts = [_search(weight, importance, books, a * group, b - a, group) for a, b in spans]
    if in_features % group:
        tail = in_features - full * group
        parts.append(_search(weight, importance, books, full * group, 1, tail))
    return torch.cat(parts, dim=1)


def _search(
    weight: torch.Tensor,
    importance: torch.Tensor | None,
    books: torch.Tensor,
    start: int,
    count: int,
    length: int,
) -> torch.Tensor:
    """:func:`search_scales` for ``count`` groups of ``length`` columns from ``start``."""
    out_features = weight.shape[0]
    block = weight[:, start : start + count * length].reshape(out_features, count, length)
    candidates = fp16_scales(block.abs().amax(2) * _RATIOS[:, :, None])  # (ratios, out, count)
    scale = candidates[..., None]
    x = (block / scale).view(len(SHRINK_GRID), out_features, count * length)
    rounded = lookup(books, nearest(books, x)).view(scale.shape[:3] + (length,))
    err = rounded.mul_(scale).sub_(block).square_()
    if importance is not None:
        imp = importance[start : start + count * length].reshape(count, length)
        # A group with no importance weighs its columns alike.
        err = err.mul_(torch.where(imp.sum(1, keepdim=True) > 0, imp, 1.0))
    # argmin takes the first of equal errors: a later ratio wins only when strictly better.
    pick = err.sum(-1).movedim(0, -1).contiguous().argmin(-1, keepdim=True)
    return candidates.movedim(0, -1).gather(-1, pick)[..., 0]


class _ScalarCodebookFormat(Format):
    """What NormalFloat and Lloyd-Max share: codes into (1 or out, 2**bits) codebooks, an fp16
    scale per group searched with them (module docstring)."""

    bits: int
    group: int
    #: True when the codebook is stored (fitted), False when it is the format's constant.
    stores_codebook = False

    @property
    def family(self) -> str:
        """``codebook``."""
        return FAMILY

    @property
    def nominal_bits(self) -> float:
        """``bits + 16 / group`` (a fitted codebook's share depends on the shape)."""
        return self.bits + SCALE_BITS / self.group

    @property
    def is_float(self) -> bool:
        """False: the weight is quantized."""
        return False

    @abstractmethod
    def books(self, weight: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
        """The codebook(s) for a checked float32 ``weight``: (1 or out, 2**bits), ascending."""

    def quantize(
        self, weight: torch.Tensor, importance: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes (out, in), scales (out, n_groups) and codebooks (1 or out, 2**bits) of
        ``weight``; scales and levels are fp16 values in float32."""
        _, in_features = self.check_shape(tuple(weight.shape))
        imp = check_importance(importance, in_features)
        w = checked_weight(weight, self.name)
        books = self.books(w, imp)
        scales = search_scales(w, imp, books, self.group)
        return nearest(books, w / expand_groups(scales, self.group, in_features)), scales, books

    def dequantize(
        self, codes: torch.Tensor, scales: torch.Tensor, books: torch.Tensor
    ) -> torch.Tensor:
        """``scale * level[code]``, float32."""
        return lookup(books, codes) * expand_groups(scales, self.group, codes.shape[1])

    def fake_quantize(
        self, weight: torch.Tensor, importance: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The dequantized weight in ``weight``'s dtype; ``importance`` weights the scale search
        (and a fitted codebook)."""
        return self.dequantize(*self.quantize(weight, importance)).to(weight.device, weight.dtype)

    def sections(self, codes: torch.Tensor, scales: torch.Tensor, books: torch.Tensor) -> tuple:
        """The stored sections: codes at ``bits`` bits, fp16 scales, a fitted codebook."""
        stored = (pack_codes("codes", codes, self.bits), pack_fp16("scales", scales))
        return (*stored, pack_fp16("codebook", books)) if self.stores_codebook else stored

    def encode(self, weight: torch.Tensor) -> Encoded:
        """The stored form of ``weight`` (see :meth:`sections`)."""
        shape = self.check_shape(tuple(weight.shape))
        return Encoded(self.name, shape, self.sections(*self.quantize(weight)))

    def decode(self, encoded: Encoded) -> torch.Tensor:
        """The float32 weight :meth:`encode` stored."""
        if encoded.format_name != self.name:
            raise BitallocError(
                f"an encoding of {encoded.format_name} cannot be decoded as {self.name}"
            )
        out_features, in_features = self.check_shape(encoded.shape)
        codes = unpack_codes(encoded.section("codes"), out_features * in_features, self.bits)
        scales = unpack_fp16(encoded.section("scales")).to(torch.float32)
        if self.stores_codebook:
            books = unpack_fp16(encoded.section("codebook")).to(torch.float32)
        else:
            books = self.books(torch.zeros(0, 0), None)
        return self.dequantize(
            codes.reshape(out_features, in_features),
            scales.reshape(out_features, -1),
            books.reshape(-1, 2**self.bits),
        )

    def column_quantizer(
        self, weight: torch.Tensor, importance: torch.Tensor | None = None
    ) -> ColumnQuantizer:
        """Column-by-column rounding: codebooks from ``weight`` (a fitted one is fitted here),
        ``fit`` searches a group's scale with them."""
        return _ScalarColumns(self, weight, importance)


@dataclass(frozen=True)
class NormalFloatFormat(_ScalarCodebookFormat):
    """``nf{bits}-g{group}``: NormalFloat codes with an fp16 scale per group of ``group``."""

    bits: int
    group: int

    def __post_init__(self) -> None:
        if self.bits not in NF_BITS:
            raise _bad_value("code width", self.bits, NF_BITS, "NormalFloat")
        if self.group not in GROUP_SIZES:
            raise _bad_value("group size", self.group, GROUP_SIZES, "NormalFloat")

    @property
    def name(self) -> str:
        """``nf4-g64`` style."""
        return f"nf{self.bits}-g{self.group}"

    def check_shape(self, shape: Sequence[int]) -> tuple[int, int]:
        """``(out, in)``; any 2-D shape fits (a last group may be shorter)."""
        return _check_shape(shape)

    def storage_bits(self, shape: Sequence[int]) -> int:
        """Codes and one fp16 scale per group."""
        out_features, in_features = _check_shape(shape)
        n_groups = math.ceil(in_features / self.group)
        return out_features * (in_features * self.bits + n_groups * SCALE_BITS)

    def books(self, weight: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
        """The NormalFloat levels, float32, as one codebook (1, 2**bits)."""
        return _nf_books(self.bits)


@dataclass(frozen=True)
class LloydMaxFormat(_ScalarCodebookFormat):
    """``lm{bits}-t-g{group}`` (one codebook per tensor) or ``lm{bits}-r-g{group}`` (one per
    output row) of ``2**bits`` fitted fp16 levels, with an fp16 scale per group of ``group``."""

    bits: int
    group: int
    per_row: bool
    stores_codebook = True

    def __post_init__(self) -> None:
        if self.bits not in LM_BITS:
            raise _bad_value("code width", self.bits, LM_BITS, "Lloyd-Max")
        if self.group not in GROUP_SIZES:
            raise _bad_value("group size", self.group, GROUP_SIZES, "Lloyd-Max")

    @property
    def name(self) -> str:
        """``lm3-t-g128`` (per tensor) or ``lm3-r-g128`` (per row)."""
        return f"lm{self.bits}-{'r' if self.per_row else 't'}-g{self.group}"

    def check_shape(self, shape: Sequence[int]) -> tuple[int, int]:
        """``(out, in)``, refusing a codebook of more levels than the weights it is fitted on."""
        out_features, in_features = _check_shape(shape)
        fitted = in_features if self.per_row else out_features * in_features
        if fitted < 2**self.bits:
            where = f"a row of {in_features}" if self.per_row else f"{fitted}"
            advice = "fewer bits or one codebook per tensor (-t)" if self.per_row else "fewer bits"
            raise BitallocError(
                f"{self.name} fits {2**self.bits} levels to {where} weights: a codebook cannot "
                f"have more levels than the weights it is fitted on; use {advice}"
            )
        return out_features, in_features

    def storage_bits(self, shape: Sequence[int]) -> int:
        """Codes, one fp16 scale per group, and the fp16 codebook(s)."""
        out_features, in_features = self.check_shape(shape)
        n_groups = math.ceil(in_features / self.group)
        codebooks = (out_features if self.per_row else 1) * 2**self.bits * SCALE_BITS
        return out_features * (in_features * self.bits + n_groups * SCALE_BITS) + codebooks

    def books(self, weight: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
        """The fitted fp16 codebook(s) (float32 values, ascending): (1 or out, 2**bits), fitted
        to ``weight`` divided by its absmax scales."""
        scales = expand_groups(group_scales(weight, self.group), self.group, weight.shape[1])
        weights = scales.square()
        if importance is not None and bool(importance.sum() > 0):
            weights = weights * importance
        x = weight / scales
        whole = lloyd_fit(x.reshape(1, -1), weights.reshape(1, -1), 2**self.bits)
        # A row starts from the tensor's levels too, so no row's codebook fits worse than the
        # one a per-tensor format would share (up to the rounding to fp16).
        levels = lloyd_fit(x, weights, 2**self.bits, whole) if self.per_row else whole
        # Rounded to what is stored, then sorted again: two levels may meet in fp16.
        return levels.to(torch.float16).to(torch.float32).sort(dim=1).values


class _ScalarColumns(ColumnQuantizer):
    """A NormalFloat or Lloyd-Max weight rounded one column at a time (see
    :class:`~bitalloc.formats.base.ColumnQuantizer`)."""

    def __init__(
        self, fmt: _ScalarCodebookFormat, weight: torch.Tensor, importance: torch.Tensor | None
    ) -> None:
        self.fmt = fmt
        self.shape = fmt.check_shape(tuple(weight.shape))
        self.group_size = fmt.group
        self.importance = check_importance(importance, self.shape[1])
        # Fixed from the original weight: a fitted codebook spans every column.
        self.books = fmt.books(checked_weight(weight, fmt.name), self.importance)
        out_features, in_features = self.shape
        self.scales = torch.zeros(out_features, math.ceil(in_features / fmt.group))
        self.fitted = torch.zeros(self.scales.shape[1], dtype=torch.bool)
        self.codes = torch.zeros(self.shape, dtype=torch.int64)
        self.rounded = torch.zeros(in_features, dtype=torch.bool)

    def fit(self, start: int, block: torch.Tensor) -> None:
        """The scale search of the group starting at column ``start``."""
        if start % self.group_size or not 0 <= start < self.shape[1]:
            raise BitallocError(f"column {start} does not start a group of {self.group_size}")
        imp = _part(self.importance, start, self.group_size)
        w = checked_weight(block, self.fmt.name)
        scale = search_scales(w, imp, self.books, self.group_size)
        self.scales[:, start // self.group_size] = scale[:, 0]
        self.fitted[start // self.group_size] = True

    def round(self, index: int, column: torch.Tensor) -> torch.Tensor:
        """Column ``index`` at its nearest level times its group's scale (float32)."""
        group = index // self.group_size
        if not self.fitted[group]:
            raise BitallocError(f"fit the group of column {index} (group {group}) before rounding")
        scale = self.scales[:, group]
        x = checked_weight(column, self.fmt.name).reshape(-1, 1) / scale[:, None]
        codes = nearest(self.books, x)
        self.codes[:, index] = codes[:, 0]
        self.rounded[index] = True
        return lookup(self.books, codes)[:, 0] * scale

    def encode(self) -> Encoded:
        """The rounded columns in the format's stored layout."""
        if not bool(self.rounded.all()):
            raise BitallocError("round every column before encoding")
        return Encoded(
            self.fmt.name, self.shape, self.fmt.sections(self.codes, self.scales, self.books)
        )


def _part(importance: torch.Tensor | None, start: int, length: int) -> torch.Tensor | None:
    return None if importance is None else importance[start : start + length]


def _bad_value(kind: str, value: int, choices: Sequence[int], name: str) -> BitallocError:
    return BitallocError(f"{name}: unsupported {kind} {value}; choose one of {tuple(choices)}")


class CodebookFamily(FormatFamily):
    """NormalFloat (``nf4-g64``), Lloyd-Max (``lm3-t-g128``, ``lm3-r-g128``) and vector
    (``vq2d-3b-g64``) codebook formats; opt-in, in no default palette."""

    name = FAMILY
    description = (
        f"'nf<bits>-g<group>' (NormalFloat, bits {NF_BITS}), 'lm<bits>-t|r-g<group>' (Lloyd-Max "
        f"per tensor or per row, bits {LM_BITS}), 'vq<dim>d-<bits>b-g<group>' (vector "
        f"codebooks, dim (2, 4), bits (2, 3)); groups {GROUP_SIZES}"
    )
    example = "nf4-g64"

    def parse(self, text: str) -> Format | None:
        """A format from its name; None for a name outside the family's patterns."""
        match = _NF_NAME.match(text)
        if match:
            return NormalFloatFormat(int(match[1]), int(match[2]))
        match = _LM_NAME.match(text)
        if match:
            if match[2] not in _LM_KINDS:
                raise BitallocError(
                    f"Lloyd-Max format {text!r}: use -t (one codebook per tensor) or -r (one "
                    "per row), e.g. lm3-t-g128"
                )
            return LloydMaxFormat(int(match[1]), int(match[3]), _LM_KINDS[match[2]])
        return parse_vq(text)

    def members(self) -> tuple[Format, ...]:
        """NF at every group, Lloyd-Max at groups 64 and 128, and the listed vector formats."""
        nf = [NormalFloatFormat(b, g) for b in NF_BITS for g in GROUP_SIZES]
        lm = [
            LloydMaxFormat(b, g, per_row)
            for per_row in (False, True)
            for b in LM_BITS
            for g in LM_MEMBER_GROUP_SIZES
        ]
        return (*nf, *lm, *vq_members())

    def default_members(self) -> tuple[Format, ...]:
        """None: the family is opt-in."""
        return ()
