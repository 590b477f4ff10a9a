"""Measured sensitivity: quantize one unit (one format) at a time and score the model.

``measured`` records the increase of the mean next-token loss on the calibration tokens: the
ground truth that the other profilers approximate. ``kl`` records the mean KL divergence of the
quantized model's next-token distribution from the unquantized one (the ``kl_div`` sensitivity
of NVIDIA ModelOpt's auto-quantize); it needs no labels and is never negative.

Both run one job per (unit, format) on :func:`bitalloc.jobs.run_jobs`: in this
process or on Ray workers, journaled so that an interrupted run resumes. The cost is one
partial forward pass over the calibration tokens per job, so both default to fewer tokens than
the gradient profilers.

Two corrections make the table a valid profile, and both are counted in the metadata:
a loss that falls when a unit is quantized (it happens at 8 bits, by chance) is clipped to 0;
and within one group size, a format never gets a larger value than a format with fewer bits
(it is capped at that value), since noise of the order of 1e-5 nats can otherwise reverse
neighbouring formats. The uncorrected values are kept in the metadata as ``raw``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from bitalloc.errors import BitallocError
from bitalloc.formats import QuantFormat
from bitalloc.jobs import Job, Journal, job_key, run_jobs
from bitalloc.models import Unit, cache_root, discover_units, model_fingerprint
from bitalloc.sensitivity.base import BaseProfiler, Statistics, allowed_mask, spread_windows
from bitalloc.sensitivity.profile import cache_key
from bitalloc.sensitivity.registry import register_profiler

if TYPE_CHECKING:
    from bitalloc.importance import Importance


def measured_journal(
    model: nn.Module,
    calibration: torch.Tensor,
    tokens: int,
    results: str | Path | None,
    importance: Importance | None = None,
) -> tuple[torch.Tensor, Journal]:
    """The calibration windows for ``tokens`` and the journal of this run.

    The run is named by the windows, the weights of every unit of the model (not only
    those measured now) and the importance that weights the clipping, so a later run with
    other units, formats or method (``measured``, ``kl``, interactions) on the same model
    reuses every job already measured.
    """
    seq_len = calibration.shape[1]
    windows = calibration[spread_windows(len(calibration), seq_len, tokens)]
    run = {
        "kind": "unit-measurements",
        "tokens": int(windows.numel()),
        "model": model_fingerprint(model, discover_units(model)),
        "calibration": hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16],
        "clipping": "mse" if importance is None else importance.digest[:16],
    }
    path = Path(results) if results else cache_root() / "measured" / f"{cache_key(run)}.jsonl"
    return windows, Journal(path, run)


def run_measured_jobs(
    model: nn.Module,
    windows: torch.Tensor,
    units: Sequence[Unit],
    jobs: Sequence[Job],
    journal: Journal,
    **options: Any,
) -> dict[str, dict[str, Any]]:
    """:func:`run_jobs` with each unit's layer taken from ``units`` (``options`` as
    :func:`run_jobs` takes them, ``importance`` included)."""
    return run_jobs(
        model, windows, {u.name: u.layer for u in units}, jobs, journal=journal, **options
    )


@register_profiler
class MeasuredProfiler(BaseProfiler):
    """Measured loss increase per (unit, format) (``measured``).

    ``workers``: 0 runs in this process; N >= 1 runs N Ray actors (local Ray, or the cluster at
    ``ray_address`` / ``$RAY_ADDRESS``). ``results``: the journal file (default: under the
    cache root, named by the run), which makes an interrupted run resume.
    """

    name = "measured"
    metric = "loss"
    measures_on_pool = True

    def __init__(
        self,
        tokens: int = 1024,
        progress: bool = True,
        *,
        workers: int = 0,
        ray_address: str | None = None,
        results: str | Path | None = None,
    ):
        if tokens <= 0:
            raise BitallocError(f"calibration tokens must be positive, got {tokens}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise BitallocError(
                f"workers must be 0 (in process) or a positive count, got {workers!r}"
            )
        self.tokens = tokens
        self.progress = progress
        self.workers = workers
        self.ray_address = ray_address
        self.results = None if results is None else Path(results)

    def options(self) -> dict[str, Any]:
        # Workers and the journal path change where the work runs, not the result.
        return {"tokens": self.tokens, "metric": self.metric}

    def _value(self, result: dict[str, Any], base: dict[str, Any]) -> float:
        return float(result["loss"]) - float(base["loss"])

    def measure(
        self,
        model: nn.Module,
        units: Sequence[Unit],
        palette: Sequence[QuantFormat],
        calibration: torch.Tensor,
        bar: tqdm,
        importance: Importance | None = None,
    ) -> Statistics:
        """Every (unit, format) job on the pool; negative increases clipped to 0."""
        seq_len = calibration.shape[1]
        windows, journal = measured_journal(
            model, calibration, self.tokens, self.results, importance
        )
        allowed = allowed_mask(units, palette)
        # A format that cannot store a unit is not measured: its entry stays the placeholder 0.
        jobs = [()] + [
            ((u.name, f.name),)
            for i, u in enumerate(units)
            for j, f in enumerate(palette)
            if allowed[i, j]
        ]
        results = run_measured_jobs(
            model,
            windows,
            units,
            jobs,
            journal,
            keep_logprobs=self.metric == "kl",
            workers=self.workers,
            ray_address=self.ray_address,
            progress=self.progress,
            desc=f"{self.name}: units x formats",
            importance=importance,
        )
        base = results[job_key(())]
        raw = np.array(
            [
                [
                    self._value(results[job_key(((u.name, f.name),))], base)
                    if allowed[i, j]
                    else 0.0
                    for j, f in enumerate(palette)
                ]
                for i, u in enumerate(units)
            ]
        ).reshape(len(units), len(palette))
        if not np.isfinite(raw).all():
            bad = np.argwhere(~np.isfinite(raw))[0]
            raise BitallocError(
                f"measuring {units[bad[0]].name} under {palette[bad[1]].name} gave a non-finite "
                "loss; check the model's weights and the calibration text"
            )
        metadata = {
            "metric": self.metric,
            "windows": int(windows.shape[0]),
            "seq_len": seq_len,
            "base_loss": float(base["loss"]),
            "negative_clipped": int((raw < 0).sum()),
            "raw": raw.tolist(),
            "jobs": len(jobs),
            "results": str(journal.path),
            "workers": self.workers,
            "worker_peak_mb": max(
                (r.get("worker_peak_mb") or 0.0 for r in results.values()), default=0.0
            ),
        }
        # Every window is scored in every job, so all of them count as used.
        used = int(windows.shape[0])
        return Statistics(int(windows.numel()), used, 0, None, metadata, np.maximum(raw, 0.0))

    def no_usable_batch(self, skipped: int) -> str:
        return "no calibration window to measure on; give calibration text of one window or more"


@register_profiler
class KLProfiler(MeasuredProfiler):
    """Measured KL divergence from the unquantized model per (unit, format) (``kl``)."""

    name = "kl"
    metric = "kl"

    def _value(self, result: dict[str, Any], base: dict[str, Any]) -> float:
        return float(result["kl"])
