"""KV-cache allocation inside :func:`bitalloc.allocate`: profile the KV units, then choose
per-layer (key bits, value bits) pairs under ``kv_avg_bits`` beside the weight allocation, or
choose weights and pairs together under one ``memory_bytes`` budget (:mod:`bitalloc.kv.plan`).

A leaf: it uses the stages (:mod:`bitalloc.stages`), never the allocator. The request's
combinations (which budgets go together) are checked by :class:`bitalloc.config.KVConfig`'s
validation before anything is loaded; here the request is sized against the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bitalloc.allocation import Allocation, UnitChoice
from bitalloc.config import DEFAULT_KV_TOKENS
from bitalloc.errors import BitallocError
from bitalloc.formats import parse_format
from bitalloc.kv.formats import KVFormat, kv_palette, kv_units
from bitalloc.kv.plan import (
    JointCosts,
    JointSpace,
    build_joint_problem,
    build_kv_problem,
    check_context_batch,
    check_kv_budget,
    fixed_bytes,
    separate_splits,
    split_solution,
    to_kv_allocation,
)
from bitalloc.kv.record import JointBudget, KVAllocation
from bitalloc.models import Unit, excluded_parameters
from bitalloc.planning import tie_groups, to_allocation
from bitalloc.sensitivity import Profile
from bitalloc.solvers import solve

if TYPE_CHECKING:
    from bitalloc.config import AllocateConfig
    from bitalloc.stages import Prepared


@dataclass(frozen=True)
class KVRequest:
    """What the caller asked of the KV cache, checked before the model is loaded."""

    kv_avg_bits: float | None
    memory_bytes: float | None
    context_len: int | None
    batch_size: int
    palette: tuple[KVFormat, ...]
    method: str
    tokens: int

    @property
    def joint(self) -> bool:
        """True for one weights + KV memory budget."""
        return self.memory_bytes is not None


def kv_request(config: AllocateConfig) -> KVRequest | None:
    """The KV request of a (validated) configuration, or None when it has no KV budget."""
    kv = config.kv
    if kv.avg_bits is None and kv.memory_bytes is None:
        return None
    check_context_batch(1 if kv.context_len is None else kv.context_len, kv.batch_size)
    tokens = DEFAULT_KV_TOKENS if kv.tokens is None else kv.tokens
    from bitalloc.kv.profiler import KVProfiler

    KVProfiler(kv.profiler, tokens=tokens)  # checks method and tokens before any loading
    return KVRequest(
        kv_avg_bits=kv.avg_bits,
        memory_bytes=kv.memory_bytes,
        context_len=kv.context_len,
        batch_size=kv.batch_size,
        palette=kv_palette(None if kv.formats is None else list(kv.formats)),
        method=kv.profiler,
        tokens=tokens,
    )


def profile_kv(
    prep: Prepared, request: KVRequest, *, use_cache: bool = True, progress: bool = True
) -> tuple[list[Unit], Profile]:
    """The model's KV units and their profile (cached like weight profiles)."""
    from bitalloc.kv.profiler import KVProfiler
    from bitalloc.stages import cached_profile_of

    units = kv_units(prep.model)
    profiler = KVProfiler(request.method, tokens=request.tokens, progress=progress)
    cal = prep.calibration_windows()
    return units, cached_profile_of(
        prep, profiler, units, request.palette, cal, use_cache=use_cache
    )


def unquantized_weights(prep: Prepared) -> Allocation:
    """Every weight unit kept at fp16: the weight side of a KV-only allocation."""
    fp16 = parse_format("fp16")
    return Allocation.from_choices(
        model=prep.loaded.source,
        budget=None,
        units=[UnitChoice.of(u, fp16, 0.0) for u in prep.units],
        excluded=excluded_parameters(prep.model, prep.units),
    )


def allocate_with_kv(
    prep: Prepared,
    weight_profile: Profile | None,
    request: KVRequest,
    *,
    solve_weights: Callable[[Profile], Allocation],
    solver: str | None,
    solver_options: Mapping[str, Any],
    ties: str | Sequence[str] | None,
    use_cache: bool = True,
    progress: bool = True,
) -> Allocation:
    """The allocation with KV formats: weights by ``solve_weights`` (or kept at fp16 when no
    weight profile is given) and KV pairs under ``kv_avg_bits``, or both in one joint problem."""
    context = check_kv_budget_fits(prep, request)
    units, kv_prof = profile_kv(prep, request, use_cache=use_cache, progress=progress)
    if request.joint:
        if weight_profile is None:
            raise BitallocError("a joint memory budget needs the weight profile")
        return _joint(
            prep, weight_profile, units, kv_prof, request, context, solver, solver_options, ties
        )
    weights = unquantized_weights(prep) if weight_profile is None else solve_weights(weight_profile)
    problem = build_kv_problem(
        units,
        request.palette,
        kv_prof,
        request.kv_avg_bits,
        context_len=context,
        batch_size=request.batch_size,
    )
    solution = solve(problem, method=solver or "lagrangian", **dict(solver_options))
    kv = to_kv_allocation(
        units,
        request.palette,
        kv_prof,
        solution.choice,
        context_len=context,
        batch_size=request.batch_size,
        budget=request.kv_avg_bits,
        solution=solution,
    )
    return weights.with_kv(kv)


