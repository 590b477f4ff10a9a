"""The vector members of the ``codebook`` family, ``vq{d}d-{R}b-g{g}``, and the fitting every
member of the family shares: per-group fp16 absmax scales and 1-D weighted Lloyd-Max
(:func:`lloyd_fit`; :mod:`bitalloc.formats.codebook` has the scalar formats and the family).

A vector format keeps one codebook of ``2**(d R)`` fp16 vectors of ``d`` weights per tensor, at
``R`` bits per weight (VPTQ, Liu et al. 2024, "VPTQ: Extreme Low-bit Vector Post-Training
Quantization for Large Language Models"; Q-Palette, Lee et al. 2025, "Q-Palette: Fractional-Bit
Quantizers Toward Optimal Bit Allocation for Efficient LLM Deployment", on offering an allocator
such fractional-bit quantizers). The weight is divided by an fp16 absmax scale per group of ``g``
consecutive weights of a row; each run of ``d`` consecutive input columns of a row (inside one
group, as ``d`` divides ``g``) is one vector, stored as the index of a codebook entry: a code of
``d * R`` bits. For a weight of shape (out, in)::

    bits = out * in * R + out * (in / g) * 16 + 2**(d R) * d * 16

that is ``R + 16 / g + 2**(d R) * d * 16 / (out * in)`` bits per weight: ``vq4d-2b-g64`` on a
1536 x 576 weight is 2.25 + 16384 / 884736 = 2.2685. ``in`` must be a multiple of ``g`` (and so
of ``d``; 576 is one of 64 but not of 128), and the weight must hold at least as many vectors as
the codebook has entries; :class:`~bitalloc.errors.BitallocError` says so otherwise. Codes wider
than 8 bits (``vq4d-3b``: 12) are stored as two sections, their low 8 bits and the rest.

Supported: ``d`` in (2, 4), ``R`` in (2, 3) (16, 64, 256 and 4096 entries), ``g`` in (32, 64,
128). The family lists ``vq2d-2b``, ``vq2d-3b`` and ``vq4d-2b`` at g64 and g128; ``vq4d-3b``
parses but is not listed: its 4096-entry codebook (262144 bits) needs 16384 weights to fit at all
(none of the contract suite's shapes), costs 0.3 bits per weight on a 1536 x 576 weight, and its
nearest-entry search is 16 times that of ``vq4d-2b``.

The codebook is fitted by weighted k-means (Lloyd's algorithm in ``d`` dimensions) on a sample of
:data:`FIT_PER_ENTRY` vectors per entry (at least :data:`FIT_VECTORS_MIN`, at most
:data:`FIT_VECTORS`, all when the weight has fewer) drawn with a generator seeded by
:data:`SEED`; then every vector takes its nearest entry. It starts from the product grid of the
1-D Lloyd-Max levels fitted to the same coordinates, which is scalar quantization at ``R`` bits,
and k-means never raises its error on the vectors it is fitted on; it runs
:data:`KMEANS_ITERATIONS` iterations at most, stopping early when no vector changes entry. An
entry no vector takes keeps its place. As for the scalar codebooks, the distance is the error of
the weight: ``sum_k s**2 * importance[column_k] * (x_k - c_k)**2`` (``importance`` 1 when not
given), so entries are weighted means per coordinate. The same weight gives the same codebook
and codes.

Computation is on the CPU in float32 (sums in float64); the result comes back on the weight's
device and in its dtype.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bitalloc.errors import BitallocError
from bitalloc.formats.base import Format, check_importance
from bitalloc.formats.encoding import (
    Encoded,
    Section,
    pack_codes,
    pack_fp16,
    unpack_codes,
    unpack_fp16,
)
from bitalloc.formats.integer import _check_shape

FAMILY = "codebook"
SCALE_BITS = 16  # one fp16 scale per group
GROUP_SIZES = (32, 64, 128)
LLOYD_ITERATIONS = 60
# Lloyd stops once no level moves by more than this, or after LLOYD_ITERATIONS: the levels
# are stored in fp16, whose spacing is 1e-3 near 1 and 3e-5 near 0.05.
LLOYD_TOLERANCE = 1e-6
INIT_BINS = 64
# The smallest normal and the largest finite fp16: a scale outside would flush to 0 or overflow.
_FP16_TINY = 2.0**-14
_FP16_MAX = 65504.0

VQ_DIMS = (2, 4)
VQ_RATES = (2, 3)
MEMBER_SPECS = ((2, 2), (2, 3), (4, 2))  # (dim, rate) listed by the family
MEMBER_GROUPS = (64, 128)
FIT_VECTORS = 65536
FIT_VECTORS_MIN = 16384
FIT_PER_ENTRY = 128
KMEANS_ITERATIONS = 16
SEED = 0
# Distance-matrix elements per assignment step: one reused buffer of 16 MiB. Smaller steps
# stay in cache but multiply the calls, each of which may wait for a second thread on a busy
# machine (1 MiB steps: 2x slower there, no faster on one idle thread).
_CHUNK_ELEMENTS = 1 << 22
_VQ_NAME = re.compile(r"^vq(\d+)d-(\d+)b-g(\d+)$")


def fp16_scales(absmax: torch.Tensor) -> torch.Tensor:
    """``absmax`` as the fp16 scales stored (float32 values), kept normal and finite."""
    return absmax.clamp(_FP16_TINY, _FP16_MAX).to(torch.float16).to(torch.float32)


def group_scales(weight: torch.Tensor, group: int) -> torch.Tensor:
    """fp16 absmax scale (float32 values) of each group of ``group`` columns: (out, n_groups),
    the last group possibly shorter."""
    out_features, in_features = weight.shape
    n_groups = math.ceil(in_features / group)
    padded = torch.zeros(out_features, n_groups * group, dtype=torch.float32)
    padded[:, :in_features] = weight.abs()
    return fp16_scales(padded.view(out_features, n_groups, group).amax(-1))


def expand_groups(scales: torch.Tensor, group: int, in_features: int) -> torch.Tensor:
    """(out, n_groups) per-group values repeated over their columns: (out, in)."""
    return scales.repeat_interleave(group, dim=1)[:, :in_features]


def checked_weight(weight: torch.Tensor, name: str) -> torch.Tensor:
    """``weight`` in float32 (detached, on the CPU), refusing NaN and inf: a codebook cannot be
    fitted to them."""
    w = weight.detach().to(device="cpu", dtype=torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise BitallocError(f"{name} cannot quantize a weight with NaN or inf values; fix them")
    return w


def lloyd_fit(
    values: torch.Tensor,
    weights: torch.Tensor,
    count: int,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted 1-D Lloyd-Max levels, ``count`` per row of ``values`` (rows, n): (rows, count)
    float64, ascending.

    Each iteration sets the cells' bounds at the midpoints of the levels and every level at its
    cell's weighted mean (a level whose cell holds no weight stays). Lloyd's iteration stops in a
    local optimum that depends on its start, so it runs from several and each row keeps the
    better: first from the quantiles of the weights' density raised to the power 1/3 (the point
    density of an optimal quantizer with many levels, Panter and Dite 1951, estimated on
    :data:`INIT_BINS` bins of the row's range), then from ``start`` (levels, (1 or rows, count))
    when given, else from the plain weighted quantiles at (k + 1/2) / count; the second wins
    only when strictly better. Rows with no weight at all are fitted unweighted.
    """
    # Sorted in the values' own precision (float32 sorts at twice the speed), summed in float64.
    order = values.sort(dim=1)
    x = order.values.to(torch.float64)
    w = weights.to(torch.float64).gather(1, order.indices)
    w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))
    # Prefix sums: a cell's weight and weighted sum are two differences, whatever its size.
    sums = torch.nn.functional.pad(torch.stack([w, w * x]).cumsum(2), (1, 0))
    cum_w = sums[0]
    targets = ((torch.arange(count, dtype=torch.float64) + 0.5) / count).expand(x.shape[0], -1)
    starts = [_companded_start(x, cum_w, targets)]
    if start is None:
        quantile = torch.searchsorted(cum_w[:, 1:].contiguous(), targets * cum_w[:, -1:])
        starts.append(x.gather(1, quantile.clamp(max=x.shape[1] - 1)))
    else:
        starts.append(start.to(torch.float64).expand(x.shape[0], -1).sort(dim=1).values)
    best, best_cost = _lloyd(x, sums, starts[0])
    for levels in starts[1:]:
        levels, cost = _lloyd(x, sums, levels)
        better = cost < best_cost
        best = torch.where(better[:, None], levels, best)
        best_cost = torch.where(better, cost, best_cost)
    return best


