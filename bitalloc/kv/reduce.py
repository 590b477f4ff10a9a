"""Search-space reduction for per-layer KV formats, as in KVTuner (Li et al., 2025), and what it
costs in optimality.

A KV allocation picks one (key bits, value bits) pair per attention layer: ``P ** L`` choices
for ``P`` pairs and ``L`` layers (16 ** 30 = 10 ** 36 on SmolLM2-135M). Two reductions:

- **Intra-layer pruning** (:func:`intra_layer_pruning`): a pair that another pair of the same
  layer dominates (no more bits and no more loss, one of them strictly less) is dropped; each
  layer keeps its lower-left Pareto front. This is free: the problem is separable (a sum of
  per-layer losses) with one budget (total bits), so in any feasible choice a dominated pair
  can be swapped for its dominator without breaking the budget or raising the loss; some
  optimum therefore uses no dominated pair.
- **Inter-layer clustering** (:func:`cluster_layers`): layers with similar sensitivity share one
  decision (a tie group for the solvers). This is not free: tied layers cannot take different
  pairs. Pruning stays free after clustering when it is applied to each group's summed
  (bits, loss) row, which is what :func:`reduction_cost` does (the tied problem is again
  separable over groups with one budget).

:func:`reduction_cost` solves the problem exactly (``bitalloc.solvers``, ILP) with no
reduction, with pruning, and with pruning plus clustering, and reports each objective relative
to the unreduced optimum. Everything here is numpy on a profile; no model is involved.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bitalloc.errors import BitallocError, InfeasibleBudgetError
from bitalloc.sensitivity.profile import Profile

BitsPerPair = Mapping[str, float] | np.ndarray


@dataclass(frozen=True)
class SpaceSize:
    """Size of an allocation search space: independent ``decisions``, ``options`` summed over
    them, and ``log10_size``, log10 of the number of complete assignments."""

    decisions: int
    options: int
    log10_size: float


def _space(counts: Sequence[int]) -> SpaceSize:
    return SpaceSize(len(counts), int(sum(counts)), float(sum(math.log10(c) for c in counts)))


def _front(bits: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Mask of the options no other option dominates (<= bits and <= loss, one strictly)."""
    no_worse = (bits[None, :] <= bits[:, None]) & (loss[None, :] <= loss[:, None])
    better = (bits[None, :] < bits[:, None]) | (loss[None, :] < loss[:, None])
    # Row j: does some option i dominate option j?
    return ~(no_worse & better).any(axis=1)


def prune_dominated(bits: Mapping[str, float], loss_row: np.ndarray) -> list[str]:
    """The pairs of one layer on its lower-left Pareto front, in the order of ``bits``.

    ``bits`` maps every pair name to its storage cost; ``loss_row[j]`` is the loss of the
    ``j``-th pair of ``bits``. A pair is dropped when another has no more bits and no more
    loss, one of them strictly less (exact duplicates are both kept).
    """
    names = list(bits)
    cost = np.asarray([bits[n] for n in names], dtype=np.float64)
    loss = np.asarray(loss_row, dtype=np.float64)
    if loss.shape != cost.shape:
        raise BitallocError(
            f"loss_row has shape {loss.shape} but bits lists {len(names)} pairs; give one loss "
            "per pair, in the order of bits"
        )
    if not (np.isfinite(cost).all() and np.isfinite(loss).all()):
        raise BitallocError("bits and losses must be finite to compare pairs")
    return [n for n, keep in zip(names, _front(cost, loss)) if keep]


def _bits_table(profile: Profile, bits_per_pair: BitsPerPair) -> np.ndarray:
    """``bits_per_pair`` as an (units x formats) table: a map from format name to bits (the
    same for every layer), or an array of shape (formats,) or (units, formats) (needed when
    layers store different token counts, as sliding-window layers do)."""
    shape = profile.loss.shape
    if isinstance(bits_per_pair, Mapping):
        missing = [f for f in profile.formats if f not in bits_per_pair]
        if missing:
            raise BitallocError(
                f"bits_per_pair gives no storage for {missing}; map every format of the "
                "profile to its bits (e.g. KVFormat.storage_bits(unit.shape, context)), or give "
                "a (units, formats) table such as kv_cost_table(units, palette, context) when "
                "the layers differ (sliding-window layers)"
            )
        row = [float(bits_per_pair[f]) for f in profile.formats]
        table = np.broadcast_to(np.asarray(row), shape).copy()
    else:
        table = np.asarray(bits_per_pair, dtype=np.float64)
        if table.shape == shape[1:]:
            table = np.broadcast_to(table, shape).copy()
        if table.shape != shape:
            raise BitallocError(
                f"bits_per_pair has shape {table.shape}; give one value per format "
                f"({shape[1]},) or per layer and format {shape}"
            )
    if not np.isfinite(table).all() or (table < 0).any():
        raise BitallocError("bits_per_pair must be finite and non-negative")
    return table


