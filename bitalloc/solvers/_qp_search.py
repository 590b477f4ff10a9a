"""Search side of the QP solver: the problem as arrays, rounding, repair and local search.

Used by :mod:`bitalloc.solvers.qp`. A choice ``x`` is improved through a per-unit "field"
``G[i, j]`` (unit ``i``'s objective row plus the interaction rows of its neighbours at their
current options): the objective change of moving unit ``i`` to option ``j`` is
``G[i, j] - G[i, x_i]``, and after a move only the neighbours' rows change.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from bitalloc.solvers.problem import feasibility_tolerance

#: Moves between full recomputations of the field, so incremental rounding cannot build up.
_REFRESH_EVERY = 256
#: Most joint moves of interacting units taken from one evaluation of all pairs.
_PAIR_BATCH = 64
#: z entries within this of a unit's largest count as tied when rounding.
ROUND_TIE = 1e-9


@dataclass
class QuadModel:
    """The problem as arrays, plus what every stage needs (scales, limits, adjacency)."""

    objective: np.ndarray  # (n, k)
    allowed: np.ndarray  # (n, k) bool
    cost: np.ndarray  # (nb, n, k), budgeted costs only
    names: list[str]
    budget: np.ndarray  # (nb,)
    scale: np.ndarray  # (nb,) divisor that makes each budget's violation comparable
    limit: np.ndarray  # (nb,) what moves keep each total under (see build_model)
    a: np.ndarray  # (m,) first unit of each pair
    b: np.ndarray  # (m,) second unit
    values: np.ndarray  # (m, k, k)
    keys: np.ndarray  # (m,) a * n + b, sorted, for pair look-ups
    key_pair: np.ndarray  # (m,) pair index of each sorted key
    ptr_a: np.ndarray  # CSR over units of the pairs where the unit is first
    pairs_a: np.ndarray
    ptr_b: np.ndarray  # ... and where it is second
    pairs_b: np.ndarray
    eps: float  # objective changes below this are rounding noise (see build_model)

    @property
    def n(self) -> int:
        """Number of units."""
        return self.objective.shape[0]

    def totals(self, x: np.ndarray) -> np.ndarray:
        """Each budgeted cost's total at choice ``x``, summed as Problem.resources does."""
        rows = np.arange(self.n)
        return np.array([table[rows, x].sum() for table in self.cost])

    def value(self, x: np.ndarray) -> float:
        """Objective at choice ``x``, interactions included."""
        linear = float(self.objective[np.arange(self.n), x].sum())
        return linear + float(self.values[np.arange(self.a.size), x[self.a], x[self.b]].sum())

    def field(self, x: np.ndarray) -> np.ndarray:
        """``G[i, j]``: objective of unit ``i`` at option ``j`` given its neighbours' options."""
        g = self.objective.copy()
        p = np.arange(self.a.size)
        np.add.at(g, self.a, self.values[p, :, x[self.b]])
        np.add.at(g, self.b, self.values[p, x[self.a], :])
        return g

    def move(self, g: np.ndarray, x: np.ndarray, i: int, j: int) -> None:
        """Set ``x[i] = j`` and update the field rows of ``i``'s neighbours."""
        old = x[i]
        first = self.pairs_a[self.ptr_a[i] : self.ptr_a[i + 1]]
        second = self.pairs_b[self.ptr_b[i] : self.ptr_b[i + 1]]
        # Pairs are unique, so each neighbour appears once per list and fancy += is safe.
        g[self.b[first]] += self.values[first, j, :] - self.values[first, old, :]
        g[self.a[second]] += self.values[second, :, j] - self.values[second, :, old]
        x[i] = j

    def gradient(self, z: np.ndarray) -> np.ndarray:
        """Gradient of the relaxed objective at ``z`` (one distribution per unit)."""
        g = self.objective.copy()
        np.add.at(g, self.a, np.einsum("pij,pj->pi", self.values, z[self.b]))
        np.add.at(g, self.b, np.einsum("pij,pi->pj", self.values, z[self.a]))
        return g

    def quad(self, z1: np.ndarray, z2: np.ndarray) -> float:
        """``sum_p z1[a_p]^T V_p z2[b_p]``: the relaxed interaction term, bilinear."""
        return float(np.einsum("pi,pij,pj->", z1[self.a], self.values, z2[self.b]))

    def pair_correction(
        self, x: np.ndarray, iu: np.ndarray, ju: np.ndarray, iv: np.ndarray, jv: np.ndarray
    ) -> np.ndarray:
        """Joint-move correction: exact delta of moving both minus the two single deltas."""
        out = np.zeros(np.broadcast(iu, iv).shape)
        if self.a.size == 0:
            return out
        lo, hi = np.broadcast_arrays(np.minimum(iu, iv), np.maximum(iu, iv))
        key = lo * self.n + hi
        pos = np.minimum(np.searchsorted(self.keys, key), self.keys.size - 1)
        hit = (self.keys[pos] == key) & (lo != hi)
        if not hit.any():
            return out
        p = self.key_pair[pos[hit]]
        swap = np.broadcast_to(iu > iv, hit.shape)[hit]
        ju_h, jv_h = np.broadcast_to(ju, hit.shape)[hit], np.broadcast_to(jv, hit.shape)[hit]
        j_lo, j_hi = np.where(swap, jv_h, ju_h), np.where(swap, ju_h, jv_h)
        x_lo, x_hi = x[lo[hit]], x[hi[hit]]
        v = self.values
        out[hit] = v[p, j_lo, j_hi] - v[p, j_lo, x_hi] - v[p, x_lo, j_hi] + v[p, x_lo, x_hi]
        return out


