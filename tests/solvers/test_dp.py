"""DPSolver against brute force, its discretization guarantees, special cases and options."""

from __future__ import annotations

import numpy as np
import pytest

from bitalloc.errors import BitallocError
from bitalloc.solvers import ILPSolver, LagrangianSolver, Problem
from bitalloc.solvers.dp import DPSolver
from tests.solvers.brute import brute_force


def random_problem(seed: int, fraction: float, integer: bool) -> Problem:
    """Small random instance; budget at ``fraction`` of the feasible range of ``"bits"``."""
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(1, 7)), int(rng.integers(1, 5))
    objective = rng.exponential(1.0, (n, k))
    if seed % 4 == 0:
        objective = rng.integers(0, 3, (n, k)).astype(float)  # many exact ties
    if integer:
        # Even costs on some seeds: the automatic step is then 2 (or more), not 1.
        cost = rng.integers(0, 9, (n, k)) * (2 if seed % 3 == 0 else 1)
    else:
        cost = rng.uniform(0.0, 10.0, (n, k))
    if seed % 4 != 3:
        objective = objective - 0.2 * cost  # dearer tends to be better, so budgets bind
    allowed = rng.random((n, k)) < 0.7
    allowed[np.arange(n), rng.integers(0, k, n)] = True
    costs = {"bits": cost.astype(float), "other": rng.random((n, k))}
    low, high = Problem(objective, costs, {}, allowed).feasible_range("bits")
    return Problem(objective, costs, {"bits": low + fraction * (high - low)}, allowed)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
def test_integer_costs_match_brute_force(fraction):
    for seed in range(30):
        problem = random_problem(seed, fraction, integer=True)
        sol = DPSolver().solve(problem)
        assert problem.is_feasible(sol.choice)
        assert sol.status == "optimal"
        assert sol.objective == pytest.approx(brute_force(problem), abs=1e-9)
        if sol.info["case"] == "dp":
            assert sol.info["exact"] is True


@pytest.mark.parametrize("max_bins", [1, 3, 10, 40])
def test_real_costs_bound_and_feasible(max_bins):
    for seed in range(30):
        problem = random_problem(seed, 0.1 + 0.8 * (seed % 5) / 4, integer=False)
        for fill in (True, False):
            sol = DPSolver(max_bins=max_bins, fill=fill).solve(problem)
            best = brute_force(problem)
            assert problem.is_feasible(sol.choice)
            assert sol.lower_bound <= best + 1e-9
            assert best <= sol.objective + 1e-9
            if sol.info["case"] == "dp":
                assert sol.info["bound_dp_objective"] <= best + 1e-9
                assert sol.info["primal_dp_objective"] >= best - 1e-9


def test_gap_shrinks_as_max_bins_grows():
    # Doubling max_bins halves the bin, so the finer ceil DP can take every coarse choice and
    # every choice of the finer floor DP is feasible for the coarse one: the DP gap never grows.
    rng = np.random.default_rng(7)
    n, k = 40, 6
    cost = rng.uniform(1.0, 50.0, (n, k))
    objective = rng.exponential(1.0, (n, k))
    low, high = Problem(objective, {"bits": cost}).feasible_range("bits")
    problem = Problem(objective, {"bits": cost}, {"bits": low + 0.4 * (high - low)})
    dp_gaps, gaps = [], []
    for max_bins in (16, 32, 64, 128, 256, 512, 1024, 2048):
        sol = DPSolver(max_bins=max_bins).solve(problem)
        assert problem.is_feasible(sol.choice)
        dp_gaps.append(sol.info["primal_dp_objective"] - sol.info["bound_dp_objective"])
        gaps.append(sol.gap)
        assert sol.gap <= dp_gaps[-1] + 1e-9  # fill and the LP bound only tighten it
    assert all(b <= a + 1e-9 for a, b in zip(dp_gaps, dp_gaps[1:]))
    assert dp_gaps[-1] < dp_gaps[0]
    assert gaps[-1] <= gaps[0] + 1e-9


