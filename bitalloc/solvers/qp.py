"""Pairwise-interaction (quadratic) allocation: Frank-Wolfe relaxation, rounding, local search.

The objective of a choice ``x`` is ``sum_i objective[i, x_i] + sum_p V_p[x_a, x_b]`` over the
interaction pairs ``p = (a, b)``, as in layer-wise allocation with inter-layer dependencies.
The solver works in three stages:

1. **Relaxation.** Each unit's choice becomes a distribution ``z[i, :]`` over its allowed
   options, budgets become linear rows, and the objective becomes
   ``<objective, z> + sum_p z_a^T V_p z_b``. The ``V_p`` may be indefinite, so the relaxation
   is nonconvex; Frank-Wolfe (sequential linear programming) copes with that: every step
   solves the LP ``min <gradient, s>`` over the same polytope with HiGHS and moves towards
   ``s`` with an exact line search (the objective is a quadratic in the step length). The
   Frank-Wolfe gap bounds how far the point is from stationarity. Without interactions the
   first LP already solves the relaxation, and its duals give a certified lower bound.
2. **Rounding and repair.** Each unit takes its most likely option; while a budget is
   exceeded, the move with the smallest objective increase per unit of (budget-normalised)
   violation removed is applied.
3. **Local search** (:mod:`bitalloc.solvers._qp_search`). Best-improvement descent over
   single-unit moves that keep every budget met, swaps (one unit to a dearer option, another
   to a cheaper one, among the most promising candidates) and joint moves of two interacting
   units; deltas are updated incrementally along the interaction adjacency. Then an iterated
   local search: a few seeded random "kicks" (re-randomise some units, repair, descend),
   keeping the best choice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.optimize import Bounds, LinearConstraint, linprog, milp

from bitalloc.errors import BitallocError, InfeasibleBudgetError
from bitalloc.solvers._qp_search import (
    ROUND_TIE,
    QuadModel,
    build_model,
    cheapest_choice,
    kicks,
    local_search,
    repair,
    repair_steps,
    round_relaxed,
)
from bitalloc.solvers.base import BaseSolver, SolverOutput
from bitalloc.solvers.problem import Problem, feasibility_tolerance
from bitalloc.solvers.registry import register_solver

# -- relaxation ---------------------------------------------------------------------------


class _LP:
    """``min <g, s>`` over the relaxation's polytope, re-solved for each gradient ``g``."""

    def __init__(self, model: QuadModel) -> None:
        n, k = model.objective.shape
        self.model = model
        self.cols = np.flatnonzero(model.allowed.ravel())
        rows = self.cols // k
        self.a_eq = sp.csr_matrix(
            (np.ones(self.cols.size), (rows, np.arange(self.cols.size))), shape=(n, self.cols.size)
        )
        # Budget rows divided by their scale, so HiGHS's absolute tolerances mean the same
        # for a budget in bits (1e9) and one in milliseconds.
        flat = model.cost.reshape(len(model.names), n * k)
        self.a_ub = flat[:, self.cols] / model.scale[:, None]
        # The rows use the search's limits (each budget plus part of its tolerance): a budget
        # a hair below the cheapest total is met within tolerance but would make an LP with
        # the exact budget infeasible.
        self.b_ub = model.limit / model.scale
        self.rows = rows

    def solve(self, g: np.ndarray) -> tuple[np.ndarray | None, np.ndarray, int]:
        """The LP vertex for gradient ``g`` (``None`` if HiGHS failed), budget duals, status."""
        model = self.model
        flat = g.ravel()[self.cols]
        # Shifting a unit's row and scaling all rows leaves the minimiser unchanged (each unit
        # sums to one); it keeps the coefficients near 1 for HiGHS's absolute tolerances.
        low = np.full(model.n, np.inf)
        np.minimum.at(low, self.rows, flat)
        shifted = flat - low[self.rows]
        sigma = float(np.abs(shifted).max(initial=0.0)) or 1.0
        has_budget = bool(model.names)
        result = linprog(
            shifted / sigma,
            A_ub=self.a_ub if has_budget else None,
            b_ub=self.b_ub if has_budget else None,
            A_eq=self.a_eq,
            b_eq=np.ones(model.n),
            # The upper bound of 1 is implied by the rows, but stating it lets the dual
            # simplex treat the columns as boxed: several times fewer iterations here.
            bounds=(0, 1),
            method="highs",
            options={"dual_feasibility_tolerance": 1e-10, "primal_feasibility_tolerance": 1e-10},
        )
        duals = np.zeros(len(model.names))
        if result.status != 0 or result.x is None:
            return None, duals, int(result.status)
        if has_budget:
            duals = np.maximum(-np.asarray(result.ineqlin.marginals), 0.0) * sigma / model.scale
        z = np.zeros(model.objective.size)
        z[self.cols] = np.maximum(result.x, 0.0)
        z = z.reshape(model.objective.shape)
        return z / z.sum(axis=1, keepdims=True), duals, 0


