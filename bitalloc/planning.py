"""From a profile to allocations without touching the model: problems, budgets, ties, frontier.

A :class:`~bitalloc.sensitivity.Profile` made by :func:`bitalloc.allocator.profile_model`
describes its units (shape, layer, role, fusion group), so everything here runs on the profile
alone, in milliseconds per budget: :func:`solve_profile` for one budget and :func:`frontier`
for many.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bitalloc.allocation import Allocation, ProfileSummary, SolverSummary, UnitChoice
from bitalloc.errors import BitallocError, InfeasibleBudgetError
from bitalloc.formats import QuantFormat, parse_format, parse_palette
from bitalloc.models import Unit
from bitalloc.records import Budget
from bitalloc.sensitivity import Profile
from bitalloc.sensitivity.monotone import allowed_by_shapes
from bitalloc.solvers import Problem, Solution, solve

#: Fusion kinds accepted by ``ties``: serving engines fuse these projections into one kernel,
#: which then needs one format. The value is the suffix of :attr:`Unit.group`.
TIE_KINDS = {"qkv": "qkv", "gateup": "gateup"}


def allowed_table(units: Sequence[Unit], palette: Sequence[QuantFormat]) -> np.ndarray:
    """Which format can store which unit, (n_units, n_formats) bools: a format refuses a shape
    its rows do not fit (llama.cpp's K-quants need input widths that are multiples of 256)."""
    return allowed_by_shapes([u.shape for u in units], palette)


def cost_table(units: Sequence[Unit], palette: Sequence[QuantFormat]) -> np.ndarray:
    """Exact stored bits of every unit under every format, (n_units, n_formats). Where a
    format cannot store a unit (:func:`allowed_table`) the entry is a placeholder, the format's
    nominal bits times the unit's weights, which no solve may pick."""
    return np.array(
        [
            [
                f.storage_bits(u.shape) if f.allows(u.shape) else f.nominal_bits * u.numel
                for f in palette
            ]
            for u in units
        ],
        dtype=np.float64,
    ).reshape(len(units), len(palette))


def check_allowed(units: Sequence[Unit], palette: Sequence[QuantFormat]) -> np.ndarray:
    """:func:`allowed_table`, or :class:`BitallocError` naming a unit that no format of the
    palette can store and what would."""
    allowed = allowed_table(units, palette)
    for i in np.flatnonzero(~allowed.any(axis=1)):
        unit = units[int(i)]
        try:
            palette[0].check_shape(unit.shape)
            why = ""
        except BitallocError as exc:
            why = f" ({palette[0].name}: {exc})"
        raise BitallocError(
            f"no format of the palette can store {unit.name} of shape {tuple(unit.shape)}{why}; "
            "add a format that fits it to --formats"
        )
    return allowed


def feasible_avg_bits(units: Sequence[Unit], palette: Sequence[QuantFormat]) -> tuple[float, float]:
    """Lowest and highest achievable average bits per weight for these units, each unit
    taking only the formats that can store it."""
    allowed = check_allowed(units, palette)
    costs = cost_table(units, palette)
    numel = sum(u.numel for u in units)
    lowest = np.where(allowed, costs, np.inf).min(axis=1)
    highest = np.where(allowed, costs, -np.inf).max(axis=1)
    return float(lowest.sum() / numel), float(highest.sum() / numel)


def range_decimals(value: float, low: float, high: float) -> int:
    """Decimals (at least 4) at which ``value`` prints differently from the bound it passes.

    A budget just past a bound must not read as equal to it (``avg_bits=16.0000`` outside a
    range ending at ``16.0000``).
    """
    bound = high if value > high else low
    for decimals in range(4, 18):
        if f"{value:.{decimals}f}" != f"{bound:.{decimals}f}":
            return decimals
    return 17


def check_budget(avg_bits: float, units: Sequence[Unit], palette: Sequence[QuantFormat]) -> None:
    """Raise :class:`InfeasibleBudgetError` naming the feasible range if ``avg_bits`` is outside."""
    if (
        isinstance(avg_bits, bool)
        or not isinstance(avg_bits, (int, float))
        or not math.isfinite(avg_bits)
    ):
        raise BitallocError(
            f"avg_bits must be a finite number of bits per weight, got {avg_bits!r}"
        )
    lo, hi = feasible_avg_bits(units, palette)
    if avg_bits < lo - 1e-12 or avg_bits > hi + 1e-12:
        d = range_decimals(avg_bits, lo, hi)
        raise InfeasibleBudgetError(
            f"avg_bits={avg_bits:.{d}f} is outside what this palette can reach on this model: "
            f"choose a budget between {lo:.{d}f} (every unit at its cheapest format) and "
            f"{hi:.{d}f} (every unit at its richest)",
            feasible_range=(lo, hi),
        )


def parse_ties(ties: str | Sequence[str] | None) -> tuple[str, ...]:
    """Normalise ``"qkv,gateup"`` / ``["qkv"]`` / ``None`` to a tuple of fusion kinds."""
    if ties is None:
        return ()
    items = ties.split(",") if isinstance(ties, str) else list(ties)
    kinds = tuple(dict.fromkeys(item.strip() for item in items if item.strip()))
    unknown = [kind for kind in kinds if kind not in TIE_KINDS and kind != "none"]
    if unknown:
        raise BitallocError(
            f"unknown tie kind(s) {unknown}; choose from {sorted(TIE_KINDS)} (comma-separated) "
            "or 'none'"
        )
    return tuple(kind for kind in kinds if kind != "none")


def tie_groups(units: Sequence[Unit], ties: str | Sequence[str] | None) -> list[list[str]]:
    """Unit names grouped by fusion group for each requested kind (e.g. q/k/v per layer)."""
    groups: dict[str, list[str]] = {}
    for kind in parse_ties(ties):
        suffix = "." + TIE_KINDS[kind]
        for unit in units:
            if unit.group.endswith(suffix):
                groups.setdefault(unit.group, []).append(unit.name)
    return [members for members in groups.values() if len(members) > 1]


def check_profile_matches(
    units: Sequence[Unit], palette: Sequence[QuantFormat], profile: Profile
) -> None:
    """Raise unless the profile has a row per unit (in order) and a column per format."""
    if list(profile.units) != [u.name for u in units]:
        raise BitallocError(
            "the profile's units do not match this model's units; re-profile this model or pass "
            "the profile made for it"
        )
    missing = [f.name for f in palette if f.name not in profile.formats]
    if missing:
        raise BitallocError(
            f"the profile has no column for {missing}; re-profile with this palette"
        )


def build_problem(
    units: Sequence[Unit],
    palette: Sequence[QuantFormat],
    profile: Profile,
    avg_bits: float | None = None,
    *,
    max_bytes: float | None = None,
    ties: str | Sequence[str] | None = None,
) -> Problem:
    """The allocation problem: profile losses, exact bit and byte costs, the budgets given,
    and the profile's interaction terms when it has them.

    ``avg_bits`` bounds the stored bits of the units per weight; ``max_bytes`` bounds their
    stored bytes. ``ties`` ties fused projections (``"qkv"``, ``"gateup"``) to one format.
    """
    check_profile_matches(units, palette, profile)
    if avg_bits is None and max_bytes is None:
        raise BitallocError("give a budget: avg_bits (bits per weight) and/or max_bytes")
    formats = [f.name for f in palette]
    objective = np.stack([profile.column(f) for f in formats], axis=1)
    bits = cost_table(units, palette)
    budgets: dict[str, float] = {}
    if avg_bits is not None:
        check_budget(avg_bits, units, palette)
        budgets["bits"] = avg_bits * sum(u.numel for u in units)
    if max_bytes is not None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, float)) or max_bytes <= 0:
            raise BitallocError(f"max_bytes must be a positive number, got {max_bytes!r}")
        budgets["bytes"] = float(max_bytes)
    names = [u.name for u in units]
    interactions = (
        None
        if profile.interactions is None
        else profile.interactions.tables(names, formats, objective)
    )
    return Problem(
        objective=objective,
        costs={"bits": bits, "bytes": bits / 8},
        budgets=budgets,
        unit_names=names,
        option_names=formats,
        allowed=check_allowed(units, palette),
        ties=tie_groups(units, ties) or None,
        interactions=interactions,
    )


