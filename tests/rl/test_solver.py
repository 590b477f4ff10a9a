import json

import numpy as np
import pytest
import torch

from bitalloc.errors import BitallocError
from bitalloc.rl.solver import problem_features
from bitalloc.solvers import Problem, solve
from tests.solvers.brute import brute_force

FAST = {"steps": 150, "learning_starts": 50}
# For tests that need a run to finish and care nothing for the policy it learns.
TINY = {"steps": 24, "learning_starts": 12}


def _problem(seed=0, n=6, k=4, fraction=0.5, names=True):
    rng = np.random.default_rng(seed)
    cost = np.sort(rng.integers(1, 20, (n, k)).astype(float), axis=1)
    objective = np.sort(rng.exponential(1.0, (n, k)), axis=1)[:, ::-1].copy()
    base = Problem(objective, {"bits": cost}, {})
    low, high = base.feasible_range("bits")
    extra = {"option_names": [f"int{b}-g64" for b in (2, 3, 4, 8)][:k]} if names else {}
    return Problem(objective, {"bits": cost}, {"bits": low + fraction * (high - low)}, **extra)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One trained and saved policy for the tests that need "a trained policy": the problem,
    the solution of training, and the policy's path."""
    problem = _problem(seed=1, fraction=0.6)
    path = tmp_path_factory.mktemp("rl") / "policy.zip"
    return problem, solve(problem, method="rl", save_policy=str(path), **FAST), path


def test_trains_and_reports_what_it_did(trained):
    problem, sol, path = trained
    assert problem.is_feasible(sol.choice)
    assert sol.lower_bound is None and sol.status == "feasible"
    assert sol.info["trained"] and sol.info["steps"] == 150 and sol.info["episodes"] == 25
    assert sol.info["features"] == "problem"
    assert sol.objective <= sol.info["policy_objective"] + 1e-12
    assert sol.objective >= brute_force(problem) - 1e-9
    assert sol.info["saved_policy"] == str(path)


def test_same_seed_trains_the_same_policy(tmp_path):
    # The determinism the solver contract relies on without training twice itself: one seed,
    # one policy, to the last bit of every weight (a tiny run, but one that updates them).
    from stable_baselines3 import SAC

    problem = _problem(seed=6)
    runs = []
    for name in ("a.zip", "b.zip"):
        sol = solve(problem, method="rl", save_policy=str(tmp_path / name), **TINY)
        runs.append((sol, SAC.load(str(tmp_path / name), device="cpu")))
    (first, model), (second, again) = runs
    assert model._n_updates > 0
    assert np.array_equal(first.choice, second.choice)
    for key in ("policy_objective", "best_episode_objective", "episodes", "source"):
        assert first.info[key] == second.info[key]
    weights, other = model.policy.state_dict(), again.policy.state_dict()
    assert weights.keys() == other.keys()
    assert all(torch.equal(weights[k], other[k]) for k in weights)


def test_training_writes_no_logger_folder(tmp_path, monkeypatch):
    # SB3 makes an empty tempdir/SB3-<time> folder for every run that has no logger of its own;
    # a search that trains hundreds of policies would leave hundreds.
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("SB3_LOGDIR", raising=False)
    solve(_problem(seed=2), method="rl", **TINY)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("SB3-")]


def test_longer_training_never_returns_worse():
    # With the same seed and warm-up, a longer run replays the shorter one first, and the solver
    # keeps the best episode it has seen.
    problem = _problem(seed=3, n=8)
    short = solve(problem, method="rl", steps=64, learning_starts=40)
    long = solve(problem, method="rl", steps=128, learning_starts=40)
    assert long.info["best_episode_objective"] <= short.info["best_episode_objective"] + 1e-12
    assert brute_force(problem) - 1e-9 <= long.objective <= long.info["best_episode_objective"]