def _dual_bound(model: QuadModel, duals: np.ndarray, budget: np.ndarray) -> float:
    """Lagrangian dual value for multipliers ``duals >= 0``: a lower bound for any of them."""
    reduced = model.objective + np.tensordot(duals, model.cost, axes=1)
    best = np.argmin(np.where(model.allowed, reduced, np.inf), axis=1)
    rows = np.arange(model.n)
    spent = np.array([t[rows, best].sum() for t in model.cost]) - budget
    return float(model.objective[rows, best].sum() + duals @ spent)


def _frank_wolfe(
    model: QuadModel, lp: _LP, z: np.ndarray, max_iter: int, gap_tol: float
) -> tuple[np.ndarray, int, float | None]:
    """Frank-Wolfe from feasible ``z``; returns (z, iterations, last Frank-Wolfe gap).

    Stops once the gap is at most ``gap_tol`` times the relaxation's value (the objective's
    scale; a floor keeps a value near zero from demanding an exact stationary point).
    """
    gap: float | None = None  # None until a gap has been measured
    value = float(np.sum(model.objective * z)) + model.quad(z, z)
    for it in range(1, max_iter + 1):
        g = model.gradient(z)
        s, _, _ = lp.solve(g)
        if s is None:
            return z, it, gap  # HiGHS trouble: keep the last feasible point
        d = s - z
        slope = float(np.sum(g * d))
        gap = max(-slope, 0.0)
        if gap <= gap_tol * max(abs(value), model.eps):
            return z, it, gap
        curvature = model.quad(d, d)
        # f(z + t d) = f(z) + t * slope + t^2 * curvature, with slope < 0: a convex parabola
        # has its minimum at -slope / (2 curvature); otherwise the far end is best.
        step = min(1.0, -slope / (2.0 * curvature)) if curvature > 0 else 1.0
        z = z + step * d
        value += step * slope + step * step * curvature
    return z, max_iter, gap


def _mip_feasible(model: QuadModel, time_limit: float) -> tuple[np.ndarray | None, bool]:
    """A choice meeting every budget from HiGHS's MIP, or (None, proven infeasible)."""
    lp = _LP(model)
    constraints = [LinearConstraint(lp.a_eq, 1.0, 1.0)]
    if model.names:
        constraints.append(LinearConstraint(lp.a_ub, -np.inf, lp.b_ub))
    result = milp(
        np.zeros(lp.cols.size),
        integrality=np.ones(lp.cols.size),
        bounds=Bounds(0.0, 1.0),
        constraints=constraints,
        options={"time_limit": time_limit, "disp": False},
    )
    if result.x is None:
        return None, result.status == 2
    x = np.zeros(model.objective.size)
    x[lp.cols] = result.x
    return np.argmax(x.reshape(model.objective.shape), axis=1), False


# -- driver -------------------------------------------------------------------------------


