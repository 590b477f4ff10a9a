"""The profile: a units x formats table of predicted loss increase plus its metadata.

Profiles are expensive and solves are cheap, so profiles are saved (JSON, written atomically)
and cached on disk keyed by everything that determines them.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bitalloc.errors import BitallocError
from bitalloc.fileio import read_json, write_json_atomic

PROFILE_VERSION = 1


@dataclass(frozen=True)
class Profile:
    """Predicted loss increase ``loss[i, j]`` of unit ``units[i]`` under format ``formats[j]``.

    ``metadata`` records the method, fingerprints of the model, palette and calibration text,
    tokens used, skipped batches and wall time.
    """

    units: tuple[str, ...]
    formats: tuple[str, ...]
    loss: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        loss = np.asarray(self.loss, dtype=np.float64)
        if loss.shape != (len(self.units), len(self.formats)):
            raise BitallocError(
                f"profile table has shape {loss.shape}, expected "
                f"({len(self.units)} units, {len(self.formats)} formats)"
            )
        bad = np.argwhere(~np.isfinite(loss))
        if bad.size:
            i, j = bad[0]
            raise BitallocError(
                f"profile value for {self.units[i]} under {self.formats[j]} is {loss[i, j]}; "
                "re-run profiling (non-finite sensitivities cannot be solved)"
            )
        loss.setflags(write=False)
        object.__setattr__(self, "loss", loss)

    def column(self, fmt: str) -> np.ndarray:
        """Predicted loss of every unit under one format."""
        if fmt not in self.formats:
            raise BitallocError(f"format {fmt!r} is not in this profile ({list(self.formats)})")
        return self.loss[:, self.formats.index(fmt)]

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (see :meth:`from_json`)."""
        return {
            "version": PROFILE_VERSION,
            "units": list(self.units),
            "formats": list(self.formats),
            "loss": self.loss.tolist(),
            "metadata": self.metadata,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Profile:
        """Inverse of :meth:`to_json`; malformed data raises :class:`BitallocError`."""
        try:
            if data.get("version") != PROFILE_VERSION:
                raise BitallocError(f"profile version {data.get('version')} is not supported")
            return cls(
                units=tuple(data["units"]),
                formats=tuple(data["formats"]),
                loss=np.asarray(data["loss"], dtype=np.float64),
                metadata=dict(data.get("metadata", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BitallocError(f"malformed profile: {exc}") from None

    def save(self, path: str | Path) -> None:
        """Write the profile as JSON, atomically."""
        write_json_atomic(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        """Read a profile written by :meth:`save`."""
        return cls.from_json(read_json(Path(path), "profile"))


def cache_key(parts: dict[str, Any]) -> str:
    """A stable hash of everything that determines a profile."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def finite_or_none(x: float | None) -> float | None:
    """JSON has no NaN/inf: map them to None."""
    return None if x is None or not math.isfinite(x) else float(x)