@dataclass(frozen=True)
class Pruning:
    """Intra-layer pruning: per unit, the pairs kept (profile column order), the same as an
    (units x formats) ``allowed`` mask, and the search space before and after."""

    kept: dict[str, tuple[str, ...]]
    allowed: np.ndarray
    before: SpaceSize
    after: SpaceSize


def intra_layer_pruning(profile: Profile, bits_per_pair: BitsPerPair) -> Pruning:
    """Keep each layer's Pareto-optimal pairs in (bits, loss); see :func:`prune_dominated`."""
    bits = _bits_table(profile, bits_per_pair)
    allowed = np.stack([_front(bits[i], profile.loss[i]) for i in range(len(profile.units))])
    kept = {
        unit: tuple(f for f, keep in zip(profile.formats, allowed[i]) if keep)
        for i, unit in enumerate(profile.units)
    }
    k = len(profile.formats)
    return Pruning(
        kept, allowed, _space([k] * len(profile.units)), _space(allowed.sum(axis=1).tolist())
    )


@dataclass(frozen=True)
class Clustering:
    """Inter-layer clustering: groups of profile rows (sorted; groups ordered by first
    member), the same groups as unit names, and the search space before and after."""

    groups: tuple[tuple[int, ...], ...]
    names: tuple[tuple[str, ...], ...]
    before: SpaceSize
    after: SpaceSize

    @property
    def ties(self) -> list[list[str]]:
        """The groups of two or more units, as tie groups for a solver ``Problem``."""
        return [list(group) for group in self.names if len(group) > 1]


def _ward(points: np.ndarray, k: int) -> list[list[int]]:
    """Agglomerative clustering with Ward's criterion down to ``k`` groups.

    Each step merges the two groups whose union raises the within-group sum of squares least
    (``|A||B| / (|A| + |B|) * ||mean A - mean B||^2``). Deterministic: ties go to the pair of
    groups with the lowest indices (``argmin`` takes the first), and nothing is random.
    """
    groups = [[i] for i in range(len(points))]
    centres = [points[i].astype(np.float64) for i in range(len(points))]
    while len(groups) > k:
        c = np.stack(centres)
        sizes = np.array([len(g) for g in groups], dtype=np.float64)
        gaps = ((c[:, None, :] - c[None, :, :]) ** 2).sum(axis=-1)
        cost = sizes[:, None] * sizes[None, :] / (sizes[:, None] + sizes[None, :]) * gaps
        cost[np.tril_indices(len(groups))] = np.inf
        a, b = divmod(int(np.argmin(cost)), len(groups))
        merged = len(groups[a]) * centres[a] + len(groups[b]) * centres[b]
        centres[a] = merged / (len(groups[a]) + len(groups[b]))
        groups[a] = sorted(groups[a] + groups[b])
        del groups[b], centres[b]
    return sorted(groups)


def _group_allowed(
    loss: np.ndarray, bits: np.ndarray, groups: Sequence[Sequence[int]]
) -> np.ndarray:
    """Every member of a group allowed the Pareto front of the group's summed (bits, loss):
    pruning that stays exact once the group takes one pair (tied units need equal masks)."""
    allowed = np.zeros(loss.shape, dtype=bool)
    for group in groups:
        members = list(group)
        allowed[members] = _front(bits[members].sum(axis=0), loss[members].sum(axis=0))
    return allowed


