"""The record a solver returns: :class:`Solution`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bitalloc.errors import BitallocError


def _read_only(array: np.ndarray) -> np.ndarray:
    # Copy first so the caller's array is neither frozen nor able to change ours later.
    out = np.array(array, copy=True)
    out.setflags(write=False)
    return out


def _jsonable(value: Any) -> Any:
    """Plain-Python copy of ``value`` that :func:`json.dumps` accepts (non-finite -> None)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    return str(value)


@dataclass(frozen=True, eq=False)
class Solution:
    """What a solver returns.

    Attributes:
        choice: ``(n,)`` int64 option index per unit (read-only).
        objective: Objective at ``choice``.
        resources: Total of every cost table at ``choice``.
        status: ``"optimal"`` when proven optimal (``gap`` within a tiny tolerance),
            otherwise ``"feasible"``. A returned solution is always feasible.
        lower_bound: Certified lower bound on the optimum, or ``None`` if the method has none.
        gap: ``objective - lower_bound`` (>= 0), or ``None`` without a bound.
        wall_time_s: Seconds spent in the solver.
        method: Registered name of the solver.
        info: Method-specific extras (plain numbers and strings).
    """

    choice: np.ndarray
    objective: float
    resources: dict[str, float]
    status: str
    lower_bound: float | None
    gap: float | None
    wall_time_s: float
    method: str
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "choice", _read_only(np.asarray(self.choice, dtype=np.int64)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (``choice`` as a list; non-finite numbers become ``None``)."""
        return {
            "choice": [int(c) for c in self.choice],
            "objective": _jsonable(self.objective),
            "resources": _jsonable(self.resources),
            "status": self.status,
            "lower_bound": _jsonable(self.lower_bound),
            "gap": _jsonable(self.gap),
            "wall_time_s": float(self.wall_time_s),
            "method": self.method,
            "info": _jsonable(self.info),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Solution:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(
                choice=np.asarray(data["choice"], dtype=np.int64),
                objective=float(data["objective"]),
                resources={str(k): float(v) for k, v in data["resources"].items()},
                status=str(data["status"]),
                lower_bound=None if data["lower_bound"] is None else float(data["lower_bound"]),
                gap=None if data["gap"] is None else float(data["gap"]),
                wall_time_s=float(data["wall_time_s"]),
                method=str(data["method"]),
                info=dict(data.get("info", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BitallocError(f"not a serialised Solution: {exc!r}") from exc
