"""More bits never predict more loss: the fix-up every profile table gets.

A leaf module (numpy only) so that :mod:`bitalloc.sensitivity.profile` can repair a loaded
table without importing any measuring code. Formats are read by duck typing (``bits``,
``group_size``, ``is_float``), so no format module is imported either.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def bit_chains(palette: Sequence[Any]) -> list[list[int]]:
    """Column indices that must not increase, one chain per group size, fewest bits first.

    A chain holds the palette's columns sharing the group size of some integer format (a
    format is integer when ``is_float`` is false). Entries without ``bits`` and ``group_size``
    (KV pairs, families that define neither) belong to no chain.
    """
    usable = [
        j
        for j, f in enumerate(palette)
        if hasattr(f, "bits") and hasattr(f, "group_size") and hasattr(f, "is_float")
    ]
    groups = {palette[j].group_size for j in usable if not palette[j].is_float}
    chains = []
    for group in groups:
        cols = sorted(
            (j for j in usable if palette[j].group_size == group), key=lambda j: palette[j].bits
        )
        if len(cols) > 1:
            chains.append(cols)
    return chains


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
