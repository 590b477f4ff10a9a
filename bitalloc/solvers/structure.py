"""Pins, tie groups and pairwise interactions of a :class:`~bitalloc.solvers.problem.Problem`.

This module normalises what the user passes (unit and option names or indices, overlapping
groups, pairs given in either order) into canonical arrays, and reduces a problem with ties
and pins to an equivalent one without them (:func:`collapse`), so that solvers only ever see
independent units with an ``allowed`` mask.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from bitalloc.errors import BitallocError

if TYPE_CHECKING:
    from bitalloc.solvers.problem import Problem


def resolve_index(label: str, value: Any, size: int, names: Sequence[str] | None, kind: str) -> int:
    """Index of a unit or option given as an int or (when names exist) a name."""
    if isinstance(value, (bool, np.bool_)):
        raise BitallocError(f"{label}: {value!r} is a bool; give an index or a name")
    if isinstance(value, (int, np.integer)):
        index = int(value)
        if not 0 <= index < size:
            raise BitallocError(f"{label}: {kind} index {index} is outside [0, {size - 1}]")
        return index
    if isinstance(value, str):
        if names is None:
            raise BitallocError(
                f"{label}: {kind} {value!r} is a name but the problem has no {kind}_names; "
                f"give {kind}_names or use indices"
            )
        try:
            return names.index(value)
        except ValueError:
            raise BitallocError(f"{label}: unknown {kind} name {value!r}") from None
    raise BitallocError(f"{label}: {value!r} is neither a {kind} index nor a {kind} name")


def normalise_pins(
    pins: Mapping[Any, Any] | None,
    allowed: np.ndarray,
    unit_names: Sequence[str] | None,
    option_names: Sequence[str] | None,
    describe: Callable[[int], str],
) -> dict[int, int]:
    """``{unit index: option index}``, each pin checked against the unit's allowed options."""
    if pins is None:
        return {}
    if not isinstance(pins, Mapping):
        raise BitallocError("pins must be a dict mapping units to options")
    n, k = allowed.shape
    out: dict[int, int] = {}
    for unit, option in pins.items():
        i = resolve_index("pins", unit, n, unit_names, "unit")
        j = resolve_index(f"pin of {describe(i)}", option, k, option_names, "option")
        if i in out and out[i] != j:
            raise BitallocError(f"{describe(i)} is pinned twice, to options {out[i]} and {j}")
        if not allowed[i, j]:
            choices = _option_list(allowed[i], option_names)
            raise BitallocError(
                f"pin of {describe(i)} to option {_option_text(j, option_names)} is outside its "
                f"allowed options ({choices}); pin it to an allowed option or allow that one"
            )
        out[i] = j
    return out


def _option_text(j: int, option_names: Sequence[str] | None) -> str:
    return repr(option_names[j]) if option_names is not None else str(j)


def _option_list(row: np.ndarray, option_names: Sequence[str] | None) -> str:
    return ", ".join(_option_text(int(j), option_names) for j in np.flatnonzero(row))


def normalise_ties(
    ties: Sequence[Sequence[Any]] | None,
    allowed: np.ndarray,
    pins: Mapping[int, int],
    unit_names: Sequence[str] | None,
    option_names: Sequence[str] | None,
    describe: Callable[[int], str],
) -> tuple[tuple[int, ...], ...]:
    """Disjoint tie groups (overlapping groups merged), each sorted, of two or more units.

    Tied units must share their allowed options and may not be pinned to different options.
    """
    if ties is None:
        return ()
    if isinstance(ties, (str, Mapping)) or not isinstance(ties, Sequence):
        raise BitallocError("ties must be a list of groups, each a list of units")
    n = allowed.shape[0]
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for g, group in enumerate(ties):
        if isinstance(group, (str, Mapping)) or not isinstance(group, Sequence):
            raise BitallocError(f"ties[{g}] must be a list of units, got {group!r}")
        members = [resolve_index(f"ties[{g}]", u, n, unit_names, "unit") for u in group]
        for i in members[1:]:
            parent[root(i)] = root(members[0])

    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    out = []
    for members in groups.values():
        if len(members) < 2:
            continue
        first = members[0]
        for i in members[1:]:
            if not np.array_equal(allowed[i], allowed[first]):
                raise BitallocError(
                    f"tie group of {describe(first)} and {describe(i)} mixes different "
                    f"allowed options ({_option_list(allowed[first], option_names)} vs "
                    f"{_option_list(allowed[i], option_names)}); tied units must take the same "
                    "option, so give them the same allowed options"
                )
        pinned = {pins[i] for i in members if i in pins}
        if len(pinned) > 1:
            raise BitallocError(
                f"tie group starting at {describe(first)} has units pinned to different "
                f"options ({', '.join(_option_text(j, option_names) for j in sorted(pinned))}); "
                "tied units take one option, so pin them alike or untie them"
            )
        out.append(tuple(members))
    return tuple(out)


