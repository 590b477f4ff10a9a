"""The profile: a units x formats table of predicted loss increase plus its metadata.

Profiles are expensive and solves are cheap, so profiles are saved (JSON, written atomically)
and cached on disk keyed by everything that determines them.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from bitalloc.errors import BitallocError
from bitalloc.fileio import read_json, write_atomic, write_json_atomic
from bitalloc.sensitivity.interactions import Interactions

PROFILE_VERSION = 1
SAFETENSORS_SUFFIX = ".safetensors"


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
    interactions: Interactions | None = None

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
        if self.interactions is not None:
            known = set(self.units)
            stray = [u for pair in self.interactions.pairs for u in pair if u not in known]
            if stray:
                raise BitallocError(
                    f"interaction terms name {stray[0]!r}, which is not a unit of this profile; "
                    "they were measured on another model"
                )

    def with_metadata(self, **extra: Any) -> Profile:
        """The same profile with metadata entries added or replaced."""
        return replace(self, metadata={**self.metadata, **extra})

    def with_interactions(self, interactions: Interactions | Profile | None) -> Profile:
        """This profile's table with pairwise terms from another measurement or profile (an
        allocation may combine one profiler's table with another run's interactions)."""
        if isinstance(interactions, Profile):
            if interactions.interactions is None:
                raise BitallocError("that profile holds no interaction terms")
            interactions = interactions.interactions
        return replace(self, interactions=interactions)

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
            "interactions": None if self.interactions is None else self.interactions.to_json(),
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
                interactions=(
                    None
                    if data.get("interactions") is None
                    else Interactions.from_json(data["interactions"])
                ),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BitallocError(f"malformed profile: {exc}") from None

    def save(self, path: str | Path) -> None:
        """Write the profile atomically: safetensors (the table as a float64 tensor, everything
        else as JSON in the header) when ``path`` ends in ``.safetensors``, else JSON."""
        path = Path(path)
        if path.suffix == SAFETENSORS_SUFFIX:
            data = self.to_json()
            table = np.ascontiguousarray(self.loss)
            data["loss"] = None
            blob = save_safetensors(
                {"loss": table}, metadata={"bitalloc_profile": json.dumps(data)}
            )
            write_atomic(path, lambda fh: fh.write(blob))
        else:
            write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        """Read a profile written by :meth:`save` (JSON or safetensors, by file content)."""
        path = Path(path)
        if path.suffix != SAFETENSORS_SUFFIX:
            return cls.from_json(read_json(path, "profile"))
        if not path.is_file():
            raise BitallocError(f"profile file {path} does not exist")
        try:
            tensors = load_safetensors(path.read_bytes())
            with safe_open(path, framework="np") as fh:
                header = fh.metadata() or {}
            data = json.loads(header["bitalloc_profile"])
            data["loss"] = tensors["loss"]
        except (KeyError, ValueError, OSError, SafetensorError) as exc:
            raise BitallocError(
                f"{path} is not a bitalloc profile in safetensors format ({exc})"
            ) from None
        return cls.from_json(data)


def cache_key(parts: dict[str, Any]) -> str:
    """A stable hash of everything that determines a profile."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def finite_or_none(x: float | None) -> float | None:
    """JSON has no NaN/inf: map them to None."""
    return None if x is None or not math.isfinite(x) else float(x)
