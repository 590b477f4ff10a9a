"""Stage 2, profile: the units x formats table of predicted loss, from the on-disk cache when
one matches (keyed by the model's weights, the palette and the calibration tokens), or a saved
profile checked against the model; optional pairwise interaction terms."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bitalloc.data import tensor_fingerprint
from bitalloc.errors import BitallocError
from bitalloc.folding_record import FOLDED_PROFILE_HINT
from bitalloc.formats import QuantFormat, parse_palette
from bitalloc.models import Unit, excluded_parameters, model_fingerprint
from bitalloc.planning import check_profile_matches, describe_units
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
from bitalloc.stages.prepare import Prepared, prepare_for, select_units

if TYPE_CHECKING:
    from bitalloc.config import AllocateConfig

#: Calibration tokens per interaction-term measurement.
INTERACTION_TOKENS = 1024


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
        importance=prep.importance,
    )


def _default_interaction_formats(palette: Sequence[QuantFormat]) -> list[QuantFormat]:
    """The two lowest-bit integer formats of the largest group size: interactions matter most
    where single-unit losses are large."""
    ints = [f for f in palette if not f.is_float]
    if not ints:
        raise BitallocError("interaction terms need an integer format in the palette")
    group = max(f.group_size for f in ints)
    return sorted((f for f in ints if f.group_size == group), key=lambda f: f.bits)[:2]


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
    interaction_tokens: int = INTERACTION_TOKENS,
    use_cache: bool = True,
    progress: bool = True,
) -> Profile:
    """Profile the prepared model (cached on disk, keyed by model, palette and calibration).

    ``profiler`` is a registered method name (see :data:`bitalloc.sensitivity.PROFILERS`) and
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
            importance=prep.importance,
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
    recorded_clipping = prof.metadata.get("clipping")
    clipping = "mse" if prep.importance is None else "weighted"
    if recorded_clipping is not None and recorded_clipping != clipping:
        raise BitallocError(
            f"the profile was made with --clipping {recorded_clipping}, this run clips "
            f"{clipping}: its predictions are for other quantized weights; pass --clipping "
            f"{recorded_clipping} or re-profile"
        )
    return prof


def interaction_terms(source: Profile | Interactions | str | Path) -> Interactions:
    """The interaction terms held by ``source`` (terms, a profile, or a saved profile's path)."""
    if isinstance(source, Interactions):
        return source
    prof = source if isinstance(source, Profile) else Profile.load(source)
    if prof.interactions is None:
        raise BitallocError(
            "the profile given for interaction terms holds none; make one with "
            "`bitalloc profile --interactions neighbours --out FILE`"
        )
    return prof.interactions


def saved_profile(profile: Profile | str | Path | None) -> Profile | None:
    """A saved profile read once (so that its formats can become the palette before the model
    is prepared), or None."""
    if profile is None or isinstance(profile, Profile):
        return profile
    return Profile.load(profile)


def profile_for(
    prep: Prepared,
    config: AllocateConfig,
    *,
    saved: Profile | None = None,
    interactions_from: Profile | Interactions | str | Path | None = None,
) -> Profile:
    """The profile ``config`` asks for on the prepared model: ``saved`` checked against it, or
    ``config.profile.profiler``'s table (cached); plus interaction terms, measured
    (``config.profile.interactions``) or taken from another profile (``interactions_from``)."""
    p = config.profile
    if saved is not None:
        prof = load_profile_for(prep, saved)
    else:
        prof = profile_model(
            prep,
            p.profiler,
            calibration_tokens=config.data.calibration_tokens,
            profiler_options=p.options,
            workers=p.workers,
            ray_address=p.ray_address,
            interactions=_pairs(p.interactions),
            use_cache=p.use_cache,
            progress=config.progress,
        )
    if interactions_from is not None:
        prof = prof.with_interactions(interaction_terms(interactions_from))
    return prof


def _pairs(interactions: Any) -> str | list[list[str]] | None:
    if interactions is None or isinstance(interactions, str):
        return interactions
    return [list(pair) for pair in interactions]


def prepare_and_profile(
    model: nn.Module | str | Path | None,
    config: AllocateConfig,
    *,
    tokenizer: object | None = None,
    profile: Profile | str | Path | None = None,
    interactions_from: Profile | Interactions | str | Path | None = None,
    check: Callable[[Prepared], object] | None = None,
) -> tuple[Prepared, Profile]:
    """Stages 1 and 2 as ``config`` asks (what :func:`bitalloc.allocate` and the measured
    search start with): prepare the model, run ``check`` on it, then profile it (cached) or
    check a saved ``profile`` (default ``config.profile.profile``) against it. A saved
    profile's formats are the palette unless the configuration names one."""
    saved = saved_profile(config.profile.profile if profile is None else profile)
    formats = None
    if saved is not None and config.target.formats is None:
        formats = list(saved.formats)
    prep = prepare_for(model, config, tokenizer=tokenizer, formats=formats, check=check)
    source = config.profile.interactions_from if interactions_from is None else interactions_from
    return prep, profile_for(prep, config, saved=saved, interactions_from=source)
