"""``allocate()``: model -> units -> palette -> profile -> problem -> solver -> allocation
-> (verify).

This is the one module that ties profiling, solving and evaluation together.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitalloc.allocation import (
    Allocation,
)
from bitalloc.data import TextSplits, load_text, tensor_fingerprint, tokenize, windows
from bitalloc.errors import BitallocError
from bitalloc.folding_record import (
    FOLDED_PROFILE_HINT,
    ScaleFolding,
    fold_alpha,
    fold_loaded,
)
from bitalloc.formats import QuantFormat, parse_palette
from bitalloc.kv.allocate import (
    DEFAULT_KV_METHOD,
    allocate_kv_only,
    allocate_with_kv,
    check_kv_budget_fits,
    keeping_kv,
    kv_request,
)
from bitalloc.kv.formats import KVFormat
from bitalloc.measuring import (
    baseline_formats,
    measure,
    measure_assignment,
    measure_frontier,
    uniform_assignment,
    uniform_avg_bits,
)
from bitalloc.models import (
    LoadedModel,
    Unit,
    discover_units,
    excluded_parameters,
    load_model,
    model_fingerprint,
)
from bitalloc.planning import (
    build_problem,
    check_budget,
    check_profile_matches,
    default_method,
    describe_units,
    feasible_avg_bits,
    to_allocation,
)
from bitalloc.repair import DEFAULT_BUDGET as DEFAULT_REPAIR_BUDGET
from bitalloc.repair import DEFAULT_GROUPS as DEFAULT_REPAIR_GROUPS
from bitalloc.repair import DEFAULT_TOKENS as DEFAULT_REPAIR_TOKENS
from bitalloc.repair import DEFAULT_TOLERANCE as DEFAULT_REPAIR_TOLERANCE
from bitalloc.repair import verify_and_repair
from bitalloc.rl.options import rl_solver_options
from bitalloc.sensitivity import (
    MEASURING_PROFILERS,
    BaseProfiler,
    Interactions,
    Profile,
    cached_profile,
    make_profiler,
    measure_interactions,
    select_pairs,
)
from bitalloc.solvers import Solution, solve

__all__ = [
    "Prepared",
    "allocate",
    "allocation_for",
    "baseline_formats",
    "build_problem",
    "feasible_avg_bits",
    "load_profile_for",
    "measure",
    "measure_assignment",
    "measure_frontier",
    "prepare",
    "prepare_and_profile",
    "profile_model",
    "select_units",
    "uniform_assignment",
    "uniform_avg_bits",
]

DEFAULT_SEQ_LEN = 512
DEFAULT_EVAL_TOKENS = 4096


@dataclass(frozen=True)
class Prepared:
    """A loaded model with its units, palette and tokenized text, ready to profile and measure."""

    loaded: LoadedModel
    units: list[Unit]
    palette: tuple[QuantFormat, ...]
    text: TextSplits
    seq_len: int
    #: Set when the model was scale-folded before profiling (see :func:`prepare_and_profile`).
    scale_folding: ScaleFolding | None = None

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


def select_units(units: Sequence[Unit], pattern: str | None) -> list[Unit]:
    r"""The units whose name matches the regular expression ``pattern`` (searched, so
    ``layers\.(0|1)\.`` or ``mlp`` work); all units when it is None."""
    if pattern is None:
        return list(units)
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise BitallocError(
            f"units filter {pattern!r} is not a valid regular expression ({exc})"
        ) from None
    chosen = [u for u in units if regex.search(u.name)]
    if not chosen:
        raise BitallocError(
            f"units filter {pattern!r} matches none of the {len(units)} units (e.g. "
            f"{units[0].name!r}); fix the pattern"
        )
    return chosen


def _default_interaction_formats(palette: Sequence[QuantFormat]) -> list[QuantFormat]:
    """The two lowest-bit integer formats of the largest group size: interactions matter most
    where single-unit losses are large."""
    ints = [f for f in palette if not f.is_float]
    if not ints:
        raise BitallocError("interaction terms need an integer format in the palette")
    group = max(f.group_size for f in ints)
    return sorted((f for f in ints if f.group_size == group), key=lambda f: f.bits)[:2]


def cached_profile_of(
    prep: Prepared,
    profiler: BaseProfiler,
    units: Sequence[Unit],
    palette: Sequence[Any],
    calibration: torch.Tensor,
    *,
    use_cache: bool = True,
) -> Profile:
    """``profiler``'s table for ``units`` x ``palette`` on the prepared model, from the profile
    cache when one matches (keyed by the model's weights and the calibration tokens)."""
    return cached_profile(
        profiler,
        prep.model,
        units,
        palette,
        calibration,
        model_fingerprint=model_fingerprint(prep.model, prep.units),
        calibration_fingerprint=tensor_fingerprint(calibration),
        use_cache=use_cache,
    )


def profile_model(
    prep: Prepared,
    profiler: str = "fisher",
    *,
    calibration_tokens: int | None = None,
    profiler_options: Mapping[str, Any] | None = None,
    units: str | None = None,
    workers: int = 0,
    ray_address: str | None = None,
    interactions: str | Sequence[Sequence[str]] | None = None,
    interaction_formats: Sequence[str | QuantFormat] | str | None = None,
    interaction_tokens: int = 1024,
    use_cache: bool = True,
    progress: bool = True,
) -> Profile:
    """Profile the prepared model (cached on disk, keyed by model, palette and calibration).

    ``profiler`` is a method name (see :data:`bitalloc.sensitivity.PROFILERS`) and
    ``profiler_options`` its options; ``calibration_tokens`` None takes the method's default.
    ``units`` restricts profiling to units whose name matches that regular expression.
    ``workers`` / ``ray_address`` run measurements on Ray (``measured``, ``kl``, interactions).
    ``interactions`` adds measured pairwise terms (``"neighbours"``, ``"top:K"``, a pairs
    file or a list of pairs) at ``interaction_formats`` (default: the two lowest-bit integer
    formats of the largest group size).

    The profile's metadata also describes the units, the model and the parameters left out,
    so that it can be solved later without the model (:mod:`bitalloc.planning`).
    """
    chosen = select_units(prep.units, units)
    cal = prep.calibration_windows()
    options = dict(profiler_options or {})
    if calibration_tokens is not None:
        options["tokens"] = calibration_tokens
    if profiler in MEASURING_PROFILERS:
        options.setdefault("workers", workers)
        options.setdefault("ray_address", ray_address)
    prof = make_profiler(profiler, progress=progress, **options)
    result = cached_profile_of(prep, prof, chosen, prep.palette, cal, use_cache=use_cache)
    result = result.with_metadata(
        model=prep.loaded.source,
        unit_info=describe_units(chosen),
        excluded=excluded_parameters(prep.model, prep.units),
    )
    if interactions is not None:
        fmts = (
            _default_interaction_formats(prep.palette)
            if interaction_formats is None
            else list(parse_palette(interaction_formats))
        )
        pairs = select_pairs(chosen, interactions, result.loss)
        terms = measure_interactions(
            prep.model,
            prep.units,
            pairs,
            fmts,
            cal,
            tokens=interaction_tokens,
            workers=workers,
            ray_address=ray_address,
            progress=progress,
        )
        result = result.with_interactions(terms)
    return result


def load_profile_for(prep: Prepared, profile: Profile | str | Path) -> Profile:
    """A saved profile, checked against the prepared model: same units, same weights (when the
    profile records their fingerprint) and a column for every palette format."""
    prof = profile if isinstance(profile, Profile) else Profile.load(profile)
    recorded = prof.metadata.get("model_fingerprint")
    if recorded is not None:
        actual = model_fingerprint(prep.model, prep.units)
        if recorded != actual:
            hint = FOLDED_PROFILE_HINT if prep.scale_folding is not None else ""
            raise BitallocError(
                "the profile was made for a model with other weights (fingerprint "
                f"{recorded} != {actual}); re-profile this model{hint}"
            )
    check_profile_matches(prep.units, prep.palette, prof)
    return prof


def _interaction_source(source: Profile | Interactions | str | Path) -> Interactions:
    if isinstance(source, Interactions):
        return source
    prof = source if isinstance(source, Profile) else Profile.load(source)
    if prof.interactions is None:
        raise BitallocError(
            "the profile given for interaction terms holds none; make one with "
            "`bitalloc profile --interactions neighbours --out FILE`"
        )
    return prof.interactions


def prepare_and_profile(
    model: nn.Module | str | Path | None,
    avg_bits: float | None,
    *,
    profiler: str = "fisher",
    profile: Profile | str | Path | None = None,
    profiler_options: Mapping[str, Any] | None = None,
    formats: Sequence[str | QuantFormat] | str | None = None,
    calibration: str | Path | Sequence[str | Path] | None = None,
    evaluation: str | Path | Sequence[str | Path] | None = None,
    tokenizer: object | None = None,
    interactions: str | Sequence[Sequence[str]] | None = None,
    workers: int = 0,
    ray_address: str | None = None,
    calibration_tokens: int | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    use_cache: bool = True,
    progress: bool = True,
    scale_folding: bool | float | None = None,
    budget_required: bool = True,
    check: Callable[[Prepared], object] | None = None,
) -> tuple[Prepared, Profile]:
    """The first steps of :func:`allocate` (and of the measured search): load the model, check
    the budget against its units and palette, then profile it (cached) or check a saved
    ``profile`` against it. A saved profile's formats are the palette unless ``formats`` is
    given. ``scale_folding`` (see :func:`allocate`; off by default) folds the model between
    loading and profiling and records it in ``prep.scale_folding``. ``budget_required`` False
    accepts ``avg_bits`` None (a joint memory budget sets the weights' share itself);
    ``check`` is called with the prepared model before anything is profiled."""
    if avg_bits is None and budget_required:
        raise BitallocError(
            "pass avg_bits (--avg-bits), the budget in average bits per weight (e.g. 3.25), "
            "or a KV cache budget: kv_avg_bits (--kv-avg-bits) or memory_bytes (--memory)"
        )
    alpha = fold_alpha(scale_folding)  # checked before anything is loaded
    saved = None
    if profile is not None:
        saved = profile if isinstance(profile, Profile) else Profile.load(profile)
        if formats is None:
            formats = list(saved.formats)
    prep = prepare(
        model,
        formats=formats,
        calibration=calibration,
        evaluation=evaluation,
        tokenizer=tokenizer,
        seq_len=seq_len,
    )
    if avg_bits is not None:
        check_budget(avg_bits, prep.units, prep.palette)
    if check is not None:
        check(prep)
    if alpha is not None:
        # load_model does not copy a module passed in, so a copy of it is folded.
        loaded, record = fold_loaded(
            prep.loaded,
            prep.calibration_windows(),
            alpha,
            copy_module=isinstance(model, nn.Module),
        )
        prep = dataclasses.replace(prep, loaded=loaded, scale_folding=record)
    if saved is not None:
        if interactions is not None:
            raise BitallocError(
                "interactions are measured while profiling; with a saved profile pass "
                "interactions_from=<profile holding them> instead"
            )
        return prep, load_profile_for(prep, saved)
    prof = profile_model(
        prep,
        profiler,
        calibration_tokens=calibration_tokens,
        profiler_options=profiler_options,
        workers=workers,
        ray_address=ray_address,
        interactions=interactions,
        use_cache=use_cache,
        progress=progress,
    )
    return prep, prof


def allocate(
    model: nn.Module | str | Path | None = None,
    avg_bits: float | None = None,
    *,
    profiler: str = "fisher",
    solver: str | None = None,
    ties: str | Sequence[str] | None = None,
    max_bytes: float | None = None,
    solver_options: Mapping[str, Any] | None = None,
    profiler_options: Mapping[str, Any] | None = None,
    formats: Sequence[str | QuantFormat] | str | None = None,
    calibration: str | Path | Sequence[str | Path] | None = None,
    evaluation: str | Path | Sequence[str | Path] | None = None,
    verify: bool = False,
    repair: bool = True,
    repair_budget: int = DEFAULT_REPAIR_BUDGET,
    repair_tolerance: float = DEFAULT_REPAIR_TOLERANCE,
    repair_tokens: int = DEFAULT_REPAIR_TOKENS,
    repair_groups: str = DEFAULT_REPAIR_GROUPS,
    tokenizer: object | None = None,
    profile: Profile | str | Path | None = None,
    interactions: str | Sequence[Sequence[str]] | None = None,
    interactions_from: Profile | Interactions | str | Path | None = None,
    workers: int = 0,
    ray_address: str | None = None,
    calibration_tokens: int | None = None,
    eval_tokens: int | None = DEFAULT_EVAL_TOKENS,
    seq_len: int = DEFAULT_SEQ_LEN,
    use_cache: bool = True,
    progress: bool = True,
    policy: str | Path | None = None,
    scale_folding: bool | float = False,
    kv_avg_bits: float | None = None,
    memory_bytes: float | None = None,
    context_len: int | None = None,
    batch_size: int = 1,
    kv_formats: str | Sequence[str | KVFormat] | None = None,
    kv_profiler: str = DEFAULT_KV_METHOD,
    kv_tokens: int | None = None,
) -> Allocation:
    """Choose a format for every unit so that average bits per weight <= ``avg_bits`` and the
    predicted loss increase is as small as possible.

    ``model`` is an ``nn.Module`` (pass ``tokenizer`` if it cannot be found from the model), a
    Hugging Face directory, a ``.gguf`` file, or None for the embedded default model.
    ``calibration`` / ``evaluation`` are text files (default: ``pydoc_data.topics`` splits).
    ``profiler`` is ``fisher``, ``hessian``, ``output``, ``kfac``, ``kl`` or ``measured``
    (options in ``profiler_options``, calibration tokens in ``calibration_tokens``, default per
    method);
    ``profile`` reuses a saved profile instead (checked against the model; its formats are the
    palette unless ``formats`` is given). ``interactions`` measures pairwise terms
    (``"neighbours"``, ``"top:K"``, a pairs file) and ``interactions_from`` takes them from
    another profile; either needs a solver that handles them (default then ``qp``).
    ``workers`` / ``ray_address`` run measurements on Ray. ``solver`` is any registered method
    (default ``lagrangian``). ``ties`` ties fused projections (``"qkv"``, ``"gateup"``) to one
    format; ``max_bytes`` adds a bound on the units' stored bytes; ``solver_options`` go to the
    solver (e.g. ``{"time_limit": 30}``). With ``solver="rl"`` the model's unit embeddings are
    computed and passed to it, and ``policy`` (a path) applies a saved policy without training.

    With ``verify`` the allocation is checked against reality. First (unless ``repair`` is
    False) its loss increase is measured on ``repair_tokens`` calibration tokens; when it
    exceeds the profile's additive prediction by more than ``repair_tolerance`` (relative), the
    groups with the largest predicted share (``repair_groups``: each unit alone, or each
    layer's units at once) are measured, their terms rescaled to match and the problem solved
    again, within ``repair_budget`` evaluations; the best measured allocation is
    kept and ``allocation.data.repair`` records predicted and measured loss before and after
    (:mod:`bitalloc.repair`). Then its perplexity is measured on ``eval_tokens`` evaluation
    tokens beside uniform baselines.

    ``scale_folding`` (True: alpha 0.5, or a float alpha in (0, 1)) scale-folds the model
    (:mod:`bitalloc.folding`) after loading and before profiling, calibrated on the first
    :data:`~bitalloc.folding_record.FOLD_TOKENS` (4096) calibration tokens; an ``nn.Module``
    passed in is deep-copied first, so it is left unchanged. The profile (and its cache
    entry, keyed by the weights' fingerprint) is then that of the folded model, so a saved
    ``profile`` of the unfolded model is refused. ``allocation.data.scale_folding`` records the
    scales, and :meth:`Allocation.apply` folds them into the original model before quantizing.

    KV cache (:mod:`bitalloc.kv`). ``kv_avg_bits`` also chooses a (key bits, value bits) pair
    per attention layer so that the cache stores at most that many bits per cached element
    (scales and zeros included) at ``context_len`` tokens (default: ``seq_len``); without
    ``avg_bits`` the weights stay at fp16. ``memory_bytes`` instead chooses weight formats and
    KV pairs in one problem: parameters outside the allocation at 16 bits + the allocated
    weights + the KV cache for ``context_len`` tokens x ``batch_size`` sequences must fit it
    (pass it without ``avg_bits``, ``kv_avg_bits`` or ``max_bytes``); ``allocation.data.joint``
    reports the split and the best separate allocations at the same total. ``kv_formats`` is
    the KV palette (default: all 16 pairs of {2, 4, 8, 16} bits, groups of 64), ``kv_profiler``
    the KV profile's measure (``kl`` default, ``loss``, or ``proxy``, which a joint budget
    refuses because it is not in nats) on ``kv_tokens`` calibration tokens (default 1024).
    ``allocation.kv_formats`` and ``allocation.kv_cache(model)`` apply the pairs; ``verify``
    measures perplexity through the quantized cache and, with a joint budget, does not repair.
    """
    request = kv_request(
        avg_bits=avg_bits,
        max_bytes=max_bytes,
        kv_avg_bits=kv_avg_bits,
        memory_bytes=memory_bytes,
        context_len=context_len,
        batch_size=batch_size,
        kv_formats=kv_formats,
        kv_profiler=kv_profiler,
        kv_tokens=kv_tokens,
        solver=solver,
    )
    if request is not None and avg_bits is None and not request.joint:
        return allocate_kv_only(
            model,
            request,
            formats=formats,
            calibration=calibration,
            evaluation=evaluation,
            tokenizer=tokenizer,
            seq_len=seq_len,
            scale_folding=scale_folding,
            solver=solver,
            solver_options=solver_options,
            verify=verify,
            eval_tokens=eval_tokens,
            use_cache=use_cache,
            progress=progress,
        )
    prep, prof = prepare_and_profile(
        model,
        avg_bits,
        profiler=profiler,
        profile=profile,
        profiler_options=profiler_options,
        formats=formats,
        calibration=calibration,
        evaluation=evaluation,
        tokenizer=tokenizer,
        interactions=interactions,
        workers=workers,
        ray_address=ray_address,
        calibration_tokens=calibration_tokens,
        seq_len=seq_len,
        use_cache=use_cache,
        progress=progress,
        scale_folding=scale_folding,
        budget_required=request is None or not request.joint,
        check=None if request is None else partial(check_kv_budget_fits, request=request),
    )
    if interactions_from is not None:
        prof = prof.with_interactions(_interaction_source(interactions_from))
    solver = default_method(prof, solver)
    options = rl_solver_options(solver, dict(solver_options or {}), policy, prep, progress)

    def solve_with(table: Profile) -> Allocation:
        problem = build_problem(
            prep.units, prep.palette, table, avg_bits, max_bytes=max_bytes, ties=ties
        )
        solution = solve(problem, method=solver, **options)
        chosen = allocation_for(prep, table, solution, avg_bits)
        # Every allocation (also those verify-and-repair re-solves) carries the fold record.
        record = prep.scale_folding
        return chosen if record is None else chosen.with_scale_folding(record)

    if request is None:
        allocation = solve_with(prof)
    else:
        allocation = allocate_with_kv(
            prep,
            prof,
            request,
            solve_weights=solve_with,
            solver=solver,
            solver_options=options,
            ties=ties,
            use_cache=use_cache,
            progress=progress,
        )
        if prep.scale_folding is not None:
            allocation = allocation.with_scale_folding(prep.scale_folding)
    if verify:
        repair_record = None
        # A joint budget's weight share is not a budget repair could re-solve alone.
        if repair and (request is None or not request.joint):
            allocation, repair_record = verify_and_repair(
                prep.model,
                prep.calibration_windows(),
                prep.units,
                prof,
                allocation,
                solve_with if request is None else keeping_kv(solve_with, allocation),
                budget=repair_budget,
                tolerance=repair_tolerance,
                tokens=repair_tokens,
                groups=repair_groups,
                workers=workers,
                ray_address=ray_address,
                progress=progress,
            )
        allocation = allocation.with_measured(
            measure(prep, allocation, eval_tokens=eval_tokens, progress=progress)
        )
        if repair_record is not None:
            allocation = allocation.with_repair(repair_record)
    return allocation