def build_model(
    objective: np.ndarray,
    costs: Mapping[str, np.ndarray],
    budgets: Mapping[str, float],
    allowed: np.ndarray,
    pairs: np.ndarray,
    values: np.ndarray,
) -> QuadModel:
    """Arrays, budget scales and limits, pair look-up keys and adjacency for the search.

    ``pairs`` is ``(m, 2)`` (any order within a pair, no pair twice) and ``values`` the
    ``(m, k, k)`` tables; only the costs named in ``budgets`` are kept.
    """
    n, k = objective.shape
    names = list(budgets)
    cost = np.zeros((0, n, k))
    if names:
        cost = np.stack([np.asarray(costs[c], dtype=np.float64) for c in names])
    budget = np.array([float(budgets[c]) for c in names])
    biggest = np.array([float(np.where(allowed, t, 0).max(axis=1).sum()) for t in cost])
    # A budget of 0 cannot normalise; the largest achievable total then sets the scale.
    scale = np.where(budget > 0, budget, np.maximum(biggest, 1.0)) if names else budget
    # Moves aim at half the feasibility tolerance, so the recomputed sums that decide
    # feasibility cannot land over by rounding. A budget a hair below the cheapest total
    # (allowed by the tolerance) gets that total as its target instead.
    tolerance = np.array([feasibility_tolerance(v) for v in budget])
    low = np.array([float(np.where(allowed, t, np.inf).min(axis=1).sum()) for t in cost])
    limit = np.minimum(np.maximum(budget + 0.5 * tolerance, low), budget + tolerance)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    values = np.asarray(values, dtype=np.float64).reshape(-1, k, k)
    # Canonical orientation (a < b, table rows for a): pair_correction relies on it.
    flip = pairs[:, 0] > pairs[:, 1]
    a, b = np.where(flip, pairs[:, 1], pairs[:, 0]), np.where(flip, pairs[:, 0], pairs[:, 1])
    values = np.where(flip[:, None, None], values.transpose(0, 2, 1), values)
    keys = a * n + b
    order = np.argsort(keys, kind="stable")
    by_a, by_b = np.argsort(a, kind="stable"), np.argsort(b, kind="stable")
    units = np.arange(n + 1)
    # A delta is a difference of field entries, each a sum of one objective entry and one
    # table entry per neighbour; rounding noise is relative to the largest such sum.
    reach = np.zeros(n)
    np.add.at(reach, a, np.abs(values).max(axis=(1, 2)))
    np.add.at(reach, b, np.abs(values).max(axis=(1, 2)))
    magnitude = float(np.abs(objective[allowed]).max() + reach.max(initial=0.0))
    return QuadModel(
        objective=np.asarray(objective, dtype=np.float64),
        allowed=np.asarray(allowed, dtype=bool),
        cost=cost,
        names=names,
        budget=budget,
        scale=scale,
        limit=limit,
        a=a,
        b=b,
        values=values,
        keys=keys[order],
        key_pair=order,
        ptr_a=np.searchsorted(a[by_a], units),
        pairs_a=by_a,
        ptr_b=np.searchsorted(b[by_b], units),
        pairs_b=by_b,
        eps=1e-12 * magnitude if magnitude > 0 else 1e-300,
    )


# -- rounding and repair ------------------------------------------------------------------


def violation(model: QuadModel, totals: np.ndarray) -> np.ndarray:
    """Summed excess over the limits, each divided by its budget's scale (``totals`` may
    carry extra trailing axes, one total per candidate move)."""
    over = np.maximum(totals - model.limit.reshape((-1,) + (1,) * (totals.ndim - 1)), 0.0)
    return (over / model.scale.reshape((-1,) + (1,) * (totals.ndim - 1))).sum(axis=0)