def test_integer_instance_reports_exact_and_step():
    rng = np.random.default_rng(3)
    cost = rng.integers(1, 6, (6, 4)).astype(float) * 3.0  # every cost a multiple of 3
    cost[:, 0] = 3.0
    cost[0, 1:] = [6.0, 9.0, 15.0]  # extra costs 3, 6, 12: their common step is 3
    objective = rng.exponential(1.0, (6, 4))
    problem = Problem(objective, {"bits": cost}, {"bits": float(cost[:, 0].sum() + 10)})
    sol = DPSolver().solve(problem)
    assert sol.info["exact"] is True
    assert sol.info["resolution"] == 3.0
    assert sol.info["resolution_source"] == "common_step"
    assert sol.info["bins"] == 3  # floor(10 / 3)
    assert sol.status == "optimal"
    assert sol.gap == 0.0
    assert sol.objective == pytest.approx(brute_force(problem), abs=1e-12)


def test_power_of_two_and_decimal_steps_are_exact():
    rng = np.random.default_rng(4)
    quarters = rng.integers(0, 20, (5, 4)) * 0.25
    objective = rng.exponential(1.0, (5, 4)) - quarters  # dearer is better: the budget binds
    low, high = Problem(objective, {"bits": quarters}).feasible_range("bits")
    problem = Problem(objective, {"bits": quarters}, {"bits": (low + high) / 2})
    sol = DPSolver().solve(problem)
    assert sol.info["exact"] is True and sol.status == "optimal"
    assert sol.objective == pytest.approx(brute_force(problem), abs=1e-12)

    # Tenths are not exact in binary: the automatic step misses them, an explicit
    # resolution=0.1 finds them (quotients like 2.9999999999999996 snap to 3).
    tenths = rng.integers(0, 20, (5, 4)) * 0.1
    objective = rng.exponential(1.0, (5, 4)) - tenths
    low, high = Problem(objective, {"bits": tenths}).feasible_range("bits")
    problem = Problem(objective, {"bits": tenths}, {"bits": low + 0.4 * (high - low)})
    assert DPSolver().solve(problem).info["resolution_source"] == "room/max_bins"
    sol = DPSolver(resolution=0.1).solve(problem)
    assert sol.info["exact"] is True and sol.status == "optimal"
    assert sol.objective == pytest.approx(brute_force(problem), abs=1e-12)


def test_unbudgeted_and_non_binding():
    rng = np.random.default_rng(5)
    objective = rng.exponential(1.0, (6, 3))
    objective[0] = [1.0, 1.0, 2.0]  # tie: the cheaper option wins
    cost = rng.integers(1, 9, (6, 3)).astype(float)
    cost[0, :2] = [5.0, 2.0]
    free = Problem(objective, {"bits": cost})
    sol = DPSolver().solve(free)
    assert sol.info["case"] == "unconstrained"
    assert sol.status == "optimal"
    assert sol.choice[0] == 1
    assert sol.objective == pytest.approx(brute_force(free))

    loose = Problem(objective, {"bits": cost}, {"bits": free.max_resource("bits")})
    sol = DPSolver().solve(loose)
    assert sol.info["case"] == "unconstrained"
    assert sol.info["budgets_not_binding"] == ["bits"]
    assert sol.status == "optimal"
    assert sol.objective == pytest.approx(brute_force(loose))


def test_budget_at_cheapest_total():
    problem = random_problem(11, 0.0, integer=False)
    low = problem.min_resource("bits")
    for budget in (low, low * (1 - 1e-12)):  # the second passes solve()'s tolerance
        tight = Problem(problem.objective, problem.costs, {"bits": budget}, problem.allowed)
        sol = DPSolver().solve(tight)
        assert tight.is_feasible(sol.choice)
        assert sol.objective == pytest.approx(brute_force(tight), abs=1e-9)


