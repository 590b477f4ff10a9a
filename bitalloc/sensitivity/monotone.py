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


def cap_chains(table: np.ndarray, chains: Sequence[Sequence[int]]) -> tuple[np.ndarray, int]:
    """Cap each chain's column at the previous column's value; returns a new table and how many
    entries were lowered."""
    out = np.array(table, dtype=np.float64, copy=True)
    fixed = 0
    for cols in chains:
        for prev, j in zip(cols, cols[1:]):
            # More bits never make a weight worse to represent. A higher value is an artefact:
            # the clipping search minimises plain (not weighted) squared error, and measured
            # values carry noise of about 1e-5 nats.
            lower = out[:, j] > out[:, prev]
            fixed += int(lower.sum())
            out[:, j] = np.minimum(out[:, j], out[:, prev])
    return out, fixed


def monotone_in_bits(table: np.ndarray, palette: Sequence[Any]) -> tuple[np.ndarray, int]:
    """Cap each value at the value of fewer bits with the same group size; returns the table and
    how many entries were lowered."""
    return cap_chains(table, bit_chains(palette))
