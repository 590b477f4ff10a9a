"""Verify and repair: measure a chosen allocation, and when the profile's additive prediction
is off (in either direction), correct the terms that matter and solve again.

A profile predicts an allocation's loss increase as a sum of per-unit terms. Two things make
that wrong: a profiler's estimate for one unit (a Fisher term can be off by 2x for some roles),
and non-additivity (units quantized together hurt more than the sum of their parts). The first
is repairable by measurement: the units that carry the largest predicted share are quantized
alone and measured, their rows of the table are rescaled to match, and the allocation is solved
again. Every candidate is measured jointly, and the best measured allocation is returned, so
the repair can never make the result worse than the first choice, or than the other
candidates it was given (the uniform allocations within the same budget), on the repair
windows. A profile judged outside its regime (:data:`REGIME_NATS`, :func:`rank_agreement`) is
not only rescaled but refined by measurement: the units that matter are measured alone under
their chosen format and the nearest cheaper and richer ones.

Measurements use the calibration split (the profile's own data); the final perplexity beside the
baselines is measured on the held-out evaluation split by :func:`bitalloc.allocator.measure`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from bitalloc.allocation import Allocation, Repair, RepairRound
from bitalloc.config import VerifyConfig
from bitalloc.config.messages import REPAIR_BUDGET, REPAIR_TOLERANCE
from bitalloc.errors import BitallocError
from bitalloc.formats import parse_format
from bitalloc.jobs import Job, job_pool, run_all
from bitalloc.sensitivity import Profile
from bitalloc.sensitivity.base import spread_windows
from bitalloc.sensitivity.monotone import allowed_by_shapes, monotone_in_bits, unit_shapes

if TYPE_CHECKING:
    from bitalloc.importance import Importance

# The defaults live in the configuration (the one home of every default).
_DEFAULTS = VerifyConfig()
DEFAULT_BUDGET = _DEFAULTS.budget
DEFAULT_TOLERANCE = _DEFAULTS.tolerance
DEFAULT_TOKENS = _DEFAULTS.tokens
DEFAULT_GROUPS = _DEFAULTS.groups
#: Groups measured per round (fewer when the evaluation budget runs short).
UNITS_PER_ROUND = 8
#: Absolute slack (nats) under which a prediction counts as right, whatever the ratio: the
#: noise of a loss measured on a few thousand tokens.
ABSOLUTE_SLACK = 0.005
#: Loss increase (nats/token, predicted or measured) above which a profile is outside its
#: regime. Fisher, Hessian and the other second-order profiles expand the loss around the
#: unquantized weights; at one nat per token (perplexity x2.7) the expansion no longer ranks
#: the options reliably, and repair measures instead of rescaling.
REGIME_NATS = 1.0
#: Rank agreement (Spearman) between predicted and measured group losses below which the
#: profile's ranking is not trusted, once at least RANK_MIN_GROUPS groups are measured.
RANK_AGREEMENT = 0.3
RANK_MIN_GROUPS = 4
#: Evaluations per unit in a measured refinement: its chosen format and its two neighbours.
REFINE_FORMATS = 3


def corrected_profile(
    profile: Profile,
    measured: Mapping[Job, float],
    exact: Mapping[tuple[str, str], float] | None = None,
) -> Profile:
    """The profile with each measured group's units rescaled so that the group's predicted
    loss matches its measurement, and each ``exact`` ``(unit, format)`` term replaced by its
    measurement.

    ``measured`` maps a group (a job: ``(unit, format)`` pairs quantized together) to its
    measured loss increase. Every unit of a group gets the ratio measured / predicted (a
    negative measurement, noise, counts as zero); a unit in several groups gets the median of
    its ratios. A single-unit group thus puts its measured term in exactly. ``exact`` holds
    terms measured one unit and one format at a time (a refined row); they are put in as
    measured, after the rescaling. More bits still never predict more loss.
    """
    table = np.array(profile.loss, dtype=np.float64)
    row = {name: i for i, name in enumerate(profile.units)}
    col = {name: j for j, name in enumerate(profile.formats)}
    ratios: dict[str, list[float]] = {}
    for job, value in measured.items():
        predicted = sum(profile.loss[row[unit], col[fmt]] for unit, fmt in job)
        if predicted > 0:
            for unit, _ in job:
                ratios.setdefault(unit, []).append(max(value, 0.0) / predicted)
    for unit, values in ratios.items():
        table[row[unit]] *= float(np.median(values))
    for (unit, fmt), value in (exact or {}).items():
        table[row[unit], col[fmt]] = max(value, 0.0)
    formats = tuple(parse_format(name) for name in profile.formats)
    shapes = unit_shapes(profile.metadata, len(profile.units))
    table, _ = monotone_in_bits(table, formats, allowed_by_shapes(shapes, formats))
    return replace(profile, loss=table)


def repair_groups(allocation: Allocation, granularity: str) -> dict[str, Job]:
    """The groups measured together, labelled: each quantized unit alone (``unit``) or each
    layer's units at once (``layer``, which also sees the interactions inside a layer)."""
    if granularity == "unit":
        return {u.name: ((u.name, u.format),) for u in allocation.data.units}
    if granularity == "layer":
        layers: dict[int, list[tuple[str, str]]] = {}
        for u in allocation.data.units:
            layers.setdefault(u.layer, []).append((u.name, u.format))
        return {f"layer {layer}": tuple(pairs) for layer, pairs in sorted(layers.items())}
    raise BitallocError(f"repair groups {granularity!r}: choose unit or layer")


