"""The record of measured pairwise interaction terms (:class:`Interactions`).

A leaf (numpy only), so that a :class:`~bitalloc.sensitivity.profile.Profile` carrying terms
can be loaded without importing the code that measures them
(:mod:`bitalloc.sensitivity.interactions`, whose module docstring explains the terms).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bitalloc.errors import BitallocError

#: The smallest coefficient kept: a pair's predicted increase then never falls below zero.
RHO_MIN = -1.0


@dataclass(frozen=True)
class Interactions:
    """Measured pairwise terms. ``pair_increase[p, f]`` is the interaction of ``pairs[p]`` with
    both units in ``formats[f]``; ``single_increase[p, s, f]`` the single-unit increase of
    unit ``s`` (0 = a, 1 = b) of that pair."""

    pairs: tuple[tuple[str, str], ...]
    formats: tuple[str, ...]
    pair_increase: np.ndarray
    single_increase: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        pairs = tuple((str(a), str(b)) for a, b in self.pairs)
        shape = (len(pairs), len(self.formats))
        pair = np.asarray(self.pair_increase, dtype=np.float64).reshape(shape)
        single = np.asarray(self.single_increase, dtype=np.float64).reshape(
            (len(pairs), 2, len(self.formats))
        )
        if not (np.isfinite(pair).all() and np.isfinite(single).all()):
            raise BitallocError("interaction terms must be finite; re-measure them")
        for a, b in pairs:
            if a == b:
                raise BitallocError(f"interaction pair ({a}, {b}) pairs a unit with itself")
        for arr in (pair, single):
            arr.setflags(write=False)
        object.__setattr__(self, "pairs", pairs)
        object.__setattr__(self, "formats", tuple(self.formats))
        object.__setattr__(self, "pair_increase", pair)
        object.__setattr__(self, "single_increase", single)

    @property
    def rho(self) -> np.ndarray:
        """Per-pair coefficient of ``sqrt(L_a L_b)`` fitted to the measured terms."""
        scale = np.sqrt(np.maximum(self.single_increase[:, 0] * self.single_increase[:, 1], 0))
        num = (self.pair_increase * scale).sum(axis=1)
        den = (scale * scale).sum(axis=1)
        rho = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
        return np.maximum(rho, RHO_MIN)

    def tables(
        self, unit_names: Sequence[str], formats: Sequence[str], loss: np.ndarray
    ) -> dict[tuple[str, str], np.ndarray]:
        """``{(a, b): k x k table}`` for a problem over ``unit_names`` x ``formats`` whose
        objective is ``loss`` (units x formats)."""
        index = {name: i for i, name in enumerate(unit_names)}
        missing = sorted({u for pair in self.pairs for u in pair if u not in index})
        if missing:
            raise BitallocError(
                f"interaction terms name units the profile does not have (first: {missing[0]!r});"
                " they were measured on another model"
            )
        loss = np.maximum(np.asarray(loss, dtype=np.float64), 0.0)
        out = {}
        for (a, b), rho in zip(self.pairs, self.rho):
            out[(a, b)] = rho * np.sqrt(np.outer(loss[index[a]], loss[index[b]]))
        return out

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (see :meth:`from_json`)."""
        return {
            "pairs": [list(p) for p in self.pairs],
            "formats": list(self.formats),
            "pair_increase": self.pair_increase.tolist(),
            "single_increase": self.single_increase.tolist(),
            "metadata": self.metadata,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Interactions:
        """Inverse of :meth:`to_json`; malformed data raises :class:`BitallocError`."""
        try:
            return cls(
                pairs=tuple(tuple(p) for p in data["pairs"]),
                formats=tuple(data["formats"]),
                pair_increase=np.asarray(data["pair_increase"], dtype=np.float64),
                single_increase=np.asarray(data["single_increase"], dtype=np.float64),
                metadata=dict(data.get("metadata", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BitallocError(f"malformed interaction terms: {exc}") from None


__all__ = ["RHO_MIN", "Interactions"]