def _jointly_infeasible(model: QuadModel) -> InfeasibleBudgetError:
    parts, ranges = [], []
    for name, budget, table in zip(model.names, model.budget, model.cost):
        low = float(np.where(model.allowed, table, np.inf).min(axis=1).sum())
        ranges.append((low, float(np.where(model.allowed, table, -np.inf).max(axis=1).sum())))
        parts.append(f"{name!r} <= {budget:.10g} (smallest achievable on its own: {low:.10g})")
    return InfeasibleBudgetError(
        "the budgets cannot all be met at once: " + "; ".join(parts) + ". Raise at least one "
        "budget or allow cheaper options",
        feasible_range=ranges[0] if len(ranges) == 1 else None,
    )


def _solve_arrays(
    objective: np.ndarray,
    costs: Mapping[str, np.ndarray],
    budgets: Mapping[str, float],
    allowed: np.ndarray,
    pairs: np.ndarray,
    values: np.ndarray,
    settings: QPSolver,
) -> SolverOutput:
    """The whole method on plain arrays (see the module docstring), with ``settings``'
    options; pairs may come in either order."""
    max_iter, gap_tol, max_moves = settings.max_iter, settings.gap_tol, settings.max_moves
    swap_candidates, restarts, seed = settings.swap_candidates, settings.restarts, settings.seed
    feasibility_time_limit = settings.feasibility_time_limit
    k = objective.shape[1]
    values = np.asarray(values, dtype=np.float64).reshape(-1, k, k)
    # All-zero tables change nothing; dropping them lets a zero-interaction problem take the
    # exact LP path below (and its bound).
    keep = np.any(values != 0, axis=(1, 2))
    model = build_model(
        objective, costs, budgets, allowed, np.asarray(pairs).reshape(-1, 2)[keep], values[keep]
    )
    quadratic = model.a.size > 0
    info: dict[str, Any] = {"interaction_pairs_used": int(model.a.size)}
    lp = _LP(model)
    z, duals, status = lp.solve(model.objective)
    if status == 2:
        raise _jointly_infeasible(model)  # the relaxation is infeasible, so is the problem
    lower_bound = None
    no_bound = "none (nonconvex relaxation)" if quadratic else "none (no LP relaxation)"
    if z is None:
        info["relaxation"] = f"HiGHS failed (status {status}); started from the cheapest choice"
        x = cheapest_choice(model, model.allowed)
    else:
        info["lp_value"] = float(np.sum(model.objective * z))
        iters, gap = 1, 0.0
        if quadratic:
            z, iters, gap = _frank_wolfe(model, lp, z, max_iter, gap_tol)
        else:
            # No quadratic part: the LP optimum is the relaxation optimum, and its budget
            # duals give a bound that holds whatever HiGHS's tolerances did. Budgets count
            # as met up to their tolerance, so the bound is taken at the loosened budgets.
            tolerance = np.array([feasibility_tolerance(v) for v in model.budget])
            with np.errstate(over="ignore", invalid="ignore"):
                bound = _dual_bound(model, duals, model.budget + tolerance)
            # Duals of losses huge against costs tiny (1e15 over 1e-300) overflow: no bound
            # then, rather than an infinite one.
            lower_bound = bound if math.isfinite(bound) else None
            no_bound = "none (the dual bound overflowed)"
        info.update(
            relaxation_value=float(np.sum(model.objective * z)) + model.quad(z, z),
            fw_iterations=iters,
            fw_gap=gap,
            fractional_units=int(np.sum(np.max(z, axis=1) < 1.0 - ROUND_TIE)),
        )
        x = round_relaxed(model, z)
    g = model.field(x)
    steps = repair_steps(model)
    repairs = repair(model, x, g, steps)
    if repairs is None:
        info["start"] = "cheapest"
        x = cheapest_choice(model, model.allowed)
        g = model.field(x)
        repairs = repair(model, x, g, steps)
    if repairs is None:
        found, proven = _mip_feasible(model, feasibility_time_limit)
        if found is None and proven:
            raise _jointly_infeasible(model)
        if found is not None:
            info["start"] = "mip_feasibility"
            x = found
            g = model.field(x)
            repairs = repair(model, x, g, steps)
        if repairs is None:
            raise BitallocError(
                "the QP solver found no choice that meets every budget within "
                f"feasibility_time_limit={feasibility_time_limit:g} s; raise that limit, "
                "loosen a budget, or use method 'ilp'"
            )
    info["rounding_repairs"] = repairs
    info["rounded_objective"] = model.value(x)
    stats = local_search(model, x, g, max_moves, swap_candidates)
    info["local_search_objective"] = model.value(x)
    x, improved = kicks(model, x, stats, max_moves, swap_candidates, restarts, seed)
    info.update(
        local_moves=stats.moves,
        local_pair_moves=stats.pair_moves,
        local_swaps=stats.swaps,
        local_search_capped=stats.capped,
        kicks_improved=improved,
        lower_bound_kind="lp_dual" if lower_bound is not None else no_bound,
    )
    return SolverOutput(x, lower_bound, info)