def verify_and_repair(
    model: torch.nn.Module,
    calibration: torch.Tensor,
    units: list[Any],
    profile: Profile,
    allocation: Allocation,
    solve_with: Callable[[Profile], Allocation],
    *,
    candidates: Sequence[tuple[str, Allocation]] = (),
    budget: int = DEFAULT_BUDGET,
    tolerance: float = DEFAULT_TOLERANCE,
    tokens: int = DEFAULT_TOKENS,
    slack: float = ABSOLUTE_SLACK,
    groups: str = DEFAULT_GROUPS,
    regime_nats: float = REGIME_NATS,
    workers: int = 0,
    ray_address: str | None = None,
    progress: bool = True,
    importance: Importance | None = None,
) -> tuple[Allocation, Repair]:
    """Measure ``allocation`` against its prediction and repair it within ``budget`` evaluations.
    Every measurement quantizes with ``importance`` (the run's clipping weights).

    ``solve_with(profile)`` re-solves the same problem (budget, ties, solver) on a corrected
    profile. ``candidates`` are other allocations within the same budget (labelled, e.g. the
    uniform ones, ``("uniform int3-g128", allocation)``), measured beside the first choice.
    ``tolerance`` is the relative gap between measured and predicted loss that is accepted, in
    either direction, plus ``slack`` nats (measurement noise). ``groups`` is what is measured
    to correct the terms (:func:`repair_groups`).

    When the profile is outside the regime where its local approximation holds (a predicted or
    measured loss increase above ``regime_nats``, or a measured ranking of the repaired units
    that disagrees with the predicted one, :func:`rank_agreement`), rescaling a row by one
    measured entry is not to be trusted either: repair then measures the units that matter
    alone under their chosen format and the nearest cheaper and richer ones
    (:data:`REFINE_FORMATS` evaluations each), puts those terms in as measured and rescales the
    rest of each row (a measured refinement), within the same budget.

    Returns the best measured allocation of all it measured (first choice, candidates, every
    repair round) with the record of every round, which says which one was returned and why.
    """
    if budget < 2:
        raise BitallocError(REPAIR_BUDGET.format(budget=budget))
    if tolerance < 0:
        raise BitallocError(REPAIR_TOLERANCE.format(tolerance=tolerance))
    repair_groups(allocation, groups)  # an unknown granularity fails before any work
    start = time.perf_counter()
    chosen = spread_windows(len(calibration), calibration.shape[1], tokens)
    windows = calibration[chosen]
    layers = {u.name: u.layer for u in units}
    evaluations = 0
    bar = tqdm(total=budget, desc="verify and repair", unit="eval", disable=not progress)
    with (
        bar,
        job_pool(
            model,
            windows,
            layers,
            keep_logprobs=False,
            workers=workers,
            ray_address=ray_address,
            importance=importance,
        ) as pool,
    ):

        def run(jobs: list[Job]) -> list[float]:
            nonlocal evaluations
            out: dict[int, float] = {}
            for i, _, result in run_all(pool, list(enumerate(jobs))):
                out[int(i)] = float(result["loss"])
                bar.update(1)
            evaluations += len(jobs)
            return [out[i] for i in range(len(jobs))]

        # The unquantized model, the first choice and as many candidates as the budget leaves
        # room for, in one batch (parallel on a pool).
        others = [(label, c) for label, c in candidates if _key(c) != _key(allocation)]
        others = others[: max(0, budget - 2)]
        first = run([(), _job(allocation), *(_job(c) for _, c in others)])
        base = first[0]
        current = allocation
        measured_now = first[1] - base
        first_measured = measured_now
        joint = {_key(current): measured_now}
        measured_candidates = {}
        best = ("solver", current, measured_now)
        for (label, cand), loss in zip(others, first[2:]):
            joint[_key(cand)] = measured_candidates[label] = loss - base
            if loss - base < best[2]:
                best = (label, cand, loss - base)
        regime = _outside_regime(
            float(allocation.data.predicted_loss or 0.0), measured_now, regime_nats
        )
        corrections: dict[Job, float] = {}
        exact: dict[tuple[str, str], float] = {}
        rounds: list[RepairRound] = []
        formats = [name for name in profile.formats if not parse_format(name).is_float]
        shapes = {u.name: tuple(u.shape) for u in units}
        while True:
            predicted = float(current.data.predicted_loss or 0.0)
            direction = _direction(predicted, measured_now, tolerance, slack)
            left = budget - evaluations
            if direction is None or left < 2:
                action = "agrees" if direction is None else "budget spent"
                rounds.append(_round(current, predicted, measured_now, [], action))
                break
            if regime is not None and left - 1 >= REFINE_FORMATS:
                # Measured refinement: the units that matter most, each alone under its chosen
                # format and the next cheaper and richer ones (the trade-offs the solver
                # weighs for it), put in as measured; the rest of each row is rescaled by the
                # chosen format's ratio.
                fits = (left - 1) // REFINE_FORMATS
                pairs = []
                labels = []
                for u in sorted(current.data.units, key=lambda u: -(u.predicted_loss or 0.0)):
                    todo = [
                        (u.name, f)
                        for f in _neighbours(u, formats, shapes[u.name])
                        if (u.name, f) not in exact
                    ]
                    if todo and not parse_format(u.format).is_float:
                        pairs += todo
                        labels.append(u.name)
                    if len(labels) == min(fits, UNITS_PER_ROUND):
                        break
                if not pairs:
                    rounds.append(_round(current, predicted, measured_now, [], "nothing left"))
                    break
                chosen_format = {u.name: u.format for u in current.data.units}
                for (unit, fmt), loss in zip(pairs, run([((u, f),) for u, f in pairs])):
                    exact[(unit, fmt)] = loss - base
                    if fmt == chosen_format[unit]:
                        corrections[((unit, fmt),)] = loss - base
                action = "refined"
            else:
                share = {u.name: u.predicted_loss or 0.0 for u in current.data.units}
                ranked = sorted(
                    (
                        (sum(share[unit] for unit, _ in job), label, job)
                        for label, job in repair_groups(current, groups).items()
                        if job not in corrections
                    ),
                    key=lambda item: -item[0],
                )
                picked = [item for item in ranked if item[0] > 0][: min(UNITS_PER_ROUND, left - 1)]
                if not picked:
                    rounds.append(_round(current, predicted, measured_now, [], "nothing left"))
                    break
                losses = run([job for _, _, job in picked])
                for (_, _, job), loss in zip(picked, losses):
                    corrections[job] = loss - base
                action, labels = "corrected", [lb for _, lb, _ in picked]
                if regime is None:
                    regime = _disagreeing_ranks(profile, corrections)
            rounds.append(_round(current, predicted, measured_now, labels, action, direction))
            current = solve_with(corrected_profile(profile, corrections, exact))
            if _key(current) not in joint:
                joint[_key(current)] = run([_job(current)])[0] - base
            # A choice measured before is not measured again; its prediction now uses the
            # corrected terms, so the next round compares them with the same measurement.
            measured_now = joint[_key(current)]
            if measured_now < best[2]:
                best = (f"repair round {len(rounds)}", current, measured_now)
    label, returned, returned_measured = best
    reason = None
    if label != "solver":
        reason = (
            f"{label} measured a loss increase of {returned_measured:.4f} nats/token on the "
            f"repair windows, below the solver's first choice ({first_measured:.4f})"
        )
    return returned, Repair(
        tokens=int(windows.numel()),
        tolerance=tolerance,
        budget=budget,
        evaluations=evaluations,
        predicted_before=float(allocation.data.predicted_loss or 0.0),
        measured_before=first_measured,
        predicted_after=float(returned.data.predicted_loss or 0.0),
        measured_after=returned_measured,
        changed=returned.formats != allocation.formats,
        groups=groups,
        groups_measured=len(set(corrections) | {((unit, fmt),) for unit, fmt in exact}),
        rounds=rounds,
        wall_time_s=time.perf_counter() - start,
        chosen=label,
        reason=reason,
        candidates=measured_candidates,
        regime=regime,
    )


