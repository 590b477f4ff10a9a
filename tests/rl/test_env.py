import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from bitalloc.errors import BitallocError
from bitalloc.rl.env import OBS_DIMS, AllocationEnv, RewardConfig
from bitalloc.solvers import Problem


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
        assert obs.shape == (OBS_DIMS,) and env.observation_space.contains(obs)
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
    cfg = RewardConfig(overshoot=0.0, undershoot=0.0, cliff=0.0)
    env = AllocationEnv(problem, _embeddings(problem.n_units), cfg)
    total, info = _episode(env, lambda o: -1.0)  # cheapest everywhere
    expected = -(info["predicted"] - env.loss_min.sum()) / env.scale
    assert total == pytest.approx(expected)
    # Leaving most of the budget unused falls off the cliff.
    cliff = AllocationEnv(problem, _embeddings(problem.n_units), RewardConfig(cliff=3.0))
    total_cliff, info = _episode(cliff, lambda o: -1.0)
    assert info["unused"] > 0.05
    assert total_cliff == pytest.approx(expected - info["unused"] - 3.0)


def test_budget_state_observations():
    problem = _problem(seed=4, fraction=0.5)
    env = AllocationEnv(problem, _embeddings(problem.n_units))
    obs, _ = env.reset()
    assert obs[11] == 0.0 and obs[12] == 0.0 and obs[13] == pytest.approx(0.5)
    np.testing.assert_allclose(obs[:11], np.clip(_embeddings(problem.n_units)[0], -5, 5), rtol=1e-6)
    obs, *_ = env.step(np.array([-1.0], dtype=np.float32))
    assert obs[11] == pytest.approx(1 / problem.n_units) and obs[12] > 0


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
    with pytest.raises(BitallocError, match="cliff_tolerance"):
        RewardConfig(cliff_tolerance=1.5)
    env = AllocationEnv(problem, _embeddings(8))
    _episode(env, lambda o: 0.0)
    with pytest.raises(BitallocError, match="call reset"):
        env.step(np.array([0.0], dtype=np.float32))


@pytest.mark.parametrize("fraction", [0.3, 0.7])
def test_neutral_action_spends_the_budget_evenly(fraction):
    problem = _problem(seed=6, n=12, fraction=fraction)
    env = AllocationEnv(problem, _embeddings(problem.n_units))
    _, info = _episode(env, lambda o: 0.0)
    # Options are discrete: the nearest one to the share may overshoot once near the end.
    assert info["projected_steps"] <= 1 and info["unused"] < 0.15
    # Asking for more than the share everywhere runs into the budget and gets projected.
    _, greedy = _episode(env, lambda o: 0.8)
    assert greedy["projected_steps"] > 0