def test_saved_policy_transfers_to_another_budget(trained):
    problem, sol, path = trained
    meta = json.loads(path.with_name("policy.zip.json").read_text())
    assert meta["features"] == "problem" and meta["palette"][0] == "int2-g64"
    assert meta["observe_profile"] and meta["obs_dims"] == 17 and meta["anchor"] == "lagrangian"
    # Same problem: the policy's own allocation comes back without training.
    again = solve(problem, method="rl", policy=str(path))
    assert not again.info["trained"] and again.objective == pytest.approx(
        sol.info["policy_objective"]
    )
    # Another budget: feasible without training.
    tighter = _problem(seed=1, fraction=0.3)
    moved = solve(tighter, method="rl", policy=str(path))
    assert tighter.is_feasible(moved.choice) and not moved.info["trained"]


def test_model_embeddings_and_tie_groups():
    rng = np.random.default_rng(0)
    problem = _problem(seed=2)
    tied = Problem(
        problem.objective,
        problem.costs,
        problem.budgets,
        ties=[[0, 1]],
        option_names=problem.option_names,
    )
    sol = solve(tied, method="rl", embeddings=rng.normal(size=(6, 11)), **TINY)
    assert sol.info["features"] == "model" and sol.choice[0] == sol.choice[1]
    assert tied.is_feasible(sol.choice)


def test_policy_mismatches_are_refused(trained, tmp_path):
    problem, _, shared = trained
    # A copy: this test edits the description beside the policy.
    path = tmp_path / "p.zip"
    path.write_bytes(shared.read_bytes())
    (tmp_path / "p.zip.json").write_bytes(shared.with_name("policy.zip.json").read_bytes())
    other_palette = Problem(
        problem.objective,
        problem.costs,
        problem.budgets,
        option_names=["int2-g32", "int3-g32", "int4-g32", "int8-g32"],
    )
    with pytest.raises(BitallocError, match="trained on the palette int2-g64"):
        solve(other_palette, method="rl", policy=str(path))
    with pytest.raises(BitallocError, match="trained on problem features"):
        solve(problem, method="rl", policy=str(path), embeddings=np.zeros((6, 11)))
    with pytest.raises(BitallocError, match="trained with the profile view; pass observe_profile"):
        solve(problem, method="rl", policy=str(path), observe_profile=False)
    with pytest.raises(BitallocError, match="acts relative to the 'lagrangian' anchor"):
        solve(problem, method="rl", policy=str(path), anchor="share")
    meta_path = tmp_path / "p.zip.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "obs_dims": 12}))
    with pytest.raises(BitallocError, match="observes 12 values"):
        solve(problem, method="rl", policy=str(path))
    meta_path.unlink()
    with pytest.raises(BitallocError, match="does not exist"):
        solve(problem, method="rl", policy=str(path))
    with pytest.raises(BitallocError, match="does not exist"):
        solve(problem, method="rl", policy=str(tmp_path / "none.zip"))


def test_bad_options_raise():
    problem = _problem()
    with pytest.raises(BitallocError, match=r"embeddings must be \(n_units, 11\)"):
        solve(problem, method="rl", embeddings=np.zeros((6, 3)))
    with pytest.raises(BitallocError, match="embeddings describe 5 units"):
        solve(problem, method="rl", embeddings=np.zeros((5, 11)))
    with pytest.raises(BitallocError, match="unknown anchor 'middle'"):
        solve(problem, method="rl", anchor="middle")
    with pytest.raises(BitallocError, match="steps must be at least 1"):
        solve(problem, method="rl", steps=0)
    with pytest.raises(BitallocError, match="bad reward option"):
        solve(problem, method="rl", reward={"greed": 1.0})
    with pytest.raises(BitallocError, match="pass one"):
        solve(problem, method="rl", policy="a.zip", save_policy="b.zip")
    with pytest.raises(BitallocError, match="ends in .zip"):
        # Refused before training: every training step is spent before the policy is saved.
        solve(problem, method="rl", save_policy="policy.pt", steps=10**6)


def test_problem_features_are_scaled_and_ordered():
    problem = _problem(seed=5, n=7)
    f = problem_features(problem)
    assert f.shape == (7, 11) and np.isfinite(f).all() and np.abs(f).max() <= 5
    assert f[0, 0] == 0 and f[-1, 0] == 1
    np.testing.assert_allclose(f[:, 2].mean(), 0, atol=1e-12)
