"""The profile's view of a unit: three observation values that tell the policy how much the
unit's predicted loss moves with its bits.

RAMP's embedding (:mod:`bitalloc.rl.embedding`) describes a unit by activation and weight
statistics only. Those correlate weakly with a profile's sensitivities, and the reward the agent
maximises is the profile's predicted loss, so a policy that sees only the embedding is left to
guess the quantity it is scored on (on the default model, with the ``share`` anchor, it reached
2.9x the optimum's predicted loss, worse than uniform). bitalloc therefore adds, by default,
three values derived from the problem's loss table, each scale-free so that it means the same on
any model and transfers like the embedding does:

``sensitivity``
    log of the unit's loss at its cheapest allowed option, z-scored within the problem (static);
``gain_up``
    the loss saved per unit of cost by moving from the neutral option (see
    :mod:`bitalloc.rl.env`) to the next richer one; -5 when there is none;
``loss_down``
    the loss added per unit of cost saved by moving to the next cheaper one; +5 when
    there is none.

The two rates are what a Lagrangian solver compares against its multiplier, so they are given
relative to the environment's current budget-tracking multiplier ``lam``
(:mod:`bitalloc.rl.anchor`) as ``log10(rate / lam)``: positive ``gain_up`` means a richer option
is worth its cost at the current price of bits, negative ``loss_down`` that a cheaper one is.
Both are scale-free, so they too mean the same on any model and budget.
"""

from __future__ import annotations

import numpy as np

from bitalloc.solvers.problem import Problem

PROFILE_DIMS = 3
_CLIP = 5.0
_FLOOR = 1e-30


class ProfileView:
    """Per-unit sensitivity and per-option marginal rates, normalised within one problem.

    Args:
        problem: the (tie-free) problem.
        options: per unit, its allowed option indices sorted from cheapest to richest.
        cost: the budget's ``(n_units, n_options)`` cost table.
    """

    def __init__(self, problem: Problem, options: list[np.ndarray], cost: np.ndarray) -> None:
        loss = problem.objective
        sensitivity = np.log(np.array([max(loss[i, o[0]], _FLOOR) for i, o in enumerate(options)]))
        self.sensitivity = _zscore(sensitivity)
        # rates[i][k]: loss saved per cost between the unit's sorted options k and k + 1.
        self.rates: list[np.ndarray] = []
        for i, o in enumerate(options):
            d_loss = loss[i, o[:-1]] - loss[i, o[1:]]
            d_cost = np.maximum(cost[i, o[1:]] - cost[i, o[:-1]], _FLOOR)
            # Huge losses over tiny cost steps overflow to inf; the features clip it anyway.
            with np.errstate(over="ignore"):
                self.rates.append(np.log(np.maximum(d_loss / d_cost, _FLOOR)))

    def features(self, i: int, position: int, lam: float) -> np.ndarray:
        """The three values for unit ``i`` whose neutral option is ``position`` in its sorted
        options, at multiplier ``lam``."""
        rates = self.rates[i]
        scale = np.log10(max(lam, _FLOOR))
        up = rates[position] / np.log(10) - scale if position < rates.size else -_CLIP
        down = rates[position - 1] / np.log(10) - scale if position > 0 else _CLIP
        values = np.array([self.sensitivity[i], up, down])
        return np.clip(values, -_CLIP, _CLIP)


def _zscore(x: np.ndarray) -> np.ndarray:
    std = x.std()
    return (x - x.mean()) / std if std > 0 else np.zeros_like(x)
