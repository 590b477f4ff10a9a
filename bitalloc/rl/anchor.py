"""The budget-tracking Lagrangian choice that the RL environment's actions are anchored to.

For a multiplier ``lam`` every unit has a best option ``argmin_j loss[i, j] + lam * cost[i, j]``.
The environment keeps, at each step, the smallest ``lam`` (the richest choice) at which the
remaining units' best options fit in the budget left, and moves the unit from that choice: the
action scales ``lam`` by ``10 ** (-span * a)``. With ``a = 0`` everywhere an episode is the
Lagrangian relaxation's allocation, re-balanced after every step; the policy learns where to
deviate from it.

The multipliers come from a fixed log-spaced grid spanning every marginal rate (loss saved per
unit of cost between adjacent options) of the problem, with a decade's margin on each side, so
the largest multiplier is the cheapest allocation and the smallest the richest. Per grid point
the units' choices and the suffix sums of their costs are precomputed, so a step costs one
binary search.
"""

from __future__ import annotations

import numpy as np

from bitalloc.solvers.problem import Problem

GRID_POINTS = 256
_FLOOR = 1e-30


class LagrangianAnchor:
    """Per-unit Lagrangian choices on a multiplier grid, with suffix sums of their costs.

    Args:
        problem: the (tie-free) problem.
        cost: the budget's ``(n_units, n_options)`` cost table.
        points: grid size.
    """

    def __init__(self, problem: Problem, cost: np.ndarray, points: int = GRID_POINTS) -> None:
        loss = problem.objective
        allowed = problem.allowed
        rates = []
        for i in range(problem.n_units):
            options = np.flatnonzero(allowed[i])
            options = options[np.argsort(cost[i, options], kind="stable")]
            d_cost = np.diff(cost[i, options])
            d_loss = -np.diff(loss[i, options])
            ok = (d_cost > 0) & (d_loss > 0)
            rates.append(d_loss[ok] / d_cost[ok])
        pooled = np.concatenate(rates) if rates else np.zeros(0)
        if pooled.size:
            low, high = np.log10(pooled.min()) - 1, np.log10(pooled.max()) + 1
        else:
            low, high = -1.0, 1.0
        self.grid = np.logspace(low, high, points)
        self.loss = loss
        self.cost = cost
        self.masked = np.where(allowed, 0.0, np.inf)
        # choice[i, g]: unit i's best option at grid[g]; grid rising, so choices get cheaper.
        score = loss[:, :, None] + self.masked[:, :, None] + cost[:, :, None] * self.grid
        self.choice = score.argmin(axis=1)
        chosen_cost = np.take_along_axis(cost, self.choice, axis=1)
        self.rest = np.concatenate(
            [np.cumsum(chosen_cost[::-1], axis=0)[::-1], np.zeros((1, points))]
        )

    def multiplier(self, i: int, left: float) -> float:
        """The smallest grid multiplier at which units ``i..`` fit in ``left`` (the largest
        when none does: then the cheapest choices, which projection keeps feasible)."""
        rest = self.rest[i]
        # rest falls as the multiplier rises; find the first point that fits.
        fits = np.flatnonzero(rest <= left * (1 + 1e-12))
        return float(self.grid[fits[0] if fits.size else -1])

    def option(self, i: int, lam: float) -> int:
        """Unit ``i``'s best allowed option at multiplier ``lam``."""
        return int(np.argmin(self.loss[i] + self.masked[i] + lam * self.cost[i]))