def default_method(profile: Profile, method: str | None) -> str:
    """``method``, or the default solver for this profile: ``qp`` when it carries interaction
    terms (the Lagrangian method cannot use them), else ``lagrangian``."""
    if method is not None:
        return method
    return "qp" if profile.interactions is not None else "lagrangian"


def describe_units(units: Sequence[Unit]) -> list[dict[str, Any]]:
    """Plain records of the units, stored in a profile's metadata as ``unit_info``."""
    return [
        {"name": u.name, "shape": list(u.shape), "layer": u.layer, "role": u.role, "group": u.group}
        for u in units
    ]


def units_from_profile(profile: Profile) -> list[Unit]:
    """The units a profile describes (``metadata["unit_info"]``), in row order."""
    info = profile.metadata.get("unit_info")
    if not info:
        raise BitallocError(
            "this profile does not describe its units (shapes, layers); re-create it with "
            "`bitalloc profile --out FILE` or pass --model so the units can be read from the model"
        )
    try:
        units = [
            Unit(
                name=str(d["name"]),
                shape=(int(d["shape"][0]), int(d["shape"][1])),
                layer=int(d["layer"]),
                role=str(d["role"]),
                group=str(d["group"]),
            )
            for d in info
        ]
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise BitallocError(f"malformed unit_info in the profile: {exc!r}") from None
    if [u.name for u in units] != list(profile.units):
        raise BitallocError("the profile's unit_info does not list its units in row order")
    return units