def test_many_options_fixed_units_ties_and_pins():
    rng = np.random.default_rng(6)
    n, k = 4, 300  # more than 256 options: 2-byte back-pointers
    objective = rng.exponential(1.0, (n, k))
    cost = rng.integers(0, 50, (n, k)).astype(float)
    allowed = rng.random((n, k)) < 0.1
    allowed[:, 0] = True
    allowed[2] = False
    allowed[2, 7] = True  # a unit with a single option skips the DP
    low, high = Problem(objective, {"bits": cost}, {}, allowed).feasible_range("bits")
    problem = Problem(objective, {"bits": cost}, {"bits": (low + high) / 2}, allowed)
    sol = DPSolver().solve(problem)
    assert sol.status == "optimal"
    assert sol.objective == pytest.approx(brute_force(problem), abs=1e-9)

    shared = allowed.copy()
    shared[1] = shared[0]
    tied = Problem(
        objective, {"bits": cost}, {"bits": (low + high) / 2}, shared, ties=[[0, 1]], pins={3: 0}
    )
    sol = DPSolver().solve(tied)
    assert sol.choice[0] == sol.choice[1] and sol.choice[3] == 0
    assert sol.status == "optimal"
    assert sol.objective == pytest.approx(brute_force(tied), abs=1e-9)


def test_deterministic():
    for seed in range(6):
        problem = random_problem(seed, 0.5, integer=seed % 2 == 0)
        first, second = DPSolver(max_bins=7).solve(problem), DPSolver(max_bins=7).solve(problem)
        assert np.array_equal(first.choice, second.choice)
        assert first.lower_bound == second.lower_bound


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"resolution": 0.0}, "resolution"),
        ({"resolution": -1.0}, "resolution"),
        ({"resolution": float("inf")}, "resolution"),
        ({"resolution": True}, "resolution"),
        ({"resolution": "1"}, "resolution"),
        ({"max_bins": 0}, "max_bins"),
        ({"max_bins": True}, "max_bins"),
        ({"max_bins": 10.0}, "max_bins"),
        ({"max_memory_bytes": 0}, "max_memory_bytes"),
        ({"max_memory_bytes": False}, "max_memory_bytes"),
        ({"fill": 1}, "fill"),
    ],
)
def test_option_validation(options, match):
    with pytest.raises(BitallocError, match=match):
        DPSolver(**options)


def test_accepts_int_resolution_and_numpy_ints():
    solver = DPSolver(resolution=2, max_bins=np.int64(50), max_memory_bytes=10**6)
    assert solver.resolution == 2.0 and solver.max_bins == 50


def test_memory_guard_and_bin_limit():
    problem = bits_problem(30, 1, 0.5)
    n = problem.n_units
    assert DPSolver().solve(problem).info["case"] == "dp"
    with pytest.raises(BitallocError, match="max_memory_bytes") as caught:
        DPSolver(max_memory_bytes=1).solve(problem)
    assert "lagrangian" in str(caught.value)
    # An explicit resolution that needs more memory is refused, naming what to change.
    room = problem.budgets["bits"] - problem.min_resource("bits")
    with pytest.raises(BitallocError, match="max_memory_bytes") as caught:
        DPSolver(resolution=room / 100, max_bins=100, max_memory_bytes=n * 50).solve(problem)
    assert "max_bins" in str(caught.value) and "lagrangian" in str(caught.value)
    # An automatic resolution shrinks the bins to fit instead.
    fitted = DPSolver(max_memory_bytes=n * 51).solve(problem)
    assert fitted.info["bins"] <= 50 and problem.is_feasible(fitted.choice)

    with pytest.raises(BitallocError, match="max_bins"):
        DPSolver(resolution=room / 100, max_bins=10).solve(problem)
    # Big enough exactly: n units x (bins + 1) one-byte pointers.
    sol = DPSolver(resolution=room / 10, max_bins=10, max_memory_bytes=n * 11).solve(problem)
    assert problem.is_feasible(sol.choice)


