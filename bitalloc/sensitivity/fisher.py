"""Fisher (squared-gradient) sensitivity.

Statistics are gathered first (:meth:`FisherAccumulator.add_batch`, one calibration window per
backward pass) and then turned into the table in one short step: for unit ``u`` and format
``f``, ``0.5 * T * sum(F_u * (Q_f(W_u) - W_u) ** 2)`` where ``F_u`` is the mean over windows of
the squared gradient of one scalar per window and ``T`` the tokens predicted per window.

The second-order change of the mean token loss is ``0.5 * dW^T H dW``, and the empirical Fisher
approximates ``H`` by the mean over tokens of ``g_t g_t^T`` (``g_t`` the gradient of token
``t``'s loss). Squaring the gradient of the window's mean loss (``estimator="window"``) gives
``(sum_t g_t)^2 / T^2``: times ``T`` that is the per-token Fisher only when the tokens' gradients
are uncorrelated, and they are not for units whose output reaches many later positions
(attention values were overestimated 3x on SmolLM2). The default ``estimator="token"`` weights
each token's loss by a random sign, which removes the cross terms in expectation at the same
cost (:func:`~bitalloc.sensitivity.base.window_objective`); on SmolLM2 its predictions match
measured loss increases with a median ratio of 1.0 (BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from bitalloc.errors import BitallocError
from bitalloc.formats import QuantFormat, fake_quantize_each
from bitalloc.models import Unit, get_linear
from bitalloc.sensitivity.base import (
    GradientProfiler,
    Statistics,
    grad_only_for,
    spread_windows,
    window_objective,
)
from bitalloc.sensitivity.registry import register_profiler


class FisherAccumulator:
    """Running mean of squared per-window gradients of every unit's weight."""

    def __init__(
        self, model: nn.Module, units: Sequence[Unit], generator: torch.Generator | None = None
    ):
        self.model = model
        self.generator = generator
        self.weights = [get_linear(model, u.name).weight for u in units]
        self.sums = [torch.zeros_like(w, dtype=torch.float32) for w in self.weights]
        self.batches = 0
        self.skipped = 0
        self.tokens = 0

    def add_batch(self, window: torch.Tensor) -> bool:
        """Forward and backward one window (1-D or (1, seq_len)); False if it was skipped."""
        ids = window.reshape(1, -1)
        for w in self.weights:
            w.grad = None
        loss = window_objective(self.model, ids, self.generator)
        grads = None
        if torch.isfinite(loss):
            loss.backward()
            grads = [w.grad for w in self.weights]
        if grads is None or any(g is None or not torch.isfinite(g).all() for g in grads):
            self.skipped += 1
            return False
        for acc, g in zip(self.sums, grads):
            acc.add_(g.detach().float().square())
        self.batches += 1
        self.tokens += ids.numel()
        return True

    def fisher(self) -> list[torch.Tensor]:
        """Mean squared gradient per unit; fails when no window was usable."""
        if self.batches == 0:
            raise BitallocError(
                f"all {self.skipped} calibration windows gave non-finite gradients; check the "
                "model's weights (NaN/inf) or use a different calibration text"
            )
        return [s / self.batches for s in self.sums]


@register_profiler
class FisherProfiler(GradientProfiler):
    """Diagonal empirical-Fisher profiler (``fisher``).

    ``tokens`` caps the calibration tokens used (windows are spread evenly over the split).
    ``estimator`` is ``window`` (the gradient of each window's mean loss) or ``token``
    (token losses weighted by random signs from ``seed``; see
    :func:`~bitalloc.sensitivity.base.window_objective`).
    """

    name = "fisher"

    def options(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "scaling": "0.5*T*sum(F*dW^2)", **self.estimator_options()}

    progress_desc = "gradients"

    def gather(
        self, model: nn.Module, units: Sequence[Unit], calibration: torch.Tensor, bar: tqdm
    ) -> Statistics:
        seq_len = calibration.shape[1]
        picks = spread_windows(len(calibration), seq_len, self.tokens)
        acc = FisherAccumulator(model, units, self.sign_generator())
        bar.reset(total=len(picks))
        with grad_only_for(model, acc.weights):
            for idx in picks:
                acc.add_batch(calibration[idx])
                bar.update()
        metadata = {"estimator": self.estimator, "windows": acc.batches, "seq_len": seq_len}
        state = (acc, acc.fisher() if acc.batches else None, 0.5 * (seq_len - 1))
        return Statistics(acc.tokens, acc.batches, acc.skipped, state, metadata)

    def unit_losses(
        self, index: int, statistics: Statistics, palette: Sequence[QuantFormat]
    ) -> list[float]:
        acc, fisher, scale = statistics.state
        w, f = acc.weights[index].detach(), fisher[index]
        row = []
        for fq in fake_quantize_each(w, palette, statistics.importance_of(index)):
            dw = fq.float() - w.float()
            row.append(scale * float((f * dw.square()).sum()))
        return row

    def no_usable_batch(self, skipped: int) -> str:
        return (
            f"all {skipped} calibration windows gave non-finite gradients; check the model's "
            "weights (NaN/inf) or use a different calibration text"
        )
