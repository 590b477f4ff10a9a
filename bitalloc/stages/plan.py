"""Stage 3 and 4, plan and solve: the problem the request poses on the profile (exact bit and
byte costs, the budgets asked for, ties), the solver that answers it, and the
:class:`~bitalloc.allocation.Allocation` of its answer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from bitalloc.allocation import Allocation
from bitalloc.models import excluded_parameters
from bitalloc.planning import build_problem, default_method, to_allocation
from bitalloc.records import Budget
from bitalloc.sensitivity import Profile
from bitalloc.solvers import Problem, Solution, solve
from bitalloc.stages.prepare import Prepared
from bitalloc.targets import target_ties

if TYPE_CHECKING:
    from bitalloc.config import AllocateConfig


@dataclass(frozen=True)
class Plan:
    """How the prepared model's weights are to be allocated: the request (``budget``), the
    fused projections tied to one format (``ties``), and the solver (``method`` with its
    ``options``). :meth:`solve` turns any profile of the model into an allocation, so that
    verify-and-repair can re-solve a corrected table the same way."""

    prep: Prepared
    budget: Budget
    ties: tuple[str, ...] | None
    method: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def problem(self, table: Profile) -> Problem:
        """The allocation problem of ``table`` under this plan's weight budgets."""
        return build_problem(
            self.prep.units,
            self.prep.palette,
            table,
            self.budget.avg_bits,
            max_bytes=self.max_unit_bytes,
            ties=None if self.ties is None else list(self.ties),
        )

    @property
    def max_unit_bytes(self) -> float | None:
        """The units' byte bound: ``max_bytes``, or what a file-size budget leaves for them
        (see :func:`bitalloc.targets.unit_byte_budget`), whichever is tighter."""
        bounds = [b for b in (self.budget.max_bytes, self.prep.file_unit_bytes) if b is not None]
        return min(bounds) if bounds else None

    def solve(self, table: Profile) -> Allocation:
        """The allocation the solver chooses on ``table`` (carrying the scale-folding record
        when the model was folded, as every allocation of a folded model must, and the
        importance that weighted the clipping)."""
        solution = solve(self.problem(table), method=self.method, **dict(self.options))
        return self.prep.recorded(allocation_for(self.prep, table, solution, self.budget))

    def uniform_candidates(self, table: Profile) -> list[tuple[str, Allocation]]:
        """The uniform allocations (every unit in one palette format) that meet this plan's
        budgets and constraints, richest first, labelled ``uniform FORMAT``: what verify
        measures beside the solver's choice, so that it never returns an allocation worse than
        doing nothing clever."""
        problem = self.problem(table)
        found = []
        for j, fmt in enumerate(self.prep.palette):
            choice = np.full(problem.n_units, j, dtype=np.int64)
            if fmt.is_float or not problem.is_feasible(choice):
                continue
            solution = Solution(
                choice=choice,
                objective=problem.objective_of(choice),
                resources=problem.resources(choice),
                status="feasible",
                lower_bound=None,
                gap=None,
                wall_time_s=0.0,
                method="uniform",
            )
            chosen = self.prep.recorded(allocation_for(self.prep, table, solution, self.budget))
            found.append((chosen.avg_bits, f"uniform {fmt.name}", chosen))
        return [(label, alloc) for _, label, alloc in sorted(found, key=lambda f: -f[0])]


def plan(prep: Prepared, profile: Profile, config: AllocateConfig) -> Plan:
    """The plan ``config`` asks for on this profile: its weight budgets, ties and solver
    (default: ``lagrangian``, or ``qp`` when the profile carries interaction terms). A solver
    that needs the model (``rl``: unit embeddings, a measured reward) gets it here."""
    from bitalloc.rl.options import rl_solver_options

    method = default_method(profile, config.solve.solver)
    options = rl_solver_options(
        method, dict(config.solve.options), config.solve.policy, prep, config.progress
    )
    target = config.target
    return Plan(
        prep=prep,
        budget=Budget(
            avg_bits=target.avg_bits,
            max_bytes=target.max_bytes,
            max_file_bytes=target.max_file_bytes,
        ),
        ties=target_ties(target.target, target.ties),
        method=method,
        options=options,
    )


def allocation_for(
    prep: Prepared, profile: Profile, solution: Solution, budget: Budget | float | None
) -> Allocation:
    """The :class:`Allocation` of a solver's choice on the prepared model (``budget``: the
    request; a number is an ``avg_bits`` request)."""
    return to_allocation(
        prep.units,
        prep.palette,
        profile,
        solution,
        budget,
        model=prep.loaded.source,
        excluded=excluded_parameters(prep.model, prep.units),
    )


def requested_budget(config: AllocateConfig) -> Budget:
    """Everything ``config`` asks for, by resource (what the final allocation records)."""
    return Budget(
        avg_bits=config.target.avg_bits,
        max_bytes=config.target.max_bytes,
        kv_avg_bits=config.kv.avg_bits,
        memory_bytes=config.kv.memory_bytes,
        max_file_bytes=config.target.max_file_bytes,
    )