def bits_problem(n: int, seed: int, fraction: float) -> Problem:
    """``n`` weight matrices x 8 integer bit widths; cost = stored bits = numel * bits."""
    rng = np.random.default_rng(seed)
    bits = np.array([2, 3, 4, 5, 6, 8, 12, 16], dtype=float)
    numel = rng.integers(1, 4, n) * 4096
    cost = numel[:, None] * bits
    scale = rng.lognormal(0.0, 1.0, n)
    objective = scale[:, None] * numel[:, None] * 2.0 ** (-2 * bits) * rng.uniform(0.8, 1.2, (n, 8))
    low, high = cost.min(axis=1).sum(), cost.max(axis=1).sum()
    return Problem(objective, {"bits": cost}, {"bits": low + fraction * (high - low)})


def test_larger_instance_agrees_with_lagrangian():
    problem = bits_problem(2000, 0, 0.2)
    sol = DPSolver().solve(problem)
    lagrangian = LagrangianSolver().solve(problem)
    assert problem.is_feasible(sol.choice)
    assert sol.info["exact"] is True and sol.status == "optimal"
    assert sol.info["resolution"] == 4096.0
    scale = abs(lagrangian.objective)
    assert sol.objective >= lagrangian.lower_bound - 1e-9 * scale
    assert sol.objective <= lagrangian.objective + 1e-9 * scale

    # Same instance with too few bins for the exact step: inexact but certified.
    coarse = DPSolver(max_bins=500).solve(problem)
    assert coarse.info["exact"] is False and problem.is_feasible(coarse.choice)
    assert coarse.lower_bound <= sol.objective + 1e-9 * scale <= coarse.objective + 2e-9 * scale
    assert coarse.lower_bound >= lagrangian.lower_bound - 1e-9 * scale
    # With four units per bin the DP's rounded-up choice loses to the Lagrangian one, which the
    # solver then returns (and says so): dp is never worse than lagrangian when inexact.
    lagrangian_wins = 0
    for seed in range(3):
        dense = bits_problem(2000, seed, 0.2)
        inexact = DPSolver(max_bins=500).solve(dense)
        reference = LagrangianSolver().solve(dense)
        assert inexact.objective <= reference.objective + 1e-12 * abs(reference.objective)
        assert inexact.info["primal"] in ("dp", "lagrangian")
        lagrangian_wins += inexact.info["primal"] == "lagrangian"
    assert lagrangian_wins >= 1


def fractional_bits_problem(seed: int, avg_bits: float) -> Problem:
    """40 units x 5 formats of fractional bits (2.125 ... 8.5 plus odd 64ths) on real shapes:
    no common step fits in the default bins, so the first DP is inexact."""
    rng = np.random.default_rng(seed)
    shapes = [(576, 576), (576, 192), (576, 1536), (1536, 576)]
    numel = np.array([np.prod(shapes[i % 4]) for i in range(40)], dtype=float)
    bits = np.array([2.125, 3.25, 4.5, 5.5625, 8.5]) + rng.choice([0, 1 / 64, 1 / 32], 5)
    cost = numel[:, None] * bits
    objective = rng.lognormal(0, 1.5, (40, 1)) * 4.0**-bits * rng.uniform(1.0, 1.1, (40, 5))
    return Problem(objective, {"bits": cost}, {"bits": avg_bits * numel.sum()})


def test_refinement_closes_the_gap_on_fractional_bits():
    # At defaults the coarse bins left up to 3.4e-3 between dp and the optimum on such
    # instances; the second DP over the options that can still win is exact here.
    checked = 0
    for seed in range(6):
        for avg_bits in (3.25, 4.0, 6.0):
            problem = fractional_bits_problem(seed, avg_bits)
            coarse = DPSolver(refine=False).solve(problem)
            if coarse.info["exact"]:
                continue
            checked += 1
            sol = DPSolver().solve(problem)
            best = ILPSolver().solve(problem).objective
            assert problem.is_feasible(sol.choice)
            assert sol.gap <= 1e-4 * sol.objective
            assert sol.objective <= best + sol.gap + 1e-12 * best
            assert sol.lower_bound <= best * (1 + 1e-9)
            assert sol.objective <= coarse.objective and sol.gap <= coarse.gap
    assert checked >= 5


def test_refine_option_is_checked():
    with pytest.raises(BitallocError, match="refine must be True or False"):
        DPSolver(refine=1)
