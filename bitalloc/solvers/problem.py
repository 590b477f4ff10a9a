"""The allocation problem: a multiple-choice knapsack with ties, pins and interactions.

A :class:`Problem` has ``n`` units (weight matrices) and ``k`` options (quantization formats).
Every unit takes exactly one allowed option; each option has a predicted objective
(loss increase) and a cost in every named cost table; some cost tables carry an upper budget.
Units may be pinned to an option or tied into groups that take one option together, and
pairs of units may add interaction terms to the objective. Solvers return a
:class:`~bitalloc.solvers.solution.Solution`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bitalloc.errors import BitallocError
from bitalloc.solvers.solution import Solution, _read_only
from bitalloc.solvers.structure import (
    Collapsed,
    collapse,
    interaction_sum,
    normalise_interactions,
    normalise_pins,
    normalise_ties,
)

__all__ = ["FEASIBILITY_RTOL", "MAGNITUDE_LIMIT", "Problem", "Solution", "feasibility_tolerance"]

#: Relative slack allowed when comparing a summed cost with its budget. Sums of many floats
#: taken in different orders differ in the last bits, so an exact ``<=`` would reject choices
#: that meet the budget in exact arithmetic.
FEASIBILITY_RTOL = 1e-9
#: Largest total any objective or cost table may reach (sum over units of the largest
#: magnitude in each row, interaction tables included). Solvers form sums, differences and
#: products of such totals; below this bound none of them can overflow to infinity.
MAGNITUDE_LIMIT = 1e300
_TINY = float(np.finfo(np.float64).tiny)


def feasibility_tolerance(budget: float) -> float:
    """Absolute amount by which a summed cost may exceed ``budget`` and still count as within it.

    Purely relative: an absolute floor would let a budget of costs in tiny units (1e-12 per
    weight, say) be exceeded by many whole units without anyone noticing.
    """
    return FEASIBILITY_RTOL * abs(budget)


def _float_table(label: str, value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray) and np.iscomplexobj(value):
        raise BitallocError(f"{label} is complex; pass real numbers")
    try:
        table = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise BitallocError(f"{label} must be a 2-D array of numbers ({exc})") from exc
    if table.ndim != 2:
        raise BitallocError(
            f"{label} must be 2-D (units x options) but has shape {table.shape}; "
            "give one row per unit and one column per option"
        )
    return table


def _names(label: str, names: Sequence[str] | None, expected: int) -> tuple[str, ...] | None:
    if names is None:
        return None
    if isinstance(names, str):
        raise BitallocError(f"{label} must be a list of strings, not a single string")
    try:
        names = tuple(names)
    except TypeError:
        raise BitallocError(
            f"{label} must be a list of strings, not {type(names).__name__}"
        ) from None
    if len(names) != expected:
        raise BitallocError(
            f"{label} has {len(names)} entries but the objective has {expected}; "
            f"give exactly one name per {'unit' if label == 'unit_names' else 'option'}"
        )
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise BitallocError(f"{label}[{i}] is {name!r}, not a string")
        if name in seen:
            # A pin or tie by this name would silently apply to the first entry only.
            raise BitallocError(
                f"{label}[{i}] repeats {name!r} (also {label}[{seen[name]}]); every name must "
                "be unique"
            )
        seen[name] = i
    return names


def _check_magnitude(
    label: str, table: np.ndarray, where: Callable[[int, int], str], extra: float = 0.0
) -> None:
    """Refuse subnormal entries and totals that could overflow (see MAGNITUDE_LIMIT)."""
    size = np.abs(table)
    # Subnormals lose precision when scaled and overflow when divided into; no real loss or
    # cost needs them.
    subnormal = (size > 0) & (size < _TINY)
    if subnormal.any():
        i, j = np.argwhere(subnormal)[0]
        raise BitallocError(
            f"{label} at {where(i, j)} is {float(table[i, j])!r}, below the smallest normal "
            f"float ({_TINY:.4g}); round it to 0 or express {label} in smaller units"
        )
    total = float(size.max(axis=1).sum()) + extra
    if not total <= MAGNITUDE_LIMIT:
        raise BitallocError(
            f"{label} adds up to {total:.4g} in magnitude (largest entry per unit, summed), "
            f"more than {MAGNITUDE_LIMIT:.0e}; divide it by a common factor"
        )


@dataclass(frozen=True, eq=False, repr=False)
class Problem:
    """A multiple-choice knapsack: pick one allowed option per unit, minimising the objective.

    Minimise ``sum_i objective[i, x_i] + sum_(a,b) interactions[a,b][x_a, x_b]`` subject to,
    for every ``name`` in ``budgets``, ``sum_i costs[name][i, x_i] <= budgets[name]``,
    ``allowed[i, x_i]``, ``x_i == pins[i]`` for pinned units, and ``x_a == x_b`` for units in
    one tie group.

    Everything is validated at construction and stored as read-only float64 (bool for
    ``allowed``) copies; invalid input raises :class:`~bitalloc.errors.BitallocError`.

    Args:
        objective: ``(n, k)`` finite predicted loss increase of unit ``i`` taking option ``j``.
            Every entry must be finite, including those of disallowed options.
        costs: Named ``(n, k)`` cost tables, finite and non-negative (e.g. ``"bits"``: stored
            bits of unit ``i`` under option ``j``). Tables without a budget are only reported.
        budgets: Upper bound per cost name; each key must be a key of ``costs``.
        allowed: Optional ``(n, k)`` bool mask; ``None`` allows everything. After construction
            this attribute is always a bool array. Every unit needs one allowed option.
        unit_names: Optional ``n`` strings, used in messages.
        option_names: Optional ``k`` strings, used in messages.
        pins: Optional ``{unit: option}`` (indices, or names when names are given). Stored as
            ``{unit index: option index}``. A pin must be an allowed option.
        ties: Optional groups of units that must take the same option (fused q/k/v or
            gate/up kernels). Overlapping groups are merged; stored as sorted, disjoint tuples
            of unit indices. Tied units need identical ``allowed`` rows and compatible pins.
        interactions: Optional pairwise terms: ``{(unit_a, unit_b): (k, k) table}`` or a list
            of ``(unit_a, unit_b, table)``; ``table[p, q]`` is added when ``unit_a`` takes
            option ``p`` and ``unit_b`` option ``q``. Stored canonically as
            :attr:`interaction_pairs` and :attr:`interaction_values`; ``interactions`` itself
            becomes a list of ``(a, b, table)`` with ``a < b``.
    """

    objective: np.ndarray
    costs: Mapping[str, np.ndarray]
    budgets: Mapping[str, float] = field(default_factory=dict)
    allowed: np.ndarray | None = None
    unit_names: Sequence[str] | None = None
    option_names: Sequence[str] | None = None
    pins: Mapping[Any, Any] | None = None
    ties: Sequence[Sequence[Any]] | None = None
    interactions: Any = None

    def __post_init__(self) -> None:
        objective = _float_table("objective", self.objective)
        n, k = objective.shape
        if n == 0 or k == 0:
            raise BitallocError(
                f"objective has shape {objective.shape}; the problem needs at least one unit "
                "and one option"
            )
        # Names first, so the checks below can use them in their messages.
        object.__setattr__(self, "unit_names", _names("unit_names", self.unit_names, n))
        object.__setattr__(self, "option_names", _names("option_names", self.option_names, k))

        bad = ~np.isfinite(objective)
        if bad.any():
            i, j = np.argwhere(bad)[0]
            raise BitallocError(
                f"objective at {self._where(i, j)} is {objective[i, j]}; every objective "
                "entry must be finite (give disallowed options any finite placeholder)"
            )

        if not isinstance(self.costs, Mapping):
            raise BitallocError("costs must be a dict mapping cost names to (n, k) tables")
        costs: dict[str, np.ndarray] = {}
        for name, value in self.costs.items():
            if not isinstance(name, str) or not name:
                raise BitallocError(f"cost name {name!r} must be a non-empty string")
            table = _float_table(f"costs[{name!r}]", value)
            if table.shape != objective.shape:
                raise BitallocError(
                    f"costs[{name!r}] has shape {table.shape} but objective has shape "
                    f"{objective.shape}; every cost table needs the objective's shape"
                )
            bad = ~np.isfinite(table) | (table < 0)
            if bad.any():
                i, j = np.argwhere(bad)[0]
                raise BitallocError(
                    f"costs[{name!r}] at {self._where(i, j)} is {table[i, j]}; costs must be "
                    "finite and non-negative"
                )
            _check_magnitude(f"costs[{name!r}]", table, self._where)
            costs[name] = _read_only(table)

        if not isinstance(self.budgets, Mapping):
            raise BitallocError("budgets must be a dict mapping cost names to upper bounds")
        budgets: dict[str, float] = {}
        for name, value in self.budgets.items():
            if name not in costs:
                known = ", ".join(repr(c) for c in costs) or "none"
                raise BitallocError(
                    f"budget {name!r} names an unknown cost (known costs: {known}); add a "
                    f"cost table {name!r} or fix the budget's name"
                )
            try:
                bound = float(value)
            except (TypeError, ValueError) as exc:
                raise BitallocError(f"budget {name!r} is {value!r}, not a number") from exc
            if not math.isfinite(bound):
                raise BitallocError(
                    f"budget {name!r} is {bound}; give a finite bound, or drop the budget to "
                    "leave that cost unconstrained"
                )
            if 0 < abs(bound) < _TINY:
                raise BitallocError(
                    f"budget {name!r} is {bound!r}, below the smallest normal float "
                    f"({_TINY:.4g}); round it to 0 or express the cost in smaller units"
                )
            budgets[name] = bound

        if self.allowed is None:
            allowed = np.ones((n, k), dtype=bool)
        else:
            try:
                allowed = np.asarray(self.allowed)
            except (TypeError, ValueError) as exc:
                raise BitallocError(
                    f"allowed must be an (n, k) array of bools ({exc}); give one bool per unit "
                    "and option"
                ) from exc
            if allowed.shape != objective.shape:
                raise BitallocError(
                    f"allowed has shape {allowed.shape} but objective has shape "
                    f"{objective.shape}; give one bool per unit and option"
                )
            if allowed.dtype != bool:
                if not (
                    np.issubdtype(allowed.dtype, np.integer) and np.isin(allowed, (0, 1)).all()
                ):
                    raise BitallocError(
                        f"allowed has dtype {allowed.dtype}; give a bool array (or 0/1 ints)"
                    )
                allowed = allowed.astype(bool)
        empty = ~allowed.any(axis=1)
        if empty.any():
            i = int(np.flatnonzero(empty)[0])
            raise BitallocError(
                f"{self.unit_label(i)} has no allowed option ({int(empty.sum())} unit(s) in "
                "all); allow at least one option per unit"
            )

        names = (self.unit_names, self.option_names)
        pins = normalise_pins(self.pins, allowed, *names, self.unit_label)
        ties = normalise_ties(self.ties, allowed, pins, *names, self.unit_label)
        pairs, values = normalise_interactions(self.interactions, (n, k), self.unit_names)
        if values.size:
            _check_magnitude(
                "interactions",
                values.reshape(values.shape[0], -1),
                lambda p, e: f"pair {tuple(pairs[p].tolist())}, entry {divmod(int(e), k)}",
            )
        reach = float(np.abs(values).max(axis=(1, 2)).sum()) if values.size else 0.0
        _check_magnitude("objective", objective, self._where, reach)

        object.__setattr__(self, "objective", _read_only(objective))
        object.__setattr__(self, "costs", costs)
        object.__setattr__(self, "budgets", budgets)
        object.__setattr__(self, "allowed", _read_only(allowed))
        object.__setattr__(self, "pins", pins)
        object.__setattr__(self, "ties", ties)
        pairs, values = _read_only(pairs), _read_only(values)
        listed = [(int(a), int(b), table) for (a, b), table in zip(pairs, values)]
        object.__setattr__(self, "interactions", listed)
        object.__setattr__(self, "_pairs", pairs)
        object.__setattr__(self, "_values", values)
        object.__setattr__(self, "_collapsed", None)

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuild through the constructor so unpickled arrays are read-only again (pickle
        # does not keep numpy's write flag); this matters when problems are shipped to workers.
        fields = (self.objective, self.costs, self.budgets, self.allowed)
        structure = (self.pins, self.ties, self.interactions or None)
        return (type(self), (*fields, self.unit_names, self.option_names, *structure))

    def __repr__(self) -> str:
        extras = ""
        if self.pins:
            extras += f", pins={len(self.pins)}"
        if self.ties:
            extras += f", ties={len(self.ties)}"
        if self.has_interactions:
            extras += f", interactions={len(self._pairs)}"
        return (
            f"Problem(n_units={self.n_units}, n_options={self.n_options}, "
            f"costs={list(self.costs)}, budgets={dict(self.budgets)}{extras})"
        )

    # -- structure ------------------------------------------------------------------------

    @property
    def interaction_pairs(self) -> np.ndarray:
        """``(m, 2)`` int64 unit pairs ``(a, b)`` with ``a < b``, sorted, without repeats."""
        return self._pairs

    @property
    def interaction_values(self) -> np.ndarray:
        """``(m, k, k)`` tables: pair ``p`` adds ``values[p, x_a, x_b]`` to the objective."""
        return self._values

    @property
    def has_interactions(self) -> bool:
        """Whether any pairwise interaction term exists."""
        return self._pairs.shape[0] > 0

    def collapsed(self) -> Collapsed:
        """The equivalent problem without ties and pins, and the map back (cached)."""
        if self._collapsed is None:
            object.__setattr__(self, "_collapsed", collapse(self))
        return self._collapsed

    # -- naming helpers -------------------------------------------------------------------

    def unit_label(self, i: int) -> str:
        """Human-readable name of unit ``i`` for messages: ``unit 3 ('layers.0.q_proj')``."""
        names = self.unit_names
        return f"unit {int(i)}" + (f" ({names[i]!r})" if names is not None else "")

    def option_label(self, j: int) -> str:
        """Human-readable name of option ``j`` for messages: ``option 1 ('q4_k')``."""
        names = self.option_names
        return f"option {int(j)}" + (f" ({names[j]!r})" if names is not None else "")

    def _where(self, i: int, j: int) -> str:
        return f"{self.unit_label(i)}, {self.option_label(j)}"

    # -- shape ----------------------------------------------------------------------------

    @property
    def n_units(self) -> int:
        """Number of units (rows)."""
        return int(self.objective.shape[0])

    @property
    def n_options(self) -> int:
        """Number of options (columns)."""
        return int(self.objective.shape[1])

    # -- evaluating a choice --------------------------------------------------------------

    def validate_choice(self, choice: Any) -> np.ndarray:
        """Return ``choice`` as an int64 array of ``n_units`` option indices, or raise.

        Only shape, dtype and range are checked here; see :meth:`check_feasible` for the mask
        and budgets.
        """
        arr = np.asarray(choice)
        if arr.shape != (self.n_units,):
            raise BitallocError(
                f"choice has shape {arr.shape}; give one option index per unit "
                f"({self.n_units} entries)"
            )
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
            raise BitallocError(f"choice has dtype {arr.dtype}; give integer option indices")
        arr = arr.astype(np.int64)
        bad = (arr < 0) | (arr >= self.n_options)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise BitallocError(
                f"choice for {self.unit_label(i)} is {arr[i]}; option indices must lie in "
                f"[0, {self.n_options - 1}]"
            )
        return arr

    def objective_of(self, choice: Any) -> float:
        """Objective at ``choice`` (one option index per unit), interaction terms included."""
        arr = self.validate_choice(choice)
        linear = float(self.objective[np.arange(self.n_units), arr].sum())
        return linear + interaction_sum(self._pairs, self._values, arr)

    def resources(self, choice: Any) -> dict[str, float]:
        """Total of every cost table (budgeted or not) at ``choice``."""
        arr = self.validate_choice(choice)
        rows = np.arange(self.n_units)
        return {name: float(table[rows, arr].sum()) for name, table in self.costs.items()}

    def violations(self, choice: Any) -> list[str]:
        """Messages for every way ``choice`` breaks the mask, a pin, a tie or a budget.

        Empty if ``choice`` is feasible.

        A budget counts as met when the total exceeds it by at most
        :func:`feasibility_tolerance` (rounding of long float sums).
        """
        arr = self.validate_choice(choice)
        problems: list[str] = []
        banned = ~self.allowed[np.arange(self.n_units), arr]
        if banned.any():
            i = int(np.flatnonzero(banned)[0])
            problems.append(
                f"{int(banned.sum())} unit(s) take a disallowed option, first "
                f"{self._where(i, arr[i])}"
            )
        pinned = [i for i, j in self.pins.items() if arr[i] != j]
        if pinned:
            i = pinned[0]
            problems.append(
                f"{len(pinned)} pinned unit(s) take another option, first {self.unit_label(i)} "
                f"takes {self.option_label(arr[i])} instead of {self.option_label(self.pins[i])}"
            )
        split = [g for g in self.ties if len(set(arr[list(g)].tolist())) > 1]
        if split:
            problems.append(
                f"{len(split)} tie group(s) take different options, first the group of "
                f"{self.unit_label(split[0][0])}"
            )
        totals = self.resources(arr)
        for name, bound in self.budgets.items():
            if totals[name] > bound + feasibility_tolerance(bound):
                problems.append(
                    f"total {name!r} is {totals[name]:.10g}, over its budget {bound:.10g}"
                )
        return problems

    def is_feasible(self, choice: Any) -> bool:
        """Whether ``choice`` respects ``allowed`` and every budget."""
        return not self.violations(choice)

    def check_feasible(self, choice: Any) -> None:
        """Raise :class:`BitallocError` listing every violation if ``choice`` is infeasible."""
        problems = self.violations(choice)
        if problems:
            raise BitallocError("choice is infeasible: " + "; ".join(problems))

    # -- feasible ranges ------------------------------------------------------------------

    def _cost(self, name: str) -> np.ndarray:
        if name not in self.costs:
            known = ", ".join(repr(c) for c in self.costs) or "none"
            raise BitallocError(f"unknown cost {name!r}; known costs: {known}")
        return self.costs[name]

    def min_resource(self, name: str) -> float:
        """Smallest achievable total of cost ``name`` on its own (ignoring other budgets).

        Every unit (tie group) at its cheapest allowed option, pins respected.
        """
        self._cost(name)
        reduced = self.collapsed().problem
        table = np.where(reduced.allowed, reduced.costs[name], np.inf)
        return float(table.min(axis=1).sum())

    def max_resource(self, name: str) -> float:
        """Largest achievable total of cost ``name``: every unit (group) at its dearest option."""
        self._cost(name)
        reduced = self.collapsed().problem
        table = np.where(reduced.allowed, reduced.costs[name], -np.inf)
        return float(table.max(axis=1).sum())

    def feasible_range(self, name: str) -> tuple[float, float]:
        """``(min_resource(name), max_resource(name))``."""
        return self.min_resource(name), self.max_resource(name)
