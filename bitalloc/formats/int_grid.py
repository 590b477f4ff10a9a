"""The integer grid under every ``int`` format: codes with per-group scales and zeros
(:class:`QuantizedWeight`), their stored form and dequantization, and the clipping search that
chooses each group's scale and zero (:func:`_search`, over groups cut by :func:`_split`).

:mod:`bitalloc.formats.integer` (the formats) and :mod:`bitalloc.formats.int_columns` (the same
grid one column at a time, for ``+gptq``) both build on it.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from bitalloc.errors import BitallocError
from bitalloc.formats.encoding import Encoded, pack_codes, pack_fp16

if TYPE_CHECKING:
    from bitalloc.formats.integer import QuantFormat

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