def _companded_start(x: torch.Tensor, cum_w: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Levels at ``targets`` (fractions) of the cumulative weighted density to the power 1/3,
    the density estimated on :data:`INIT_BINS` equal bins of each row's range of ``x``."""
    lo, hi = x[:, :1], x[:, -1:]
    edges = lo + (hi - lo) * (torch.arange(INIT_BINS + 1, dtype=torch.float64) / INIT_BINS)
    cuts = torch.searchsorted(x, edges.contiguous())
    cuts[:, 0], cuts[:, -1] = 0, x.shape[1]
    mass = (cum_w.gather(1, cuts[:, 1:]) - cum_w.gather(1, cuts[:, :-1])).clamp(min=0)
    cdf = torch.cat([torch.zeros_like(lo), mass.pow(1 / 3).cumsum(1)], dim=1)
    cdf = cdf / cdf[:, -1:].clamp(min=1e-300)
    # The bin each target falls in, and where inside it (the cdf is linear within a bin).
    bins = torch.searchsorted(cdf[:, 1:].contiguous(), targets.contiguous())
    bins = bins.clamp(max=INIT_BINS - 1)
    below, above = cdf.gather(1, bins), cdf.gather(1, bins + 1)
    inside = ((targets - below) / (above - below).clamp(min=1e-300)).clamp(0, 1)
    return lo + (hi - lo) * (bins + inside) / INIT_BINS


def _lloyd(
    x: torch.Tensor, sums: torch.Tensor, levels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's iteration from ``levels`` on the sorted rows ``x`` (rows, n), with ``sums``
    their prefix sums of weights and weighted values (2, rows, n + 1) (see :func:`lloyd_fit`):
    the levels and each row's weighted squared error less its constant ``sum w x**2``."""
    rows, n = x.shape
    cuts = torch.zeros(rows, levels.shape[1] + 1, dtype=torch.int64)
    cuts[:, -1] = n

    def cells(levels: torch.Tensor) -> torch.Tensor:
        mids = (levels[:, :-1] + levels[:, 1:]).mul_(0.5)
        # Values up to a midpoint fall in the lower cell, as :func:`nearest` rounds them.
        cuts[:, 1:-1] = torch.searchsorted(x, mids, right=True)
        return sums.gather(2, cuts.expand(2, -1, -1)).diff(dim=2)  # weight, weighted sum

    for _ in range(LLOYD_ITERATIONS):
        cell_w, cell_wx = cells(levels)
        # A cell with no weight divides by zero; where() keeps its level instead. Means of
        # ordered cells are ordered; only a kept level can fall out of order.
        moved = torch.where(cell_w > 0, cell_wx / cell_w, levels)
        if not bool((moved[:, 1:] >= moved[:, :-1]).all()):
            moved = moved.sort(dim=1).values
        step = float((moved - levels).abs_().max())
        levels = moved
        if step <= LLOYD_TOLERANCE:
            break
    cell_w, cell_wx = cells(levels)
    return levels, (levels.square() * cell_w - 2 * levels * cell_wx).sum(1)


@dataclass(frozen=True)
class VectorFormat(Format):
    """``vq{dim}d-{rate}b-g{group}``: a per-tensor codebook of ``2**(dim * rate)`` fp16 vectors
    of ``dim`` consecutive weights, with an fp16 absmax scale per group of ``group``."""

    dim: int
    rate: int
    group: int

    def __post_init__(self) -> None:
        for kind, value, choices in (
            ("vector dimension", self.dim, VQ_DIMS),
            ("rate (bits per weight)", self.rate, VQ_RATES),
            ("group size", self.group, GROUP_SIZES),
        ):
            if value not in choices:
                raise BitallocError(
                    f"vector codebook: unsupported {kind} {value}; choose one of {choices}"
                )

    @property
    def name(self) -> str:
        """``vq4d-2b-g128`` style."""
        return f"vq{self.dim}d-{self.rate}b-g{self.group}"

    @property
    def family(self) -> str:
        """``codebook``."""
        return FAMILY

    @property
    def nominal_bits(self) -> float:
        """``rate + 16 / group`` (the codebook's share depends on the shape)."""
        return self.rate + SCALE_BITS / self.group

    @property
    def is_float(self) -> bool:
        """False: the weight is quantized."""
        return False

    @property
    def code_bits(self) -> int:
        """Bits of one code, ``dim * rate``."""
        return self.dim * self.rate

    @property
    def entries(self) -> int:
        """Codebook entries, ``2**(dim * rate)``."""
        return 2**self.code_bits

    def check_shape(self, shape: Sequence[int]) -> tuple[int, int]:
        """``(out, in)`` with ``in`` a multiple of the group and enough vectors to fit."""
        out_features, in_features = _check_shape(shape)
        if in_features % self.group:
            raise BitallocError(
                f"{self.name} needs an input width that is a multiple of its group "
                f"{self.group}, got {in_features}; choose a group that divides it"
            )
        vectors = out_features * in_features // self.dim
        if vectors < self.entries:
            raise BitallocError(
                f"{self.name} fits a codebook of {self.entries} entries to {vectors} vectors of "
                f"a ({out_features}, {in_features}) weight: a codebook cannot have more entries "
                "than the vectors it is fitted on; use a lower rate or dimension"
            )
        return out_features, in_features

    def storage_bits(self, shape: Sequence[int]) -> int:
        """Codes, one fp16 scale per group, and the fp16 codebook."""
        out_features, in_features = self.check_shape(shape)
        codes = out_features * in_features * self.rate
        scales = out_features * (in_features // self.group) * SCALE_BITS
        return codes + scales + self.entries * self.dim * SCALE_BITS

    def quantize(
        self, weight: torch.Tensor, importance: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes (out * in / dim,), float32 fp16-valued scales (out, in / group) and codebook
        (entries, dim) of ``weight``."""
        _, in_features = self.check_shape(tuple(weight.shape))
        imp = check_importance(importance, in_features)
        w = checked_weight(weight, self.name)
        scales = group_scales(w, self.group)
        expanded = expand_groups(scales, self.group, in_features)
        # An all-zero importance weighs nothing: the fit falls back to the plain error.
        weighted = imp is not None and bool(imp.sum() > 0)
        weights = expanded.square() * imp if weighted else expanded.square()
        vectors = (w / expanded).reshape(-1, self.dim)
        weights = weights.reshape(-1, self.dim)
        book = kmeans_codebook(vectors, weights, self.rate, weighted)
        return assign(vectors, weights if weighted else None, book), scales, book

    def _dequantize(
        self, codes: torch.Tensor, scales: torch.Tensor, book: torch.Tensor
    ) -> torch.Tensor:
        out_features = scales.shape[0]
        values = book[codes].reshape(out_features, -1)
        return values * expand_groups(scales, self.group, values.shape[1])

    def fake_quantize(
        self, weight: torch.Tensor, importance: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``scale * codebook[code]`` in ``weight``'s dtype; ``importance`` weights the fit and
        the choice of entries."""
        codes, scales, book = self.quantize(weight, importance)
        return self._dequantize(codes, scales, book).to(weight.device, weight.dtype)

    def encode(self, weight: torch.Tensor) -> Encoded:
        """Codes at ``dim * rate`` bits, fp16 scales and the fp16 codebook."""
        shape = self.check_shape(tuple(weight.shape))
        codes, scales, book = self.quantize(weight)
        sections = (
            *pack_wide_codes("codes", codes, self.code_bits),
            pack_fp16("scales", scales),
            pack_fp16("codebook", book),
        )
        return Encoded(self.name, shape, sections)

    def decode(self, encoded: Encoded) -> torch.Tensor:
        """The float32 weight :meth:`encode` stored."""
        if encoded.format_name != self.name:
            raise BitallocError(
                f"an encoding of {encoded.format_name} cannot be decoded as {self.name}"
            )
        out_features, in_features = self.check_shape(encoded.shape)
        count = out_features * in_features // self.dim
        codes = unpack_wide_codes(encoded, "codes", count, self.code_bits)
        scales = unpack_fp16(encoded.section("scales")).to(torch.float32)
        book = unpack_fp16(encoded.section("codebook")).to(torch.float32)
        return self._dequantize(
            codes, scales.reshape(out_features, -1), book.reshape(self.entries, self.dim)
        )


def pack_wide_codes(name: str, codes: torch.Tensor, bits: int) -> tuple[Section, ...]:
    """Codes of up to 16 bits: one section when they fit in 8, else ``<name>_lo`` (low 8 bits)
    and ``<name>_hi`` (the other ``bits - 8``); exactly ``bits`` per code either way."""
    if bits <= 8:
        return (pack_codes(name, codes, bits),)
    if bits > 16:
        raise BitallocError(f"codes are packed at up to 16 bits each, got {bits}")
    codes = codes.to(torch.int64)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise BitallocError(f"section {name!r} has codes outside [0, {2**bits - 1}]")
    return (
        pack_codes(f"{name}_lo", codes & 255, 8),
        pack_codes(f"{name}_hi", codes >> 8, bits - 8),
    )


def unpack_wide_codes(encoded: Encoded, name: str, count: int, bits: int) -> torch.Tensor:
    """The ``count`` codes :func:`pack_wide_codes` stored under ``name``, flat int64."""
    if bits <= 8:
        return unpack_codes(encoded.section(name), count, bits)
    low = unpack_codes(encoded.section(f"{name}_lo"), count, 8)
    high = unpack_codes(encoded.section(f"{name}_hi"), count, bits - 8)
    return low | (high << 8)


def assign(vectors: torch.Tensor, weights: torch.Tensor | None, book: torch.Tensor) -> torch.Tensor:
    """Index of the entry of ``book`` (K, d) nearest each of ``vectors`` (n, d): flat int64
    (n,), the first of equally near ones. ``weights`` (n, d) weighs each coordinate's squared
    difference; None when every coordinate of a vector weighs the same (a factor per vector
    does not change its nearest entry)."""
    # sum_k w (x - c)**2 = sum_k w x**2 - 2 sum_k (w x) c + sum_k w c**2. The first term is the
    # same for every entry; the others are one matrix product of [w, w x] with [c**2, -2 c]
    # ([x, 1] with [-2 c, |c|**2] when w is 1).
    if weights is None:
        left = torch.cat([vectors, torch.ones(vectors.shape[0], 1)], dim=1)
        right = torch.cat([-2 * book.T, book.square().sum(1)[None]], dim=0)
    else:
        left = torch.cat([weights, weights * vectors], dim=1)
        right = torch.cat([book.square().T, -2 * book.T], dim=0)
    step = max(1, _CHUNK_ELEMENTS // book.shape[0])
    buffer = torch.empty(min(step, vectors.shape[0]), book.shape[0])
    codes = torch.empty(vectors.shape[0], dtype=torch.int64)
    for start in range(0, vectors.shape[0], step):
        part = left[start : start + step]
        distance = torch.mm(part, right, out=buffer[: part.shape[0]])
        # min's indices (the first minimum, like argmin) cost less than argmin here.
        codes[start : start + step] = distance.min(1).indices
    return codes


def kmeans_codebook(
    vectors: torch.Tensor, weights: torch.Tensor, rate: int, weighted_distance: bool
) -> torch.Tensor:
    """The fp16 codebook (float32 values, (2**(d rate), d)) fitted by weighted k-means to
    ``vectors`` (n, d) with per-coordinate ``weights`` from the product grid of 1-D Lloyd-Max
    levels (module docstring). ``weighted_distance`` False: the coordinates of a vector weigh
    the same, so vectors are assigned by plain distance."""
    count, dim = vectors.shape
    entries = 2 ** (rate * dim)
    fit = min(FIT_VECTORS, max(FIT_VECTORS_MIN, FIT_PER_ENTRY * entries))
    if count > fit:
        generator = torch.Generator().manual_seed(SEED)
        pick = torch.randperm(count, generator=generator)[:fit].sort().values
        vectors, weights = vectors[pick], weights[pick]
    levels = lloyd_fit(vectors.reshape(1, -1), weights.reshape(1, -1), 2**rate)[0]
    book = torch.cartesian_prod(*[levels.to(torch.float32)] * dim)
    distance_weights = weights if weighted_distance else None
    codes = assign(vectors, distance_weights, book)
    wx = (weights * vectors).to(torch.float64)
    mass_w = weights.to(torch.float64)
    for _ in range(KMEANS_ITERATIONS):
        sums = torch.zeros(book.shape, dtype=torch.float64).index_add_(0, codes, wx)
        mass = torch.zeros(book.shape, dtype=torch.float64).index_add_(0, codes, mass_w)
        book = torch.where(mass > 0, sums / mass.clamp(min=1e-300), book.double()).float()
        moved = assign(vectors, distance_weights, book)
        if torch.equal(moved, codes):
            break
        codes = moved
    return book.to(torch.float16).to(torch.float32)


def parse_vq(text: str) -> VectorFormat | None:
    """``vq2d-3b-g128`` to ``VectorFormat(2, 3, 128)``; None for other names."""
    match = _VQ_NAME.match(text)
    if not match:
        return None
    return VectorFormat(int(match[1]), int(match[2]), int(match[3]))


def vq_members() -> tuple[VectorFormat, ...]:
    """The vector formats the family lists (see the module docstring)."""
    return tuple(VectorFormat(d, r, g) for d, r in MEMBER_SPECS for g in MEMBER_GROUPS)
