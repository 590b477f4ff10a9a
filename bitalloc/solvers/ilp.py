"""Exact allocation by integer linear programming (HiGHS, CP-SAT or SCIP).

The problem is written as a 0/1 program, as in MixDQ, HAWQ-V3 and Q-Palette: one binary
``x[i, j]`` per allowed (unit, option), ``sum_j x[i, j] = 1`` per unit, one linear row per
budget, and the objective ``sum objective[i, j] x[i, j]``. Pairwise interaction terms get
linearised product variables ``y[p, a, b]`` tied to ``x`` by marginal rows (see
:mod:`bitalloc.solvers._ilp_model`). Any number of budgets is supported; the backends prove
optimality or report the gap they reached within the time limit.

Floating point is handled so that the returned lower bound is valid for the problem as given:

* HiGHS and SCIP work with absolute tolerances: given raw loss increases (1e-9 .. 1e-6 per
  unit) HiGHS "proves" optimal a choice five times worse than the optimum. The objective is
  therefore shifted (every unit's best allowed option costs 0) and normalised so the largest
  coefficient is 1, HiGHS's gap and feasibility tolerances are tightened to 1e-9, and the
  bound is lowered by ``2e-9 * max(1, normalised objective)``: on tiny random problems with
  coefficients spanning 1e-12 .. 3e2, both backends' bounds were off by up to 7e-10 in
  normalised units (numbers below their tolerances count as zero). The bound is thus valid to
  the extent that the backends keep their tolerances, and a solve the backend calls optimal
  reports a gap of about 1e-9 relative (still status ``"optimal"``, see
  :data:`~bitalloc.solvers.base.OPTIMALITY_RTOL`; ``info["backend_status"]`` keeps the
  backend's word). The choice is re-checked against the real budgets; a choice over
  a budget by the backend's feasibility tolerance is re-solved with that budget lowered (the
  first solve's bound stays).
* CP-SAT needs integers: the objective is scaled and rounded and the bound is corrected by the
  worst rounding error per unit and pair; costs are scaled exactly where possible (bit counts
  as they are, fractional bits by a power of two) and otherwise rounded in both directions, a
  relaxed model for the bound and, only if its choice misses a budget, a tight one for the
  choice (see :func:`~bitalloc.solvers._ilp_model.integer_budget`).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bitalloc.errors import BitallocError, InfeasibleBudgetError
from bitalloc.solvers._ilp_model import (
    LinearModel,
    budget_excess,
    build_model,
    cp_sat_model,
    integer_budget,
    integer_objective,
)
from bitalloc.solvers.base import BaseSolver, SolverOutput
from bitalloc.solvers.problem import Problem, feasibility_tolerance
from bitalloc.solvers.registry import register_solver

#: Backends, in the order they are documented; ``"scip"`` runs through OR-Tools' linear solver
#: wrapper and works when that build of OR-Tools includes it. (CBC, also in that wrapper, is
#: left out: its tolerances cannot be tightened there and its bounds were off by up to 2e-7
#: of the largest coefficient on tiny random problems.)
BACKENDS = ("highs", "cp-sat", "scip")
#: Relative objective tolerance of HiGHS and SCIP as configured here; the bound they report
#: is lowered by twice this times max(1, normalised objective) (see the module docstring).
_MIP_OBJECTIVE_TOLERANCE = 1e-9
#: How often a MIP backend's choice that misses a budget by its tolerance is re-solved.
_BUDGET_RETRIES = 3


@dataclass
class _Run:
    """What one backend call found: 0/1 values (or None), its bound, and facts for info."""

    values: np.ndarray | None
    bound: float | None
    infeasible: bool
    status: str
    info: dict[str, Any] = field(default_factory=dict)


@register_solver
class ILPSolver(BaseSolver):
    """Optimal allocation by integer programming, any number of budgets, with interactions.

    Proves optimality on problems with thousands of units in seconds (HiGHS: 1,000 units x 8
    options with one budget in under a second, 2,000 in a few seconds), handles several
    budgets at once and pairwise interaction terms. If the time limit ends the search, the
    best choice found is returned with its proven bound and gap.

    The bound is lowered by what floating point may have cost (see the module docstring), so a
    proven optimum carries a certified gap of about 1e-9 relative; ``status`` reads
    ``"optimal"`` below :data:`~bitalloc.solvers.base.OPTIMALITY_RTOL` (1e-8), and
    ``info["backend_status"]`` keeps the backend's own word.

    Args:
        backend: ``"highs"`` (SciPy's HiGHS MIP solver, the default and usually fastest),
            ``"cp-sat"`` (OR-Tools CP-SAT on an integer-scaled model) or ``"scip"`` (through
            OR-Tools, when its build includes it). See the module docstring for how each
            backend's floating point is kept honest.
        time_limit: Seconds for the whole solve, or ``None`` for no limit.
        mip_rel_gap: Stop once (objective - bound) <= mip_rel_gap * |objective|; 0 proves
            optimality.
        num_workers: CP-SAT search workers. 1 (the default) is deterministic; more are
            faster on big problems but may return different optimal choices from run to run.
            HiGHS and SCIP run single-threaded here.
        objective_scale: CP-SAT only: factor applied to the shifted objective before rounding
            to integers; ``None`` maps the largest coefficient to about 4e12 (less for
            problems so big that the objective could pass 2^52).
        random_seed: CP-SAT's random seed.
        hint: CP-SAT only: start the search from the Lagrangian choice (one budget or none)
            or a cheapest choice that meets every budget (several budgets).
        verbose: Print the backend's log.
    """

    name = "ilp"
    max_budgets = None
    supports_interactions = True
    exact = True

    def __init__(
        self,
        *,
        backend: str = "highs",
        time_limit: float | None = 300.0,
        mip_rel_gap: float = 0.0,
        num_workers: int = 1,
        objective_scale: float | None = None,
        random_seed: int = 0,
        hint: bool = True,
        verbose: bool = False,
    ) -> None:
        if backend not in BACKENDS:
            raise BitallocError(
                f"unknown ILP backend {backend!r}; choose one of "
                f"{', '.join(repr(b) for b in BACKENDS)}"
            )
        if time_limit is not None:
            time_limit = _positive_number("time_limit", time_limit, "or None for no limit")
        mip_rel_gap = _number("mip_rel_gap", mip_rel_gap)
        if mip_rel_gap < 0:
            raise BitallocError(
                f"mip_rel_gap must be >= 0 (0 proves optimality), got {mip_rel_gap}"
            )
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise BitallocError(f"num_workers must be an int >= 1, got {num_workers!r}")
        if objective_scale is not None:
            objective_scale = _positive_number(
                "objective_scale", objective_scale, "or None for the automatic scale"
            )
        if isinstance(random_seed, bool) or not isinstance(random_seed, int):
            raise BitallocError(f"random_seed must be an int, got {random_seed!r}")
        for label, flag in (("hint", hint), ("verbose", verbose)):
            if not isinstance(flag, bool):
                raise BitallocError(f"{label} must be True or False, got {flag!r}")
        self.backend = backend
        self.time_limit = time_limit
        self.mip_rel_gap = mip_rel_gap
        self.num_workers = num_workers
        self.objective_scale = objective_scale
        self.random_seed = random_seed
        self.hint = hint
        self.verbose = verbose

    # -- driver ---------------------------------------------------------------------------

    def _solve(self, problem: Problem) -> SolverOutput:
        deadline = None if self.time_limit is None else time.monotonic() + self.time_limit
        model = build_model(problem)
        info: dict[str, Any] = {
            "backend": self.backend,
            "variables": model.n_vars,
            "constraints": model.n_rows,
            "x_variables": model.n_x,
            "y_variables": model.n_y,
            "interaction_pairs_modelled": model.pairs_modelled,
            "interaction_pairs_folded": model.pairs_folded,
        }
        if self.backend == "cp-sat":
            choice, bound = self._solve_cp_sat(problem, model, deadline, info)
        else:
            choice, bound = self._solve_mip(problem, model, deadline, info)
        objective = problem.objective_of(choice)
        if bound is not None:
            gap = max(objective - bound, 0.0)
            info["proven_gap"] = gap
            info["proven_gap_rel"] = gap / max(abs(objective), 1e-300) if gap else 0.0
        return SolverOutput(choice, bound, info)

    def _time_left(self, deadline: float | None) -> float | None:
        if deadline is None:
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            raise self._no_solution()
        return left

    def _no_solution(self, what: str = "") -> BitallocError:
        found = f"ILP backend {self.backend!r} found no feasible choice{what}"
        fallback = "use method 'lagrangian' (one budget) for a fast near-optimal answer"
        if self.time_limit is None:
            return BitallocError(f"{found}; {fallback}")
        return BitallocError(
            f"{found} within time_limit={self.time_limit:g} s; raise time_limit, or {fallback}"
        )

    # -- HiGHS, SCIP ----------------------------------------------------------------------

    def _solve_mip(
        self, problem: Problem, model: LinearModel, deadline: float | None, info: dict[str, Any]
    ) -> tuple[np.ndarray, float | None]:
        largest = float(model.group_max.max(initial=0.0))
        # Divide rather than multiply by the reciprocal: 1 / largest overflows for tiny losses.
        unit = largest if largest > 0 else 1.0
        objective = model.objective / unit
        rhs, row_costs, row_scale = {}, {}, {}
        for name, budget in model.budgets.items():
            cost = model.costs[name]
            limit = budget + feasibility_tolerance(budget)
            # Integer costs sum to an integer, so the budget may be rounded down: the solver
            # then cannot use its feasibility tolerance to go over it.
            integral = np.array_equal(cost, np.round(cost)) and cost.sum() < 2.0**52
            bound = math.floor(limit) if integral else budget
            # Each unit pays only the extra over its cheapest option out of the room above the
            # cheapest total (each unit takes one option, so the row means the same), and the
            # row is divided by a power of two near its largest extra: HiGHS reads matrix
            # entries of 1e15 and more as infinite (calling feasible budgets infeasible) and
            # drops those below 1e-9 of the row. Choices are checked in original units below.
            cheapest = np.full(model.n_units, np.inf)
            np.minimum.at(cheapest, model.x_unit, cost)
            extra = cost - cheapest[model.x_unit]
            row_scale[name] = _power_of_two_above(float(extra.max(initial=0.0)))
            row_costs[name] = extra / row_scale[name]
            rhs[name] = max(bound - float(cheapest.sum()), 0.0) / row_scale[name]
        run_backend = self._run_highs if self.backend == "highs" else self._run_or_tools
        bound = None
        for attempt in range(_BUDGET_RETRIES + 1):
            run = run_backend(model, objective, row_costs, rhs, self._time_left(deadline))
            info.update(
                run.info,
                backend_status=run.status,
                objective_normalisation=_jsonable_ratio(unit),
                cost_row_scales=dict(row_scale),
            )
            if run.infeasible:
                if attempt == 0:
                    raise _jointly_infeasible(problem)
                raise BitallocError(
                    f"ILP backend {self.backend!r} returned choices over budget by its "
                    "tolerance and the tightened problem is infeasible; use backend 'cp-sat', "
                    "which meets budgets exactly"
                )
            if run.values is None:
                raise self._no_solution()
            choice = model.decode(run.values)
            if attempt == 0 and run.bound is not None and math.isfinite(run.bound):
                found = (problem.objective_of(choice) - model.constant) / unit
                margin = 2.0 * _MIP_OBJECTIVE_TOLERANCE * max(1.0, found)
                bound = model.constant + (run.bound - margin) * unit
                info["bound_margin"] = margin * unit
            excess = budget_excess(model, model.x_vector(choice))
            info["budget_retries"] = attempt
            if not excess:
                return choice, bound
            # Over by the solver's tolerance (or by entries too small for it to see): ask
            # again with room for that. The first solve's bound covers every choice within
            # the original budgets.
            for name, over in excess.items():
                tightening = 2.0 * over + feasibility_tolerance(model.budgets[name])
                rhs[name] -= tightening / row_scale[name]
        raise BitallocError(
            f"ILP backend {self.backend!r} kept returning choices over budget by its tolerance; "
            "use backend 'cp-sat', which meets budgets exactly"
        )

    def _run_highs(
        self,
        model: LinearModel,
        objective: np.ndarray,
        costs: dict[str, np.ndarray],
        rhs: dict[str, float],
        time_left: float | None,
    ) -> _Run:
        from scipy.optimize import Bounds, LinearConstraint, milp

        matrix, lower, upper = model.all_rows(costs, rhs)
        integrality = np.concatenate([np.ones(model.n_x), np.zeros(model.n_y)])
        options: dict[str, Any] = {
            "disp": self.verbose,
            "mip_rel_gap": self.mip_rel_gap,
            # The options below are not among milp's documented ones; SciPy passes them to
            # HiGHS verbatim (with a warning, silenced here). At HiGHS's defaults (absolute gap
            # 1e-6, feasibility tolerances 1e-6 / 1e-7 in normalised units) it stops about
            # 1e-6 short of a proof on typical allocation problems and misjudges small terms.
            "mip_abs_gap": 0.0,
            "mip_feasibility_tolerance": _MIP_OBJECTIVE_TOLERANCE,
            "primal_feasibility_tolerance": _MIP_OBJECTIVE_TOLERANCE,
            "dual_feasibility_tolerance": _MIP_OBJECTIVE_TOLERANCE,
        }
        if time_left is not None:
            options["time_limit"] = time_left
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Unrecognized options", RuntimeWarning)
            result = milp(
                objective,
                integrality=integrality,
                bounds=Bounds(0.0, 1.0),
                constraints=LinearConstraint(matrix, lower, upper),
                options=options,
            )
        if result.status not in (0, 1, 2):
            raise BitallocError(f"HiGHS failed: {result.message}; try backend 'cp-sat'")
        bound = getattr(result, "mip_dual_bound", None)
        if bound is None and result.status == 0:
            bound = result.fun
        nodes = getattr(result, "mip_node_count", None)
        return _Run(
            values=None if result.x is None else np.asarray(result.x),
            bound=None if bound is None else float(bound),
            infeasible=result.status == 2,
            status=str(result.message),
            info={"nodes": nodes} if nodes is not None else {},
        )

    def _run_or_tools(
        self,
        model: LinearModel,
        objective: np.ndarray,
        costs: dict[str, np.ndarray],
        rhs: dict[str, float],
        time_left: float | None,
    ) -> _Run:
        from ortools.linear_solver import pywraplp

        solver = pywraplp.Solver.CreateSolver(self.backend.upper())
        if solver is None:
            raise BitallocError(
                f"ILP backend {self.backend!r} is not available in this OR-Tools build; use "
                "backend 'highs' or 'cp-sat'"
            )
        variables = [solver.BoolVar(f"x{v}") for v in range(model.n_x)]
        # Binary, not continuous, y: SCIP's presolve certified wrong optima (off by 30%) on
        # tiny models with continuous y in the marginal rows; integral y cost nothing, as they
        # are integral whenever x is.
        variables += [solver.BoolVar(f"y{v}") for v in range(model.n_y)]
        rows = model.rows
        for r in range(rows.shape[0]):
            row = solver.Constraint(float(model.rhs[r]), float(model.rhs[r]))
            for v, a in zip(
                rows.indices[rows.indptr[r] : rows.indptr[r + 1]].tolist(),
                rows.data[rows.indptr[r] : rows.indptr[r + 1]].tolist(),
            ):
                row.SetCoefficient(variables[v], a)
        for name, limit in rhs.items():
            row = solver.Constraint(-solver.infinity(), float(limit))
            cost = costs[name]
            for v in np.flatnonzero(cost).tolist():
                row.SetCoefficient(variables[v], float(cost[v]))
        goal = solver.Objective()
        for v in np.flatnonzero(objective).tolist():
            goal.SetCoefficient(variables[v], float(objective[v]))
        goal.SetMinimization()
        if time_left is not None:
            solver.SetTimeLimit(max(1, int(time_left * 1000)))
        if self.verbose:
            solver.EnableOutput()
        params = pywraplp.MPSolverParameters()
        params.SetDoubleParam(params.RELATIVE_MIP_GAP, self.mip_rel_gap)
        status = solver.Solve(params)
        names = {
            pywraplp.Solver.OPTIMAL: "OPTIMAL",
            pywraplp.Solver.FEASIBLE: "FEASIBLE",
            pywraplp.Solver.INFEASIBLE: "INFEASIBLE",
            pywraplp.Solver.NOT_SOLVED: "NOT_SOLVED",
        }
        if status not in names:
            raise BitallocError(
                f"ILP backend {self.backend!r} failed (status {status}); try backend 'highs'"
            )
        solved = status in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE)
        values = np.array([v.solution_value() for v in variables]) if solved else None
        return _Run(
            values=values,
            bound=float(goal.BestBound()) if solved else None,
            infeasible=status == pywraplp.Solver.INFEASIBLE,
            status=names[status],
            info={"nodes": int(solver.nodes()), "backend_wall_time_s": solver.wall_time() / 1e3},
        )

    # -- CP-SAT ---------------------------------------------------------------------------

    def _solve_cp_sat(
        self, problem: Problem, model: LinearModel, deadline: float | None, info: dict[str, Any]
    ) -> tuple[np.ndarray, float | None]:
        objective = integer_objective(model, self.objective_scale)
        integer = {
            name: integer_budget(model.costs[name], budget, model.n_units)
            for name, budget in model.budgets.items()
        }
        info.update(
            objective_scale=objective.scale,
            objective_rounding_allowance=objective.rounding / objective.scale,
            cost_scales={name: b.scale for name, b in integer.items()},
            cost_scaling_exact=all(b.exact for b in integer.values()),
        )
        hint = self._hint(problem) if self.hint else None
        relaxed = {n: (b.relaxed_costs, b.relaxed_budget) for n, b in integer.items()}
        run = self._run_cp_sat(model, objective.coefficients, relaxed, hint, deadline)
        info.update(run.info, backend_status=run.status, cost_model="relaxed")
        if run.infeasible:
            # The relaxed model contains every choice that meets the real budgets.
            raise _jointly_infeasible(problem)
        bound = None
        if run.bound is not None:
            bound = model.constant + (run.bound - objective.rounding) / objective.scale
        if run.values is not None:
            choice = model.decode(run.values)
        elif hint is not None and not budget_excess(model, model.x_vector(hint)):
            # Time ran out before CP-SAT reported a choice of its own (in presolve, say); the
            # hint meets every budget, so it is the best choice known.
            choice = hint
            info["returned_hint"] = True
        else:
            raise self._no_solution()
        if budget_excess(model, model.x_vector(choice)):
            # Rounded-down costs let the relaxed model's choice go over a real budget by at
            # most the rounding; the tight model only admits choices within every budget.
            tight = {n: (b.tight_costs, b.tight_budget) for n, b in integer.items()}
            run = self._run_cp_sat(model, objective.coefficients, tight, hint, deadline)
            info.update(run.info, backend_status=run.status, cost_model="relaxed+tight")
            if run.values is None:
                what = " that meets the budgets after rounding costs to integers"
                if run.infeasible:
                    raise BitallocError(
                        f"CP-SAT found no feasible choice{what}: the budgets are within "
                        "rounding of the cheapest possible totals; raise a budget slightly "
                        "or use backend 'highs'"
                    )
                raise self._no_solution(what)
            choice = model.decode(run.values)
        return choice, bound

    def _hint(self, problem: Problem) -> np.ndarray | None:
        """A good feasible starting choice, cheap to find (see the ``hint`` option)."""
        if len(problem.budgets) <= 1:
            from bitalloc.solvers.lagrangian import LagrangianSolver

            return LagrangianSolver()._solve(problem).choice
        rows = np.arange(problem.n_units)
        for name in problem.budgets:
            # Cheapest in this budget, lowest objective among equally cheap options.
            cost = np.where(problem.allowed, problem.costs[name], np.inf)
            cheapest = cost == cost.min(axis=1, keepdims=True)
            choice = np.argmin(np.where(cheapest, problem.objective, np.inf), axis=1)
            totals = {c: problem.costs[c][rows, choice].sum() for c in problem.budgets}
            if all(totals[c] <= b for c, b in problem.budgets.items()):
                return choice
        return None

    def _run_cp_sat(
        self,
        model: LinearModel,
        coefficients: np.ndarray,
        budgets: dict[str, tuple[np.ndarray, int]],
        hint: np.ndarray | None,
        deadline: float | None,
    ) -> _Run:
        from ortools.sat.python import cp_model

        cp, feasible_hint = cp_sat_model(model, coefficients, budgets, hint)
        # Run even when the time is already up: CP-SAT then stops at once, and a hint still
        # gives a choice (see _solve_cp_sat).
        time_left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        solver = cp_model.CpSolver()
        params = solver.parameters
        params.num_workers = self.num_workers
        params.random_seed = self.random_seed
        params.relative_gap_limit = self.mip_rel_gap
        params.log_search_progress = self.verbose
        # OR-Tools 9.15's presolve of at-most-one constraints against linear rows (exactly our
        # unit rows against the budget rows) can certify a wrong optimum; its inclusion work
        # limit switches that step off (google/or-tools#5293; seen here on a 6-unit model).
        params.presolve_inclusion_work_limit = 0
        if time_left is not None:
            params.max_time_in_seconds = time_left
        status = solver.solve(cp)
        if status == cp_model.MODEL_INVALID:
            raise BitallocError(f"CP-SAT rejected the model: {cp.validate()}")
        values = None
        if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            # The response lists every variable's value in creation order.
            values = np.array(solver.response_proto.solution, dtype=np.float64)
        # Proven even without a solution (when the time limit stops the search first).
        bound = float(solver.best_objective_bound)
        return _Run(
            values=values,
            bound=bound if math.isfinite(bound) and status != cp_model.INFEASIBLE else None,
            infeasible=status == cp_model.INFEASIBLE,
            status=solver.status_name(status),
            info={
                "nodes": int(solver.num_branches),
                "conflicts": int(solver.num_conflicts),
                "backend_wall_time_s": float(solver.wall_time),
                "hint_used": bool(feasible_hint),
            },
        )


def _jointly_infeasible(problem: Problem) -> InfeasibleBudgetError:
    parts = [
        f"{name!r} <= {budget:.10g} (smallest achievable total on its own: "
        f"{problem.min_resource(name):.10g})"
        for name, budget in problem.budgets.items()
    ]
    return InfeasibleBudgetError(
        "the budgets cannot all be met at once: " + "; ".join(parts) + ". Each is achievable "
        "on its own, but no choice meets them together; raise at least one of them or allow "
        "more options"
    )


def _power_of_two_above(value: float) -> float:
    """The power of two in ``[value, 2 * value)``, or 1 for ``value <= 0``."""
    return math.ldexp(1.0, math.frexp(value)[1]) if value > 0 else 1.0


def _jsonable_ratio(unit: float) -> float | None:
    """``1 / unit``, the factor the objective was multiplied by; ``None`` where it overflows."""
    return 1.0 / unit if unit > 1e-300 else None


def _number(label: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise BitallocError(f"{label} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise BitallocError(f"{label} must be finite, got {value}")
    return value


def _positive_number(label: str, value: Any, alternative: str) -> float:
    value = _number(label, value)
    if value <= 0:
        raise BitallocError(f"{label} must be > 0 ({alternative}), got {value:g}")
    return value
