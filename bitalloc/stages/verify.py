"""Stage 5, verify: check the allocation against reality. Its loss increase is measured
against the profile's additive prediction and, when that was too optimistic, the worst terms
are corrected and the plan re-solved (:mod:`bitalloc.repair`); then its perplexity is measured
on held-out text beside uniform baselines (:mod:`bitalloc.measuring`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from bitalloc.allocation import Allocation
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
) -> Allocation:
    """``allocation`` with its measured quality and, unless ``config.verify.repair`` is off or
    ``resolve`` is None (nothing can re-solve it, as for a joint memory budget's weight
    share), repaired first. ``resolve`` turns a corrected profile into an allocation."""
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
            budget=v.budget,
            tolerance=v.tolerance,
            tokens=v.tokens,
            groups=v.groups,
            workers=config.profile.workers,
            ray_address=config.profile.ray_address,
            progress=config.progress,
        )
    measured = measure(
        prep, allocation, eval_tokens=config.data.eval_tokens, progress=config.progress
    )
    allocation = allocation.with_measured(measured)
    return allocation if record is None else allocation.with_repair(record)
