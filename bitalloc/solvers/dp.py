"""Exact dynamic programming over a discretized budget (one budget).

The single-budget problem is a multiple-choice knapsack: every unit takes one allowed option,
``sum_i cost[i, x_i] <= B``, minimise ``sum_i objective[i, x_i]``. As in SAQ and Q-Palette,
the budget is cut into bins of ``resolution`` cost units and a DP over (unit, bins used) finds
the best choice. The DP only spans the room above the cheapest total: unit ``i`` pays
``extra[i, j] = cost[i, j] - min_j cost[i, j]`` (its cheapest allowed option is free) out of
``room = B - sum_i min_j cost[i, j]``.

Two DPs bracket the optimum:

* the **primal** DP rounds every extra cost UP to whole bins (``ceil(extra / r)``) with
  capacity ``floor(room / r)`` bins, so every choice it returns meets the real budget;
* the **bound** DP rounds extra costs DOWN (``floor(extra / r)``) with the same capacity. Any
  choice that meets the real budget has ``sum_i floor(extra_i / r) <= floor(room / r)`` (a sum
  of integers below ``room / r``), so it is feasible there too and the bound DP's optimum is a
  certified lower bound.

When ``r`` divides every extra cost both DPs are the same problem and the primal DP is
exactly optimal. With ``resolution=None`` the solver looks for such an ``r``: the greatest
common step of the extra costs (integers, or integers over a power of two); if that step needs
more than ``max_bins`` bins it falls back to ``room / max_bins`` and reports the certified gap.
In that inexact case the reported lower bound is the larger of the bound DP and the LP
relaxation's bound (the Lagrangian dual, tighter when there are many units per bin), a greedy
fill spends the budget that rounding up left unused, and when the Lagrangian choice is better
than the DP's (many units per bin) it is returned instead, with ``info["primal"]`` saying so.
Then (``refine=True``) a second DP runs on the options that reduced-cost fixing at the
Lagrangian multiplier keeps (those that can still beat the best choice so far): the room
above their cheapest total is much smaller, so its bins are much finer, and the optimum is
the better of the best choice so far and that DP's answer (``info["refine_*"]``). On 40 x 5
instances with fractional bits x real weight counts, where the first DP alone stayed up to
1.3e-2 (certified) and 1.2e-2 (actual) from the optimum, the second DP was exact every time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Any, ClassVar

import numpy as np

from bitalloc.errors import BitallocError
from bitalloc.solvers.base import BaseSolver, SolverOutput
from bitalloc.solvers.lagrangian import LagrangianSolver
from bitalloc.solvers.moves import greedy_fill, min_objective_choice
from bitalloc.solvers.problem import Problem, feasibility_tolerance
from bitalloc.solvers.registry import register_solver

#: ``extra / r`` within this relative distance of a positive integer counts as that integer,
#: so that e.g. ``0.3 / 0.1 = 2.9999999999999996`` takes 3 bins. Kept well below the budget's
#: feasibility tolerance (1e-9 relative): snapping shifts a choice's total by at most this
#: fraction of its extra cost.
SNAP_RTOL = 1e-10
#: Powers of two tried when looking for a common step of non-integer costs (0.5, 0.25, ...).
_MAX_STEP_POWER = 30


def _common_step(extras: np.ndarray) -> float | None:
    """Largest ``g = m / 2**p`` dividing every value exactly, or ``None`` if there is none.

    Multiplying by a power of two is exact in floating point, so the test is exact too.
    """
    if extras.size == 0:
        return None
    values = np.unique(extras)
    for power in range(_MAX_STEP_POWER + 1):
        scaled = values * 2.0**power
        if scaled[-1] >= 2.0**53:  # beyond this floats cannot tell integers apart
            return None
        if np.array_equal(scaled, np.floor(scaled)):
            return int(np.gcd.reduce(scaled.astype(np.int64))) / 2.0**power
    return None


def _bins(quotient: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(floor, ceil)`` of ``quotient`` as floats, snapping near-integers (see SNAP_RTOL)."""
    nearest = np.rint(quotient)
    near = (nearest >= 1) & (np.abs(quotient - nearest) <= SNAP_RTOL * nearest)
    return np.where(near, nearest, np.floor(quotient)), np.where(near, nearest, np.ceil(quotient))


def _option_dtype(k: int) -> type[np.unsignedinteger]:
    for dtype in (np.uint8, np.uint16, np.uint32):
        if k <= np.iinfo(dtype).max + 1:
            return dtype
    return np.uint64


