"""The allocation environment of the RL allocator (RAMP): one step decides one unit's format.

An episode walks the units of a :class:`~bitalloc.solvers.problem.Problem` in network order.
At each step the agent sees the unit's 11-dimensional embedding
(:mod:`bitalloc.rl.embedding`) and the state of the budget, and answers with one number ``a``
in [-1, 1] that moves the unit away from a budget-neutral choice. The neutral option is the
allowed option whose cost is nearest to the same share of the unit's cost range as the budget
left allows the remaining units (``slack``, below); the action moves ``a * (m - 1) / 2`` places
from it along the unit's ``m`` options sorted by cost (clipped to the ends). So ``a = 0`` spends
the budget evenly and the policy only has to learn which units deserve more or less than their
share, which is what carries across models and budgets.

Budget safety: an action that would leave too little budget for the remaining units (even at
their cheapest options) is projected to the richest option that keeps the episode feasible, so
every episode ends with a feasible allocation, and the agent is told by a penalty.

Observation (``OBS_DIMS`` = 11 + 3 values):

- the unit's embedding (11 values, clipped to [-5, 5]);
- ``progress``: units decided so far / units;
- ``spent``: budgeted cost spent so far / budget;
- ``slack``: where the budget left lies between the remaining units' cheapest and richest total,
  in [0, 1]: 0 means every remaining unit must take its cheapest option, 1 that all can take
  their richest. Scale-free, so it means the same on any model and budget.

Reward (RAMP's shape: quality first, asymmetric penalties, a budget cliff):

- per step, ``-(loss[i, j] - loss_min[i]) / scale``: the unit's predicted loss above its best
  option, with ``scale`` the mean spread of the units' losses, so a whole episode's quality term
  is O(1) on any model;
- per step, when the action had to be projected down, ``-overshoot * excess``, ``excess`` being
  the cost the agent asked for beyond what was feasible, over the budget (overshooting costs
  far more than undershooting);
- at the end, ``-undershoot * unused``, ``unused`` the fraction of the budget left unspent, and a
  further ``-cliff`` when more than ``cliff_tolerance`` of the budget is left (a budget cliff);
- optionally, every ``measure_every`` episodes, ``measure(choice)`` (e.g. a measured loss
  increase) replaces the predicted quality of the episode: its difference from the prediction is
  added at the last step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

from bitalloc.errors import BitallocError
from bitalloc.solvers.problem import Problem

EMBEDDING_SIZE = 11
OBS_DIMS = EMBEDDING_SIZE + 3
_CLIP = 5.0


@dataclass(frozen=True)
class RewardConfig:
    """Weights of the reward terms (see the module docstring)."""

    overshoot: float = 10.0
    undershoot: float = 1.0
    cliff: float = 1.0
    cliff_tolerance: float = 0.05
    measure_every: int = 0

    def __post_init__(self) -> None:
        for name in ("overshoot", "undershoot", "cliff"):
            if getattr(self, name) < 0:
                raise BitallocError(f"reward weight {name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.cliff_tolerance < 1:
            raise BitallocError(f"cliff_tolerance must be in [0, 1), got {self.cliff_tolerance}")
        if self.measure_every < 0:
            raise BitallocError(f"measure_every must be >= 0, got {self.measure_every}")


class AllocationEnv(gym.Env):
    """Gymnasium environment over a tie-free, single-budget :class:`Problem`.

    Args:
        problem: the allocation problem (use ``problem.collapsed()`` first when it has ties or
            pins); exactly one budget.
        embeddings: ``(n_units, 11)`` unit embeddings in the problem's unit order.
        reward: reward weights.
        measure: optional ``choice -> loss`` used every ``reward.measure_every`` episodes.
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(
        self,
        problem: Problem,
        embeddings: np.ndarray,
        reward: RewardConfig | None = None,
        measure: Callable[[np.ndarray], float] | None = None,
    ) -> None:
        super().__init__()
        if problem.ties or problem.pins:
            raise BitallocError(
                "the environment takes a problem without ties or pins; pass problem.collapsed()"
            )
        if len(problem.budgets) != 1:
            raise BitallocError(
                f"the environment takes exactly one budget, got {sorted(problem.budgets)}"
            )
        emb = np.asarray(embeddings, dtype=np.float64)
        if emb.shape != (problem.n_units, EMBEDDING_SIZE) or not np.isfinite(emb).all():
            raise BitallocError(
                f"embeddings must be finite of shape ({problem.n_units}, {EMBEDDING_SIZE}), got "
                f"{emb.shape}"
            )
        self.problem = problem
        self.reward_config = reward or RewardConfig()
        if self.reward_config.measure_every and measure is None:
            raise BitallocError("reward.measure_every needs a measure function")
        self.measure = measure
        ((self.budget_name, budget),) = problem.budgets.items()
        self.budget = float(budget)
        if self.budget <= 0:
            raise BitallocError(f"the budget must be positive, got {self.budget}")
        cost = problem.costs[self.budget_name]
        allowed = problem.allowed
        self.embeddings = np.clip(emb, -_CLIP, _CLIP).astype(np.float32)
        # Per unit, the allowed options from cheapest to richest (ties broken by lower loss).
        self.options = [
            np.array(
                sorted(
                    np.flatnonzero(allowed[i]), key=lambda j: (cost[i, j], problem.objective[i, j])
                )
            )
            for i in range(problem.n_units)
        ]
        self.cost = cost
        self.min_cost = np.array([cost[i, o].min() for i, o in enumerate(self.options)])
        self.max_cost = np.array([cost[i, o].max() for i, o in enumerate(self.options)])
        # Suffix sums: cheapest and richest totals of units i.. n-1.
        self.min_rest = np.concatenate([np.cumsum(self.min_cost[::-1])[::-1], [0.0]])
        self.max_rest = np.concatenate([np.cumsum(self.max_cost[::-1])[::-1], [0.0]])
        if self.min_rest[0] > self.budget * (1 + 1e-12):
            raise BitallocError(
                f"the budget {self.budget:g} is below the cheapest allocation "
                f"{self.min_rest[0]:g}; no episode can be feasible"
            )
        objective = problem.objective
        self.loss_min = np.array([objective[i, o].min() for i, o in enumerate(self.options)])
        spread = np.array([objective[i, o].max() for i, o in enumerate(self.options)])
        self.scale = max(float(np.mean(spread - self.loss_min)), 1e-12)
        self.observation_space = gym.spaces.Box(-_CLIP, _CLIP, (OBS_DIMS,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.episodes = 0
        self._reset_state()

    # --- gymnasium API --------------------------------------------------------------------------
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self._reset_state()
        return self._observation(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self.unit >= self.problem.n_units:
            raise BitallocError("the episode has ended; call reset()")
        i = self.unit
        wanted = self.option_for(i, float(np.asarray(action, dtype=np.float64).reshape(-1)[0]))
        j, excess = self._project(i, wanted)
        self.choice[i] = j
        self.spent += self.cost[i, j]
        self.predicted += self.problem.objective[i, j]
        cfg = self.reward_config
        reward = -(self.problem.objective[i, j] - self.loss_min[i]) / self.scale
        reward -= cfg.overshoot * excess / self.budget
        self.projected += int(excess > 0)
        self.unit += 1
        terminated = self.unit == self.problem.n_units
        info: dict[str, Any] = {"option": int(j), "projected": bool(excess > 0)}
        if terminated:
            reward += self._final_reward(info)
        return self._observation(), float(reward), terminated, False, info

    # --- helpers ----------------------------------------------------------------------------------
    def option_for(self, i: int, action: float) -> int:
        """The allowed option of unit ``i`` for ``action`` in [-1, 1] (see the module
        docstring): cost nearest to the neutral share of its range moved by ``action``."""
        options = self.options[i]
        target = self.min_cost[i] + self._slack() * (self.max_cost[i] - self.min_cost[i])
        neutral = int(np.argmin(np.abs(self.cost[i, options] - target)))
        shift = min(max(action, -1.0), 1.0) * (len(options) - 1) / 2.0
        return int(options[min(max(int(round(neutral + shift)), 0), len(options) - 1)])

    def _slack(self) -> float:
        """Where the budget left lies between the remaining units' cheapest and richest."""
        rest_min, rest_max = self.min_rest[self.unit], self.max_rest[self.unit]
        if rest_max <= rest_min:
            return 1.0
        left = self.budget - self.spent
        return min(max((left - rest_min) / (rest_max - rest_min), 0.0), 1.0)

    def _project(self, i: int, j: int) -> tuple[int, float]:
        """The richest option at most as costly as ``j`` that leaves the rest feasible, and how
        much cost the agent asked for beyond it."""
        room = self.budget - self.spent - self.min_rest[i + 1]
        if self.cost[i, j] <= room + 1e-9 * self.budget:
            return j, 0.0
        feasible = [o for o in self.options[i] if self.cost[i, o] <= room + 1e-9 * self.budget]
        best = feasible[-1] if feasible else int(self.options[i][0])
        return best, float(self.cost[i, j] - self.cost[i, best])

    def _final_reward(self, info: dict[str, Any]) -> float:
        cfg = self.reward_config
        unused = max(0.0, (self.budget - self.spent) / self.budget)
        reward = -cfg.undershoot * unused
        if unused > cfg.cliff_tolerance:
            reward -= cfg.cliff
        self.episodes += 1
        info.update(
            choice=self.choice.copy(),
            predicted=self.predicted,
            spent=self.spent,
            unused=unused,
            projected_steps=self.projected,
        )
        if cfg.measure_every and self.episodes % cfg.measure_every == 0:
            measured = float(self.measure(self.choice.copy()))
            info["measured"] = measured
            reward -= (measured - self.predicted) / self.scale
        return reward

    def _reset_state(self) -> None:
        self.unit = 0
        self.spent = 0.0
        self.predicted = 0.0
        self.projected = 0
        self.choice = np.zeros(self.problem.n_units, dtype=np.int64)

    def _observation(self) -> np.ndarray:
        n = self.problem.n_units
        i = min(self.unit, n - 1)
        state = np.array([self.unit / n, self.spent / self.budget, self._slack()], dtype=np.float32)
        return np.concatenate([self.embeddings[i], state]).astype(np.float32)