def to_allocation(
    units: Sequence[Unit],
    palette: Sequence[QuantFormat],
    profile: Profile,
    solution: Solution,
    budget: Budget | float | None,
    *,
    model: str,
    excluded: Mapping[str, int] | None = None,
) -> Allocation:
    """Turn a solver's choice into an :class:`Allocation` with its summaries. ``budget`` is
    the request (a number: ``avg_bits``). When the solution counts the units' stored bits
    (``resources["bits"]``, from :func:`build_problem`'s cost table), that count is the
    allocation's total; the allocation checks it against the formats."""
    column = {name: j for j, name in enumerate(profile.formats)}
    choices = [
        UnitChoice.of(unit, palette[int(j)], float(profile.loss[i, column[palette[int(j)].name]]))
        for i, (unit, j) in enumerate(zip(units, solution.choice))
    ]
    terms = profile.interactions
    pair_loss = 0.0
    if terms is not None:
        names = [f.name for f in palette]
        objective = np.stack([profile.column(f) for f in names], axis=1)
        index = {u.name: i for i, u in enumerate(units)}
        tables = terms.tables([u.name for u in units], names, objective)
        pair_loss = float(
            sum(
                t[solution.choice[index[a]], solution.choice[index[b]]]
                for (a, b), t in tables.items()
            )
        )
    bits = solution.resources.get("bits")
    return Allocation.from_choices(
        model=model,
        budget=budget,
        total_bits=None if bits is None else round(bits),
        units=choices,
        excluded=dict(excluded or {}),
        solver=solver_summary(solution),
        profile=profile_summary(profile, pair_loss),
        interaction_loss=pair_loss,
    )


def solver_summary(solution: Solution) -> SolverSummary:
    """The record of how a solver made its choice."""
    return SolverSummary(
        method=solution.method,
        status=solution.status,
        objective=solution.objective,
        lower_bound=solution.lower_bound,
        gap=solution.gap,
        wall_time_s=solution.wall_time_s,
    )


def profile_summary(profile: Profile, interaction_loss: float = 0.0) -> ProfileSummary:
    """The record of which profile predicted the losses (``interaction_loss``: the pairwise
    terms' share of the chosen allocation's predicted loss)."""
    meta = profile.metadata
    terms = profile.interactions
    return ProfileSummary(
        method=str(meta.get("method", "unknown")),
        tokens=meta.get("tokens"),
        seconds=meta.get("seconds"),
        model_fingerprint=meta.get("model_fingerprint"),
        calibration_fingerprint=meta.get("calibration_fingerprint"),
        cache=meta.get("cache"),
        interaction_pairs=0 if terms is None else len(terms.pairs),
        interaction_formats=None if terms is None else list(terms.formats),
        interaction_loss=interaction_loss,
    )


def solve_profile(
    profile: Profile,
    avg_bits: float | None = None,
    *,
    max_bytes: float | None = None,
    method: str | None = None,
    ties: str | Sequence[str] | None = None,
    formats: Sequence[str | QuantFormat] | str | None = None,
    units: Sequence[Unit] | None = None,
    options: Mapping[str, Any] | None = None,
) -> Allocation:
    """Allocate from a saved profile alone (no model): one solve, milliseconds.

    ``formats`` restricts the palette to a subset of the profile's columns (default: all of
    them). ``units`` overrides the unit descriptions stored in the profile. ``options`` go to
    the solver (e.g. ``{"time_limit": 10}`` for ``ilp``).
    """
    units = list(units) if units is not None else units_from_profile(profile)
    palette = parse_palette(formats) if formats is not None else _profile_palette(profile)
    problem = build_problem(units, palette, profile, avg_bits, max_bytes=max_bytes, ties=ties)
    solution = solve(problem, method=default_method(profile, method), **dict(options or {}))
    return to_allocation(
        units,
        palette,
        profile,
        solution,
        Budget(avg_bits=avg_bits, max_bytes=max_bytes),
        model=str(profile.metadata.get("model", "unknown")),
        excluded=profile.metadata.get("excluded"),
    )


