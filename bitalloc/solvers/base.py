"""The solver contract: :class:`BaseSolver` and what its :meth:`~BaseSolver.solve` checks.

The registry of methods and the module-level :func:`~bitalloc.solvers.registry.solve` live
in :mod:`bitalloc.solvers.registry`; this module imports no concrete solver.
"""

from __future__ import annotations

import abc
import inspect
import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from bitalloc.errors import BitallocError, InfeasibleBudgetError
from bitalloc.solvers.problem import Problem, Solution, feasibility_tolerance

#: Relative gap under which a solution is reported as ``"optimal"``. MIP backends work to
#: tolerances of about 1e-9, and the ILP solver lowers their bounds by that much to keep them
#: valid, so a proven optimum carries a certified gap of a few 1e-9; heuristic gaps on real
#: allocation problems are 1e-7 and up.
OPTIMALITY_RTOL = 1e-8
#: A lower bound may exceed the objective by this much (relative) from rounding alone; more
#: than that means the solver's bound is wrong.
BOUND_RTOL = 1e-9


@dataclass(frozen=True)
class SolverOutput:
    """What :meth:`BaseSolver._solve` hands back; :meth:`BaseSolver.solve` does the rest.

    Attributes:
        choice: ``(n,)`` option index per unit. Must respect ``allowed`` and every budget.
        lower_bound: A certified lower bound on the optimal objective, or ``None``.
        info: Method-specific extras (numbers, strings, small lists) for :attr:`Solution.info`.
    """

    choice: np.ndarray
    lower_bound: float | None
    info: dict[str, Any] = field(default_factory=dict)


class BaseSolver(abc.ABC):
    """Base class for allocation solvers.

    A solver turns a :class:`~bitalloc.solvers.problem.Problem` into a
    :class:`~bitalloc.solvers.problem.Solution`. Callers use :meth:`solve` (or the module-level
    :func:`solve`); solver authors subclass this class, set :attr:`name` and
    :attr:`max_budgets`, take their options as keyword arguments of ``__init__`` (raising
    :class:`~bitalloc.errors.BitallocError` for bad values), implement :meth:`_solve`, and
    register the class (:func:`~bitalloc.solvers.registry.register_solver`, or an entry point:
    see :mod:`bitalloc.solvers.registry`) so :func:`~bitalloc.solvers.registry.solve` and the
    shared contract tests see it.

    The contract every solver keeps:

    * The returned choice takes one allowed option per unit and meets every budget (up to
      :func:`~bitalloc.solvers.problem.feasibility_tolerance`).
    * ``lower_bound``, when not ``None``, is a valid lower bound on the optimum of the problem.
      ``status`` is ``"optimal"`` only when the bound proves it.
    * The same problem and options give the same choice (no unseeded randomness, no dependence
      on wall-clock time).
    * A budget below the cheapest achievable total raises
      :class:`~bitalloc.errors.InfeasibleBudgetError` carrying the feasible range; a problem
      with more budgets than :attr:`max_budgets` raises :class:`~bitalloc.errors.BitallocError`.
      Both checks happen in :meth:`solve` before :meth:`_solve` runs.
    * The problem is never modified (its arrays are read-only).
    * Ties and pins are handled here, not by ``_solve``: :meth:`solve` reduces the problem to
      one without them (:meth:`Problem.collapsed`), so ``_solve`` sees independent units with an
      ``allowed`` mask, and maps the choice back. A solver whose ``_solve`` does not optimise
      interaction terms keeps ``supports_interactions = False`` and is refused such problems.
    * Budgets that cannot bind (at or above the dearest achievable total, the largest float
      included) are dropped before ``_solve`` runs (``info["budgets_not_binding"]`` names
      them), and so are options that alone break a budget (``info["options_over_budget"]``
      counts them); see :func:`_simplified`.
    """

    #: Registered method name, as passed to :func:`solve` (``method="..."``).
    name: ClassVar[str]
    #: Most budgeted costs the method handles; ``None`` means any number.
    max_budgets: ClassVar[int | None] = None
    #: Whether ``_solve`` optimises pairwise interaction terms.
    supports_interactions: ClassVar[bool] = False
    #: Whether the method, with default options, proves optimality (status ``"optimal"``) on
    #: small problems whose budgeted costs are integers. The contract suite holds it to that.
    exact: ClassVar[bool] = False

    def solve(self, problem: Problem) -> Solution:
        """Solve ``problem`` and return a feasible :class:`Solution`.

        Checks the problem against the solver's limits, reduces ties and pins, runs
        :meth:`_solve`, maps the choice back, verifies it, and fills in objective, resources,
        gap, status and timing.

        Raises:
            InfeasibleBudgetError: a budget is below the smallest achievable total.
            BitallocError: the problem has more budgets than the method supports, or
                interaction terms the method ignores.
        """
        if not isinstance(problem, Problem):
            raise BitallocError(
                f"{type(self).__name__}.solve needs a Problem, got {type(problem).__name__}"
            )
        if self.max_budgets is not None and len(problem.budgets) > self.max_budgets:
            raise BitallocError(
                f"method {self.name!r} supports at most {self.max_budgets} budget(s) but the "
                f"problem has {len(problem.budgets)} ({', '.join(map(repr, problem.budgets))}); "
                "drop budgets or use a method that supports several constraints, e.g. 'ilp'"
            )
        if problem.has_interactions and not self.supports_interactions:
            supported = ", ".join(repr(name) for name in _interaction_methods())
            raise BitallocError(
                f"method {self.name!r} ignores pairwise interaction terms but the problem has "
                f"{len(problem.interaction_pairs)}; use a method that optimises them "
                f"({supported or 'none registered'}) or drop the interactions"
            )
        for cost_name, budget in problem.budgets.items():
            low, high = problem.feasible_range(cost_name)
            if budget < low - feasibility_tolerance(budget):
                raise InfeasibleBudgetError(
                    f"budget for {cost_name!r} is {budget:.10g} but the smallest achievable "
                    f"total is {low:.10g} (every unit at its cheapest allowed option); raise "
                    f"the budget to at least {low:.10g} or allow cheaper options",
                    feasible_range=(low, high),
                )

        start = time.perf_counter()
        reduced = problem.collapsed()
        inner, loose, pruned = _simplified(reduced.problem)
        output = self._solve(inner)
        wall = time.perf_counter() - start

        info = dict(output.info)
        if loose:
            info["budgets_not_binding"] = loose
        if pruned:
            info["options_over_budget"] = pruned
        if reduced.identity:
            choice = problem.validate_choice(output.choice)
        else:
            choice = reduced.expand(reduced.problem.validate_choice(output.choice))
            info["reduced_units"] = reduced.problem.n_units
        problems = problem.violations(choice)
        if problems:
            # The problem was checked above, so this is the solver's fault, not the user's.
            raise RuntimeError(f"solver {self.name!r} returned an infeasible choice: {problems}")
        objective = problem.objective_of(choice)
        scale = max(1.0, abs(objective))
        lower_bound = output.lower_bound
        gap = None
        if lower_bound is not None and not math.isfinite(float(lower_bound)):
            # A multiplier of a loss huge against costs tiny overflows (1e15 / 1e-300): the
            # method has no usable bound on this problem, which is said, never a NaN gap.
            info["lower_bound_dropped"] = f"not finite ({float(lower_bound)!r})"
            lower_bound = None
        if lower_bound is not None:
            lower_bound = float(lower_bound)
            if lower_bound > objective + BOUND_RTOL * scale:
                raise RuntimeError(
                    f"solver {self.name!r} reported lower bound {lower_bound!r} above the "
                    f"objective {objective!r} of its own feasible choice"
                )
            # Within rounding of the objective: the choice is optimal.
            lower_bound = min(lower_bound, objective)
            gap = objective - lower_bound
        optimal = gap is not None and gap <= OPTIMALITY_RTOL * scale
        return Solution(
            choice=choice,
            objective=objective,
            resources=problem.resources(choice),
            status="optimal" if optimal else "feasible",
            lower_bound=lower_bound,
            gap=gap,
            wall_time_s=wall,
            method=self.name,
            info=info,
        )

    @abc.abstractmethod
    def _solve(self, problem: Problem) -> SolverOutput:
        """Find a choice for ``problem`` (and a lower bound, if the method has one).

        Called only by :meth:`solve`, after the budget count and each budget's feasibility
        have been checked, with a problem that has no ties and no pins. Must not modify
        ``problem`` and must be deterministic.
        """


