"""An allocation of a checkpoint too large to load: the streamed ``output`` profile
(:mod:`bitalloc.streaming.profile`) or ``fisher`` profile (:mod:`bitalloc.streaming.fisher`),
then the same problem and solvers as the in-memory path (they work on arrays alone).

Calibration text is tokenized with the checkpoint's own tokenizer (``calibration`` text, or
the embedded default text when None) into windows of ``seq_len`` tokens; ``windows`` given
directly (token ids, (n, seq_len)) skip that.
"""

from __future__ import annotations

import gc
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from bitalloc.allocation import Allocation
from bitalloc.errors import BitallocError
from bitalloc.formats import default_palette, parse_palette
from bitalloc.importance import IMPORTANCE_TOKENS
from bitalloc.planning import build_problem, to_allocation
from bitalloc.solvers import solve
from bitalloc.streaming.fisher import streamed_fisher_profile
from bitalloc.streaming.model import StreamedModel, calibration_windows, release_freed_memory
from bitalloc.streaming.profile import streamed_output_profile
from bitalloc.streaming.resources import (
    ModelShape,
    available_bytes,
    memory_terms,
    peak_of,
    spills,
)

DEFAULT_SEQ_LEN = 512
#: Profilers that run one layer at a time.
STREAMING_PROFILERS = ("output", "fisher", "kfac")


def allocate_streamed(
    path: str | Path,
    avg_bits: float,
    *,
    formats: str | Sequence[str] | None = None,
    calibration: str | None = None,
    windows: torch.Tensor | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    tokens: int = IMPORTANCE_TOKENS,
    solver: str = "lagrangian",
    ties: str | Sequence[str] | None = None,
    progress: bool = True,
    workers: int = 0,
    ray_address: str | None = None,
    max_memory: int | None = None,
    profiler: str = "output",
) -> Allocation:
    """Allocate ``avg_bits`` over the units of the checkpoint at ``path`` without loading it
    whole: one decoder layer in float32 at a time (see the module docstring); ``workers`` > 0
    scores the units on Ray workers (see :func:`streamed_output_profile`).

    ``max_memory`` (bytes) refuses, before any work, a run whose planned peak
    (:func:`~bitalloc.streaming.resources.memory_terms`) exceeds it, naming the minimum.
    ``profiler`` must be one that streams: ``output`` (its scores include ``+gptq``), or
    ``fisher`` or ``kfac`` (by recomputation, in this process: not with ``workers``)."""
    model = StreamedModel(path)
    if profiler not in STREAMING_PROFILERS:
        raise BitallocError(_whole_model_message(profiler, model))
    if profiler != "output" and workers:
        raise BitallocError(
            f"the streamed {profiler} profile runs in this process (its backward pass is one "
            "chain through the layers); drop --workers, or use --profiler output to score on Ray"
        )
    if max_memory is not None:
        _check_memory(model, max_memory, tokens, seq_len, profiler)
    palette = parse_palette(formats) if formats is not None else default_palette()
    if windows is None:
        windows = calibration_windows(model.checkpoint, calibration, seq_len)
    if profiler != "output":
        profile, importance = _gradient(model, palette, windows, tokens, progress, profiler)
    else:
        profile, importance = streamed_output_profile(
            model,
            palette,
            windows,
            tokens=tokens,
            progress=progress,
            workers=workers,
            ray_address=ray_address,
        )
    problem = build_problem(model.units, palette, profile, avg_bits, ties=ties)
    solution = solve(problem, method=solver)
    chosen = {f"{u.name}.weight" for u in model.units}
    excluded = {
        name: info.numel for name, info in model.checkpoint.tensors.items() if name not in chosen
    }
    allocation = to_allocation(
        model.units,
        palette,
        profile,
        solution,
        avg_bits,
        model=str(model.checkpoint.path),
        excluded=excluded,
    )
    # The model's shell and its modules form reference cycles: freed now, and the heap's
    # pages handed back, so that what runs next (an export) starts from a small process.
    del model, profile
    gc.collect()
    release_freed_memory()
    # The importance weighted every clipping search: applying the allocation repeats it.
    return allocation.with_importance(importance)


def _gradient(
    model: StreamedModel, palette, windows: torch.Tensor, tokens: int, progress: bool, method: str
):
    """The streamed Fisher or K-FAC profile, its kept layer inputs spilled to a temporary
    directory when they would take more than their share of the memory available
    (:func:`spills`)."""
    seq_len = int(windows.shape[1])
    used = max(1, min(len(windows), tokens // seq_len)) * seq_len
    if not spills(4 * len(model.layers) * used * int(model.config.hidden_size)):
        return streamed_fisher_profile(
            model, palette, windows, tokens=tokens, progress=progress, method=method
        )
    with tempfile.TemporaryDirectory(prefix=f"bitalloc-{method}-") as spill:
        return streamed_fisher_profile(
            model, palette, windows, tokens=tokens, progress=progress, spill=spill, method=method
        )


def _whole_model_message(profiler: str, model: StreamedModel) -> str:
    """Why ``profiler`` cannot run here, and what can: the streaming profilers always; the
    whole-model ones (``allocate``) only when the model fits this machine's memory in
    float32, with its gradients for a backward pass."""
    whole = 2 * 4 * sum(info.numel for info in model.checkpoint.tensors.values())
    free = available_bytes()
    fits = (
        f"it fits whole here ({whole / 2**30:.1f} GiB in float32 with gradients, "
        f"{free / 2**30:.1f} GiB available): run `bitalloc allocate --profiler {profiler}`"
        if whole < free
        else f"this model needs about {whole / 2**30:.1f} GiB whole (float32 with gradients) "
        f"and {free / 2**30:.1f} GiB are available, so only the streaming profilers run it "
        "on this machine"
    )
    return (
        f"the {profiler!r} profiler needs a backward pass through the whole model, which "
        f"streaming does not hold; profilers that stream: {', '.join(STREAMING_PROFILERS)}; "
        f"{fits}"
    )


def _check_memory(
    model: StreamedModel, limit: int, tokens: int, seq_len: int, profiler: str
) -> None:
    terms = memory_terms(ModelShape.of_checkpoint(model), tokens, seq_len, profiler)
    need = peak_of(terms)
    if need > limit:
        largest = max(terms, key=terms.get)
        raise BitallocError(
            f"streaming this model needs about {need / 2**20:.0f} MiB at its peak (largest "
            f"term: {largest}, {terms[largest] / 2**20:.0f} MiB), more than the "
            f"{limit / 2**20:.0f} MiB allowed; allow at least {need / 2**20:.0f} MiB, or use "
            "fewer calibration tokens"
        )