class _Knapsack:
    """One discretized multiple-choice knapsack: integer weights, capacity ``cap`` bins.

    ``weights`` is ``(n, k)`` int64 with ``cap + 1`` marking an excluded option; every unit
    has a weight-0 option (its cheapest allowed one). Options dominated in (weight, value)
    are dropped up front; units left with one option are fixed and skip the DP.
    """

    def __init__(self, values: np.ndarray, weights: np.ndarray, cap: int) -> None:
        n = values.shape[0]
        values = np.where(weights <= cap, values, np.inf)
        # Sort each row by (weight, value); an option survives if it beats every lighter one.
        order = np.lexsort((values, weights), axis=1)
        sorted_w = np.take_along_axis(weights, order, axis=1)
        sorted_v = np.take_along_axis(values, order, axis=1)
        before = np.minimum.accumulate(sorted_v, axis=1)
        before = np.concatenate([np.full((n, 1), np.inf), before[:, :-1]], axis=1)
        keep = sorted_v < before
        counts = keep.sum(axis=1)
        self.cap = cap
        self.weights = weights
        self.fixed = np.flatnonzero(counts == 1)
        self.fixed_choice = order[self.fixed, 0]
        self.active = np.flatnonzero(counts > 1)
        # Per active unit: its surviving options in increasing weight (decreasing value).
        rows, cols = np.nonzero(keep[self.active])
        split = np.cumsum(counts[self.active])[:-1]
        units = self.active[rows]
        self.options = np.split(order[units, cols], split)
        self.option_w = np.split(sorted_w[units, cols], split)
        self.option_v = np.split(sorted_v[units, cols], split)
        self.constant = float(sorted_v[self.fixed, 0].sum())
        self._f = np.zeros(1)
        self._pointers: np.ndarray | None = None
        self._lengths = np.zeros(0, dtype=np.int64)

    def run(self, keep_choice: bool, k: int) -> None:
        """Fill the DP table; with ``keep_choice`` also the back-pointers for :meth:`choice`."""
        cap, m = self.cap, self.active.size
        # f[b] = best value of the units so far using at most b bins. Only a prefix of
        # `length` bins can differ (the heaviest weights so far sum to less); beyond it f is
        # flat, so early units work on short arrays.
        f, spare = np.zeros(cap + 1), np.empty(cap + 1)  # this unit reads f, writes spare
        cand = np.empty(cap + 1)
        better = np.empty(cap + 1, dtype=bool)
        pointers = np.empty((m, cap + 1), dtype=_option_dtype(k)) if keep_choice else None
        lengths = np.empty(m, dtype=np.int64)
        length = 1
        for t in range(m):
            opts, ws, vs = self.options[t], self.option_w[t], self.option_v[t]
            new_length = min(cap, length - 1 + int(ws[-1])) + 1
            f[length:new_length] = f[length - 1]
            length = new_length
            old, new = f[:length], spare[:length]
            np.add(old, vs[0], out=new)  # the weight-0 option
            if pointers is not None:
                row = pointers[t, :length]
                row[:] = opts[0]
            for j in range(1, len(opts)):
                w = int(ws[j])
                if w >= length:
                    break  # weights increase along the row
                span = length - w
                c, tail = cand[:span], new[w:]
                np.add(old[:span], vs[j], out=c)
                if pointers is not None:
                    # Strictly better only: among equal values the lighter option stays.
                    mask = better[:span]
                    np.less(c, tail, out=mask)
                    np.putmask(row[w:], mask, opts[j])
                np.minimum(tail, c, out=tail)
            lengths[t] = length
            f, spare = spare, f
        self._f = f[:length].copy()
        self._pointers = pointers
        self._lengths = lengths

    def value(self, b: int) -> float:
        """Best value within ``b`` bins (after :meth:`run`)."""
        return float(self._f[min(b, self._f.size - 1)]) + self.constant

    def choice(self, b: int) -> np.ndarray:
        """An optimal choice within ``b`` bins (after ``run(keep_choice=True)``)."""
        if self._pointers is None:
            raise RuntimeError("run(keep_choice=True) first")
        choice = np.empty(self.weights.shape[0], dtype=np.int64)
        choice[self.fixed] = self.fixed_choice
        # Plain Python ints: this loop is sequential and numpy scalars would slow it down.
        lengths = self._lengths.tolist()
        units = self.active.tolist()
        pointers, weights = self._pointers, self.weights
        for t in range(len(units) - 1, -1, -1):
            b = min(b, lengths[t] - 1)
            unit = units[t]
            j = int(pointers[t, b])
            choice[unit] = j
            b -= int(weights[unit, j])
        return choice


