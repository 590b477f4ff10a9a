"""``allocate()``: the one place that ties the stages together.

``prepare -> profile -> plan -> solve -> verify/repair -> allocation`` (:mod:`bitalloc.stages`),
driven by one :class:`~bitalloc.config.AllocateConfig`. Nothing imports this module except the
CLI and the public API; the names below it re-exports are the stages' own.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

from torch import nn

from bitalloc.allocation import Allocation
from bitalloc.config import INTERACTIONS_WITH_PROFILE, AllocateConfig, call_arguments
from bitalloc.errors import ConfigError
from bitalloc.kv.allocate import (
    allocate_kv_only,
    allocate_with_kv,
    check_kv_budget_fits,
    keeping_kv,
    kv_request,
)
from bitalloc.measuring import (
    baseline_formats,
    measure,
    measure_assignment,
    measure_frontier,
    uniform_assignment,
    uniform_avg_bits,
)
from bitalloc.planning import build_problem, feasible_avg_bits
from bitalloc.sensitivity import Interactions, Profile
from bitalloc.stages import (
    Prepared,
    allocation_for,
    load_profile_for,
    plan,
    prepare,
    prepare_and_profile,
    profile_model,
    requested_budget,
    select_units,
    verify,
)

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

#: Options that may be objects in memory rather than files: they are inputs of this run, not
#: part of the (serializable) configuration.
_IN_MEMORY = {"profile": Profile, "interactions_from": (Profile, Interactions)}


def allocate(
    model: nn.Module | str | Path | None = None,
    config: AllocateConfig | float | None = None,
    *,
    tokenizer: object | None = None,
    **overrides: Any,
) -> Allocation:
    """Choose a format for every unit so that the budget holds and the predicted loss increase
    is as small as possible.

    ``model`` is an ``nn.Module`` (pass ``tokenizer`` if it cannot be found from the model), a
    Hugging Face directory, a ``.gguf`` file, or None for ``config.model`` (default: the
    embedded model). ``config`` is an :class:`~bitalloc.config.AllocateConfig`, which documents
    every option and default; a number there is the short form of ``avg_bits``. ``overrides``
    are options by their flat names (``avg_bits=3.25``, ``profiler="hessian"``,
    ``verify=True``, ... see :data:`bitalloc.config.FLAT_FIELDS`), applied on top of
    ``config``; ``profile`` and ``interactions_from`` may also be :class:`Profile` /
    :class:`Interactions` objects. The configuration is validated before anything is loaded.

    The stages: prepare the model (and scale-fold it when asked), profile it (cached) or check
    a saved profile, plan the problem (budgets, ties, solver) and solve it, with the KV cache
    when a KV or joint memory budget is given, then with ``verify`` measure (and repair) it.
    The allocation records the budget requested by resource and the configuration it was made
    with (``allocation.data.config``; ``bitalloc allocate --config FILE`` reruns it).
    """
    config, inputs = _resolve(model, config, overrides)
    request = kv_request(config)
    if request is not None and config.target.avg_bits is None and not request.joint:
        allocation = allocate_kv_only(model, config, request, tokenizer=tokenizer)
        return _recorded(allocation, config)
    prep, profile = prepare_and_profile(
        model,
        config,
        tokenizer=tokenizer,
        profile=inputs.get("profile"),
        interactions_from=inputs.get("interactions_from"),
        check=None if request is None else partial(check_kv_budget_fits, request=request),
    )
    weights = plan(prep, profile, config)
    if request is None:
        allocation = weights.solve(profile)
        resolve = weights.solve
        candidates = weights.uniform_candidates(profile) if config.verify.enabled else []
    else:
        allocation = allocate_with_kv(
            prep,
            profile,
            request,
            solve_weights=weights.solve,
            solver=weights.method,
            solver_options=weights.options,
            ties=weights.ties,
            use_cache=config.profile.use_cache,
            progress=config.progress,
        )
        allocation = prep.recorded(allocation)
        # A joint budget's weight share is not a budget repair could re-solve alone.
        resolve = None if request.joint else keeping_kv(weights.solve, allocation)
        candidates = []
        if resolve is not None and config.verify.enabled:
            kv = allocation.data.kv
            candidates = [(lb, c.with_kv(kv)) for lb, c in weights.uniform_candidates(profile)]
    if config.verify.enabled:
        allocation = verify(
            prep, profile, allocation, config, resolve=resolve, candidates=candidates
        )
    return _recorded(allocation, config).with_live_importance(prep.importance)


def _resolve(
    model: Any, config: AllocateConfig | float | None, overrides: Mapping[str, Any]
) -> tuple[AllocateConfig, dict[str, Any]]:
    """The validated configuration, and the options given as objects in memory."""
    config, flat = call_arguments(model, config, overrides)
    inputs = {
        name: flat.pop(name)
        for name, kind in _IN_MEMORY.items()
        if isinstance(flat.get(name), kind)
    }
    if config is None:
        resolved = AllocateConfig.from_flat(**flat)
    else:
        resolved = config.with_flat(**flat) if flat else config
    if "profile" in inputs and resolved.profile.interactions is not None:
        # The rule AllocateConfig checks for a saved profile's path, for one held in memory.
        raise ConfigError(INTERACTIONS_WITH_PROFILE)
    return resolved, inputs


def _recorded(allocation: Allocation, config: AllocateConfig) -> Allocation:
    return allocation.with_budget(requested_budget(config)).with_config(config.to_json_dict())