def _simplified(problem: Problem) -> tuple[Problem, list[str], int]:
    """``problem`` without what no choice can use or need, exactly; what was dropped.

    * A budget at or above the dearest achievable total cannot bind. Dropping it spares every
      method from bounds as large as the largest float (HiGHS and SciPy's LP refuse those,
      and scaling them overflows) and gives the exact unconstrained answer.
    * An option whose cost, with every other unit at its cheapest, is over a budget (beyond
      twice its tolerance, so that no option a feasible choice may take is lost) is in no
      feasible choice. Removing it keeps the budget rows within a range that LP and MIP
      backends resolve: one option a billion times the budget otherwise sets their scale,
      and the backends' absolute tolerances then hide the options that matter.

    Returns the problem, the names of the dropped budgets and the number of removed options.
    """
    loose = [
        name for name, budget in problem.budgets.items() if budget >= problem.max_resource(name)
    ]
    budgets = {name: b for name, b in problem.budgets.items() if name not in loose}
    allowed = problem.allowed.copy()
    for name, budget in budgets.items():
        cost = np.where(problem.allowed, problem.costs[name], np.inf)
        cheapest = cost.min(axis=1)
        room = budget + 2.0 * feasibility_tolerance(budget) - float(cheapest.sum())
        allowed &= cost - cheapest[:, None] <= room
    empty = ~allowed.any(axis=1)
    if empty.any():
        # Each budget alone was checked in solve(); together they leave this unit nothing.
        parts = "; ".join(
            f"{name!r} <= {budget:.10g} (smallest achievable total on its own: "
            f"{problem.min_resource(name):.10g})"
            for name, budget in budgets.items()
        )
        raise InfeasibleBudgetError(
            f"the budgets cannot all be met at once: {parts}. "
            f"{problem.unit_label(int(np.flatnonzero(empty)[0]))} has no option that fits "
            "every budget with the other units at their cheapest; raise at least one budget "
            "or allow more options"
        )
    pruned = int(problem.allowed.sum() - allowed.sum())
    if not loose and not pruned:
        return problem, [], 0
    slim = Problem(
        problem.objective,
        problem.costs,
        budgets,
        allowed,
        problem.unit_names,
        problem.option_names,
        problem.pins,
        problem.ties,
        problem.interactions or None,
    )
    return slim, loose, pruned


def _interaction_methods() -> list[str]:
    """Names of the loaded solver classes that optimise interaction terms, for an error message.

    Found among :class:`BaseSolver`'s subclasses rather than through the registry, which
    imports this module; every registered solver is such a subclass, loaded when registered.
    """
    names: set[str] = set()
    pending = list(BaseSolver.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        name = getattr(cls, "name", None)
        if cls.supports_interactions and isinstance(name, str) and not inspect.isabstract(cls):
            names.add(name)
    return sorted(names)