def _profile_palette(profile: Profile) -> tuple[QuantFormat, ...]:
    return tuple(parse_format(name) for name in profile.formats)


@dataclass(frozen=True)
class FrontierPoint:
    """One budget of a frontier: the allocation and, once measured, its perplexity."""

    budget: float
    allocation: Allocation
    perplexity: float | None = None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON record of the point (formats per unit included)."""
        solver = self.allocation.data.solver
        return {
            "budget": self.budget,
            "avg_bits": self.allocation.avg_bits,
            "predicted_loss": self.allocation.data.predicted_loss,
            "perplexity": self.perplexity,
            "status": solver.status if solver else None,
            "gap": solver.gap if solver else None,
            "solve_ms": solver.wall_time_s * 1000 if solver else None,
            "formats": self.allocation.formats,
        }


@dataclass(frozen=True)
class Frontier:
    """Predicted loss (and measured perplexity, when verified) against the bit budget."""

    points: tuple[FrontierPoint, ...]
    method: str
    ties: tuple[str, ...]
    fp16_perplexity: float | None = None

    def table(self) -> str:
        """A text table, one row per budget."""
        measured = any(p.perplexity is not None for p in self.points)
        head = f"{'budget':>7} {'avg bits':>8} {'predicted':>10} {'gap':>9} {'ms':>7}"
        lines = [head + (f" {'perplexity':>11}" if measured else "")]
        for p in self.points:
            s = p.allocation.data.solver
            gap = "n/a" if s is None or s.gap is None else f"{s.gap:.2e}"
            ms = f"{s.wall_time_s * 1000:.1f}" if s else ""
            row = (
                f"{p.budget:7.3f} {p.allocation.avg_bits:8.3f} "
                f"{p.allocation.data.predicted_loss or 0.0:10.4f} {gap:>9} {ms:>7}"
            )
            if measured:
                row += f" {p.perplexity:11.3f}" if p.perplexity is not None else f" {'':>11}"
            lines.append(row)
        if self.fp16_perplexity is not None:
            lines.append(f"unquantized (fp16) perplexity: {self.fp16_perplexity:.3f}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON: method, ties, the points, and the fp16 perplexity when measured."""
        return {
            "method": self.method,
            "ties": list(self.ties),
            "fp16_perplexity": self.fp16_perplexity,
            "points": [p.to_json() for p in self.points],
        }


def parse_budgets(spec: str | Sequence[float]) -> list[float]:
    """Budgets from ``"2.5,3,3.5"``, ``"2.5:4.5:0.25"`` (start:stop:step, stop included), or
    a list of numbers."""
    if not isinstance(spec, str):
        values = [float(b) for b in spec]
    elif ":" in spec:
        try:
            start, stop, step = (float(x) for x in spec.split(":"))
        except ValueError:
            raise BitallocError(
                f"budgets {spec!r}: give start:stop:step, e.g. 2.5:4.5:0.25"
            ) from None
        if step <= 0 or stop < start:
            raise BitallocError(f"budgets {spec!r}: need step > 0 and stop >= start")
        count = int(math.floor((stop - start) / step + 1e-9)) + 1
        values = [round(start + i * step, 10) for i in range(count)]
    else:
        try:
            values = [float(b) for b in spec.split(",") if b.strip()]
        except ValueError:
            raise BitallocError(f"budgets {spec!r}: give numbers separated by commas") from None
    if not values:
        raise BitallocError("give at least one budget")
    return values


def frontier(
    profile: Profile,
    budgets: str | Sequence[float],
    *,
    method: str | None = None,
    ties: str | Sequence[str] | None = None,
    formats: Sequence[str | QuantFormat] | str | None = None,
    units: Sequence[Unit] | None = None,
    options: Mapping[str, Any] | None = None,
) -> Frontier:
    """Re-solve one profile for many average-bit budgets (no re-profiling).

    Every budget is checked against the feasible range first, so a bad budget fails before
    any solve. Measure the points with :func:`bitalloc.allocator.measure_frontier`.
    """
    values = parse_budgets(budgets)
    method = default_method(profile, method)
    units = list(units) if units is not None else units_from_profile(profile)
    palette = parse_palette(formats) if formats is not None else _profile_palette(profile)
    for value in values:
        check_budget(value, units, palette)
    points = tuple(
        FrontierPoint(
            value,
            solve_profile(
                profile,
                value,
                method=method,
                ties=ties,
                formats=[f.name for f in palette],
                units=units,
                options=options,
            ),
        )
        for value in values
    )
    return Frontier(points, method, parse_ties(ties))
