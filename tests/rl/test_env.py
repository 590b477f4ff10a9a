import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from bitalloc.errors import BitallocError
from bitalloc.rl.env import AllocationEnv, RewardConfig, obs_dims
from bitalloc.solvers import Problem
from tests.solvers.brute import brute_force


def _problem(seed=0, n=8, k=4, fraction=0.5, **extra):
    rng = np.random.default_rng(seed)
    # Richer options cost more and lose less, as formats do.
    cost = np.sort(rng.integers(1, 20, (n, k)).astype(float), axis=1)
    objective = np.sort(rng.exponential(1.0, (n, k)), axis=1)[:, ::-1].copy()
    allowed = rng.random((n, k)) < 0.8
    allowed[:, 0] = True
    base = Problem(objective, {"bits": cost}, {}, allowed)
    low, high = base.feasible_range("bits")
    return Problem(
        objective, {"bits": cost}, {"bits": low + fraction * (high - low)}, allowed, **extra
    )


def _embeddings(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 11))


def _episode(env, policy):
    obs, _ = env.reset(seed=0)
    total, done, info = 0.0, False, {}
    while not done:
        obs, reward, done, truncated, info = env.step(np.array([policy(obs)], dtype=np.float32))
        assert obs.shape == (obs_dims(True),) and env.observation_space.contains(obs)
        total += reward
    return total, info


def test_gymnasium_checker_accepts_the_environment():
    problem = _problem()
    check_env(AllocationEnv(problem, _embeddings(problem.n_units)), skip_render_check=True)


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_every_episode_is_feasible_whatever_the_actions(fraction):
    problem = _problem(seed=3, fraction=fraction)
    env = AllocationEnv(problem, _embeddings(problem.n_units))
    rng = np.random.default_rng(0)
    for policy in (lambda o: 1.0, lambda o: -1.0, lambda o: rng.uniform(-1, 1)):
        for _ in range(5):
            _, info = _episode(env, policy)
            assert problem.is_feasible(info["choice"])
            assert problem.allowed[np.arange(problem.n_units), info["choice"]].all()


def test_overspending_is_projected_and_penalised():
    problem = _problem(seed=1, fraction=0.3)
    env = AllocationEnv(problem, _embeddings(problem.n_units))
    greedy, info = _episode(env, lambda o: 1.0)  # always asks for the richest option
    assert info["projected_steps"] > 0
    # The same choices without the overshoot penalty score higher.
    lenient = AllocationEnv(problem, _embeddings(problem.n_units), RewardConfig(overshoot=0.0))
    assert _episode(lenient, lambda o: 1.0)[0] > greedy


def test_quality_term_and_budget_cliff():
    problem = _problem(seed=2, fraction=0.8)
    cfg = RewardConfig(price=0.0, overshoot=0.0, undershoot=0.0, cliff=0.0)
    env = AllocationEnv(problem, _embeddings(problem.n_units), cfg, anchor="share")
    total, info = _episode(env, lambda o: -1.0)  # far below the even share everywhere
    expected = -(info["predicted"] - info["anchor_loss"]) / env.scale
    assert total == pytest.approx(expected)
    # Leaving most of the budget unused falls off the cliff.
    cliff = AllocationEnv(
        problem, _embeddings(problem.n_units), RewardConfig(price=0, cliff=3.0), anchor="share"
    )
    total_cliff, info = _episode(cliff, lambda o: -1.0)
    assert info["unused"] > 0.05
    assert total_cliff == pytest.approx(expected - info["unused"] - 3.0)


def test_budget_state_observations():
    problem = _problem(seed=4, fraction=0.5)
    env = AllocationEnv(problem, _embeddings(problem.n_units))
    obs, _ = env.reset()
    assert obs[-3] == 0.0 and obs[-2] == 0.0 and obs[-1] == pytest.approx(0.5)
    np.testing.assert_allclose(obs[:11], np.clip(_embeddings(problem.n_units)[0], -5, 5), rtol=1e-6)
    obs, *_ = env.step(np.array([-1.0], dtype=np.float32))
    assert obs[-3] == pytest.approx(1 / problem.n_units) and obs[-2] > 0


def test_profile_view_reports_sensitivity_and_marginal_rates():
    problem = _problem(seed=6, fraction=0.5)
    env = AllocationEnv(problem, _embeddings(problem.n_units))
    bare = AllocationEnv(problem, _embeddings(problem.n_units), observe_profile=False)
    assert env.obs_dims == obs_dims(True) == 17 and bare.obs_dims == obs_dims(False) == 14
    obs, _ = env.reset()
    assert bare.reset()[0].shape == (14,)
    # Sensitivity: the z-scored log loss at the cheapest option, in the same order as the losses.
    cheapest = np.array([problem.objective[i, o[0]] for i, o in enumerate(env.options)])
    order = np.argsort(cheapest)
    assert np.all(np.diff(env.view.sensitivity[order]) >= 0)
    # The rates around the neutral option, by hand, against the current multiplier.
    options, cost, loss = env.options[0], env.cost, problem.objective
    k, lam = env._neutral(0), env._multiplier(0)
    d_loss = np.maximum(loss[0, options[:-1]] - loss[0, options[1:]], 1e-30)
    rates = np.log10(d_loss / np.diff(cost[0, options]))
    assert 0 < k < len(options) - 1  # a budget at half the range starts mid-palette
    assert obs[12] == pytest.approx(np.clip(rates[k] - np.log10(lam), -5, 5), rel=1e-5)
    assert obs[13] == pytest.approx(np.clip(rates[k - 1] - np.log10(lam), -5, 5), rel=1e-5)
    # At the Lagrangian choice a richer option is not worth its price and a cheaper one is not
    # worth its saving.
    assert obs[12] <= 1e-9 and obs[13] >= -1e-9
    # At the richest option there is nothing to gain; at the cheapest nothing to save.
    assert env.view.features(0, len(options) - 1, lam)[1] == -5.0
    assert env.view.features(0, 0, lam)[2] == 5.0


