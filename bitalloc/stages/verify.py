"""Stage 5, verify: check the allocation against reality. Its loss increase is measured
against the profile's additive prediction and, when the two disagree, the terms that matter
are corrected (or, for a profile outside its regime, measured) and the plan re-solved
(:mod:`bitalloc.repair`); then its perplexity is measured on held-out text beside uniform
baselines (:mod:`bitalloc.measuring`).

With repair on, what is returned is never worse than a candidate measured within the same
budget: the solver's choice, every repair round and the uniform allocations that fit are
compared on the calibration windows, and a uniform baseline within the budget that then
measures a lower perplexity on the evaluation split than the result replaces it, saying so."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from bitalloc.allocation import Allocation, Measured, Repair
from bitalloc.measuring import measure
from bitalloc.repair import verify_and_repair
from bitalloc.sensitivity import Profile
from bitalloc.stages.prepare import Prepared

if TYPE_CHECKING:
    from bitalloc.config import AllocateConfig


def verify(
    prep: Prepared,
    profile: Profile,
    allocation: Allocation,
    config: AllocateConfig,
    *,
    resolve: Callable[[Profile], Allocation] | None,
    candidates: Sequence[tuple[str, Allocation]] = (),
) -> Allocation:
    """``allocation`` with its measured quality and, unless ``config.verify.repair`` is off or
    ``resolve`` is None (nothing can re-solve it, as for a joint memory budget's weight
    share), repaired first. ``resolve`` turns a corrected profile into an allocation;
    ``candidates`` are labelled allocations within the same budget (the plan's uniform ones)
    that the result must not measure worse than."""
    v = config.verify
    record = None
    if v.repair and resolve is not None:
        allocation, record = verify_and_repair(
            prep.model,
            prep.calibration_windows(),
            prep.units,
            profile,
            allocation,
            resolve,
            candidates=candidates,
            budget=v.budget,
            tolerance=v.tolerance,
            tokens=v.tokens,
            groups=v.groups,
            workers=config.profile.workers,
            ray_address=config.profile.ray_address,
            progress=config.progress,
            importance=prep.importance,
        )
    measured = measure(
        prep, allocation, eval_tokens=config.data.eval_tokens, progress=config.progress
    )
    if record is not None:
        allocation, measured, record = never_worse_than_baselines(
            allocation, measured, record, candidates
        )
    allocation = allocation.with_measured(measured)
    return allocation if record is None else allocation.with_repair(record)


def never_worse_than_baselines(
    allocation: Allocation,
    measured: Measured,
    record: Repair,
    candidates: Sequence[tuple[str, Allocation]],
) -> tuple[Allocation, Measured, Repair]:
    """The uniform candidate whose evaluation-split perplexity (measured as a baseline) is
    below ``allocation``'s, in its place, with the measurement and repair record saying so;
    otherwise the inputs unchanged.

    Only candidates that repair measured on its windows qualify (their record entry is the
    returned allocation's ``measured_after``), and only for weight-only allocations: a KV
    allocation's perplexity includes its quantized cache, which the uniform weight baselines
    do not."""
    if allocation.data.kv is not None:
        return allocation, measured, record
    better = []
    for label, cand in candidates:
        # The baseline measured for a candidate is the one of its single format (read from the
        # candidate itself, not from its label).
        formats = set(cand.formats.values())
        if label not in record.candidates or len(formats) != 1:
            continue
        ppl = measured.baselines.get(formats.pop(), math.inf)
        if ppl < measured.perplexity:
            better.append((ppl, label, cand))
    if not better:
        return allocation, measured, record
    ppl, label, cand = min(better, key=lambda b: b[0])
    fp16 = measured.baselines["fp16"]
    replaced = measured.model_copy(
        update={
            "perplexity": ppl,
            "measured_loss_increase": math.log(ppl) - math.log(fp16),
            "predicted_loss_increase": float(cand.predicted_total_loss or 0.0),
        }
    )
    reason = (
        f"{label} measured perplexity {ppl:.3f} on the evaluation split, below the repaired "
        f"allocation's {measured.perplexity:.3f} ({record.chosen}), within the same budget"
    )
    updated = record.model_copy(
        update={
            "chosen": label,
            "reason": reason,
            "predicted_after": float(cand.data.predicted_loss or 0.0),
            "measured_after": record.candidates[label],
            "changed": True,
        }
    )
    return cand, replaced, updated
