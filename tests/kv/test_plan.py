"""KV and joint weights + KV problems from profiles alone: costs, budgets, brute-force optima."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from bitalloc.errors import BitallocError, InfeasibleBudgetError
from bitalloc.formats import parse_palette
from bitalloc.kv.formats import kv_palette
from bitalloc.kv.plan import (
    JointSpace,
    build_joint_problem,
    build_kv_problem,
    check_kv_budget,
    fixed_bytes,
    kv_cost_table,
    kv_elements,
    kv_feasible_avg_bits,
    separate_splits,
    solve_separate,
    split_solution,
    to_kv_allocation,
)
from bitalloc.models import Unit
from bitalloc.planning import cost_table
from bitalloc.sensitivity import Profile
from bitalloc.solvers import solve

KV_PALETTE = kv_palette("K2V2,K4V2,K4V4,K8V8,K16V16")
W_PALETTE = parse_palette("int2-g32,int4-g32,int8-g32")


def kv_unit(layer: int, n_kv: int = 2, head_dim: int = 32) -> Unit:
    name = f"model.layers.{layer}.self_attn.kv"
    return Unit(
        name=name, shape=(2 * n_kv, head_dim), layer=layer, role="kv", group=name, kind="kv"
    )


def w_unit(layer: int, role: str, shape=(64, 64)) -> Unit:
    name = f"model.layers.{layer}.mlp.{role}"
    return Unit(name=name, shape=shape, layer=layer, role=role, group=name)


def profile_for(units, palette, seed: int) -> Profile:
    """Losses that fall as bits rise, different per unit."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.2, 2.0, size=(len(units), 1))
    bits = np.array([getattr(f, "avg_bits", None) or f.bits for f in palette], dtype=float)
    loss = (
        scale
        * np.exp(-bits / 2.0)[None, :]
        * rng.uniform(0.8, 1.2, size=(len(units), len(palette)))
    )
    loss[:, [i for i, f in enumerate(palette) if f.name in ("K16V16", "fp16")]] = 0.0
    return Profile(
        units=tuple(u.name for u in units),
        formats=tuple(f.name for f in palette),
        loss=loss,
        metadata={"method": "synthetic"},
    )


KV_UNITS = [kv_unit(i) for i in range(3)]
W_UNITS = [w_unit(0, "up_proj"), w_unit(0, "down_proj", (64, 96)), w_unit(1, "up_proj")]


def test_kv_costs_are_the_formats_cache_bits_and_scale_with_batch():
    table = kv_cost_table(KV_UNITS, KV_PALETTE, 200, 3)
    for j, fmt in enumerate(KV_PALETTE):
        assert table[0, j] == fmt.cache_bits(200, 3, 2, 32)
    assert np.array_equal(kv_cost_table(KV_UNITS, KV_PALETTE, 200, 6), 2 * table)
    lo, hi = kv_feasible_avg_bits(KV_UNITS, KV_PALETTE, 256)
    assert lo == pytest.approx(KV_PALETTE[0].bits_per_element(32, 2, 256))
    assert hi == 16.0


@pytest.mark.parametrize("budget", [1.0, 17.0])
def test_kv_budget_outside_the_range_names_it(budget):
    with pytest.raises(InfeasibleBudgetError, match="choose between") as err:
        check_kv_budget(budget, KV_UNITS, KV_PALETTE, 256)
    assert err.value.feasible_range == kv_feasible_avg_bits(KV_UNITS, KV_PALETTE, 256)
    with pytest.raises(BitallocError, match="finite number"):
        check_kv_budget(float("nan"), KV_UNITS, KV_PALETTE, 256)


def test_kv_budget_just_past_the_top_reads_as_outside():
    lo, hi = kv_feasible_avg_bits(KV_UNITS, KV_PALETTE, 256)
    with pytest.raises(InfeasibleBudgetError) as err:
        check_kv_budget(hi + 1e-7, KV_UNITS, KV_PALETTE, 256)
    # 16.0000001 against 16.0000000: both at seven decimals, not 16.0000 twice.
    assert "kv_avg_bits=16.0000001 " in str(err.value) and "16.0000000 (every" in str(err.value)


def test_kv_units_of_another_kind_and_bad_context_are_refused():
    with pytest.raises(BitallocError, match="not a KV unit"):
        kv_cost_table(W_UNITS, KV_PALETTE, 64)
    with pytest.raises(BitallocError, match="context_len must be a positive integer"):
        kv_cost_table(KV_UNITS, KV_PALETTE, 0)
    with pytest.raises(BitallocError, match="batch_size"):
        kv_cost_table(KV_UNITS, KV_PALETTE, 64, True)


