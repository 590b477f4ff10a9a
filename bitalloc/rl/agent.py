"""Training, running, saving and loading the SAC policy of the RL allocator.

The policy is stable-baselines3's Soft Actor-Critic over :class:`~bitalloc.rl.env.AllocationEnv`.
It is saved in stable-baselines3's own zip format, with a JSON file beside it
(``<policy>.json``) recording what it was trained on: observation and action sizes, the kind of
unit features, the palette and the budget.

A policy file is trusted code: stable-baselines3 unpickles parts of it. :func:`load_policy`
therefore reads only a path the caller names, never one found by itself.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bitalloc.errors import BitallocError
from bitalloc.fileio import read_json_object, write_json_atomic
from bitalloc.rl.env import AllocationEnv, RewardConfig, obs_dims

POLICY_FORMAT = "bitalloc-rl-policy"


@dataclass(frozen=True)
class TrainConfig:
    """SAC settings. ``steps=None`` takes 100 episodes (100 x units), within [300, 30000]."""

    steps: int | None = None
    seed: int = 0
    threads: int = 1
    learning_starts: int | None = None
    batch_size: int = 128
    hidden: tuple[int, ...] = (64, 64)
    learning_rate: float = 3e-4
    #: Short horizon: the reward's price term already charges a step for the budget it takes
    #: from later units, so little is left for discounting to carry.
    gamma: float = 0.9
    progress: bool = False
    reward: RewardConfig = field(default_factory=RewardConfig)

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise BitallocError(f"steps must be at least 1, got {self.steps}")
        if self.threads < 1:
            raise BitallocError(f"threads must be at least 1, got {self.threads}")

    def total_steps(self, units: int) -> int:
        """The step budget for a problem of ``units`` units."""
        return self.steps if self.steps is not None else int(min(30000, max(300, 100 * units)))


@dataclass(frozen=True)
class PolicyInfo:
    """What a saved policy was trained on (the JSON beside the zip)."""

    features: str
    palette: tuple[str, ...] | None
    budget: float
    steps: int
    seed: int
    units: int
    format: str = POLICY_FORMAT
    observe_profile: bool = True
    anchor: str = "lagrangian"
    obs_dims: int = obs_dims(True)
    action_dims: int = 1


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` torch threads, restoring the previous count (SAC's small matmuls gain
    nothing from threads and stall when another process holds a core)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class TrainResult:
    """A trained model and the best feasible episode seen while training."""

    model: Any
    steps: int
    episodes: int
    best_choice: np.ndarray | None
    best_objective: float
    seconds: float
    #: (predicted, measured) loss of every episode whose quality was measured.
    measured: list[tuple[float, float]] = field(default_factory=list)


def train_policy(env: AllocationEnv, config: TrainConfig) -> TrainResult:
    """Train SAC on ``env`` for ``config.total_steps(units)`` steps."""
    import time

    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.logger import Logger

    steps = config.total_steps(env.problem.n_units)
    learning_starts = config.learning_starts
    if learning_starts is None:
        learning_starts = min(steps // 4, 10 * env.problem.n_units + 100)
    best: dict[str, Any] = {"objective": np.inf, "choice": None, "episodes": 0, "measured": []}

    class _Track(BaseCallback):
        def __init__(self, bar: Any) -> None:
            super().__init__()
            self.bar = bar

        def _on_step(self) -> bool:
            for info in self.locals.get("infos", []):
                if "choice" in info:
                    best["episodes"] += 1
                    if "measured" in info:
                        best["measured"].append((float(info["predicted"]), info["measured"]))
                    if info["predicted"] < best["objective"]:
                        best["objective"] = float(info["predicted"])
                        best["choice"] = info["choice"].copy()
            if self.bar is not None:
                self.bar.update(1)
            return True

    start = time.perf_counter()
    with torch_threads(config.threads), _progress(steps, config.progress) as bar:
        model = SAC(
            "MlpPolicy",
            env,
            learning_rate=config.learning_rate,
            buffer_size=max(steps, 1000),
            learning_starts=learning_starts,
            batch_size=config.batch_size,
            gamma=config.gamma,
            policy_kwargs={"net_arch": list(config.hidden)},
            seed=config.seed,
            device="cpu",
            verbose=0,
        )
        # Without a logger of its own, SB3 makes an empty tempdir/SB3-<time> folder per run.
        model.set_logger(Logger(folder=None, output_formats=[]))
        model.learn(total_timesteps=steps, callback=_Track(bar))
    return TrainResult(
        model,
        steps,
        best["episodes"],
        best["choice"],
        best["objective"],
        time.perf_counter() - start,
        best["measured"],
    )


@contextlib.contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc="rl training", unit="step") as bar:
        yield bar


def rollout(model: Any, env: AllocationEnv) -> np.ndarray:
    """The policy's deterministic allocation: one episode with mean actions."""
    obs, _ = env.reset(seed=0)
    done = False
    info: dict[str, Any] = {}
    with torch_threads(1):
        while not done:
            action, _ = model.predict(obs, deterministic=True)
            obs, _, done, _, info = env.step(action)
    return np.asarray(info["choice"], dtype=np.int64)


