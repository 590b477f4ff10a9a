"""What :func:`bitalloc.allocate` adds to the ``rl`` solver's options: the model's unit
embeddings, the policy path and progress."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bitalloc.errors import BitallocError

#: Calibration windows the embeddings are computed on (activation statistics settle quickly).
EMBEDDING_WINDOWS = 4


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
            raise BitallocError(f"policy= applies an RL policy; use solver='rl', not {solver!r}")
        return options
    from bitalloc.rl.embedding import unit_embeddings

    options = dict(options)
    if policy is not None:
        options["policy"] = str(policy)
    options.setdefault("progress", progress)
    if "embeddings" not in options:
        windows = prepared.calibration_windows()[:EMBEDDING_WINDOWS]
        options["embeddings"] = unit_embeddings(prepared.model, prepared.units, windows)
    return options
