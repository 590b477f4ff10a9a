"""``allocate()``: model -> units -> palette -> profile -> problem -> solver -> allocation
-> (verify).

This is the one module that ties profiling, solving and evaluation together.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitalloc.allocation import (
    Allocation,
    Measured,
)
from bitalloc.apply import fake_quantized
from bitalloc.data import TextSplits, load_text, tensor_fingerprint, tokenize, windows
from bitalloc.errors import BitallocError
from bitalloc.evaluate import Perplexity, perplexity
from bitalloc.formats import QuantFormat, parse_format, parse_palette
from bitalloc.models import (
    LoadedModel,
    Unit,
    discover_units,
    excluded_parameters,
    load_model,
    model_fingerprint,
)
from bitalloc.planning import (
    Frontier,
    FrontierPoint,
    build_problem,
    check_budget,
    describe_units,
    feasible_avg_bits,
    to_allocation,
)
from bitalloc.sensitivity import Profile, cached_profile, make_profiler
from bitalloc.solvers import Solution, solve

__all__ = [
    "Prepared",
    "allocate",
    "allocation_for",
    "baseline_formats",
    "build_problem",
    "feasible_avg_bits",
    "measure",
    "measure_assignment",
    "measure_frontier",
    "prepare",
    "profile_model",
    "uniform_assignment",
]

DEFAULT_SEQ_LEN = 512
DEFAULT_CALIBRATION_TOKENS = 8192
DEFAULT_EVAL_TOKENS = 4096


@dataclass(frozen=True)
class Prepared:
    """A loaded model with its units, palette and tokenized text, ready to profile and measure."""

    loaded: LoadedModel
    units: list[Unit]
    palette: tuple[QuantFormat, ...]
    text: TextSplits
    seq_len: int

    @property
    def model(self) -> nn.Module:
        """The model being allocated."""
        return self.loaded.model

    def calibration_windows(self) -> torch.Tensor:
        """All calibration windows (profilers pick their own subset)."""
        return windows(tokenize(self.loaded.tokenizer, self.text.calibration), self.seq_len)

    def evaluation_windows(self, tokens: int | None) -> torch.Tensor:
        """Evaluation windows, evenly spread, capped at ``tokens``."""
        ids = tokenize(self.loaded.tokenizer, self.text.evaluation)
        return windows(ids, self.seq_len, tokens)


def prepare(
    model: nn.Module | str | Path | None = None,
    *,
    formats: Sequence[str | QuantFormat] | str | None = None,
    calibration: str | Path | Sequence[str | Path] | None = None,
    evaluation: str | Path | Sequence[str | Path] | None = None,
    tokenizer: object | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
) -> Prepared:
    """Load the model, discover its units and resolve the palette and text."""
    palette = parse_palette(formats)
    text = load_text(calibration, evaluation)
    loaded = load_model(model, tokenizer)
    units = discover_units(loaded.model)
    return Prepared(loaded, units, palette, text, seq_len)


def allocation_for(prep: Prepared, profile: Profile, solution: Solution, budget: float):
    """The :class:`Allocation` of a solver's choice on the prepared model."""
    return to_allocation(
        prep.units,
        prep.palette,
        profile,
        solution,
        budget,
        model=prep.loaded.source,
        excluded=excluded_parameters(prep.model, prep.units),
    )


def uniform_assignment(units: Sequence[Unit], fmt: QuantFormat | str) -> dict[str, str]:
    """Every unit in one format."""
    name = parse_format(fmt).name
    return {u.name: name for u in units}


def baseline_formats(
    units: Sequence[Unit], palette: Sequence[QuantFormat], avg_bits: float
) -> list[QuantFormat]:
    """Uniform baselines for a budget: the palette formats nearest below and above it (by their
    exact average bits on these units), ``int4-g128``, and ``fp16`` (unquantized)."""
    numel = sum(u.numel for u in units)
    exact = [(sum(f.storage_bits(u.shape) for u in units) / numel, f) for f in palette]
    below = [e for e in exact if e[0] <= avg_bits and not e[1].is_float]
    above = [e for e in exact if e[0] > avg_bits and not e[1].is_float]
    chosen = []
    if below:
        chosen.append(max(below, key=lambda e: e[0])[1])
    if above:
        chosen.append(min(above, key=lambda e: e[0])[1])
    for extra in ("int4-g128", "fp16"):
        fmt = parse_format(extra)
        if fmt not in chosen:
            chosen.append(fmt)
    return chosen


def measure_assignment(
    prep: Prepared,
    assignment: dict[str, str],
    ev: torch.Tensor,
    *,
    batch_size: int = 4,
    progress: bool = False,
    desc: str = "perplexity",
) -> Perplexity:
    """Perplexity with ``assignment`` (unit -> format) fake-applied; the model is restored."""
    with fake_quantized(prep.model, assignment):
        return perplexity(prep.model, ev, batch_size=batch_size, progress=progress, desc=desc)


