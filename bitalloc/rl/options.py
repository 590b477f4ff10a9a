"""What :func:`bitalloc.allocate` adds to the ``rl`` solver's options: the model's unit
embeddings, the policy path, progress and, when the reward asks for measured quality, the
function that measures it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bitalloc.config.messages import POLICY_NEEDS_RL
from bitalloc.errors import BitallocError

#: Calibration windows the embeddings are computed on (activation statistics settle quickly).
EMBEDDING_WINDOWS = 4
#: Calibration windows a measured reward evaluates (one forward pass each per measurement).
MEASURE_WINDOWS = 2


def rl_solver_options(
    solver: str,
    options: dict[str, Any],
    policy: str | Path | None,
    prepared: Any,
    progress: bool,
) -> dict[str, Any]:
    """``options`` for ``solver`` with the RL additions; an error when ``policy`` is given to
    another solver."""
    if solver != "rl":
        if policy is not None:
            raise BitallocError(POLICY_NEEDS_RL.format(solver=solver))
        return options
    from bitalloc.rl.embedding import unit_embeddings

    options = dict(options)
    if policy is not None:
        options["policy"] = str(policy)
    options.setdefault("progress", progress)
    if "embeddings" not in options:
        windows = prepared.calibration_windows()[:EMBEDDING_WINDOWS]
        options["embeddings"] = unit_embeddings(prepared.model, prepared.units, windows)
    reward = options.get("reward") or {}
    if isinstance(reward, dict) and reward.get("measure_every") and "measure" not in options:
        options["measure"] = measured_loss(prepared)
    return options


def measured_loss(prepared: Any, windows: int = MEASURE_WINDOWS) -> Callable[[np.ndarray], float]:
    """``choice -> loss increase`` (nats/token) of the fake-quantized model on the first
    ``windows`` calibration windows; ``choice`` indexes the palette per unit, in the units'
    order (as :func:`bitalloc.planning.build_problem` lays out a problem)."""
    from bitalloc.evaluate import perplexity
    from bitalloc.measuring import measure_assignment

    ids = prepared.calibration_windows()[:windows]
    units, palette = prepared.units, prepared.palette
    base = perplexity(prepared.model, ids).nll

    def measure(choice: np.ndarray) -> float:
        formats = {u.name: palette[int(j)].name for u, j in zip(units, choice)}
        return measure_assignment(prepared, formats, ids).nll - base

    return measure
