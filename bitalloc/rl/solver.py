"""The ``rl`` method of the solver protocol: RAMP's SAC allocator.

Without a ``policy`` the solver trains SAC on the problem itself and returns the better of the
trained policy's deterministic allocation and the best episode seen while training (both are
feasible: the environment never overspends). With ``policy=path`` it applies a policy trained
elsewhere (another model, another budget) without training: zero-shot transfer.

Unit features: ``embeddings`` (``(n_units, 11)``, from
:func:`bitalloc.rl.embedding.unit_embeddings`) describe units in terms that carry across
models. Without them the solver derives 11 features from the problem alone
(:func:`problem_features`), which serve training on that problem but do not transfer; a policy
records which kind it was trained on and refuses the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from bitalloc.errors import BitallocError
from bitalloc.rl.env import ANCHORS, EMBEDDING_SIZE, RewardConfig
from bitalloc.solvers.base import BaseSolver, SolverOutput
from bitalloc.solvers.problem import Problem
from bitalloc.solvers.registry import register_solver

MODEL_FEATURES = "model"
PROBLEM_FEATURES = "problem"


def problem_features(problem: Problem) -> np.ndarray:
    """11 features per unit from the problem alone, z-scored within it where scale-dependent:
    position, size (log cheapest cost), log loss at the cheapest, middle and richest allowed
    options, the log ratio of cheapest to richest loss, log cost ratio, the share of allowed
    options; the last three are zero."""
    n, k = problem.n_units, problem.n_options
    (name,) = problem.budgets or {"": 0.0}
    cost = problem.costs[name] if name else np.ones((n, k))
    out = np.zeros((n, EMBEDDING_SIZE))
    out[:, 0] = np.arange(n) / max(n - 1, 1)
    for i in range(n):
        options = np.flatnonzero(problem.allowed[i])
        options = options[np.argsort(cost[i, options], kind="stable")]
        losses = np.log(np.maximum(problem.objective[i, options], 1e-12))
        out[i, 1] = np.log(max(cost[i, options[0]], 1e-12))
        out[i, 2], out[i, 3], out[i, 4] = losses[0], losses[len(losses) // 2], losses[-1]
        out[i, 5] = losses[0] - losses[-1]
        out[i, 6] = np.log(max(cost[i, options[-1]], 1e-12) / max(cost[i, options[0]], 1e-12))
        out[i, 7] = len(options) / k
    for d in range(1, 7):
        col = out[:, d]
        std = col.std()
        out[:, d] = (col - col.mean()) / std if std > 0 else 0.0
    return np.clip(out, -5.0, 5.0)


@register_solver
class RLSolver(BaseSolver):
    """Soft Actor-Critic over unit embeddings (RAMP). Heuristic: no lower bound.

    Options:
        embeddings: ``(n_units, 11)`` unit embeddings in the problem's unit order (tie groups
            take the mean of their members); None derives features from the problem.
        policy: path of a saved policy to apply without training (explicitly named: a policy
            file is trusted code).
        save_policy: path (``.zip``) to save the trained policy to.
        steps, seed, threads, learning_starts, progress: SAC training (see
            :class:`bitalloc.rl.agent.TrainConfig`).
        reward: :class:`~bitalloc.rl.env.RewardConfig` fields as a dict.
        measure: ``choice -> measured loss`` over the problem's units (the full problem, ties
            expanded), used every ``reward["measure_every"]`` episodes;
            :func:`bitalloc.allocate` supplies one that measures the loss increase on
            calibration windows.
        observe_profile: add the profile's view of each unit to the observation
            (:mod:`bitalloc.rl.profile_view`); None means yes when training and the saved
            policy's setting when applying one.
        anchor: what an action of zero chooses (``lagrangian`` or ``share``, see
            :mod:`bitalloc.rl.env`); None means ``lagrangian`` when training and the saved
            policy's anchor when applying one.
    """

    name: ClassVar[str] = "rl"
    max_budgets: ClassVar[int | None] = 1

    def __init__(
        self,
        *,
        embeddings: Any = None,
        policy: str | None = None,
        save_policy: str | None = None,
        steps: int | None = None,
        seed: int = 0,
        threads: int = 1,
        learning_starts: int | None = None,
        progress: bool = False,
        reward: dict[str, Any] | None = None,
        observe_profile: bool | None = None,
        anchor: str | None = None,
        measure: Any = None,
    ) -> None:
        from bitalloc.rl.agent import TrainConfig

        if embeddings is not None:
            embeddings = np.asarray(embeddings, dtype=np.float64)
            if embeddings.ndim != 2 or embeddings.shape[1] != EMBEDDING_SIZE:
                raise BitallocError(
                    f"embeddings must be (n_units, {EMBEDDING_SIZE}), got {embeddings.shape}"
                )
        if policy is not None and save_policy is not None:
            raise BitallocError(
                "policy applies a trained policy; save_policy saves a new one: pass one"
            )
        if save_policy is not None and Path(save_policy).suffix != ".zip":
            # Checked here as well as when saving, so a bad name fails before training.
            raise BitallocError(
                "a policy file ends in .zip (stable-baselines3's format), got "
                f"{save_policy}; pass save_policy='<name>.zip'"
            )
        self.embeddings = embeddings
        self.observe_profile = observe_profile
        if anchor is not None and anchor not in ANCHORS:
            raise BitallocError(f"unknown anchor {anchor!r}; choose one of {', '.join(ANCHORS)}")
        self.anchor = anchor
        if measure is not None and not callable(measure):
            raise BitallocError("measure must be a function of a choice returning a loss")
        self.measure = measure
        self._measure: Any = None
        self.policy = policy
        self.save_policy = save_policy
        try:
            reward_config = RewardConfig(**(reward or {}))
        except TypeError as exc:
            raise BitallocError(f"bad reward option: {exc}") from None
        self.config = TrainConfig(
            steps=steps,
            seed=seed,
            threads=threads,
            learning_starts=learning_starts,
            progress=progress,
            reward=reward_config,
        )
        self._features: np.ndarray | None = None

    def solve(self, problem: Problem):  # noqa: D102 - documented on BaseSolver
        if self.embeddings is not None and self.embeddings.shape[0] != problem.n_units:
            raise BitallocError(
                f"embeddings describe {self.embeddings.shape[0]} units; the problem has "
                f"{problem.n_units}"
            )
        reduced = problem.collapsed()
        if self.embeddings is None:
            self._features = None
        else:
            groups = reduced.group_of
            self._features = np.stack(
                [self.embeddings[groups == g].mean(axis=0) for g in range(reduced.problem.n_units)]
            )
        if self.measure is not None:
            measure = self.measure
            self._measure = lambda choice: float(measure(reduced.expand(choice)))
        try:
            return super().solve(problem)
        finally:
            self._features = None
            self._measure = None

    def _solve(self, problem: Problem) -> SolverOutput:
        from bitalloc.rl import agent
        from bitalloc.rl.env import AllocationEnv

        if not problem.budgets:
            # Without a budget every unit takes its best option: nothing to learn.
            masked = np.where(problem.allowed, problem.objective, np.inf)
            return SolverOutput(masked.argmin(axis=1), None, {"trained": False})
        kind = PROBLEM_FEATURES if self._features is None else MODEL_FEATURES
        features = problem_features(problem) if self._features is None else self._features
        saved = None if self.policy is None else agent.read_policy_info(self.policy)
        observe = self.observe_profile
        if observe is None:
            observe = True if saved is None else saved.observe_profile
        anchor = self.anchor or ("lagrangian" if saved is None else saved.anchor)
        env = AllocationEnv(
            problem,
            features,
            self.config.reward,
            self._measure,
            observe_profile=observe,
            anchor=anchor,
        )
        info: dict[str, Any] = {"features": kind, "observe_profile": observe, "anchor": anchor}
        if self.policy is not None:
            model, meta = agent.load_policy(
                self.policy, features=kind, palette=problem.option_names, env=env
            )
            choice = agent.rollout(model, env)
            info.update(policy=str(self.policy), trained=False, policy_budget=meta.budget)
            return SolverOutput(choice, None, info)
        try:
            result = agent.train_policy(env, self.config)
        except ValueError as exc:
            # torch's distributions refuse the NaN a diverged network outputs; that follows
            # from rewards beyond float range (losses huge against costs tiny), not a bug.
            if "invalid values" not in str(exc):
                raise
            raise BitallocError(
                "the rl method's network diverged on this problem (its losses and costs span "
                "too wide a range for its rewards); solve it with lagrangian, dp or ilp"
            ) from None
        choice = agent.rollout(result.model, env)
        from_policy = problem.objective_of(choice)
        # Re-evaluate the best episode with the problem's own sum: the environment accumulates the
        # same losses in another order, and the two may differ in the last bit.
        best = None if result.best_choice is None else problem.objective_of(result.best_choice)
        info.update(
            trained=True,
            steps=result.steps,
            episodes=result.episodes,
            train_seconds=round(result.seconds, 3),
            policy_objective=from_policy,
            best_episode_objective=best,
        )
        if result.measured:
            info["measured_episodes"] = [
                {"predicted": p, "measured": m} for p, m in result.measured
            ]
        if best is not None and best < from_policy:
            choice = result.best_choice
            info["source"] = "best training episode"
        else:
            info["source"] = "policy"
        if self.save_policy is not None:
            (budget,) = problem.budgets.values()
            meta = agent.PolicyInfo(
                features=kind,
                palette=tuple(problem.option_names) if problem.option_names else None,
                budget=float(budget),
                steps=result.steps,
                seed=self.config.seed,
                units=problem.n_units,
                observe_profile=observe,
                anchor=anchor,
                obs_dims=env.obs_dims,
            )
            info["saved_policy"] = str(agent.save_policy(result.model, self.save_policy, meta))
        return SolverOutput(choice, None, info)