def normalise_interactions(
    interactions: Any,
    shape: tuple[int, int],
    unit_names: Sequence[str] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(pairs (m, 2) with i < j, values (m, k, k))``; pairs given twice are summed.

    ``interactions`` is a dict ``{(unit_a, unit_b): (k, k) table}`` or a list of
    ``(unit_a, unit_b, table)``; ``table[p, q]`` is added to the objective when ``unit_a``
    takes option ``p`` and ``unit_b`` option ``q``.
    """
    n, k = shape
    if interactions is None:
        return np.zeros((0, 2), dtype=np.int64), np.zeros((0, k, k))
    if isinstance(interactions, Mapping):
        items = [(*key, value) for key, value in interactions.items()]
    elif isinstance(interactions, Sequence) and not isinstance(interactions, str):
        items = list(interactions)
    else:
        raise BitallocError(
            "interactions must be a dict {(unit_a, unit_b): k x k table} or a list of "
            "(unit_a, unit_b, table)"
        )
    merged: dict[tuple[int, int], np.ndarray] = {}
    for e, item in enumerate(items):
        if not isinstance(item, Sequence) or len(item) != 3:
            raise BitallocError(f"interactions[{e}] must be (unit_a, unit_b, table)")
        a = resolve_index(f"interactions[{e}]", item[0], n, unit_names, "unit")
        b = resolve_index(f"interactions[{e}]", item[1], n, unit_names, "unit")
        if a == b:
            raise BitallocError(
                f"interactions[{e}] pairs unit {a} with itself; fold a unit's own terms into "
                "the objective instead"
            )
        try:
            table = np.asarray(item[2], dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise BitallocError(f"interactions[{e}] table is not numeric ({exc})") from exc
        if table.shape != (k, k):
            raise BitallocError(
                f"interactions[{e}] table has shape {table.shape}; give ({k}, {k}): one row per "
                "option of the first unit and one column per option of the second"
            )
        if not np.isfinite(table).all():
            raise BitallocError(f"interactions[{e}] table has non-finite entries")
        key, table = ((a, b), table) if a < b else ((b, a), table.T)
        merged[key] = merged[key] + table if key in merged else table.copy()
    keys = sorted(merged)
    pairs = np.array(keys, dtype=np.int64).reshape(-1, 2)
    values = np.stack([merged[key] for key in keys]) if keys else np.zeros((0, k, k))
    return pairs, values


def interaction_sum(pairs: np.ndarray, values: np.ndarray, choice: np.ndarray) -> float:
    """Sum of the interaction terms at ``choice``."""
    if pairs.shape[0] == 0:
        return 0.0
    p = np.arange(pairs.shape[0])
    return float(values[p, choice[pairs[:, 0]], choice[pairs[:, 1]]].sum())


@dataclass(frozen=True)
class Collapsed:
    """A problem without ties or pins, equivalent to the original, and the way back.

    ``problem`` has one unit per tie group or untied unit (super-units ordered by their first
    member); pins become single-option ``allowed`` rows. Every choice of ``problem`` maps to a
    choice of the original with the same objective and resources, and back.

    Attributes:
        problem: The reduced problem.
        group_of: ``(n,)`` super-unit index of each original unit.
        identity: The original had neither ties nor pins, and ``problem`` is the original.
    """

    problem: Problem
    group_of: np.ndarray
    identity: bool = False

    def expand(self, choice: np.ndarray) -> np.ndarray:
        """The original problem's choice for a choice of the reduced problem."""
        return np.asarray(choice, dtype=np.int64)[self.group_of]


def collapse(problem: Problem) -> Collapsed:
    """Reduce ``problem``'s ties and pins to super-units and masks (see :class:`Collapsed`)."""
    n = problem.n_units
    if not problem.ties and not problem.pins:
        return Collapsed(problem, np.arange(n), identity=True)
    group_of = np.full(n, -1, dtype=np.int64)
    for members in problem.ties:
        group_of[list(members)] = members[0]
    lone = group_of < 0
    group_of[lone] = np.flatnonzero(lone)
    # Renumber leaders 0..g-1 in order of first member.
    leaders, group_of = np.unique(group_of, return_inverse=True)
    g = leaders.size

    def summed(table: np.ndarray) -> np.ndarray:
        out = np.zeros((g, table.shape[1]))
        np.add.at(out, group_of, table)
        return out

    objective = summed(problem.objective)
    allowed = problem.allowed[leaders].copy()
    for unit, option in problem.pins.items():
        row = allowed[group_of[unit]]
        row[:] = False
        row[option] = True

    pairs, values = problem.interaction_pairs, problem.interaction_values
    merged: dict[tuple[int, int], np.ndarray] = {}
    for (a, b), table in zip(group_of[pairs].tolist(), values):
        if a == b:
            # Both ends take the group's option j, so the pair adds table[j, j].
            objective[a] += np.diag(table)
        else:
            key, table = ((a, b), table) if a < b else ((b, a), table.T)
            merged[key] = merged[key] + table if key in merged else table
    interactions = [(a, b, table) for (a, b), table in merged.items()]

    names = problem.unit_names
    unit_names = None
    if names is not None:
        members: list[list[str]] = [[] for _ in range(g)]
        for i, s in enumerate(group_of.tolist()):
            members[s].append(names[i])
        unit_names = ["+".join(m) for m in members]
    # type(problem), not an import of Problem: problem.py imports this module.
    reduced = type(problem)(
        objective=objective,
        costs={name: summed(table) for name, table in problem.costs.items()},
        budgets=dict(problem.budgets),
        allowed=allowed,
        unit_names=unit_names,
        option_names=problem.option_names,
        interactions=interactions or None,
    )
    return Collapsed(reduced, group_of)