def _neighbours(choice: Any, formats: Sequence[str], shape: tuple[int, int]) -> list[str]:
    """The unit's chosen format and the palette formats just below and just above it in stored
    bits for its shape (the nearest cheaper and richer options)."""
    fitting = [f for f in formats if parse_format(f).allows(shape)]
    ranked = sorted(fitting, key=lambda f: (parse_format(f).storage_bits(shape), f))
    if choice.format not in ranked:
        return []
    i = ranked.index(choice.format)
    return ranked[max(0, i - 1) : i + 2]


def _job(alloc: Allocation) -> Job:
    return tuple(alloc.formats.items())


def _direction(predicted: float, measured: float, tolerance: float, slack: float) -> str | None:
    """``optimistic`` when the measurement exceeds the prediction beyond the tolerance,
    ``pessimistic`` when it falls short of it by as much, None when they agree."""
    if measured > predicted * (1 + tolerance) + slack:
        return "optimistic"
    if measured * (1 + tolerance) + slack < predicted:
        return "pessimistic"
    return None


def _outside_regime(predicted: float, measured: float, limit: float) -> str | None:
    worst = max(predicted, measured)
    if worst <= limit:
        return None
    return (
        f"the loss increase is {worst:.2f} nats/token (predicted {predicted:.2f}, measured "
        f"{measured:.2f}), beyond the {limit:g} nats/token up to which a local (second-order) "
        "profile is trusted"
    )