def save_policy(model: Any, path: str | Path, info: PolicyInfo) -> Path:
    """Save ``model`` (stable-baselines3 zip) and ``info`` (``<path>.json``)."""
    path = Path(path)
    if path.suffix != ".zip":
        raise BitallocError(f"a policy file ends in .zip (stable-baselines3's format), got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(str(path))
    write_json_atomic(_info_path(path), asdict(info))
    return path


def read_policy_info(path: str | Path) -> PolicyInfo:
    """The description saved beside a policy (``<path>.json``), checked to be one of ours."""
    path = Path(path)
    if not path.is_file():
        raise BitallocError(f"policy file {path} does not exist")
    raw = read_json_object(_info_path(path), "RL policy description")
    try:
        info = PolicyInfo(
            **{**raw, "palette": tuple(raw["palette"]) if raw.get("palette") else None}
        )
    except TypeError as exc:
        raise BitallocError(
            f"{_info_path(path)} is not a bitalloc policy description: {exc}"
        ) from None
    if info.format != POLICY_FORMAT:
        raise BitallocError(f"{path} is not a bitalloc policy (format {info.format!r})")
    return info


def load_policy(
    path: str | Path, *, features: str, palette: Sequence[str] | None, env: AllocationEnv
) -> tuple[Any, PolicyInfo]:
    """Load a policy the caller named explicitly, after checking what it was trained on.

    Raises :class:`BitallocError` when the file or its JSON is missing, or when the policy's
    observation or action sizes, feature kind or palette differ from this problem's (``env``).
    """
    from stable_baselines3 import SAC

    path = Path(path)
    info = read_policy_info(path)
    expected = env.obs_dims
    if info.observe_profile != (env.view is not None):
        seen = "with" if info.observe_profile else "without"
        raise BitallocError(
            f"policy {path} was trained {seen} the profile view; pass "
            f"observe_profile={info.observe_profile} or train a new policy"
        )
    if info.anchor != env.anchor:
        raise BitallocError(
            f"policy {path} acts relative to the {info.anchor!r} anchor, this environment to "
            f"{env.anchor!r}; pass anchor={info.anchor!r} or train a new policy"
        )
    if info.obs_dims != expected or info.action_dims != 1:
        raise BitallocError(
            f"policy {path} observes {info.obs_dims} values and acts with {info.action_dims}; this "
            f"environment has {expected} and 1: train a new policy"
        )
    if info.features != features:
        raise BitallocError(
            f"policy {path} was trained on {info.features} features but this problem has "
            f"{features} features; pass unit embeddings of the same kind or train a new policy"
        )
    if palette is not None and info.palette is not None and tuple(palette) != info.palette:
        raise BitallocError(
            f"policy {path} was trained on the palette {', '.join(info.palette)}, not "
            f"{', '.join(palette)}; use that palette or train a new policy"
        )
    with torch_threads(1):
        model = SAC.load(str(path), device="cpu")
    spaces = (model.observation_space.shape, model.action_space.shape)
    if spaces != ((expected,), (1,)):
        raise BitallocError(
            f"policy {path} has observation/action shapes {spaces}; expected (({expected},), (1,))"
        )
    return model, info


def _info_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def describe(info: PolicyInfo) -> str:
    """One line about a policy, for messages."""
    return json.dumps(asdict(info))