def _int_option(label: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise BitallocError(f"{label} must be an int >= {low}, got {value!r}")
    return int(value)


def _positive(label: str, value: Any) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
    if not ok or not math.isfinite(value) or value <= 0:
        raise BitallocError(f"{label} must be a finite number > 0, got {value!r}")
    return float(value)


@register_solver
class QPSolver(BaseSolver):
    """Heuristic for problems with pairwise interaction terms and any number of budgets.

    Solves a continuous relaxation by Frank-Wolfe (each step an LP solved by HiGHS, exact
    line search), rounds it, repairs the budgets and improves the choice by local search
    (single-unit moves and paired moves that keep every budget met). The result is feasible
    but not proven optimal when interactions are present; ``lower_bound`` is then ``None``
    because the relaxation is nonconvex. Without interactions (or with all-zero tables) the
    relaxation is an LP and its dual value is returned as a certified lower bound.

    ``info`` reports the LP and relaxation values, Frank-Wolfe iterations and gap, the
    repair moves after rounding, the objective after rounding and after the first descent,
    and the local search's moves, joint moves of interacting units, swaps and improving kicks.

    Args:
        max_iter: Most Frank-Wolfe iterations (each one LP solve).
        gap_tol: Stop Frank-Wolfe once its gap is at most ``gap_tol`` times the relaxation's
            value.
        max_moves: Most local-search steps in all (single moves, joint moves, swaps).
        swap_candidates: Candidate moves on each side of a swap (improving moves that are too
            dear alone, and budget-freeing moves); 0 disables swaps.
        feasibility_time_limit: Seconds for the MIP feasibility search used only when
            rounding and repair cannot meet several budgets at once.
        restarts: Kicks of the iterated local search (random changes to a few units, then
            repair and descent; the best choice is kept); 0 disables them.
        seed: Seed of the kicks' random generator (results are deterministic for a seed).
    """

    name = "qp"
    max_budgets = None
    supports_interactions = True

    def __init__(
        self,
        *,
        max_iter: int = 50,
        gap_tol: float = 1e-6,
        max_moves: int = 20_000,
        swap_candidates: int = 64,
        feasibility_time_limit: float = 30.0,
        restarts: int = 20,
        seed: int = 0,
    ) -> None:
        self.max_iter = _int_option("max_iter", max_iter, 1)
        self.gap_tol = _positive("gap_tol", gap_tol)
        self.max_moves = _int_option("max_moves", max_moves, 0)
        self.swap_candidates = _int_option("swap_candidates", swap_candidates, 0)
        self.feasibility_time_limit = _positive("feasibility_time_limit", feasibility_time_limit)
        self.restarts = _int_option("restarts", restarts, 0)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise BitallocError(f"seed must be an int, got {seed!r}")
        self.seed = int(seed)

    def _solve(self, problem: Problem) -> SolverOutput:
        return _solve_arrays(
            problem.objective,
            problem.costs,
            problem.budgets,
            problem.allowed,
            problem.interaction_pairs,
            problem.interaction_values,
            self,
        )