def check_kv_budget_fits(prep: Prepared, request: KVRequest) -> int:
    """Check the request against the loaded model before anything is profiled: the context
    fits the model, and ``kv_avg_bits`` or ``memory_bytes`` is reachable. Returns the context."""
    from bitalloc.kv.cache import check_context

    context = prep.seq_len if request.context_len is None else request.context_len
    check_context(prep.model, context)
    units = kv_units(prep.model)
    if request.joint:
        joint_costs(prep, units, request, context).check_memory(request.memory_bytes)
    else:
        check_kv_budget(request.kv_avg_bits, units, request.palette, context)
    return context


def joint_costs(
    prep: Prepared, units: Sequence[Unit], request: KVRequest, context_len: int
) -> JointCosts:
    """The :class:`JointCosts` of the prepared model: its weight units and palette, its KV
    units and the request's KV palette, and its parameters outside the allocation."""
    return JointCosts(
        weight_units=tuple(prep.units),
        weight_palette=tuple(prep.palette),
        kv_units=tuple(units),
        kv_palette=request.palette,
        context_len=context_len,
        batch_size=request.batch_size,
        fixed_bytes=fixed_bytes(excluded_parameters(prep.model, prep.units)),
    )


def joint_space(
    prep: Prepared,
    weight_profile: Profile,
    units: Sequence[Unit],
    kv_profile: Profile,
    request: KVRequest,
    context_len: int,
) -> JointSpace:
    """:func:`joint_costs` with both profiles: what the joint problem is built from."""
    costs = joint_costs(prep, units, request, context_len)
    return JointSpace(
        **{f.name: getattr(costs, f.name) for f in dataclasses.fields(costs)},
        weight_profile=weight_profile,
        kv_profile=kv_profile,
    )


def _joint(prep, weight_profile, units, kv_prof, request, context, solver, options, ties):
    from bitalloc.planning import default_method

    method = default_method(weight_profile, solver)
    excluded = excluded_parameters(prep.model, prep.units)
    space = joint_space(prep, weight_profile, units, kv_prof, request, context)
    memory = request.memory_bytes
    problem = build_joint_problem(space, memory, ties=tie_groups(prep.units, ties))
    solution = solve(problem, method=method, **dict(options))
    weight_solution, kv_choice = split_solution(space, solution)
    numel = sum(u.numel for u in prep.units)
    weight_bits = sum(
        prep.palette[int(j)].storage_bits(u.shape)
        for u, j in zip(prep.units, weight_solution.choice)
    )
    weights = to_allocation(
        prep.units,
        prep.palette,
        weight_profile,
        weight_solution,
        weight_bits / numel,  # the split gave the weights this budget
        model=prep.loaded.source,
        excluded=excluded,
    )
    kv: KVAllocation = to_kv_allocation(
        units,
        request.palette,
        kv_prof,
        kv_choice,
        context_len=context,
        batch_size=request.batch_size,
        budget=None,
        solution=solution,
    )
    joint = JointBudget(
        memory_bytes=float(memory),
        minimum_bytes=space.memory_range()[0],
        fixed_bytes=space.fixed_bytes,
        weight_bytes=weights.data.bytes,
        kv_bytes=kv.bytes,
        total_bytes=space.fixed_bytes + weights.data.bytes + kv.bytes,
        weight_loss=float(weights.data.predicted_loss or 0.0),
        kv_loss=float(kv.predicted_loss or 0.0),
        separate=separate_splits(space, memory, method=method, options=options, ties=ties),
    )
    return weights.with_kv(kv, joint)


def keeping_kv(solve_with: Callable[[Profile], Allocation], allocation: Allocation):
    """``solve_with`` for verify-and-repair, keeping the KV formats of ``allocation``: repair
    re-solves the weights, the KV formats (chosen under their own budget) stay."""
    kv = allocation.data.kv

    def solve_keeping_kv(table: Profile) -> Allocation:
        return solve_with(table).with_kv(kv)

    return solve_keeping_kv


def allocate_kv_only(
    model: Any, config: AllocateConfig, request: KVRequest, *, tokenizer: object | None = None
) -> Allocation:
    """:func:`bitalloc.allocate` with ``kv_avg_bits`` and no ``avg_bits``: the weights stay at
    fp16 and are not profiled."""
    from bitalloc.stages import prepare_for
    from bitalloc.stages.verify import measure

    prep = prepare_for(model, config, tokenizer=tokenizer)
    allocation = allocate_with_kv(
        prep,
        None,
        request,
        solve_weights=lambda table: unquantized_weights(prep),
        solver=config.solve.solver,
        solver_options=dict(config.solve.options),
        ties=None,
        use_cache=config.profile.use_cache,
        progress=config.progress,
    )
    if config.verify.enabled:
        allocation = allocation.with_measured(
            measure(prep, allocation, eval_tokens=config.data.eval_tokens, progress=config.progress)
        )
    return allocation