def test_measured_quality_every_n_episodes():
    problem = _problem(seed=5)
    calls = []

    def measure(choice):
        calls.append(choice)
        return problem.objective_of(choice) + 0.5

    env = AllocationEnv(
        problem, _embeddings(problem.n_units), RewardConfig(measure_every=2), measure
    )
    first, info1 = _episode(env, lambda o: 0.0)
    second, info2 = _episode(env, lambda o: 0.0)
    assert "measured" not in info1 and info2["measured"] == pytest.approx(info2["predicted"] + 0.5)
    assert len(calls) == 1 and second == pytest.approx(first - 0.5 / env.scale)


def test_bad_inputs_raise():
    problem = _problem()
    with pytest.raises(BitallocError, match=r"embeddings must be finite of shape \(8, 11\)"):
        AllocationEnv(problem, np.zeros((8, 10)))
    with pytest.raises(BitallocError, match="without ties or pins"):
        AllocationEnv(_problem(pins={0: 0}), _embeddings(8))
    rng = np.random.default_rng(0)
    two = Problem(
        rng.random((3, 2)),
        {"bits": np.ones((3, 2)), "bytes": np.ones((3, 2))},
        {"bits": 5.0, "bytes": 5.0},
    )
    with pytest.raises(BitallocError, match="exactly one budget"):
        AllocationEnv(two, _embeddings(3))
    with pytest.raises(BitallocError, match="needs a measure function"):
        AllocationEnv(problem, _embeddings(8), RewardConfig(measure_every=3))
    with pytest.raises(
        BitallocError, match="unknown anchor 'even'; choose one of lagrangian, share"
    ):
        AllocationEnv(problem, _embeddings(8), anchor="even")
    with pytest.raises(BitallocError, match="cliff_tolerance"):
        RewardConfig(cliff_tolerance=1.5)
    env = AllocationEnv(problem, _embeddings(8))
    _episode(env, lambda o: 0.0)
    with pytest.raises(BitallocError, match="call reset"):
        env.step(np.array([0.0], dtype=np.float32))


@pytest.mark.parametrize("fraction", [0.3, 0.7])
def test_neutral_action_spends_the_budget_evenly(fraction):
    problem = _problem(seed=6, n=12, fraction=fraction)
    env = AllocationEnv(problem, _embeddings(problem.n_units), anchor="share")
    _, info = _episode(env, lambda o: 0.0)
    # Options are discrete: the nearest one to the share may overshoot once near the end.
    assert info["projected_steps"] <= 1 and info["unused"] < 0.15
    # Asking for more than the share everywhere runs into the budget and gets projected.
    _, greedy = _episode(env, lambda o: 0.8)
    assert greedy["projected_steps"] > 0


@pytest.mark.parametrize("seed", range(6))
def test_zero_actions_on_the_lagrangian_anchor_are_optimal_at_its_budgets(seed):
    # Everett: a Lagrangian choice is optimal for the budget it spends. With the budget set to
    # what the anchor's choice at some multiplier costs, zero actions must return that choice.
    rng = np.random.default_rng(seed)
    n, k = 7, 4
    cost = np.sort(rng.integers(1, 30, (n, k)).astype(float), axis=1)
    objective = np.sort(rng.exponential(1.0, (n, k)), axis=1)[:, ::-1].copy()
    probe = AllocationEnv(Problem(objective, {"bits": cost}, {"bits": cost.sum()}), _embeddings(n))
    anchor = probe.lagrangian
    g = int(rng.integers(0, anchor.grid.size))
    problem = Problem(objective, {"bits": cost}, {"bits": float(anchor.rest[0, g])})
    env = AllocationEnv(problem, _embeddings(n))
    _, info = _episode(env, lambda o: 0.0)
    assert info["projected_steps"] == 0
    assert problem.objective_of(info["choice"]) == pytest.approx(brute_force(problem))


def test_actions_move_the_lagrangian_choice_monotonically():
    problem = _problem(seed=7, n=10, k=6, fraction=0.5)
    env = AllocationEnv(problem, _embeddings(problem.n_units))
    env.reset()
    for i in range(problem.n_units):
        costs = [env.cost[i, env.option_for(i, a)] for a in np.linspace(-1, 1, 9)]
        assert costs == sorted(costs)
    assert env.cost[0, env.option_for(0, 1.0)] > env.cost[0, env.option_for(0, -1.0)]


def test_the_price_term_charges_bits_moved_from_the_anchor():
    problem = _problem(seed=8, n=10, k=5, fraction=0.5)
    cfg = RewardConfig(overshoot=0.0, undershoot=0.0, cliff=0.0)
    env = AllocationEnv(problem, _embeddings(problem.n_units), cfg)
    # Zero actions take the anchor's choice: nothing is charged beyond the quality term.
    total, info = _episode(env, lambda o: 0.0)
    assert info["projected_steps"] == 0
    assert total == 0.0 and info["predicted"] == pytest.approx(info["anchor_loss"])
    # One richer step is charged its extra bits at the current multiplier.
    env.reset()
    lam, anchor = env._multiplier(0), env.option_for(0, 0.0)
    _, reward, *_ = env.step(np.array([1.0], dtype=np.float32))
    j = env.choice[0]
    assert env.cost[0, j] > env.cost[0, anchor]
    quality = -(problem.objective[0, j] - problem.objective[0, anchor]) / env.scale
    assert reward == pytest.approx(
        quality - lam * (env.cost[0, j] - env.cost[0, anchor]) / env.scale
    )
