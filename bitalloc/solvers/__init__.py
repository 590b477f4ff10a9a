"""Solvers for the bit-allocation problem (a multiple-choice knapsack).

Build a :class:`Problem`, then call :func:`solve` (or a solver's ``solve``) to get a
:class:`Solution`. :func:`available_solvers` lists the registered methods; see
:mod:`bitalloc.solvers.registry` for adding one (a decorator, or an entry point).
"""

# The array-only built-ins register themselves on import; importing them here makes them
# available to every caller of solve(). The rl method (torch) is an entry point, loaded lazily.
from bitalloc.solvers.base import BaseSolver
from bitalloc.solvers.dp import DPSolver
from bitalloc.solvers.ilp import ILPSolver
from bitalloc.solvers.lagrangian import LagrangianSolver
from bitalloc.solvers.problem import Problem, Solution
from bitalloc.solvers.qp import QPSolver
from bitalloc.solvers.registry import (
    available_solvers,
    register_solver,
    registered_solver,
    solve,
    solver_class,
    solver_names,
    unregister_solver,
)

__all__ = [
    "BaseSolver",
    "DPSolver",
    "ILPSolver",
    "LagrangianSolver",
    "Problem",
    "QPSolver",
    "Solution",
    "available_solvers",
    "register_solver",
    "registered_solver",
    "solve",
    "solver_class",
    "solver_names",
    "unregister_solver",
]