def _brute(objective, cost, budget, allowed=None):
    n, k = objective.shape
    best = None
    for choice in itertools.product(range(k), repeat=n):
        if allowed is not None and not all(allowed[i, j] for i, j in enumerate(choice)):
            continue
        if sum(cost[i, j] for i, j in enumerate(choice)) <= budget + 1e-9:
            value = sum(objective[i, j] for i, j in enumerate(choice))
            best = value if best is None else min(best, value)
    return best


@pytest.mark.parametrize("bits", [3.0, 4.0, 6.0])
def test_kv_problem_reaches_the_brute_force_optimum(bits):
    prof = profile_for(KV_UNITS, KV_PALETTE, seed=1)
    problem = build_kv_problem(KV_UNITS, KV_PALETTE, prof, bits, context_len=256)
    solution = solve(problem, method="ilp")
    cost = kv_cost_table(KV_UNITS, KV_PALETTE, 256)
    budget = bits * kv_elements(KV_UNITS, 256)
    assert solution.objective == pytest.approx(_brute(prof.loss, cost, budget), abs=1e-12)
    alloc = to_kv_allocation(
        KV_UNITS, KV_PALETTE, prof, solution.choice, context_len=256, batch_size=1, budget=bits
    )
    alloc.check()
    assert alloc.avg_bits <= bits + 1e-9
    assert alloc.predicted_loss == pytest.approx(solution.objective)


def _space(batch: int = 2, context: int = 128) -> JointSpace:
    return JointSpace(
        weight_units=tuple(W_UNITS),
        weight_palette=W_PALETTE,
        weight_profile=profile_for(W_UNITS, W_PALETTE, seed=2),
        kv_units=tuple(KV_UNITS[:2]),
        kv_palette=KV_PALETTE,
        kv_profile=profile_for(KV_UNITS[:2], KV_PALETTE, seed=3),
        context_len=context,
        batch_size=batch,
        fixed_bytes=fixed_bytes({"embed": 1000, "norm": 64}),
    )


@pytest.mark.parametrize("fraction", [0.1, 0.35, 0.7])
def test_joint_problem_reaches_the_brute_force_optimum_and_splits(fraction):
    space = _space()
    lo, hi = space.memory_range()
    memory = lo + fraction * (hi - lo)
    problem = build_joint_problem(space, memory)
    # Weight units take weight formats only, KV units KV pairs only.
    assert not problem.allowed[:3, 3:].any() and not problem.allowed[3:, :3].any()
    solution = solve(problem, method="ilp")
    best = _brute(
        problem.objective, problem.costs["bytes"], memory - space.fixed_bytes, problem.allowed
    )
    assert solution.objective == pytest.approx(best, abs=1e-12)
    weights, kv_choice = split_solution(space, solution)
    assert weights.choice.max() < len(W_PALETTE) and kv_choice.min() >= 0
    w_bytes = sum(cost_table(W_UNITS, W_PALETTE)[i, j] / 8 for i, j in enumerate(weights.choice))
    kv_bytes = sum(space.kv_bytes()[i, j] for i, j in enumerate(kv_choice))
    assert space.fixed_bytes + w_bytes + kv_bytes <= memory * (1 + 1e-12)
    # Joint is never worse than any separate split at the same total.
    for split in separate_splits(space, memory, method="ilp"):
        assert solution.objective <= split.total_mixed + 1e-12
        assert split.total_mixed <= split.total_uniform + 1e-12


def test_separate_split_gives_the_kv_cache_its_share_and_the_weights_the_rest():
    space = _space()
    lo, hi = space.memory_range()
    memory = (lo + hi) / 2
    j = [f.name for f in KV_PALETTE].index("K4V4")
    weights, kv = solve_separate(space, memory, j, method="ilp")
    share = space.kv_bytes()[:, j].sum()
    assert kv.resources["bytes"] <= share + 1e-9
    assert weights.resources["bytes"] <= memory - space.fixed_bytes - share + 1e-9
    # A share that leaves the weights less than their cheapest formats is skipped.
    assert solve_separate(space, lo + 1, len(KV_PALETTE) - 1, method="ilp") is None


def test_memory_below_the_minimum_names_it():
    space = _space(batch=4, context=512)
    lo, hi = space.memory_range()
    with pytest.raises(InfeasibleBudgetError, match=r"below the minimum of [\d,]+ bytes") as err:
        build_joint_problem(space, lo * 0.9)
    assert err.value.feasible_range == (lo, hi)
    assert "512 tokens x batch 4" in str(err.value)
    for bad in (0, -5.0, float("inf"), True, "1e6"):
        with pytest.raises(BitallocError, match="memory_bytes must be a positive number"):
            space.check_memory(bad)
    # Above the richest total everything fits: the richest choice is taken.
    problem = build_joint_problem(space, hi * 2)
    solution = solve(problem, method="lagrangian")
    best = np.where(problem.allowed, problem.objective, np.inf).min(axis=1).sum()
    assert solution.objective == pytest.approx(best, abs=1e-12)
