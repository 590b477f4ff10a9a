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
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

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
from bitalloc.sensitivity.monotone import monotone_in_bits

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


def corrected_profile(profile: Profile, measured: Mapping[Job, float]) -> Profile:
    """The profile with each measured group's units rescaled so that the group's predicted
    loss matches its measurement.

    ``measured`` maps a group (a job: ``(unit, format)`` pairs quantized together) to its
    measured loss increase. Every unit of a group gets the ratio measured / predicted (a
    negative measurement, noise, counts as zero); a unit in several groups gets the median of
    its ratios. A single-unit group thus puts its measured term in exactly. More bits still
    never predict more loss.
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
    formats = tuple(parse_format(name) for name in profile.formats)
    table, _ = monotone_in_bits(table, formats)
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
    budget: int = DEFAULT_BUDGET,
    tolerance: float = DEFAULT_TOLERANCE,
    tokens: int = DEFAULT_TOKENS,
    slack: float = ABSOLUTE_SLACK,
    groups: str = DEFAULT_GROUPS,
    workers: int = 0,
    ray_address: str | None = None,
    progress: bool = True,
) -> tuple[Allocation, Repair]:
    """Measure ``allocation`` against its prediction and repair it within ``budget`` evaluations.

    ``solve_with(profile)`` re-solves the same problem (budget, ties, solver) on a corrected
    profile. ``tolerance`` is the relative excess of measured over predicted loss that is
    accepted, plus ``slack`` nats (measurement noise). ``groups`` is what is measured to
    correct the terms (:func:`repair_groups`). Returns the best measured allocation
    (the given one when no repair beat it) and the record of every round.
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
            model, windows, layers, keep_logprobs=False, workers=workers, ray_address=ray_address
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

        base = run([()])[0]
        current = allocation
        measured_now = run([tuple(current.formats.items())])[0] - base
        first_measured = measured_now
        best, best_measured = current, measured_now
        corrections: dict[Job, float] = {}
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
            rounds.append(
                _round(current, predicted, measured_now, [lb for _, lb, _ in picked], "corrected")
            )
            current = solve_with(corrected_profile(profile, corrections))
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
        groups=groups,
        groups_measured=len(corrections),
        rounds=rounds,
        wall_time_s=time.perf_counter() - start,
    )


def _key(alloc: Allocation) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(alloc.formats.items()))


def _round(alloc: Allocation, predicted: float, measured: float, groups: list[str], action: str):
    return RepairRound(
        avg_bits=alloc.avg_bits,
        predicted=predicted,
        measured=measured,
        groups_measured=groups,
        action=action,
    )