def cluster_layers(
    profile: Profile,
    k: int,
    *,
    bits_per_pair: BitsPerPair | None = None,
    floor: float = 1e-6,
) -> Clustering:
    """Group the profile's layers into ``k`` clusters of similar sensitivity.

    Each layer is the vector ``log10(loss + floor * max(loss))`` over the pairs, clustered by
    Ward's agglomerative method (:func:`_ward`; deterministic). Logarithms because the losses
    of one layer span orders of magnitude (K2V2 against K8V8) and what makes layers alike is
    their relative sensitivity, not the few largest entries; the floor, relative to the whole
    profile so it is unit-free, keeps exact zeros (K16V16) finite and treats values a
    millionth of the largest as equal.

    ``after`` counts ``k`` decisions over every pair, or, when ``bits_per_pair`` is given, over
    each group's Pareto front of summed (bits, loss) (clustering plus pruning).
    """
    n = len(profile.units)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise BitallocError(f"the number of layer clusters must be an integer in 1..{n}, got {k!r}")
    if not (isinstance(floor, int | float) and floor > 0):
        raise BitallocError(f"floor must be a positive fraction of the largest loss, got {floor!r}")
    loss = profile.loss
    scale = float(loss.max())
    points = np.log10(loss + floor * scale) if scale > 0 else np.zeros_like(loss)
    groups = _ward(points, k)
    if bits_per_pair is None:
        counts = [len(profile.formats)] * k
    else:
        allowed = _group_allowed(loss, _bits_table(profile, bits_per_pair), groups)
        counts = [int(allowed[g[0]].sum()) for g in groups]
    return Clustering(
        groups=tuple(tuple(g) for g in groups),
        names=tuple(tuple(profile.units[i] for i in g) for g in groups),
        before=_space([len(profile.formats)] * n),
        after=_space(counts),
    )


@dataclass(frozen=True)
class Reduced:
    """The exact optimum under one reduction (``none``, ``pruning``, ``pruning+clustering``).

    ``relative_loss`` is ``objective / unreduced objective - 1`` (0 = no loss of optimality);
    ``choice`` maps each unit to its pair. ``status`` is the solver's (``optimal``), or
    ``infeasible`` when tying layers leaves no choice within the budget (then the numbers are
    None).
    """

    name: str
    space: SpaceSize
    status: str
    objective: float | None = None
    relative_loss: float | None = None
    bits: float | None = None
    choice: dict[str, str] | None = None


def reduction_cost(
    profile: Profile,
    bits_per_pair: BitsPerPair,
    budget: float,
    *,
    clusters: int | Clustering | None = None,
    method: str = "ilp",
    **options: Any,
) -> list[Reduced]:
    """The optimum of the KV allocation (minimise the summed loss with total bits <=
    ``budget``, in the units of ``bits_per_pair``) with no reduction, with intra-layer pruning
    and, when ``clusters`` (a count or a :class:`Clustering`) is given, with pruning plus
    clustering. Solved by ``bitalloc.solvers.solve(method=...)``, exact by default.
    """
    from bitalloc.solvers import Problem, solve  # solver backends load only when asked

    bits = _bits_table(profile, bits_per_pair)
    loss = profile.loss
    n, k = loss.shape
    cases: list[tuple[str, np.ndarray | None, list[list[str]], SpaceSize]] = [
        ("none", None, [], _space([k] * n))
    ]
    pruning = intra_layer_pruning(profile, bits)
    cases.append(("pruning", pruning.allowed, [], pruning.after))
    if clusters is not None:
        if not isinstance(clusters, Clustering):
            clusters = cluster_layers(profile, clusters)
        if sorted(i for g in clusters.groups for i in g) != list(range(n)):
            raise BitallocError(
                "the clustering does not cover this profile's layers once each; cluster this "
                "profile (cluster_layers(profile, k))"
            )
        allowed = _group_allowed(loss, bits, clusters.groups)
        space = _space([int(allowed[g[0]].sum()) for g in clusters.groups])
        cases.append(("pruning+clustering", allowed, clusters.ties, space))
    results: list[Reduced] = []
    for name, allowed, ties, space in cases:
        problem = Problem(
            objective=loss,
            costs={"bits": bits},
            budgets={"bits": float(budget)},
            allowed=allowed,
            unit_names=profile.units,
            option_names=profile.formats,
            ties=ties or None,
        )
        try:
            solution = solve(problem, method=method, **options)
        except InfeasibleBudgetError:
            if name == "none":
                raise
            results.append(Reduced(name, space, "infeasible"))
            continue
        base = results[0].objective if results else solution.objective
        if base > 0:
            relative = solution.objective / base - 1.0
        else:
            relative = 0.0 if solution.objective <= 0 else math.inf
        choice = {u: profile.formats[j] for u, j in zip(profile.units, solution.choice)}
        results.append(
            Reduced(
                name,
                space,
                solution.status,
                solution.objective,
                relative,
                solution.resources["bits"],
                choice,
            )
        )
    return results