def measure(
    prep: Prepared,
    allocation: Allocation,
    *,
    eval_tokens: int | None,
    batch_size: int = 4,
    progress: bool = True,
) -> Measured:
    """Perplexity of the allocation beside uniform baselines on the evaluation split."""
    allocation.check_model(prep.model)
    ev = prep.evaluation_windows(eval_tokens)
    numel = sum(u.numel for u in prep.units)
    baselines: dict[str, float] = {}
    baseline_bits: dict[str, float] = {}
    for fmt in baseline_formats(prep.units, prep.palette, allocation.data.budget):
        result = measure_assignment(
            prep,
            uniform_assignment(prep.units, fmt),
            ev,
            batch_size=batch_size,
            progress=progress,
            desc=f"perplexity {fmt.name}",
        )
        baselines[fmt.name] = result.perplexity
        baseline_bits[fmt.name] = sum(fmt.storage_bits(u.shape) for u in prep.units) / numel
    result = measure_assignment(
        prep,
        allocation.formats,
        ev,
        batch_size=batch_size,
        progress=progress,
        desc="perplexity allocation",
    )
    return Measured(
        perplexity=result.perplexity,
        baselines=baselines,
        baseline_avg_bits=baseline_bits,
        eval_tokens=result.tokens,
        seq_len=result.seq_len,
        measured_loss_increase=math.log(result.perplexity) - math.log(baselines["fp16"]),
        predicted_loss_increase=float(allocation.data.predicted_loss or 0.0),
    )


def profile_model(
    prep: Prepared,
    profiler: str = "fisher",
    *,
    calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS,
    use_cache: bool = True,
    progress: bool = True,
) -> Profile:
    """Profile the prepared model (cached on disk, keyed by model, palette and calibration).

    The profile's metadata also describes the units, the model and the parameters left out,
    so that it can be solved later without the model (:mod:`bitalloc.planning`).
    """
    cal = prep.calibration_windows()
    prof = make_profiler(profiler, tokens=calibration_tokens, progress=progress)
    result = cached_profile(
        prof,
        prep.model,
        prep.units,
        prep.palette,
        cal,
        model_fingerprint=model_fingerprint(prep.model, prep.units),
        calibration_fingerprint=tensor_fingerprint(cal),
        use_cache=use_cache,
    )
    described = {
        "model": prep.loaded.source,
        "unit_info": describe_units(prep.units),
        "excluded": excluded_parameters(prep.model, prep.units),
    }
    return Profile(result.units, result.formats, result.loss, {**result.metadata, **described})


def allocate(
    model: nn.Module | str | Path | None = None,
    avg_bits: float | None = None,
    *,
    profiler: str = "fisher",
    solver: str = "lagrangian",
    ties: str | Sequence[str] | None = None,
    max_bytes: float | None = None,
    solver_options: Mapping[str, Any] | None = None,
    formats: Sequence[str | QuantFormat] | str | None = None,
    calibration: str | Path | Sequence[str | Path] | None = None,
    evaluation: str | Path | Sequence[str | Path] | None = None,
    verify: bool = False,
    tokenizer: object | None = None,
    profile: Profile | str | Path | None = None,
    calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS,
    eval_tokens: int | None = DEFAULT_EVAL_TOKENS,
    seq_len: int = DEFAULT_SEQ_LEN,
    use_cache: bool = True,
    progress: bool = True,
) -> Allocation:
    """Choose a format for every unit so that average bits per weight <= ``avg_bits`` and the
    predicted loss increase is as small as possible.

    ``model`` is an ``nn.Module`` (pass ``tokenizer`` if it cannot be found from the model), a
    Hugging Face directory, a ``.gguf`` file, or None for the embedded default model.
    ``calibration`` / ``evaluation`` are text files (default: ``pydoc_data.topics`` splits).
    ``profile`` reuses a saved profile instead of profiling. ``solver`` is any registered
    method (``lagrangian``, ``dp``, ``ilp``, ``qp``, ...). ``ties`` ties fused projections
    (``"qkv"``, ``"gateup"``) to one format; ``max_bytes`` adds a bound on the units' stored
    bytes; ``solver_options`` go to the solver (e.g. ``{"time_limit": 30}``). With ``verify``
    the allocation's perplexity is measured on ``eval_tokens``
    evaluation tokens beside uniform baselines.
    """
    if avg_bits is None:
        raise BitallocError("pass avg_bits, the budget in average bits per weight (e.g. 3.25)")
    prep = prepare(
        model,
        formats=formats,
        calibration=calibration,
        evaluation=evaluation,
        tokenizer=tokenizer,
        seq_len=seq_len,
    )
    check_budget(avg_bits, prep.units, prep.palette)
    if profile is None:
        prof = profile_model(
            prep,
            profiler,
            calibration_tokens=calibration_tokens,
            use_cache=use_cache,
            progress=progress,
        )
    else:
        prof = profile if isinstance(profile, Profile) else Profile.load(profile)
    problem = build_problem(
        prep.units, prep.palette, prof, avg_bits, max_bytes=max_bytes, ties=ties
    )
    allocation = allocation_for(
        prep, prof, solve(problem, method=solver, **dict(solver_options or {})), avg_bits
    )
    if verify:
        allocation = allocation.with_measured(
            measure(prep, allocation, eval_tokens=eval_tokens, progress=progress)
        )
    return allocation


def measure_frontier(
    prep: Prepared,
    front: Frontier,
    *,
    eval_tokens: int | None,
    batch_size: int = 4,
    progress: bool = True,
) -> Frontier:
    """Measure every frontier point's perplexity (and unquantized fp16) on one evaluation set."""
    ev = prep.evaluation_windows(eval_tokens)
    fp16 = measure_assignment(
        prep,
        uniform_assignment(prep.units, "fp16"),
        ev,
        batch_size=batch_size,
        progress=progress,
        desc="perplexity fp16",
    ).perplexity
    points = []
    for point in front.points:
        point.allocation.check_model(prep.model)
        result = measure_assignment(
            prep,
            point.allocation.formats,
            ev,
            batch_size=batch_size,
            progress=progress,
            desc=f"perplexity @ {point.budget:g} bits",
        )
        points.append(FrontierPoint(point.budget, point.allocation, result.perplexity))
    return Frontier(tuple(points), front.method, front.ties, fp16)
