"""Problems as files, so that other tools can call the solvers: JSON and NPZ.

JSON (``*.json``), one object::

    {
      "format": "bitalloc.problem", "version": 1,
      "objective": [[...], ...],                  # n x k predicted loss increase
      "costs": {"bits": [[...], ...], ...},       # named n x k cost tables
      "budgets": {"bits": 123456.0},              # upper bounds (optional)
      "allowed": [[true, ...], ...],              # optional n x k mask
      "unit_names": [...], "option_names": [...], # optional
      "pins": {"unit": "option", ...},            # optional; names or indices ("3": 1)
      "ties": [["unit", "unit"], ...],            # optional tie groups
      "interactions": [{"units": ["a", "b"], "values": [[...]]}, ...]   # optional k x k
    }

NPZ (``*.npz``, read with ``allow_pickle=False``): arrays ``objective``; ``cost:<name>`` for
each cost table; 0-d ``budget:<name>`` for each budget; optional ``allowed`` (bool),
``unit_names`` and ``option_names`` (unicode), ``pins`` ((p, 2) int: unit, option),
``tie_group`` ((n,) int, -1 for untied units, equal values tie), ``interaction_pairs``
((m, 2) int) and ``interaction_values`` ((m, k, k) float).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bitalloc.errors import BitallocError
from bitalloc.fileio import read_json_object, write_atomic, write_json_atomic, wrong_kind_error
from bitalloc.solvers.problem import Problem
from bitalloc.solvers.solution import _jsonable

FORMAT = "bitalloc.problem"
VERSION = 1
_JSON_KEYS = {
    "format",
    "version",
    "objective",
    "costs",
    "budgets",
    "allowed",
    "unit_names",
    "option_names",
    "pins",
    "ties",
    "interactions",
}


def problem_to_dict(problem: Problem) -> dict[str, Any]:
    """The JSON object for ``problem`` (see the module docstring)."""
    out: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "objective": problem.objective.tolist(),
        "costs": {name: table.tolist() for name, table in problem.costs.items()},
        "budgets": dict(problem.budgets),
    }
    if not problem.allowed.all():
        out["allowed"] = problem.allowed.tolist()
    if problem.unit_names is not None:
        out["unit_names"] = list(problem.unit_names)
    if problem.option_names is not None:
        out["option_names"] = list(problem.option_names)
    if problem.pins:
        out["pins"] = {str(unit): option for unit, option in problem.pins.items()}
    if problem.ties:
        out["ties"] = [list(group) for group in problem.ties]
    if problem.has_interactions:
        out["interactions"] = [
            {"units": [a, b], "values": table.tolist()} for a, b, table in problem.interactions
        ]
    return _jsonable(out)


def _unit_key(key: str) -> int | str:
    # JSON object keys are strings; digits mean an index.
    return int(key) if key.isdigit() else key


def problem_from_dict(data: Mapping[str, Any]) -> Problem:
    """Build and validate a :class:`Problem` from its JSON object."""
    if not isinstance(data, Mapping):
        raise BitallocError("a problem file must hold a JSON object")
    if data.get("format", FORMAT) != FORMAT:
        raise BitallocError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
    if data.get("version", VERSION) != VERSION:
        raise BitallocError(f"version {data.get('version')!r} is not supported (use {VERSION})")
    unknown = set(data) - _JSON_KEYS
    if unknown:
        raise BitallocError(
            f"unknown key(s) {sorted(unknown)} in the problem; allowed keys: {sorted(_JSON_KEYS)}"
        )
    for key in ("objective", "costs"):
        if key not in data:
            raise BitallocError(f"the problem has no {key!r}; it is required")
    pins = data.get("pins")
    if isinstance(pins, Mapping):
        pins = {_unit_key(str(unit)): option for unit, option in pins.items()}
    interactions = data.get("interactions")
    if interactions is not None:
        if not isinstance(interactions, list):
            raise BitallocError("interactions must be a list of {'units': [a, b], 'values': ...}")
        try:
            interactions = [(*item["units"], item["values"]) for item in interactions]
        except (TypeError, KeyError) as exc:
            raise BitallocError(
                "each interaction must be {'units': [a, b], 'values': k x k table}"
            ) from exc
    return Problem(
        objective=data["objective"],
        costs=data["costs"],
        budgets=data.get("budgets") or {},
        allowed=data.get("allowed"),
        unit_names=data.get("unit_names"),
        option_names=data.get("option_names"),
        pins=pins,
        ties=data.get("ties"),
        interactions=interactions,
    )


def _npz_arrays(problem: Problem) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {"objective": problem.objective}
    for name, table in problem.costs.items():
        arrays[f"cost:{name}"] = table
    for name, bound in problem.budgets.items():
        arrays[f"budget:{name}"] = np.array(bound)
    if not problem.allowed.all():
        arrays["allowed"] = problem.allowed
    if problem.unit_names is not None:
        arrays["unit_names"] = np.array(problem.unit_names, dtype=str)
    if problem.option_names is not None:
        arrays["option_names"] = np.array(problem.option_names, dtype=str)
    if problem.pins:
        arrays["pins"] = np.array(sorted(problem.pins.items()), dtype=np.int64)
    if problem.ties:
        group = np.full(problem.n_units, -1, dtype=np.int64)
        for g, members in enumerate(problem.ties):
            group[list(members)] = g
        arrays["tie_group"] = group
    if problem.has_interactions:
        arrays["interaction_pairs"] = problem.interaction_pairs
        arrays["interaction_values"] = problem.interaction_values
    return arrays


def _npz_budget(key: str, array: np.ndarray) -> float:
    # A 0-d real number only: float() would take a one-element array or a numeric string.
    if array.shape != () or not (
        np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    ):
        raise BitallocError(
            f"NPZ array {key!r} must be a 0-d real number, not {array.dtype} of shape {array.shape}"
        )
    return float(array)


def _npz_ints(key: str, array: np.ndarray, ndim: int) -> np.ndarray:
    if array.ndim != ndim or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
        raise BitallocError(
            f"NPZ array {key!r} must be a {ndim}-d integer array, not {array.dtype} of shape "
            f"{array.shape}"
        )
    return array.astype(np.int64)


def _npz_names(key: str, array: np.ndarray) -> list[str]:
    if array.ndim != 1 or array.dtype.kind != "U":
        raise BitallocError(
            f"NPZ array {key!r} must be a 1-d array of strings, not {array.dtype} of shape "
            f"{array.shape}"
        )
    return [str(s) for s in array]


def _problem_from_npz(arrays: Mapping[str, np.ndarray]) -> Problem:
    if "objective" not in arrays:
        raise BitallocError("the NPZ problem has no 'objective' array")
    costs = {key[5:]: arrays[key] for key in arrays if key.startswith("cost:")}
    budgets = {
        key[7:]: _npz_budget(key, arrays[key]) for key in arrays if key.startswith("budget:")
    }
    known = {"objective", "allowed", "unit_names", "option_names", "pins", "tie_group"}
    known |= {"interaction_pairs", "interaction_values"}
    unknown = [k for k in arrays if k not in known and not k.startswith(("cost:", "budget:"))]
    if unknown:
        raise BitallocError(f"unknown array(s) {unknown} in the NPZ problem")
    pins = None
    if "pins" in arrays:
        pin_array = _npz_ints("pins", np.asarray(arrays["pins"]), 2)
        if pin_array.shape[1] != 2:
            raise BitallocError("'pins' must be a (p, 2) array of (unit, option) indices")
        pins = {}
        for u, o in pin_array.tolist():
            if pins.get(u, o) != o:
                raise BitallocError(f"'pins' pins unit {u} twice, to {pins[u]} and {o}")
            pins[u] = o
    ties = None
    if "tie_group" in arrays:
        group = _npz_ints("tie_group", np.asarray(arrays["tie_group"]), 1)
        ties = [np.flatnonzero(group == g).tolist() for g in np.unique(group[group >= 0])]
    interactions = None
    if "interaction_pairs" in arrays or "interaction_values" in arrays:
        if "interaction_pairs" not in arrays or "interaction_values" not in arrays:
            raise BitallocError("give both 'interaction_pairs' and 'interaction_values'")
        pairs = _npz_ints("interaction_pairs", arrays["interaction_pairs"], 2)
        values = arrays["interaction_values"]
        if pairs.shape[1:] != (2,) or values.ndim != 3 or len(pairs) != len(values):
            raise BitallocError(
                "'interaction_pairs' must be (m, 2) and 'interaction_values' (m, k, k) with "
                f"the same m; got shapes {pairs.shape} and {values.shape}"
            )
        interactions = [(a, b, v) for (a, b), v in zip(pairs.tolist(), values)]
    names = {
        key: _npz_names(key, arrays[key]) if key in arrays else None
        for key in ("unit_names", "option_names")
    }
    return Problem(
        objective=arrays["objective"],
        costs=costs,
        budgets=budgets,
        allowed=arrays.get("allowed"),
        unit_names=names["unit_names"],
        option_names=names["option_names"],
        pins=pins,
        ties=ties,
        interactions=interactions,
    )


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in (".json", ".npz"):
        raise BitallocError(f"{path}: a problem file must end in .json or .npz")
    return suffix


def save_problem(problem: Problem, path: str | os.PathLike[str]) -> Path:
    """Write ``problem`` to ``path`` (``.json`` or ``.npz``) atomically; return the path."""
    path = Path(path)
    if _suffix(path) == ".json":
        return write_json_atomic(path, problem_to_dict(problem))
    return write_atomic(path, lambda handle: np.savez_compressed(handle, **_npz_arrays(problem)))


def load_problem(path: str | os.PathLike[str]) -> Problem:
    """Read a problem written by :func:`save_problem` or by another tool (see module doc)."""
    path = Path(path)
    suffix = _suffix(path)
    if not path.is_file():
        raise BitallocError(f"{path}: no such problem file")
    if suffix == ".json":
        data = read_json_object(path, "solver problem file")
        wrong = wrong_kind_error(path, data, "solver problem file")
        if wrong is not None:
            raise wrong
        return problem_from_dict(data)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise BitallocError(f"{path}: not a readable NPZ file ({exc})") from exc
    return _problem_from_npz(arrays)