@dataclass(frozen=True)
class _Pass:
    """What one discretized DP found (see :meth:`DPSolver._pass`)."""

    choice: np.ndarray
    primal_value: float
    bound_value: float
    exact: bool
    resolution: float
    how: str
    bins: int
    dp_units: int


@register_solver
class DPSolver(BaseSolver):
    """Dynamic programming over a discretized budget, for problems with at most one budget.

    Guarantees: the returned choice always meets the budget (extra costs are rounded up to
    whole bins); it is exactly optimal when the resolution divides every extra cost (then
    ``info["exact"]`` is True and the status ``"optimal"``); otherwise its distance from the
    optimum is at most the reported certified gap (the lower bound is the larger of a second
    DP that rounds costs down and the LP relaxation's bound). With ``resolution=None`` and
    integer budgeted costs (or multiples of a common power-of-two fraction) needing at most
    ``max_bins`` bins above the cheapest total, the result is exact. (Quotients within
    ``SNAP_RTOL`` of an integer count as that integer, so e.g. ``resolution=0.1`` is exact for
    costs in tenths.) Time is ``O(n * k * bins)``, twice that when inexact; memory is
    ``n * (bins + 1)`` bytes of back-pointers (2 bytes each beyond 256 options).

    With no budget, every unit takes its lowest-objective allowed option (ties: cheapest in
    each cost table in order, then lowest index), which is optimal; if that choice fits the
    budget it is returned as optimal without a DP.

    Args:
        resolution: Cost units per bin, or ``None`` to choose it (exact when possible).
        max_bins: Most bins the DP may use; with ``resolution=None`` the bin count when no
            exact step fits, with an explicit resolution a limit that raises when exceeded.
        max_memory_bytes: Memory for back-pointers (default 1 GiB). An automatic resolution
            uses fewer bins to fit; an explicit one that would need more is refused before
            anything is allocated.
        fill: When inexact, spend budget left by rounding on greedy improving moves.
        refine: When inexact, run a second DP on the options that can still beat the best
            choice found (reduced-cost fixing at the Lagrangian multiplier), with bins cut
            from that much smaller room; exact whenever the second DP is.
    """

    name = "dp"
    max_budgets = 1
    supports_interactions: ClassVar[bool] = False
    exact = True

    def __init__(
        self,
        *,
        resolution: float | None = None,
        max_bins: int = 20_000,
        max_memory_bytes: int = 1024**3,
        fill: bool = True,
        refine: bool = True,
    ) -> None:
        if resolution is not None:
            if isinstance(resolution, (bool, np.bool_)) or not isinstance(resolution, Real):
                raise BitallocError(
                    f"resolution must be a positive number or None (automatic), got {resolution!r}"
                )
            resolution = float(resolution)
            if not (math.isfinite(resolution) and resolution > 0):
                raise BitallocError(
                    f"resolution must be a positive finite number of cost units per bin, got "
                    f"{resolution!r}; or pass None to choose it automatically"
                )
        for label, value in (("max_bins", max_bins), ("max_memory_bytes", max_memory_bytes)):
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise BitallocError(f"{label} must be an int, got {value!r}")
            if value < 1:
                raise BitallocError(f"{label} must be >= 1, got {value}")
        for label, flag in (("fill", fill), ("refine", refine)):
            if not isinstance(flag, bool):
                raise BitallocError(f"{label} must be True or False, got {flag!r}")
        self.resolution = resolution
        self.max_bins = int(max_bins)
        self.max_memory_bytes = int(max_memory_bytes)
        self.fill = fill
        self.refine = refine

    def _pick_resolution(
        self, extras: np.ndarray, room: float, bin_limit: int
    ) -> tuple[float, str]:
        """Cost units per bin and how they were chosen."""
        if self.resolution is not None:
            return self.resolution, "given"
        step = _common_step(extras)
        if step is not None and room / step <= bin_limit:
            return step, "common_step"
        if room > 0:
            return room / bin_limit, "room/max_bins"
        # No room: only free (extra 0) options fit. Bins of the smallest positive extra make
        # both roundings agree (every positive extra takes at least one bin).
        return (float(extras.min()) if extras.size else 1.0), "no_room"

    def _solve(self, problem: Problem) -> SolverOutput:
        objective, allowed = problem.objective, problem.allowed
        n, k = objective.shape
        rows = np.arange(n)
        if not problem.budgets:
            choice = min_objective_choice(objective, allowed, list(problem.costs.values()))
            return SolverOutput(choice, problem.objective_of(choice), {"case": "unconstrained"})

        ((budget_name, budget),) = problem.budgets.items()
        cost = problem.costs[budget_name]
        info: dict[str, Any] = {"budget_name": budget_name}
        unconstrained = min_objective_choice(objective, allowed, [cost])
        if cost[rows, unconstrained].sum() <= budget:
            info["case"] = "budget_not_binding"
            return SolverOutput(unconstrained, problem.objective_of(unconstrained), info)

        first = self._pass(objective, cost, allowed, budget, k)
        choice = first.choice
        info.update(
            case="dp",
            resolution=first.resolution,
            resolution_source=first.how,
            bins=first.bins,
            dp_units=first.dp_units,
            exact=first.exact,
            primal_dp_objective=first.primal_value,
        )
        if first.exact:
            # Both discretizations are the real problem: the DP choice is optimal.
            info["bound_dp_objective"] = info["primal_dp_objective"]
            return SolverOutput(choice, problem.objective_of(choice), info)

        bound_dp = first.bound_value
        # The LP relaxation's bound (Lagrangian dual) is often tighter than rounding down
        # when there are many units per bin; both are certified, so report the larger.
        lagrangian = LagrangianSolver().solve(problem)
        lp_bound = lagrangian.lower_bound
        info.update(bound_dp_objective=bound_dp, lp_bound=lp_bound)
        lower_bound = bound_dp if lp_bound is None else max(bound_dp, lp_bound)
        if self.fill:
            choice, _, moves = greedy_fill(
                objective, cost, allowed, budget, choice, max_rounds=10_000
            )
            info["fill_moves"] = moves
        # With about as many units as bins, rounding every unit up wastes much of the budget
        # and the Lagrangian choice (computed for the bound anyway) is better: keep the better
        # one and say which.
        info["primal"] = "dp"
        if lagrangian.objective < problem.objective_of(choice):
            choice = lagrangian.choice
            info["primal"] = "lagrangian"
        multiplier = lagrangian.info.get("multiplier")
        if self.refine and multiplier is not None and math.isfinite(multiplier):
            choice, lower_bound = self._refine(
                problem, choice, lower_bound, float(multiplier), info
            )
        return SolverOutput(choice, lower_bound, info)

    def _pass(
        self, objective: np.ndarray, cost: np.ndarray, allowed: np.ndarray, budget: float, k: int
    ) -> _Pass:
        """One discretized DP (and, when inexact, the rounded-down bound DP) over ``allowed``."""
        n = objective.shape[0]
        cheapest = np.where(allowed, cost, np.inf).min(axis=1)
        extra = np.where(allowed, cost - cheapest[:, None], 0.0)
        # solve() accepts budgets a rounding error below the cheapest total; treat them as it.
        room = max(budget - float(cheapest.sum()), 0.0)
        # An automatic resolution also keeps the back-pointers (n x bins) within the memory
        # limit, so big problems get coarser bins instead of an error.
        itemsize = np.dtype(_option_dtype(k)).itemsize
        bin_limit = min(self.max_bins, self.max_memory_bytes // (n * itemsize) - 1)
        if self.resolution is None and bin_limit < 1:
            raise BitallocError(
                f"{n} units leave no room for DP bins within max_memory_bytes="
                f"{self.max_memory_bytes:,}; raise max_memory_bytes or use 'lagrangian'"
            )
        resolution, how = self._pick_resolution(
            extra[allowed & (extra > 0)], room, max(bin_limit, 1)
        )
        capacity = room / resolution
        if capacity > self.max_bins * (1 + SNAP_RTOL):
            raise BitallocError(
                f"resolution {resolution:.6g} cuts the room above the cheapest total "
                f"({room:.6g}) into {capacity:.6g} bins, more than max_bins={self.max_bins}; "
                "use a coarser resolution, raise max_bins, or pass resolution=None"
            )
        cap = int(_bins(np.array([capacity]))[0][0])
        low_q, high_q = _bins(extra / resolution)

        # Disallowed options and options over the capacity are excluded (weight cap + 1).
        low_w, high_w = (
            np.where(allowed, np.minimum(q, cap + 1), cap + 1).astype(np.int64)
            for q in (low_q, high_q)
        )
        exact = bool(np.array_equal(low_w, high_w))

        # Values relative to each unit's best allowed objective keep the DP sums small.
        base = np.where(allowed, objective, np.inf).min(axis=1)
        values = np.where(allowed, objective - base[:, None], 0.0)
        offset = float(base.sum())
        primal = _Knapsack(values, high_w, cap)
        needed = primal.active.size * (cap + 1) * itemsize
        if needed > self.max_memory_bytes:
            raise BitallocError(
                f"the DP needs {needed:,} bytes of back-pointers ({primal.active.size} units x "
                f"{cap + 1} bins), above max_memory_bytes={self.max_memory_bytes:,}; lower "
                "max_bins or use a coarser resolution, raise max_memory_bytes, or use another "
                "method (e.g. 'lagrangian')"
            )
        primal.run(keep_choice=True, k=k)
        primal_value = primal.value(cap) + offset
        bound_value = primal_value
        if not exact:
            bound = _Knapsack(values, low_w, cap)
            bound.run(keep_choice=False, k=k)
            bound_value = bound.value(cap) + offset
        return _Pass(
            choice=primal.choice(cap),
            primal_value=primal_value,
            bound_value=bound_value,
            exact=exact,
            resolution=resolution,
            how=how,
            bins=cap,
            dp_units=int(primal.active.size),
        )

    def _refine(
        self,
        problem: Problem,
        choice: np.ndarray,
        lower_bound: float,
        multiplier: float,
        info: dict[str, Any],
    ) -> tuple[np.ndarray, float]:
        """Second DP on the options that can still beat ``choice``; the better choice and bound.

        For ``lam >= 0`` every choice ``x`` within the budget has ``objective(x) >= L(lam) +
        sum_i red_i(x_i)``, where ``L`` is the Lagrangian dual value and ``red_i(j) >= 0`` the
        reduced cost of option ``j`` of unit ``i``. So an option with ``red > UB - L`` (``UB``
        the objective of ``choice``) is in no choice better than ``choice``: the optimum is
        either ``UB`` or lies among the remaining options, and the second DP's bound over
        those gives ``min(UB, bound)``. Far fewer options remain near the budget, so the
        room, and with it each bin, shrinks by a large factor; often the second DP is exact.
        """
        objective, allowed = problem.objective, problem.allowed
        ((budget_name, budget),) = problem.budgets.items()
        cost = problem.costs[budget_name]
        rows = np.arange(problem.n_units)
        upper = problem.objective_of(choice)
        # Anchored at each unit's Lagrangian option so large lam * cost terms cancel exactly.
        priced = np.where(allowed, objective + multiplier * cost, np.inf)
        anchor = np.argmin(priced, axis=1)
        shifted = (objective - objective[rows, anchor][:, None]) + multiplier * (
            cost - cost[rows, anchor][:, None]
        )
        reduced = np.where(allowed, shifted, np.inf)
        # Choices up to the feasibility tolerance over the budget count as within it.
        loose = budget + feasibility_tolerance(budget)
        dual = float(
            objective[rows, anchor].sum() + multiplier * (cost[rows, anchor].sum() - loose)
        )
        slack = upper - dual
        # Rounding in the reduced costs must not remove an option that belongs: keep a margin
        # far above their float error (relative to the terms that were summed).
        margin = 1e-9 * float(np.abs(np.where(allowed, objective, 0)).max() + multiplier * loose)
        keep = allowed & (reduced <= slack + margin)
        info.update(refine_options=int(keep.sum()), refine_dual=dual)
        if not slack > 0 or keep.sum() == allowed.sum():
            return choice, lower_bound
        second = self._pass(objective, cost, keep, budget, problem.n_options)
        info.update(
            refine_resolution=second.resolution,
            refine_bins=second.bins,
            refine_exact=second.exact,
        )
        # Any choice outside `keep` costs at least `upper`; inside it, at least the bound DP.
        refined_bound = min(upper, second.bound_value)
        candidate = second.choice
        if self.fill:
            candidate, _, _ = greedy_fill(objective, cost, allowed, budget, candidate, 10_000)
        if problem.objective_of(candidate) < upper:
            choice = candidate
            info["primal"] = "dp"
        return choice, max(lower_bound, refined_bound)
