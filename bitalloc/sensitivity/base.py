"""The profiler protocol and the on-disk profile cache."""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from bitalloc.errors import BitallocError
from bitalloc.formats import QuantFormat
from bitalloc.models import Unit, cache_root
from bitalloc.sensitivity.profile import Profile, cache_key


class BaseProfiler(ABC):
    """Estimates what each unit loses under each format.

    Contract for implementations:

    - :meth:`profile` takes the model (not modified: any temporary change is undone before it
      returns, also on error), the units in network order, the palette, and calibration token
      windows of shape (n_windows, seq_len). It returns a :class:`Profile` whose rows are the
      units in the given order and whose columns are the palette's format names in order.
    - Values are finite and non-negative predicted increases of the language-model loss (mean
      next-token cross-entropy, in nats) when only that unit takes that format.
    - ``metadata`` holds at least ``method``, ``tokens`` (calibration tokens used),
      ``skipped_batches`` and ``seconds``.
    - :meth:`options` returns every setting that changes the result; it keys the cache, so two
      profilers with equal options on equal inputs must give equal profiles.
    - Batches whose statistics are not finite are skipped and counted; when none is usable the
      profiler raises :class:`~bitalloc.errors.BitallocError`.
    """

    name: ClassVar[str]

    @abstractmethod
    def options(self) -> dict[str, Any]:
        """Settings that determine the result (used in the cache key)."""

    @abstractmethod
    def profile(
        self,
        model: nn.Module,
        units: Sequence[Unit],
        palette: Sequence[QuantFormat],
        calibration: torch.Tensor,
    ) -> Profile:
        """Compute the units x formats table of predicted loss increase."""


class GradientProfiler(BaseProfiler):
    """Shared settings of the profilers that square loss gradients (``fisher``, ``kfac``):
    ``tokens`` (calibration cap), ``estimator`` (see :func:`window_objective`) and ``seed``
    (the token signs)."""

    def __init__(
        self,
        tokens: int = 8192,
        progress: bool = True,
        *,
        estimator: str = "token",
        seed: int = 0,
    ):
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
            raise BitallocError(f"calibration tokens must be a positive integer, got {tokens!r}")
        self.tokens = tokens
        self.progress = progress
        self.estimator = check_estimator(estimator)
        self.seed = int(seed)

    def estimator_options(self) -> dict[str, Any]:
        """The estimator settings for :meth:`options` (none for ``window``, so that profiles
        cached before the per-token estimator existed keep their key)."""
        return {"estimator": "token", "seed": self.seed} if self.estimator == "token" else {}

    def sign_generator(self) -> torch.Generator | None:
        """A fresh generator of token signs, or None for the ``window`` estimator."""
        return torch.Generator().manual_seed(self.seed) if self.estimator == "token" else None


def spread_windows(n_windows: int, seq_len: int, tokens: int) -> list[int]:
    """Indices of the calibration windows a profiler uses for a ``tokens`` cap: as many whole
    windows as fit (at least one), spread evenly over all ``n_windows``, fixed and
    deterministic."""
    if tokens <= 0:
        raise BitallocError(f"calibration tokens must be positive, got {tokens}")
    if n_windows <= 0:
        raise BitallocError(
            "no calibration windows: the calibration text is shorter than one sequence"
        )
    wanted = max(1, min(n_windows, tokens // seq_len))
    return [(i * n_windows) // wanted for i in range(wanted)]


def monotone_in_bits(table: np.ndarray, palette: Sequence[QuantFormat]) -> tuple[np.ndarray, int]:
    """Cap each value at the value of fewer bits with the same group size; returns the table and
    how many entries were lowered."""
    out = table.copy()
    fixed = 0
    for group in {f.group_size for f in palette if not f.is_float}:
        cols = sorted(
            (j for j, f in enumerate(palette) if f.group_size == group),
            key=lambda j: palette[j].bits,
        )
        for prev, j in zip(cols, cols[1:]):
            # More bits never make a weight worse to represent. A higher value is an artefact:
            # the clipping search minimises plain (not weighted) squared error, and measured
            # values carry noise of about 1e-5 nats.
            lower = out[:, j] > out[:, prev]
            fixed += int(lower.sum())
            out[:, j] = np.minimum(out[:, j], out[:, prev])
    return out, fixed


#: How a window's gradient is formed: ``window`` differentiates the window's mean token loss;
#: ``token`` weights each token's loss by a random sign first (see :func:`window_objective`).
ESTIMATORS = ("window", "token")


def check_estimator(estimator: str) -> str:
    """Validate a gradient-estimator name."""
    if estimator not in ESTIMATORS:
        raise BitallocError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    return estimator


def window_objective(
    model: nn.Module, ids: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The scalar whose gradient a Fisher-type profiler squares, for one (1, seq_len) window.

    Without ``generator``: the mean next-token loss. Squaring its gradient and multiplying by
    the tokens ``T`` estimates the per-token Fisher only when the tokens' gradients are
    uncorrelated; a unit whose output feeds many later positions (attention values) has
    correlated ones and is overestimated. With ``generator``: ``mean_t(s_t * loss_t)`` with
    independent random signs ``s_t``. The cross terms between tokens then vanish in
    expectation, so ``T`` times the squared gradient is an unbiased estimate of the mean
    per-token squared gradient, at the cost of the same one backward pass.
    """
    if generator is None:
        return model(input_ids=ids, labels=ids).loss
    logits = model(input_ids=ids).logits[0, :-1].float()
    per_token = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
    signs = torch.randint(0, 2, (per_token.numel(),), generator=generator) * 2 - 1
    return (per_token * signs.to(per_token)).mean()


@contextlib.contextmanager
def grad_only_for(model: nn.Module, weights: Sequence[nn.Parameter]) -> Iterator[None]:
    """Enable gradients for ``weights`` alone (skips e.g. the 28M-weight embedding gradient),
    restoring every flag afterwards."""
    saved = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        for p in saved:
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        model.eval()
        yield
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)


def cached_profile(
    profiler: BaseProfiler,
    model: nn.Module,
    units: Sequence[Unit],
    palette: Sequence[QuantFormat],
    calibration: torch.Tensor,
    *,
    model_fingerprint: str,
    calibration_fingerprint: str,
    use_cache: bool = True,
) -> Profile:
    """Return the profile from the cache when one matches, else compute and store it.

    The key covers the method and its options, the model's weights, the palette and the
    calibration tokens, so a stale profile is never reused.
    """
    parts = {
        "method": profiler.name,
        "options": profiler.options(),
        "model": model_fingerprint,
        "palette": [f.name for f in palette],
        "units": [u.name for u in units],
        "calibration": calibration_fingerprint,
    }
    path = cache_root() / "profiles" / f"{profiler.name}-{cache_key(parts)}.json"
    if use_cache and path.is_file():
        cached = Profile.load(path)
        return Profile(
            cached.units,
            cached.formats,
            cached.loss,
            {**cached.metadata, "cache": "hit", "cache_path": str(path)},
        )
    start = time.perf_counter()
    result = profiler.profile(model, units, palette, calibration)
    metadata = {
        **result.metadata,
        "model_fingerprint": model_fingerprint,
        "calibration_fingerprint": calibration_fingerprint,
        "palette": [f.name for f in palette],
        "seconds": result.metadata.get("seconds", time.perf_counter() - start),
    }
    result = Profile(result.units, result.formats, result.loss, metadata)
    if use_cache:
        result.save(path)
    return Profile(
        result.units,
        result.formats,
        result.loss,
        {**metadata, "cache": "miss", "cache_path": str(path) if use_cache else None},
    )