def rank_agreement(predicted: Sequence[float], measured: Sequence[float]) -> float:
    """Spearman's rank correlation of two equally long sequences (ties share their mean rank);
    1.0 when either is constant, for there is no ranking to disagree with."""
    a = _ranks(np.asarray(predicted, dtype=np.float64))
    b = _ranks(np.asarray(measured, dtype=np.float64))
    a, b = a - a.mean(), b - b.mean()
    norm = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return 1.0 if norm == 0 else float((a * b).sum() / norm)


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values), dtype=np.float64)
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def _disagreeing_ranks(profile: Profile, corrections: Mapping[Job, float]) -> str | None:
    """Why the profile's ranking of the measured groups is not to be trusted, or None."""
    if len(corrections) < RANK_MIN_GROUPS:
        return None
    row = {name: i for i, name in enumerate(profile.units)}
    col = {name: j for j, name in enumerate(profile.formats)}
    predicted = [sum(profile.loss[row[u], col[f]] for u, f in job) for job in corrections]
    rho = rank_agreement(predicted, list(corrections.values()))
    if rho >= RANK_AGREEMENT:
        return None
    return (
        f"the profile ranks the {len(corrections)} measured groups unlike their measurements "
        f"(Spearman rank correlation {rho:.2f}, below {RANK_AGREEMENT:g})"
    )


def _key(alloc: Allocation) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(alloc.formats.items()))


def _round(
    alloc: Allocation,
    predicted: float,
    measured: float,
    groups: list[str],
    action: str,
    direction: str | None = None,
) -> RepairRound:
    return RepairRound(
        avg_bits=alloc.avg_bits,
        predicted=predicted,
        measured=measured,
        groups_measured=groups,
        action=action,
        direction=direction,
    )
