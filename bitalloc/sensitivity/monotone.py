"""More bits never predict more loss: the fix-up every profile table gets.

A leaf module (numpy only) so that :mod:`bitalloc.sensitivity.profile` can repair a loaded
table without importing any measuring code. Formats are read by duck typing (their ``ladder``,
see :attr:`bitalloc.formats.Format.ladder`), so no format module is imported either.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def bit_chains(palette: Sequence[Any]) -> list[list[int]]:
    """Column indices that must not increase, one chain per ladder (``int-g128``: the int
    formats of group size 128), lowest rank first.

    Entries without a ``ladder`` (fp16, KV pairs, formats on no ladder) belong to no chain.
    """
    ladders: dict[str, list[tuple[float, int]]] = {}
    for j, fmt in enumerate(palette):
        rung = getattr(fmt, "ladder", None)
        if rung is not None:
            ladders.setdefault(rung[0], []).append((rung[1], j))
    return [[j for _, j in sorted(rungs)] for rungs in ladders.values() if len(rungs) > 1]


def cap_chains(
    table: np.ndarray,
    chains: Sequence[Sequence[int]],
    allowed: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """Cap each chain's column at the least value of the columns before it; returns a new table
    and how many entries were lowered.

    ``allowed`` (a bool table of the same shape, None: all) marks the entries that stand for a
    format the unit can take; the others are placeholders, which neither cap nor are capped.
    """
    out = np.array(table, dtype=np.float64, copy=True)
    mask = np.ones(out.shape, dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool)
    fixed = 0
    for cols in chains:
        running = np.full(out.shape[0], np.inf)
        for j in cols:
            # More bits never make a weight worse to represent. A higher value is an artefact
            # of the clipping search (it minimises a per-group error, not the loss) and of
            # measurement noise (about 1e-5 nats).
            lower = mask[:, j] & (out[:, j] > running)
            fixed += int(lower.sum())
            out[:, j] = np.where(lower, running, out[:, j])
            running = np.where(mask[:, j], np.minimum(running, out[:, j]), running)
    return out, fixed


def monotone_in_bits(
    table: np.ndarray, palette: Sequence[Any], allowed: np.ndarray | None = None
) -> tuple[np.ndarray, int]:
    """Cap each value at the least value of the rungs below it on its ladder; returns the table
    and how many entries were lowered (``allowed``: see :func:`cap_chains`)."""
    return cap_chains(table, bit_chains(palette), allowed)


def allowed_by_shapes(
    shapes: Sequence[Sequence[int]] | None, palette: Sequence[Any]
) -> np.ndarray | None:
    """Which format can store which of the units of ``shapes`` (None when the shapes are not
    known, e.g. a profile without ``unit_info``); formats without ``allows`` take every unit."""
    if shapes is None:
        return None
    return np.array(
        [[not hasattr(f, "allows") or f.allows(tuple(s)) for f in palette] for s in shapes],
        dtype=bool,
    ).reshape(len(shapes), len(palette))


def unit_shapes(metadata: Any, n_units: int) -> list[tuple[int, ...]] | None:
    """The unit shapes a profile's metadata records (``unit_info``), or None."""
    info = metadata.get("unit_info") if isinstance(metadata, dict) else None
    if not isinstance(info, list) or len(info) != n_units:
        return None
    try:
        return [tuple(int(d) for d in entry["shape"]) for entry in info]
    except (KeyError, TypeError, ValueError):
        return None
