"""Kronecker-factored sensitivity: output error weighted by how much the loss cares about each
output channel.

``fisher`` keeps only the diagonal of the Fisher matrix, so it ignores that a quantization
error in one input column is seen through every correlated input. ``output`` keeps those
correlations (the input Gram matrix ``G``, as GPTQ does) but weighs every output channel and
every layer alike. This profiler keeps both: with ``g_t`` the gradient of a window's mean loss
with respect to the layer's output at token ``t`` and ``x_t`` its input, the second-order loss
change of ``W -> W + dW`` in the Fisher (Gauss-Newton) approximation is
``0.5 * E[(sum_t g_t^T dW x_t)^2]``; treating tokens as independent and factorising output
gradients from inputs (K-FAC, Martens & Grosse, ICML 2015) with the output factor kept
diagonal gives

    0.5 * T * sum_i D_i * (dW G dW^T)_ii,   D_i = E_window[sum_t g_ti^2],  G = E_token[x x^T]

with ``T`` the tokens predicted per window, the same per-token scaling as ``fisher`` (whose
prediction this reduces to when ``G`` is diagonal). Output-gradient weighting of a layer's
reconstruction error is also how BRECQ (Li et al., ICLR 2021) turns local errors into loss.

Only activation gradients are needed: the backward pass skips every weight gradient, so one
window costs about two forward passes, less than ``fisher``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from bitalloc.formats import QuantFormat, fake_quantize_each
from bitalloc.models import Unit
from bitalloc.sensitivity.base import (
    GradientProfiler,
    Statistics,
    spread_windows,
    window_objective,
)
from bitalloc.sensitivity.output import InputGramAccumulator
from bitalloc.sensitivity.registry import register_profiler


class KroneckerAccumulator(InputGramAccumulator):
    """Input Gram matrices (as :class:`InputGramAccumulator`) plus, per unit, the mean over
    windows of ``sum_t g_t^2`` per output channel, from one forward and one activation-only
    backward per window."""

    def __init__(
        self, model: nn.Module, units: Sequence[Unit], generator: torch.Generator | None = None
    ):
        super().__init__(model, units)
        self.generator = generator
        self._out_sq: list[torch.Tensor | None] = [None] * len(units)
        self._pending_sq: dict[int, torch.Tensor] = {}
        self.windows = 0

    def _grad_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if output.requires_grad:
                output.register_hook(lambda g: self._record_grad(index, g))

        return hook

    def _record_grad(self, index: int, grad: torch.Tensor) -> None:
        self._pending_sq[index] = grad.detach().float().square().reshape(-1, grad.shape[-1]).sum(0)

    def add_batch(self, window: torch.Tensor) -> bool:
        """Forward and activation-only backward over one window; False if it was skipped."""
        ids = window.reshape(1, -1)
        embed = self.model.get_input_embeddings()
        # No parameter needs a gradient; a graph from the embeddings gives activation gradients.
        handle = embed.register_forward_hook(lambda m, a, out: out.requires_grad_(True))
        try:
            return self.add_batch_through(
                lambda: window_objective(self.model, ids, self.generator), ids.numel()
            )
        finally:
            handle.remove()

    def add_batch_through(self, objective: Callable[[], torch.Tensor], tokens: int) -> bool:
        """Record the units' inputs and output gradients while ``objective()`` (a forward that
        calls the units once over ``tokens`` tokens and returns the scalar whose gradient they
        receive) runs and is differentiated; False if the window was skipped."""
        handles = [lin.register_forward_hook(self._hook(i)) for i, lin in enumerate(self.linears)]
        handles += [
            lin.register_forward_hook(self._grad_hook(i)) for i, lin in enumerate(self.linears)
        ]
        usable = False
        try:
            with torch.enable_grad():
                loss = objective()
                if torch.isfinite(loss):
                    loss.backward()
                    usable = (
                        len(self._pending_sq) == len(self.linears)
                        and all(bool(torch.isfinite(s).all()) for s in self._pending_sq.values())
                        and all(bool(torch.isfinite(x).all()) for _, x in self._pending)
                    )
            if usable:
                self._pending = [(slot, x.detach()) for slot, x in self._pending]
                self._accumulate(tokens)
                for i, sq in self._pending_sq.items():
                    acc = self._out_sq[i]
                    self._out_sq[i] = sq if acc is None else acc + sq
        finally:
            for h in handles:
                h.remove()
            self._seen.clear()
            self._pending.clear()
            self._pending_sq.clear()
        if not usable:
            self.skipped += 1
            return False
        self.batches += 1
        self.losses.append(float(loss.detach()))
        return True

    def output_factors(self) -> list[torch.Tensor]:
        """Per unit, ``D = E_window[sum_t g_t^2]`` per output channel."""
        self.grams()  # raises when no window was usable
        return [s / self.batches for s in self._out_sq]


@register_profiler
class KFACProfiler(GradientProfiler):
    """Kronecker-factored Fisher profiler (``kfac``): input correlations and output-gradient
    weights, from one forward and one activation-only backward per calibration window."""

    name = "kfac"

    def options(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "scaling": "0.5*T*sum_i D_i (dW G dW^T)_ii",
            **self.estimator_options(),
        }

    def gather(
        self, model: nn.Module, units: Sequence[Unit], calibration: torch.Tensor, bar: tqdm
    ) -> Statistics:
        seq_len = calibration.shape[1]
        picks = spread_windows(len(calibration), seq_len, self.tokens)
        acc = KroneckerAccumulator(model, units, self.sign_generator())
        saved = {p: p.requires_grad for p in model.parameters()}
        was_training = model.training
        bar.reset(total=len(picks))
        try:
            for p in saved:
                p.requires_grad_(False)
            model.eval()
            for idx in picks:
                acc.add_batch(calibration[idx])
                bar.update()
        finally:
            for p, flag in saved.items():
                p.requires_grad_(flag)
            model.train(was_training)
        factors = (acc.grams(), acc.output_factors()) if acc.batches else None
        metadata = {"estimator": self.estimator, "windows": acc.batches, "seq_len": seq_len}
        state = (acc, factors, 0.5 * (seq_len - 1))
        return Statistics(acc.tokens, acc.batches, acc.skipped, state, metadata)

    def unit_losses(
        self, index: int, statistics: Statistics, palette: Sequence[QuantFormat]
    ) -> list[float]:
        acc, (grams, factors), scale = statistics.state
        gram, d = grams[index], factors[index]
        w = acc.linears[index].weight.detach().float()
        row = []
        for fq in fake_quantize_each(w, palette, statistics.importance_of(index)):
            dw = fq.float() - w
            per_row = ((dw @ gram) * dw).sum(dim=1).clamp_min(0)
            row.append(scale * float((d * per_row).sum()))
        return row

    def no_usable_batch(self, skipped: int) -> str:
        return (
            f"all {skipped} calibration windows gave non-finite activations or loss; check "
            "the model's weights (NaN/inf) or use a different calibration text"
        )
