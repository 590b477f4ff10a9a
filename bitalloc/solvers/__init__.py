"""Solvers for the bit-allocation problem (a multiple-choice knapsack).

Build a :class:`Problem`, then call :func:`solve` (or a solver's ``solve``) to get a
:class:`Solution`. :func:`available_solvers` lists the registered methods.
"""

from bitalloc.solvers.base import BaseSolver, available_solvers, solve
from bitalloc.solvers.dp import DPSolver
from bitalloc.solvers.ilp import ILPSolver
from bitalloc.solvers.lagrangian import LagrangianSolver
from bitalloc.solvers.problem import Problem, Solution
from bitalloc.solvers.qp import QPSolver

__all__ = [
    "BaseSolver",
    "DPSolver",
    "ILPSolver",
    "LagrangianSolver",
    "Problem",
    "QPSolver",
    "Solution",
    "available_solvers",
    "solve",
]
