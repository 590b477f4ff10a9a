"""KV-cache and joint weights + KV allocation problems, built from profiles alone (no model).

KV units (:func:`bitalloc.kv.kv_units`) are ordinary rows of a :class:`~bitalloc.solvers.Problem`:
their options are KV formats and their cost is what the cache stores at a context length and
batch size (:meth:`~bitalloc.kv.KVFormat.cache_bits`), so every solver handles them as it
handles weight matrices.

- :func:`build_kv_problem`: the KV units alone under a budget in average bits per cached
  element (``kv_avg_bits``). A sliding-window layer caches ``min(context, window)`` tokens, so
  both its cost and its element count are taken at that many tokens.
- :func:`build_joint_problem`: weight units and KV units in one problem whose options are the
  weight palette followed by the KV palette (an ``allowed`` mask keeps each unit to its own
  kind) and whose one budget is bytes: weights + KV cache + the parameters outside the
  allocation must fit ``memory_bytes``. Both profiles must predict loss in nats (every weight
  profiler does; the KV ``kl`` and ``loss`` methods do, ``proxy`` does not), since one sum
  trades the two against each other.
- :func:`separate_splits`: the alternative a user has without a joint solver: give the KV
  cache the bytes of one uniform pair, the weights the rest, and solve each alone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from bitalloc.config.messages import CONTEXT_BATCH
from bitalloc.errors import BitallocError, InfeasibleBudgetError
from bitalloc.formats import QuantFormat
from bitalloc.kv.formats import KVFormat, stored_tokens
from bitalloc.kv.record import FIXED_BYTES_PER_PARAMETER, KVAllocation, KVChoice, SeparateSplit
from bitalloc.models import Unit
from bitalloc.planning import (
    build_problem,
    check_allowed,
    check_profile_matches,
    cost_table,
    profile_summary,
    range_decimals,
    solver_summary,
)
from bitalloc.sensitivity import Profile
from bitalloc.solvers import Problem, Solution, solve


def check_context_batch(context_len: object, batch_size: object) -> tuple[int, int]:
    """Both must be positive integers; a clear error otherwise."""
    for what, value in (("context_len", context_len), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BitallocError(CONTEXT_BATCH.format(what=what, value=value))
    return int(context_len), int(batch_size)


def _geometry(unit: Unit) -> tuple[int, int, int | None]:
    """(n_kv_heads, head_dim, sliding window or None) of a KV unit."""
    if unit.kind != "kv":
        raise BitallocError(f"{unit.name} is a {unit.kind} unit, not a KV unit (kv_units())")
    rows, head_dim = unit.shape
    # A plain Unit of kind kv (built by hand) is a full-attention layer.
    return rows // 2, head_dim, getattr(unit, "window", None)


def kv_cost_table(
    units: Sequence[Unit], palette: Sequence[KVFormat], context_len: int, batch_size: int = 1
) -> np.ndarray:
    """Exact stored bits of every KV unit's cache under every KV format, (n_units, n_formats);
    a sliding-window unit stores the last ``min(context_len, window)`` tokens."""
    context_len, batch_size = check_context_batch(context_len, batch_size)
    rows = []
    for unit in units:
        n_kv, head_dim, window = _geometry(unit)
        rows.append(
            [f.cache_bits(context_len, batch_size, n_kv, head_dim, window) for f in palette]
        )
    return np.array(rows, dtype=np.float64)


def kv_elements(units: Sequence[Unit], context_len: int, batch_size: int = 1) -> int:
    """Cached elements (keys and values) the KV units store at a context and batch: every
    token for full attention, ``min(context_len, window)`` for a sliding-window unit."""
    return batch_size * sum(u.numel * stored_tokens(context_len, _geometry(u)[2]) for u in units)


def kv_feasible_avg_bits(
    units: Sequence[Unit], palette: Sequence[KVFormat], context_len: int
) -> tuple[float, float]:
    """Lowest and highest achievable bits per cached element at this context."""
    costs = kv_cost_table(units, palette, context_len)
    elements = kv_elements(units, context_len)
    return float(costs.min(axis=1).sum() / elements), float(costs.max(axis=1).sum() / elements)


def check_kv_budget(
    kv_avg_bits: object, units: Sequence[Unit], palette: Sequence[KVFormat], context_len: int
) -> float:
    """Raise :class:`InfeasibleBudgetError` naming the feasible range when ``kv_avg_bits`` is
    outside what the KV palette reaches at this context."""
    if (
        isinstance(kv_avg_bits, bool)
        or not isinstance(kv_avg_bits, (int, float))
        or not math.isfinite(kv_avg_bits)
    ):
        raise BitallocError(
            f"kv_avg_bits must be a finite number of bits per cached element, got {kv_avg_bits!r}"
        )
    lo, hi = kv_feasible_avg_bits(units, palette, context_len)
    if kv_avg_bits < lo - 1e-12 or kv_avg_bits > hi + 1e-12:
        d = range_decimals(kv_avg_bits, lo, hi)
        raise InfeasibleBudgetError(
            f"kv_avg_bits={kv_avg_bits:.{d}f} is outside what the KV palette can reach at a "
            f"{context_len}-token context: choose between {lo:.{d}f} (every layer at its "
            f"cheapest pair) and {hi:.{d}f} (every layer at its richest)",
            feasible_range=(lo, hi),
        )
    return float(kv_avg_bits)


def _objective(profile: Profile, units: Sequence[Unit], palette: Sequence[object]) -> np.ndarray:
    if list(profile.units) != [u.name for u in units]:
        raise BitallocError(
            "the KV profile's units do not match this model's attention layers; re-profile"
        )
    missing = [f.name for f in palette if f.name not in profile.formats]
    if missing:
        raise BitallocError(f"the KV profile has no column for {missing}; re-profile this palette")
    return np.stack([profile.column(f.name) for f in palette], axis=1)


def build_kv_problem(
    units: Sequence[Unit],
    palette: Sequence[KVFormat],
    profile: Profile,
    kv_avg_bits: float | None = None,
    *,
    context_len: int,
    batch_size: int = 1,
    max_bytes: float | None = None,
    ties: Sequence[Sequence[str]] | None = None,
) -> Problem:
    """The KV units alone: cost ``bits`` (and ``bytes``) of the cache at the context and batch,
    budget ``kv_avg_bits`` per cached element and/or ``max_bytes``. ``ties`` groups layers that
    share one decision (e.g. :attr:`bitalloc.kv.reduce.Clustering.ties`)."""
    if kv_avg_bits is None and max_bytes is None:
        raise BitallocError("give a KV budget: kv_avg_bits (bits per cached element) or max_bytes")
    objective = _objective(profile, units, palette)
    bits = kv_cost_table(units, palette, context_len, batch_size)
    budgets: dict[str, float] = {}
    if kv_avg_bits is not None:
        check_kv_budget(kv_avg_bits, units, palette, context_len)
        budgets["bits"] = kv_avg_bits * kv_elements(units, context_len, batch_size)
    if max_bytes is not None:
        budgets["bytes"] = float(max_bytes)
    return Problem(
        objective=objective,
        costs={"bits": bits, "bytes": bits / 8},
        budgets=budgets,
        unit_names=[u.name for u in units],
        option_names=[f.name for f in palette],
        ties=[list(t) for t in ties] if ties else None,
    )


def to_kv_allocation(
    units: Sequence[Unit],
    palette: Sequence[KVFormat],
    profile: Profile,
    choice: Sequence[int],
    *,
    context_len: int,
    batch_size: int,
    budget: float | None,
    solution: Solution | None = None,
) -> KVAllocation:
    """The :class:`KVAllocation` of choosing ``palette[choice[i]]`` for KV unit ``i``."""
    objective = _objective(profile, units, palette)
    layers = []
    for i, (unit, j) in enumerate(zip(units, choice)):
        fmt = palette[int(j)]
        n_kv, head_dim, window = _geometry(unit)
        layers.append(
            KVChoice(
                name=unit.name,
                layer=unit.layer,
                format=fmt.name,
                bits_per_element=fmt.bits_per_element(head_dim, n_kv, context_len, window),
                cache_bits=fmt.cache_bits(context_len, batch_size, n_kv, head_dim, window),
                predicted_loss=float(objective[i, int(j)]),
                window=window,
            )
        )
    n_kv, head_dim, _ = _geometry(units[0])
    total = sum(c.cache_bits for c in layers)
    return KVAllocation(
        context_len=context_len,
        batch_size=batch_size,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        budget=budget,
        avg_bits=total / kv_elements(units, context_len, batch_size),
        total_bits=total,
        bytes=total / 8,
        predicted_loss=float(sum(c.predicted_loss for c in layers)),
        layers=layers,
        solver=None if solution is None else solver_summary(solution),
        profile=profile_summary(profile),
    )


def fixed_bytes(excluded: Mapping[str, int]) -> float:
    """Bytes of the parameters outside the allocation, at :data:`FIXED_BYTES_PER_PARAMETER`."""
    return float(FIXED_BYTES_PER_PARAMETER * sum(excluded.values()))


@dataclass(frozen=True)
class JointCosts:
    """What a joint memory budget costs: weight units and KV units with their palettes, the
    context and batch the cache holds, and the bytes of the parameters outside the allocation.
    Enough to check a budget before anything is profiled."""

    weight_units: tuple[Unit, ...]
    weight_palette: tuple[QuantFormat, ...]
    kv_units: tuple[Unit, ...]
    kv_palette: tuple[KVFormat, ...]
    context_len: int
    batch_size: int
    fixed_bytes: float

    def weight_bytes(self) -> np.ndarray:
        """(n_weight_units, n_weight_formats) stored bytes."""
        return cost_table(self.weight_units, self.weight_palette) / 8

    def kv_bytes(self) -> np.ndarray:
        """(n_kv_units, n_kv_formats) cache bytes at the context and batch."""
        return kv_cost_table(self.kv_units, self.kv_palette, self.context_len, self.batch_size) / 8

    def memory_range(self) -> tuple[float, float]:
        """Total bytes with everything at its cheapest and at its richest option."""
        w, kv = self.weight_bytes(), self.kv_bytes()
        lo = self.fixed_bytes + w.min(axis=1).sum() + kv.min(axis=1).sum()
        hi = self.fixed_bytes + w.max(axis=1).sum() + kv.max(axis=1).sum()
        return float(lo), float(hi)

    def check_memory(self, memory_bytes: object) -> float:
        """Raise :class:`InfeasibleBudgetError` naming the minimum when nothing fits."""
        if (
            isinstance(memory_bytes, bool)
            or not isinstance(memory_bytes, (int, float))
            or not math.isfinite(memory_bytes)
            or memory_bytes <= 0
        ):
            raise BitallocError(
                f"memory_bytes must be a positive number of bytes, got {memory_bytes!r}"
            )
        lo, hi = self.memory_range()
        if memory_bytes < lo * (1 - 1e-12):
            w = self.weight_bytes().min(axis=1).sum()
            kv = self.kv_bytes().min(axis=1).sum()
            raise InfeasibleBudgetError(
                f"memory_bytes={memory_bytes:,.0f} ({memory_bytes / 2**20:.2f} MiB) is below the "
                f"minimum of {lo:,.0f} bytes ({lo / 2**20:.2f} MiB): other parameters at 16 bits "
                f"{self.fixed_bytes / 2**20:.2f} MiB + every weight matrix at its cheapest format "
                f"{w / 2**20:.2f} MiB + the KV cache at its cheapest pairs for "
                f"{self.context_len} tokens x batch {self.batch_size} {kv / 2**20:.2f} MiB; raise "
                "the budget, or shorten the context or the batch",
                feasible_range=(lo, hi),
            )
        return float(memory_bytes)


@dataclass(frozen=True)
class JointSpace(JointCosts):
    """Everything a joint memory budget is decided over (weights first, then KV units): the
    costs and both profiles."""

    weight_profile: Profile
    kv_profile: Profile


def build_joint_problem(
    space: JointSpace, memory_bytes: float, *, ties: Sequence[Sequence[str]] | None = None
) -> Problem:
    """One problem over weight units and KV units with one ``bytes`` budget (see the module
    docstring). The weight profile's interaction terms are kept (on the weight block)."""
    space.check_memory(memory_bytes)
    n_w, k_w = len(space.weight_units), len(space.weight_palette)
    n_kv, k_kv = len(space.kv_units), len(space.kv_palette)
    check_profile_matches(space.weight_units, space.weight_palette, space.weight_profile)
    names = [f.name for f in space.weight_palette]
    weight_objective = np.stack([space.weight_profile.column(f) for f in names], axis=1)
    kv_objective = _objective(space.kv_profile, space.kv_units, space.kv_palette)
    objective = np.zeros((n_w + n_kv, k_w + k_kv))
    objective[:n_w, :k_w] = weight_objective
    objective[n_w:, k_w:] = kv_objective
    cost = np.zeros_like(objective)
    cost[:n_w, :k_w] = space.weight_bytes()
    cost[n_w:, k_w:] = space.kv_bytes()
    allowed = np.zeros(objective.shape, dtype=bool)
    # A weight unit takes the weight formats that can store it (row-length rules).
    allowed[:n_w, :k_w] = check_allowed(space.weight_units, space.weight_palette)
    allowed[n_w:, k_w:] = True
    interactions = None
    terms = space.weight_profile.interactions
    if terms is not None:
        # Pairwise terms live on the weight block; KV columns never pair with anything.
        interactions = {}
        tables = terms.tables([u.name for u in space.weight_units], names, weight_objective)
        for pair, table in tables.items():
            padded = np.zeros((k_w + k_kv, k_w + k_kv))
            padded[:k_w, :k_w] = table
            interactions[pair] = padded
    return Problem(
        objective=objective,
        costs={"bytes": cost},
        budgets={"bytes": float(memory_bytes) - space.fixed_bytes},
        allowed=allowed,
        unit_names=[u.name for u in space.weight_units] + [u.name for u in space.kv_units],
        option_names=[f.name for f in space.weight_palette] + [f.name for f in space.kv_palette],
        ties=[list(t) for t in ties] if ties else None,
        interactions=interactions,
    )


