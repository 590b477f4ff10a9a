"""Pairwise interaction terms: how far quantizing two units together departs from the sum of
quantizing each alone.

For a pair (a, b) and a format f, the measured term is
``loss(a=f, b=f) - loss(a=f) - loss(b=f) + loss(unquantized)`` on the calibration tokens. The
solvers need a term for every format pair, and measuring k x k combinations per pair is too
slow, so the measured terms fit one coefficient per pair, ``rho``, in

    I_ab(p, q) = rho_ab * sqrt(L_a(p) * L_b(q))

by least squares over the measured formats (``L`` are the measured single-unit increases). The
solver's table then uses ``L`` from whichever profile the allocation runs on, so interaction
terms measured once combine with any profiler's table. ``rho`` is kept >= -1: a pair's
predicted increase ``L_a + L_b + I_ab`` then never falls below ``(sqrt(L_a) - sqrt(L_b))^2``
>= 0.

Pairs are chosen as ``neighbours`` (the same role in consecutive layers), ``top:K`` (all pairs
among the K units with the largest predicted loss in a given profile) or an explicit list.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from bitalloc.errors import BitallocError
from bitalloc.formats import QuantFormat
from bitalloc.jobs import job_key
from bitalloc.models import Unit
from bitalloc.sensitivity.interaction_terms import Interactions

if TYPE_CHECKING:
    from bitalloc.importance import Importance


def select_pairs(
    units: Sequence[Unit],
    spec: str | Sequence[Sequence[str]],
    loss: np.ndarray | None = None,
) -> list[tuple[str, str]]:
    """Unit pairs to measure: ``"neighbours"``, ``"top:K"`` (needs ``loss``, units x formats,
    ranked by each unit's largest value), a JSON file or text file of ``a,b`` lines, or a list
    of pairs."""
    names = [u.name for u in units]
    if isinstance(spec, str) and spec == "neighbours":
        by_slot = {(u.layer, u.role): u.name for u in units}
        pairs = [
            (u.name, by_slot[(u.layer + 1, u.role)])
            for u in units
            if (u.layer + 1, u.role) in by_slot
        ]
    elif isinstance(spec, str) and spec.startswith("top:"):
        try:
            k = int(spec[4:])
        except ValueError:
            k = 0
        if k < 2:
            raise BitallocError(f"{spec!r}: write top:K with K >= 2 units")
        if loss is None:
            raise BitallocError("top:K pairs need a profile to rank the units by")
        order = np.argsort(-np.asarray(loss).max(axis=1), kind="stable")[:k]
        chosen = sorted(int(i) for i in order)
        pairs = [(names[i], names[j]) for x, i in enumerate(chosen) for j in chosen[x + 1 :]]
    elif isinstance(spec, str):
        pairs = _read_pairs(Path(spec))
    else:
        pairs = [tuple(p) for p in spec]
    known = set(names)
    for pair in pairs:
        if len(pair) != 2 or pair[0] == pair[1]:
            raise BitallocError(f"interaction pair {pair!r} must name two different units")
        for name in pair:
            if name not in known:
                raise BitallocError(
                    f"interaction pair names {name!r}, which is not a unit of this model"
                )
    if not pairs:
        raise BitallocError(f"the pair selection {spec!r} selects no pairs")
    return list(dict.fromkeys((str(a), str(b)) for a, b in pairs))


def _read_pairs(path: Path) -> list[tuple[str, ...]]:
    if not path.is_file():
        raise BitallocError(
            f"interaction pairs {str(path)!r}: give neighbours, top:K, or a file of pairs"
        )
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
        return [tuple(p) for p in data]
    except (json.JSONDecodeError, TypeError):
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return [tuple(part.strip() for part in line.split(",")) for line in lines]


def measure_interactions(
    model: nn.Module,
    units: Sequence[Unit],
    pairs: Sequence[tuple[str, str]],
    formats: Sequence[QuantFormat],
    calibration: torch.Tensor,
    *,
    tokens: int = 1024,
    workers: int = 0,
    ray_address: str | None = None,
    results: str | Path | None = None,
    progress: bool = True,
    importance: Importance | None = None,
) -> Interactions:
    """Measure the interaction of every pair at every format in ``formats`` (both units in the
    same format), on the same journaled jobs as the ``measured`` profiler, so single-unit
    measurements already made are reused; ``importance`` weights the clipping."""
    from bitalloc.sensitivity.measured import measured_journal, run_measured_jobs

    start = time.perf_counter()
    if not formats:
        raise BitallocError("give at least one format to measure interactions at")
    windows, journal = measured_journal(model, calibration, tokens, results, importance)
    jobs: list[tuple] = [()]
    for a, b in pairs:
        for f in formats:
            jobs += [((a, f.name),), ((b, f.name),), ((a, f.name), (b, f.name))]
    results_by_key = run_measured_jobs(
        model,
        windows,
        units,
        jobs,
        journal,
        workers=workers,
        ray_address=ray_address,
        progress=progress,
        desc="interactions",
        keep_logprobs=False,
        importance=importance,
    )
    base = results_by_key[job_key(())]["loss"]

    def increase(job) -> float:
        return results_by_key[job_key(job)]["loss"] - base

    single = np.array(
        [[[increase(((u, f.name),)) for f in formats] for u in pair] for pair in pairs]
    )
    joint = np.array([[increase(((a, f.name), (b, f.name))) for f in formats] for a, b in pairs])
    return Interactions(
        pairs=tuple(pairs),
        formats=tuple(f.name for f in formats),
        pair_increase=joint - single.sum(axis=1),
        single_increase=single,
        metadata={
            "method": "measured",
            "tokens": int(windows.numel()),
            "base_loss": base,
            "results": str(journal.path),
            "seconds": time.perf_counter() - start,
        },
    )