def repair(model: QuadModel, x: np.ndarray, g: np.ndarray, max_steps: int) -> int | None:
    """Move units until every budget is met; returns the moves made, or None if stuck.

    Each step takes, among moves that lower the total normalised violation, one that does
    not raise the objective and removes the most violation if there is one, otherwise the
    one with the smallest objective increase per unit of violation removed. ``g`` (the
    field of ``x``) is kept up to date.
    """
    rows = np.arange(model.n)
    for step in range(max_steps + 1):
        totals = model.totals(x)
        now = float(violation(model, totals))
        if now <= 0:
            return step
        if step == max_steps:
            return None
        change = model.cost - model.cost[:, rows, x][:, :, None]
        removed = now - violation(model, totals[:, None, None] + change)
        usable = model.allowed & (removed > 1e-12 * now)
        usable[rows, x] = False
        if not usable.any():
            return None
        delta = g - g[rows, x][:, None]
        free = usable & (delta <= 0)
        if free.any():
            # Moves that do not raise the objective: take the one removing the most violation.
            score = np.where(free, -removed, np.inf)
        else:
            score = np.where(usable, delta / np.where(usable, removed, 1.0), np.inf)
        i, j = np.unravel_index(int(np.argmin(score)), score.shape)
        model.move(g, x, int(i), int(j))
    return None


def repair_steps(model: QuadModel) -> int:
    """A cap on repair moves; every move strictly lowers the violation, so it rarely binds."""
    return 4 * model.objective.size + 10


def round_relaxed(model: QuadModel, z: np.ndarray) -> np.ndarray:
    """Each unit's largest ``z``; ties go to the cheaper option (normalised cost sum)."""
    masked = np.where(model.allowed, z, -np.inf)
    tied = masked >= masked.max(axis=1, keepdims=True) - ROUND_TIE
    return cheapest_choice(model, tied)


def cheapest_choice(model: QuadModel, allowed: np.ndarray) -> np.ndarray:
    """Per unit, the allowed option with the lowest normalised cost sum, then objective."""
    price = np.tensordot(1.0 / model.scale, model.cost, axes=1) if model.names else 0.0
    price = np.where(allowed, price, np.inf)
    best = price <= price.min(axis=1, keepdims=True)
    worth = np.where(best, model.objective, np.inf)
    best &= worth <= worth.min(axis=1, keepdims=True)
    return np.argmax(best, axis=1)


# -- local search -------------------------------------------------------------------------


@dataclass
class SearchStats:
    """Counts of accepted local-search steps, and whether ``max_moves`` stopped the search."""

    moves: int = 0
    pair_moves: int = 0
    swaps: int = 0
    capped: bool = False


def _pair_moves(
    model: QuadModel,
    x: np.ndarray,
    g: np.ndarray,
    delta: np.ndarray,
    dcost: np.ndarray,
    room: np.ndarray,
) -> int:
    """Apply improving joint moves of two interacting units; returns how many.

    Strongly coupled units often only pay off when they change together, which no single
    move (and no budget-driven swap) finds. Evaluating every pair costs ``O(m k^2)``, so one
    evaluation feeds a batch: the best moves are taken in order as long as they touch
    neither a unit moved in this batch nor a neighbour of one (their gains then stay exact)
    and their summed cost changes fit the budgets.
    """
    a, b, v = model.a, model.b, model.values
    p = np.arange(a.size)
    xa, xb = x[a], x[b]
    joint = v + (delta[a] - v[p, :, xb])[:, :, None] + (delta[b] - v[p, xa, :])[:, None, :]
    joint += v[p, xa, xb][:, None, None]
    ok = (joint < -model.eps) & model.allowed[a][:, :, None] & model.allowed[b][:, None, :]
    for table, left in zip(dcost, room):
        ok &= table[a][:, :, None] + table[b][:, None, :] <= left
    flat = np.flatnonzero(ok)
    if flat.size == 0:
        return 0
    flat = flat[np.argsort(joint.ravel()[flat], kind="stable")[:_PAIR_BATCH]]
    blocked = np.zeros(model.n, dtype=bool)
    spent = np.zeros(room.shape)
    done = 0
    for pair, ja, jb in zip(*np.unravel_index(flat, joint.shape)):
        ua, ub = int(a[pair]), int(b[pair])
        cost = dcost[:, ua, ja] + dcost[:, ub, jb]
        if blocked[ua] or blocked[ub] or np.any(spent + cost > room):
            continue
        for unit in (ua, ub):
            blocked[unit] = True
            blocked[model.b[model.pairs_a[model.ptr_a[unit] : model.ptr_a[unit + 1]]]] = True
            blocked[model.a[model.pairs_b[model.ptr_b[unit] : model.ptr_b[unit + 1]]]] = True
        model.move(g, x, ua, int(ja))
        model.move(g, x, ub, int(jb))
        spent += cost
        done += 1
    return done


