"""The profile: a units x formats table of predicted loss increase plus its metadata.

Profiles are expensive and solves are cheap, so profiles are saved (JSON, written atomically)
and cached on disk keyed by everything that determines them.

A profile keeps the profiler contract (see :class:`~bitalloc.sensitivity.BaseProfiler`): every
value is finite and never negative, whether the table is built in memory or loaded. A loaded
file must also name each unit and format once (a repeated name would pair one entry's values
with another's cost), and is checked for the contract's last rule, more bits never predict more
loss at the same group size: a value above the same unit's value with fewer bits (noise in a
hand-made or foreign file; every profiler keeps the rule, as its contract test checks) is
lowered to it,
the count is recorded in ``metadata["monotone_fixes_on_load"]`` and a
:class:`ProfileRepairWarning` says so. Columns that are not weight formats (KV pairs) are left
as they are.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from bitalloc.errors import BitallocError
from bitalloc.fileio import (
    file_kind,
    parse_json,
    read_json_object,
    write_atomic,
    write_json_atomic,
)
from bitalloc.sensitivity.interaction_terms import Interactions
from bitalloc.sensitivity.monotone import allowed_by_shapes, monotone_in_bits, unit_shapes

PROFILE_VERSION = 1
SAFETENSORS_SUFFIX = ".safetensors"
#: The metadata entry counting the values a load lowered to keep more bits from predicting more.
MONOTONE_FIXES_ON_LOAD = "monotone_fixes_on_load"
_TOP_LEVEL = {"version", "units", "formats", "loss", "metadata", "interactions"}


class ProfileRepairWarning(UserWarning):
    """A loaded profile broke the profiler contract in a way that was repaired (and recorded in
    its metadata) rather than refused."""


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
        negative = np.argwhere(loss < 0)
        if negative.size:
            i, j = negative[0]
            raise BitallocError(
                f"profile value for {self.units[i]} under {self.formats[j]} is {loss[i, j]}; "
                "a predicted loss increase is never negative (profilers clip noise at 0): "
                "re-run profiling or clip the table"
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
    def from_json(cls, data: Any, where: str = "this document") -> Profile:
        """Inverse of :meth:`to_json`; malformed data raises :class:`BitallocError` (``where``
        names the file in messages). A table that is not monotone in bits is repaired (see the
        module docstring)."""
        if not isinstance(data, dict):
            raise BitallocError(f"{where} is not a profile: its top level is not a JSON object")
        kind = file_kind(data)
        if kind is not None and kind != "profile":
            article = "an" if kind[0] in "aeiou" else "a"
            raise BitallocError(
                f"{where} is {article} {kind}, not a profile; give a profile file (from "
                "`bitalloc profile --out`)"
            )
        missing = [key for key in ("units", "formats", "loss") if key not in data]
        if missing:
            raise BitallocError(
                f"{where} is not a profile: it has no {missing[0]!r} field (a profile holds "
                "units, formats, loss and metadata)"
            )
        try:
            version = data.get("version")
            if type(version) is not int or version != PROFILE_VERSION:
                raise BitallocError(
                    f"{where}: profile version {version!r} is not supported (this bitalloc reads "
                    f"version {PROFILE_VERSION}); re-create the profile"
                )
            stray = sorted(set(data) - _TOP_LEVEL)
            if stray:
                raise BitallocError(f"{where}: unknown field {stray[0]!r} in a profile")
            units = _names(data["units"], "units")
            formats = _names(data["formats"], "formats")
            _unique(units, "unit", "row")
            _unique(formats, "format", "column")
            loss = _table(data["loss"])
            metadata = data.get("metadata", {})
            if not isinstance(metadata, dict):
                raise BitallocError("metadata must be a JSON object")
            terms = data.get("interactions")
            interactions = None if terms is None else _interactions(terms)
            profile = cls(units, formats, loss, dict(metadata), interactions)
        except BitallocError as exc:
            message = str(exc)
            raise BitallocError(
                message if message.startswith(where) else f"{where}: {message}"
            ) from None
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as exc:
            raise BitallocError(f"{where} is a malformed profile: {exc!r}") from None
        return _monotone_on_load(profile, where)

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
        """Read a profile written by :meth:`save` (safetensors when the name ends in
        ``.safetensors``, else JSON). Anything malformed, or a file of another kind, raises
        :class:`BitallocError`."""
        path = Path(path)
        where = str(path)
        if path.suffix != SAFETENSORS_SUFFIX:
            return cls.from_json(read_json_object(path, "profile"), where)
        if not path.is_file():
            raise BitallocError(f"profile file {path} does not exist")
        try:
            blob = path.read_bytes()
        except OSError as exc:
            raise BitallocError(f"cannot read {where}: {exc.strerror or exc}") from None
        return cls.from_json(_safetensors_document(blob, where), where)


def _safetensors_document(blob: bytes, where: str) -> dict[str, Any]:
    """The profile document of a safetensors file, its table put back in as an array."""
    not_ours = f"{where} is not a bitalloc profile in safetensors format"
    if len(blob) < 8:
        raise BitallocError(f"{not_ours} (only {len(blob)} bytes)")
    size = int.from_bytes(blob[:8], "little")
    if size > len(blob) - 8:
        raise BitallocError(f"{not_ours} (its header runs past the end of the file)")
    try:
        header = parse_json(blob[8 : 8 + size], "its header")
    except BitallocError as exc:
        raise BitallocError(f"{not_ours} ({exc})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    text = meta.get("bitalloc_profile") if isinstance(meta, dict) else None
    if not isinstance(text, str):
        raise BitallocError(f"{not_ours} (no bitalloc_profile entry in its metadata)")
    try:
        tensors = load_safetensors(blob)
    except (SafetensorError, ValueError, TypeError, OverflowError, MemoryError) as exc:
        raise BitallocError(f"{not_ours} ({exc})") from None
    table = tensors.get("loss")
    if set(tensors) != {"loss"} or table is None or table.dtype != np.float64 or table.ndim != 2:
        raise BitallocError(f"{not_ours} (it must hold one 2-D float64 tensor named loss)")
    data = parse_json(text, f"the profile header of {where}")
    if not isinstance(data, dict) or data.get("loss", 0) is not None:
        raise BitallocError(f"{not_ours} (its header must leave loss to the tensor)")
    return {**data, "loss": table}


def _names(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BitallocError(f"{what} must be a list of names")
    return tuple(value)


def _unique(names: tuple[str, ...], what: str, where: str) -> None:
    # Checked on load: a file with one name twice pairs one entry's values with another's.
    if len(set(names)) != len(names):
        twice = next(n for k, n in enumerate(names) if n in names[:k])
        raise BitallocError(
            f"the profile has two {what} entries named {twice!r}; each {what} needs exactly "
            f"one {where}"
        )


def _numbers(value: Any, depth: int) -> bool:
    """True for nested lists ``depth`` deep of real numbers (not booleans, not strings)."""
    if depth == 0:
        return type(value) in (int, float)
    return isinstance(value, list) and all(_numbers(v, depth - 1) for v in value)


def _table(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if not _numbers(value, 2):
        raise BitallocError("loss must be a list of rows of numbers")
    rows = {len(r) for r in value}
    if len(rows) > 1:
        raise BitallocError("loss rows differ in length")
    return np.asarray(value, dtype=np.float64).reshape(len(value), rows.pop() if rows else 0)


def _interactions(terms: Any) -> Interactions:
    if not isinstance(terms, dict):
        raise BitallocError("interactions must be a JSON object")
    pairs = terms.get("pairs")
    if not isinstance(pairs, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(u, str) for u in p) for p in pairs
    ):
        raise BitallocError("interaction pairs must be a list of [unit, unit] name pairs")
    if len({frozenset(p) for p in pairs}) != len(pairs):
        raise BitallocError("interaction terms list a pair twice; each pair needs one term")
    formats = _names(terms.get("formats"), "interaction formats")
    if len(set(formats)) != len(formats):
        raise BitallocError("interaction formats name a format twice")
    if not (_numbers(terms.get("pair_increase"), 2) and _numbers(terms.get("single_increase"), 3)):
        raise BitallocError("interaction increases must be nested lists of numbers")
    if not isinstance(terms.get("metadata", {}), dict):
        raise BitallocError("interaction metadata must be a JSON object")
    if set(terms) - {"pairs", "formats", "pair_increase", "single_increase", "metadata"}:
        raise BitallocError("unknown field in the interaction terms")
    pair = np.asarray(terms["pair_increase"], dtype=np.float64)
    single = np.asarray(terms["single_increase"], dtype=np.float64)
    if pair.shape != (len(pairs), len(formats)) or single.shape != (len(pairs), 2, len(formats)):
        raise BitallocError("interaction increases do not have one row per pair and format")
    return Interactions.from_json(terms)


def _monotone_on_load(profile: Profile, where: str) -> Profile:
    """``profile`` with each weight-format value capped at the same unit's value with fewer
    bits and the same group size, the repair recorded and warned about (KV and unknown format
    names are left as they are)."""
    # Imported here: formats is a leaf, but parsing names is only needed for this repair.
    from bitalloc.formats import parse_format

    cols, palette = [], []
    for j, name in enumerate(profile.formats):
        try:
            fmt = parse_format(name)
        except BitallocError:
            continue  # a KV format or one a solve will refuse by name
        cols.append(j)
        palette.append(fmt)
    if len(cols) < 2:
        return profile
    shapes = unit_shapes(profile.metadata, len(profile.units))
    capped, fixed = monotone_in_bits(
        profile.loss[:, cols], palette, allowed_by_shapes(shapes, palette)
    )
    if not fixed:
        return profile
    table = np.array(profile.loss)
    table[:, cols] = capped
    warnings.warn(
        ProfileRepairWarning(
            f"{where}: {fixed} values predicted more loss than the same unit with fewer bits "
            f"at the same group size; lowered to that value (recorded as metadata "
            f"{MONOTONE_FIXES_ON_LOAD!r})"
        ),
        stacklevel=3,
    )
    done = profile.metadata.get(MONOTONE_FIXES_ON_LOAD)
    done = done if type(done) is int else 0
    return replace(profile, loss=table).with_metadata(**{MONOTONE_FIXES_ON_LOAD: done + fixed})


def cache_key(parts: dict[str, Any]) -> str:
    """A stable hash of everything that determines a profile."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def finite_or_none(x: float | None) -> float | None:
    """JSON has no NaN/inf: map them to None."""
    return None if x is None or not math.isfinite(x) else float(x)
