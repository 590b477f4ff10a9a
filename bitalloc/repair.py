"""Verify and repair: measure a chosen allocation, and when the profile's additive prediction
was too optimistic, correct the terms that matter and solve again.

A profile predicts an allocation's loss increase as a sum of per-unit terms. Two things make
that wrong: a profiler's estimate for one unit (a Fisher term can be off by 2x for some roles),
and non-additivity (units quantized together hurt more than the sum of their parts). The first
is repairable by measurement: the units that carry the largest predicted share are quantized
alone and measured, their rows of the table are rescaled to match, and the allocation is solved
again. Every candidate is measured jointly, and the best measured allocation is returned, so
the repair can never make the result worse than the first choice on the repair windows.

Measurements use the calibration split (the profile's own data); the final perplexity beside the
baselines is measured on the held-out evaluation split by :func:`bitalloc.allocator.measure`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from bitalloc.allocation import Allocation, Repair, RepairRound
from bitalloc.errors import BitallocError
from bitalloc.formats import parse_format
from bitalloc.sensitivity import Profile
from bitalloc.sensitivity.base import monotone_in_bits, spread_windows
from bitalloc.sensitivity.jobs import Job, job_pool

DEFAULT_BUDGET = 24
DEFAULT_TOLERANCE = 0.10
DEFAULT_TOKENS = 2048
#: Units measured alone per round (fewer when the evaluation budget runs short).
UNITS_PER_ROUND = 8
#: Absolute slack (nats) under which a prediction counts as right, whatever the ratio: the
#: noise of a loss measured on a few thousand tokens.
ABSOLUTE_SLACK = 0.005


def corrected_profile(profile: Profile, measured: dict[tuple[str, str], float]) -> Profile:
    """The profile with measured single-unit terms put in and each measured unit's row rescaled
    by its measured/predicted ratio (more bits still never predict more loss)."""
    table = np.array(profile.loss, dtype=np.float64)
    row = {name: i for i, name in enumerate(profile.units)}
    col = {name: j for j, name in enumerate(profile.formats)}
    ratios: dict[str, list[float]] = {}
    for (unit, fmt), value in measured.items():
        predicted = profile.loss[row[unit], col[fmt]]
        if predicted > 0:
            ratios.setdefault(unit, []).append(max(value, 0.0) / predicted)
    for unit, values in ratios.items():
        table[row[unit]] *= float(np.median(values))
    for (unit, fmt), value in measured.items():
        table[row[unit], col[fmt]] = max(value, 0.0)
    formats = tuple(parse_format(name) for name in profile.formats)
    table, _ = monotone_in_bits(table, formats)
    return replace(profile, loss=table)


def verify_and_repair(
    model: torch.nn.Module,
    calibration: torch.Tensor,
    units: list[Any],
    profile: Profile,
    allocation: Allocation,
    solve_with: Callable[[Profile], Allocation],
    *,
    budget: int = DEFAULT_BUDGET,
    tolerance: float = DEFAULT_TOLERANCE,
    tokens: int = DEFAULT_TOKENS,
    slack: float = ABSOLUTE_SLACK,
    workers: int = 0,
    ray_address: str | None = None,
    progress: bool = True,
) -> tuple[Allocation, Repair]:
    """Measure ``allocation`` against its prediction and repair it within ``budget`` evaluations.

    ``solve_with(profile)`` re-solves the same problem (budget, ties, solver) on a corrected
    profile. ``tolerance`` is the relative excess of measured over predicted loss that is
    accepted, plus ``slack`` nats (measurement noise). Returns the best measured allocation
    (the given one when no repair beat it) and the record of every round.
    """
    if budget < 2:
        raise BitallocError(f"the repair budget must allow >= 2 evaluations, not {budget}")
    if tolerance < 0:
        raise BitallocError(f"the repair tolerance must be >= 0, not {tolerance}")
    start = time.perf_counter()
    chosen = spread_windows(len(calibration), calibration.shape[1], tokens)
    windows = calibration[chosen]
    layers = {u.name: u.layer for u in units}
    evaluations = 0
    with job_pool(
        model, windows, layers, keep_logprobs=False, workers=workers, ray_address=ray_address
    ) as pool:

        def run(jobs: list[Job]) -> list[float]:
            nonlocal evaluations
            for i, job in enumerate(jobs):
                pool.submit(i, job)
            out: dict[int, float] = {}
            while pool.pending:
                i, _, result = pool.wait()
                out[int(i)] = float(result["loss"])
            evaluations += len(jobs)
            return [out[i] for i in range(len(jobs))]

        base = run([()])[0]
        current = allocation
        measured_now = run([tuple(current.formats.items())])[0] - base
        first_measured = measured_now
        best, best_measured = current, measured_now
        singles: dict[tuple[str, str], float] = {}
        rounds: list[RepairRound] = []
        joint = {_key(current): measured_now}
        while True:
            predicted = float(current.data.predicted_loss or 0.0)
            agrees = measured_now <= predicted * (1 + tolerance) + slack
            left = budget - evaluations
            if agrees or left < 2:
                action = "agrees" if agrees else "budget spent"
                rounds.append(_round(current, predicted, measured_now, [], action))
                break
            terms = sorted(
                (
                    (u.predicted_loss or 0.0, u.name, u.format)
                    for u in current.data.units
                    if (u.name, u.format) not in singles and (u.predicted_loss or 0.0) > 0
                ),
                reverse=True,
            )[: min(UNITS_PER_ROUND, left - 1)]
            if not terms:
                rounds.append(_round(current, predicted, measured_now, [], "no units left"))
                break
            losses = run([((name, fmt),) for _, name, fmt in terms])
            for (_, name, fmt), loss in zip(terms, losses):
                singles[(name, fmt)] = loss - base
            rounds.append(
                _round(current, predicted, measured_now, [n for _, n, _ in terms], "corrected")
            )
            current = solve_with(corrected_profile(profile, singles))
            if _key(current) not in joint:
                joint[_key(current)] = run([tuple(current.formats.items())])[0] - base
            # A choice measured before is not measured again; its prediction now uses the
            # corrected terms, so the next round compares them with the same measurement.
            measured_now = joint[_key(current)]
            if measured_now < best_measured:
                best, best_measured = current, measured_now
    return best, Repair(
        tokens=int(windows.numel()),
        tolerance=tolerance,
        budget=budget,
        evaluations=evaluations,
        predicted_before=float(allocation.data.predicted_loss or 0.0),
        measured_before=first_measured,
        predicted_after=float(best.data.predicted_loss or 0.0),
        measured_after=best_measured,
        changed=best.formats != allocation.formats,
        units_measured=len(singles),
        rounds=rounds,
        wall_time_s=time.perf_counter() - start,
    )


def _key(alloc: Allocation) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(alloc.formats.items()))


def _round(alloc: Allocation, predicted: float, measured: float, units: list[str], action: str):
    return RepairRound(
        avg_bits=alloc.avg_bits,
        predicted=predicted,
        measured=measured,
        units_measured=units,
        action=action,
    )