def _swap(
    model: QuadModel,
    x: np.ndarray,
    g: np.ndarray,
    delta: np.ndarray,
    dcost: np.ndarray,
    room: np.ndarray,
    candidates: int,
) -> bool:
    """Apply the best improving swap, if any: an improving move too dear on its own plus a
    move elsewhere that frees budget at the least objective cost per unit freed."""
    k = model.objective.shape[1]
    better = model.allowed & (delta < -model.eps)
    saving = -np.tensordot(1.0 / model.scale, dcost, axes=1)
    freeing = model.allowed & (saving > 0)
    if candidates == 0 or not better.any() or not freeing.any():
        return False
    up = np.flatnonzero(better.ravel())
    up = up[np.argsort(delta.ravel()[up], kind="stable")[:candidates]]
    down = np.flatnonzero(freeing.ravel())
    ratio = delta.ravel()[down] / saving.ravel()[down]
    down = down[np.argsort(ratio, kind="stable")[:candidates]]
    iu, ju = np.divmod(up, k)
    iv, jv = np.divmod(down, k)
    joint = dcost[:, iu, ju][:, :, None] + dcost[:, iv, jv][:, None, :]
    ok = np.all(joint <= room[:, None, None], axis=0) & (iu[:, None] != iv[None, :])
    gain = delta[iu, ju][:, None] + delta[iv, jv][None, :]
    gain += model.pair_correction(x, iu[:, None], ju[:, None], iv[None, :], jv[None, :])
    gain = np.where(ok, gain, np.inf)
    best = np.unravel_index(int(np.argmin(gain)), gain.shape)
    if not gain[best] < -model.eps:
        return False
    model.move(g, x, int(iu[best[0]]), int(ju[best[0]]))
    model.move(g, x, int(iv[best[1]]), int(jv[best[1]]))
    return True


def local_search(
    model: QuadModel, x: np.ndarray, g: np.ndarray, max_moves: int, candidates: int
) -> SearchStats:
    """Best-improvement descent: single moves first, then swaps, then joint moves of
    interacting units (the dearest to evaluate), back to single moves after any success.

    Every accepted step keeps each budget within ``max(limit, current total)`` and lowers the
    objective by more than a rounding-level tolerance, so the search cannot cycle.
    """
    n, k = model.objective.shape
    rows = np.arange(n)
    stats = SearchStats()
    fresh = 0
    while True:
        if stats.moves + stats.pair_moves + stats.swaps >= max_moves:
            stats.capped = True
            return stats
        if fresh >= _REFRESH_EVERY:
            g[:] = model.field(x)
            fresh = 0
        totals = model.totals(x)
        room = np.maximum(model.limit, totals) - totals
        dcost = model.cost - model.cost[:, rows, x][:, :, None]
        fits = model.allowed & np.all(dcost <= room[:, None, None], axis=0)
        delta = g - g[rows, x][:, None]
        single = fits & (delta < -model.eps)
        if single.any():
            i, j = np.unravel_index(int(np.argmin(np.where(single, delta, np.inf))), (n, k))
            model.move(g, x, int(i), int(j))
            stats.moves += 1
            fresh += 1
        elif model.names and _swap(model, x, g, delta, dcost, room, candidates):
            stats.swaps += 1
            fresh += 2
        else:
            batch = _pair_moves(model, x, g, delta, dcost, room) if model.a.size else 0
            if batch == 0:
                return stats
            stats.pair_moves += batch
            fresh += 2 * batch


def kicks(
    model: QuadModel,
    x: np.ndarray,
    stats: SearchStats,
    max_moves: int,
    candidates: int,
    restarts: int,
    seed: int,
) -> tuple[np.ndarray, int]:
    """Iterated local search: perturb a few units at random, repair, descend, keep the best.

    Returns the best choice and how many kicks improved it. ``stats`` keeps counting moves
    so ``max_moves`` caps the whole search.
    """
    rng = np.random.default_rng(seed)
    n = model.n
    # Kick sizes cycle from 2 units up to about 5% of them (at least 3 where possible):
    # small kicks escape shallow optima, larger ones reach other basins.
    largest = min(n, max(3, n // 20))
    best, best_value = x.copy(), model.value(x)
    improved = 0
    steps = repair_steps(model)
    for r in range(restarts):
        size = min(n, 2 + r % max(1, largest - 1))
        left = max_moves - stats.moves - stats.pair_moves - stats.swaps
        if left <= 0:
            break
        y = best.copy()
        for i in rng.choice(n, size=size, replace=False):
            y[i] = rng.choice(np.flatnonzero(model.allowed[i]))
        g = model.field(y)
        if repair(model, y, g, steps) is None:
            continue
        run = local_search(model, y, g, left, candidates)
        stats.moves += run.moves
        stats.pair_moves += run.pair_moves
        stats.swaps += run.swaps
        stats.capped |= run.capped
        value = model.value(y)
        if value < best_value - model.eps:
            best, best_value = y, value
            improved += 1
    return best, improved
