"""Choice helpers shared by several solvers (numpy only)."""

from __future__ import annotations

import numpy as np


def min_objective_choice(
    objective: np.ndarray, allowed: np.ndarray, tie_costs: list[np.ndarray]
) -> np.ndarray:
    """Each unit's lowest-objective allowed option; ties go to the cheapest, table by table."""
    masked = np.where(allowed, objective, np.inf)
    best = masked == masked.min(axis=1, keepdims=True)
    for cost in tie_costs:
        priced = np.where(best, cost, np.inf)
        best &= priced == priced.min(axis=1, keepdims=True)
    # argmax returns the first True, so remaining ties go to the lowest option index.
    return np.argmax(best, axis=1)


def greedy_fill(
    objective: np.ndarray,
    cost: np.ndarray,
    allowed: np.ndarray,
    budget: float,
    choice: np.ndarray,
    max_rounds: int,
) -> tuple[np.ndarray, int, int]:
    """Spend leftover budget on improving moves, best objective saving per extra cost first.

    Each round finds every unit's best move that fits the current slack on its own, then
    accepts moves in order of efficiency while their running extra cost fits. Moves that
    lower the objective without raising cost rank first. Returns (choice, rounds, moves).
    """
    choice = choice.copy()
    n = choice.size
    rows = np.arange(n)
    active = rows
    previous_slack = np.inf
    rounds = moves = 0
    while active.size and rounds < max_rounds:
        # Recomputed from scratch each round so rounding cannot accumulate across rounds.
        slack = budget - float(cost[rows, choice].sum())
        if slack > previous_slack:
            active = rows  # a cost-saving move freed budget: units dropped earlier may fit now
        previous_slack = slack
        at = choice[active]
        do = objective[active] - objective[active, at][:, None]
        dc = cost[active] - cost[active, at][:, None]
        candidate = allowed[active] & (do < 0) & (dc <= slack)
        has = candidate.any(axis=1)
        if not has.any():
            break
        # Units without a fitting move now never get one (slack only shrinks), so drop them.
        active, do, dc, candidate = active[has], do[has], dc[has], candidate[has]
        free = candidate & (dc <= 0)
        has_free = free.any(axis=1)
        ratio = np.divide(-do, dc, out=np.full(dc.shape, -np.inf), where=candidate & (dc > 0))
        pick = np.where(
            has_free,
            np.argmax(np.where(free, -do, -np.inf), axis=1),
            np.argmax(ratio, axis=1),
        )
        local = np.arange(active.size)
        pick_ratio = np.where(has_free, np.inf, ratio[local, pick])
        rank = np.argsort(-pick_ratio, kind="stable")
        spent = np.cumsum(dc[local, pick][rank])
        over = np.flatnonzero(spent > slack)
        # The first move fits on its own, so every round accepts at least one move.
        accepted = rank[: over[0] if over.size else rank.size]
        choice[active[accepted]] = pick[accepted]
        rounds += 1
        moves += accepted.size
    return choice, rounds, moves