def split_solution(space: JointSpace, solution: Solution) -> tuple[Solution, np.ndarray]:
    """The weight part of a joint solution (as a :class:`Solution` over the weight palette)
    and the KV part's choices as indices into the KV palette."""
    n_w, k_w = len(space.weight_units), len(space.weight_palette)
    weights = dataclasses.replace(solution, choice=np.array(solution.choice[:n_w]))
    return weights, np.array(solution.choice[n_w:]) - k_w


def solve_separate(
    space: JointSpace,
    memory_bytes: float,
    share: int,
    *,
    method: str,
    options: Mapping[str, object] | None = None,
    ties: str | Sequence[str] | None = None,
) -> tuple[Solution, Solution] | None:
    """One separate allocation at ``memory_bytes``: the KV cache gets the bytes of every layer
    at ``space.kv_palette[share]`` and its layers choose pairs within them; the weights get the
    rest. Returns the (weights, KV) solutions, or None when the rest is below the weights'
    cheapest formats."""
    w_bytes = space.weight_bytes()
    w_lo, w_hi = float(w_bytes.min(axis=1).sum()), float(w_bytes.max(axis=1).sum())
    kv_bytes = float(space.kv_bytes()[:, share].sum())
    rest = memory_bytes - space.fixed_bytes - kv_bytes
    if rest < w_lo * (1 - 1e-12):
        return None
    weight_problem = build_problem(
        space.weight_units,
        space.weight_palette,
        space.weight_profile,
        max_bytes=min(rest, w_hi),
        ties=ties,
    )
    kv_problem = build_kv_problem(
        space.kv_units,
        space.kv_palette,
        space.kv_profile,
        context_len=space.context_len,
        batch_size=space.batch_size,
        max_bytes=kv_bytes,
    )
    run = dict(options or {})
    return solve(weight_problem, method=method, **run), solve(kv_problem, method=method, **run)


def separate_splits(
    space: JointSpace,
    memory_bytes: float,
    *,
    method: str,
    options: Mapping[str, object] | None = None,
    ties: str | Sequence[str] | None = None,
) -> list[SeparateSplit]:
    """Separate allocations at the same total (:func:`solve_separate`), one for every uniform
    pair of the KV palette whose cache leaves the weights enough bytes; each records the KV
    loss of mixed pairs within the share and of every layer at that pair."""
    kv_objective = _objective(space.kv_profile, space.kv_units, space.kv_palette)
    kv_bytes = space.kv_bytes()
    numel = sum(u.numel for u in space.weight_units)
    out = []
    for j, fmt in enumerate(space.kv_palette):
        solved = solve_separate(space, memory_bytes, j, method=method, options=options, ties=ties)
        if solved is None:
            continue
        weights, kv = solved
        out.append(
            SeparateSplit(
                kv_share=fmt.name,
                kv_bytes=float(kv_bytes[:, j].sum()),
                weight_avg_bits=8 * float(weights.resources["bytes"]) / numel,
                weight_loss=float(weights.objective),
                kv_loss_mixed=float(kv.objective),
                kv_loss_uniform=float(kv_objective[:, j].sum()),
            )
        )
    return out
