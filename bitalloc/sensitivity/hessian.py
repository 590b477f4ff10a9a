"""Hessian-trace sensitivity (Hutchinson's estimator, as in HAWQ-V2/V3).

For a weight matrix ``W_u`` with ``n_u`` entries and a perturbation ``dW`` (the quantization
error ``Q_f(W_u) - W_u``), a second-order Taylor expansion of the mean next-token loss around a
trained model (gradient close to zero) gives ``0.5 * dW^T H_u dW``. HAWQ-V2 (Dong et al.,
"HAWQ-V2: Hessian Aware trace-Weighted Quantization of Neural Networks", NeurIPS 2020) replaces
``H_u`` by its average eigenvalue ``Tr(H_u) / n_u`` times the identity and ranks layers by
``Tr(H_u) / n_u * ||Q(W_u) - W_u||^2``; HAWQ-V3 (Yao et al., ICML 2021) uses the same per-layer
average trace. The table here is that quantity with the Taylor factor:
``0.5 * max(Tr(H_u), 0) / n_u * ||Q_f(W_u) - W_u||^2``.

The trace is estimated with Hutchinson's method (Hutchinson 1989): for a vector ``v`` of
independent Rademacher (+1/-1) entries, ``E[v^T H v] = Tr(H)``. One probe costs a forward pass,
a backward pass that keeps its graph (``create_graph=True``) and a second backward through that
graph, giving ``H v`` for every unit at once; the per-unit estimates are ``<v_u, (H v)_u>``
(the blocks of ``H`` between different units add variance but no bias). On CPU a probe costs
about 2-3.5x an eager forward + backward and keeps the whole graph in memory. Probes cycle over
the calibration windows and stop once the running mean of the per-unit traces changes by less
than ``tol`` (relative, L1) between consecutive probes.

Unlike the Fisher profiler no ``T`` (tokens per window) factor is needed: the Hessian of the
window's mean loss is already on the scale of the mean per-token loss.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from bitalloc.errors import BitallocError
from bitalloc.formats import QuantFormat, fake_quantize_each
from bitalloc.models import Unit, get_linear
from bitalloc.sensitivity.base import BaseProfiler, Statistics, grad_only_for, spread_windows
from bitalloc.sensitivity.profile import finite_or_none
from bitalloc.sensitivity.registry import register_profiler


def rademacher(weights: Sequence[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """One Rademacher tensor (+1 or -1, each with probability 1/2) per weight, drawn in order.

    Drawn on the CPU so that a seed gives the same probes on every device, then moved to each
    weight's device and dtype.
    """
    out = []
    for w in weights:
        bits = torch.randint(0, 2, tuple(w.shape), generator=generator, dtype=torch.int8)
        out.append((bits * 2 - 1).to(device=w.device, dtype=w.dtype))
    return out


@contextlib.contextmanager
def twice_differentiable_attention(model: nn.Module) -> Iterator[None]:
    """Run a Hugging Face model with eager attention, restoring its implementation afterwards.

    Fused attention kernels have no double backward: on CPU, SDPA dispatches to
    ``_scaled_dot_product_flash_attention_for_cpu`` whose backward is not differentiable
    ("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
    implemented", torch 2.13), and the CUDA flash/memory-efficient kernels lack it too
    (pytorch/pytorch#116350). Eager attention is plain matmul + softmax, which autograd
    differentiates twice. Modules without ``set_attn_implementation`` are left alone.
    """
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    setter = getattr(model, "set_attn_implementation", None)
    if setter is None or current in (None, "eager"):
        yield
        return
    setter("eager")
    try:
        yield
    finally:
        setter(current)


def hutchinson_probe(
    model: nn.Module,
    weights: Sequence[nn.Parameter],
    vectors: Sequence[torch.Tensor],
    window: torch.Tensor,
) -> np.ndarray | None:
    """Per-weight ``<v_u, (H v)_u>`` for one window's mean next-token loss, where ``H`` is the
    Hessian with respect to ``weights`` jointly; None when the loss, gradient or ``H v`` is not
    finite. Gradients must be enabled for ``weights``."""
    ids = window.reshape(1, -1).to(weights[0].device)
    loss = model(input_ids=ids, labels=ids).loss
    if not torch.isfinite(loss):
        return None
    grads = torch.autograd.grad(loss, weights, create_graph=True, materialize_grads=True)
    if not all(torch.isfinite(g).all() for g in grads):
        return None
    dot = sum((g * v).sum() for g, v in zip(grads, vectors))
    if isinstance(dot, torch.Tensor) and dot.requires_grad:
        hvs = torch.autograd.grad(dot, weights, materialize_grads=True)
    else:
        # The gradient does not depend on the weights: the loss is linear in them, H = 0.
        hvs = tuple(torch.zeros_like(w) for w in weights)
    if not all(torch.isfinite(h).all() for h in hvs):
        return None
    est = np.array(
        [float((v.double() * h.double()).sum()) for v, h in zip(vectors, hvs)], dtype=np.float64
    )
    return est if np.isfinite(est).all() else None


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise BitallocError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


@register_profiler
class HessianProfiler(BaseProfiler):
    """Hutchinson Hessian-trace profiler (``hessian``).

    ``tokens`` caps the calibration tokens (whole windows, spread evenly over the split); probes
    cycle over those windows. Between ``min_probes`` and ``max_probes`` probes are used: the
    loop stops once the relative L1 change of the running mean of per-unit traces falls below
    ``tol``. ``seed`` seeds the Rademacher vectors, so equal options give equal profiles.
    """

    name = "hessian"

    def __init__(
        self,
        tokens: int = 4096,
        progress: bool = True,
        *,
        max_probes: int = 32,
        tol: float = 0.02,
        min_probes: int = 4,
        seed: int = 0,
    ):
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
            raise BitallocError(f"calibration tokens must be positive, got {tokens!r}")
        self.tokens = tokens
        self.progress = progress
        self.max_probes = _check_int("max_probes", max_probes, 1)
        self.min_probes = _check_int("min_probes", min_probes, 1)
        if self.min_probes > self.max_probes:
            raise BitallocError(
                f"min_probes ({min_probes}) must not exceed max_probes ({max_probes}); "
                "lower min_probes or raise max_probes"
            )
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
            raise BitallocError(
                f"tol must be a positive number (relative change of the trace estimate, e.g. "
                f"0.02), got {tol!r}"
            )
        self.tol = float(tol)
        self.seed = _check_int("seed", seed, 0)

    def options(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "max_probes": self.max_probes,
            "min_probes": self.min_probes,
            "tol": self.tol,
            "seed": self.seed,
            "estimator": "hutchinson-rademacher",
            "scaling": "0.5*max(tr,0)/n*||dW||^2",
        }

    progress_desc = "probes"
    progress_unit = "probe"

    def gather(
        self, model: nn.Module, units: Sequence[Unit], calibration: torch.Tensor, bar: tqdm
    ) -> Statistics:
        seq_len = calibration.shape[1]
        picks = spread_windows(len(calibration), seq_len, self.tokens)
        weights = [get_linear(model, u.name).weight for u in units]
        generator = torch.Generator().manual_seed(self.seed)
        sums = np.zeros(len(units))
        mean = np.zeros(len(units))
        usable = skipped = 0
        used_windows: set[int] = set()
        change = math.inf
        converged = False
        bar.reset(total=self.max_probes)
        with twice_differentiable_attention(model), grad_only_for(model, weights):
            for k in range(self.max_probes):
                idx = picks[k % len(picks)]
                # Drawn before the probe runs so that probe k's vector does not depend on which
                # earlier probes were skipped.
                vectors = rademacher(weights, generator)
                est = hutchinson_probe(model, weights, vectors, calibration[idx])
                bar.update(1)
                if est is None:
                    skipped += 1
                    continue
                usable += 1
                used_windows.add(idx)
                sums += est
                # The mean before the first probe counts as zero, so probe 1's change is 1.
                previous, mean = mean, sums / usable
                num, den = float(np.abs(mean - previous).sum()), float(np.abs(mean).sum())
                change = num / den if den > 0 else (0.0 if num == 0 else math.inf)
                bar.set_postfix(change=f"{change:.3g}")
                if usable >= self.min_probes and change < self.tol:
                    converged = True
                    break
        metadata = {
            "windows": len(used_windows),
            "skipped_probes": skipped,
            "seq_len": seq_len,
            "probes": usable,
            "converged": converged,
            "relative_change": finite_or_none(change),
            "tol": self.tol,
            "seed": self.seed,
            "negative_traces": int((mean < 0).sum()),
            "traces": [float(t) for t in mean],
        }
        tokens = len(used_windows) * seq_len
        return Statistics(tokens, usable, skipped, (weights, mean), metadata)

    def unit_losses(
        self, index: int, statistics: Statistics, palette: Sequence[QuantFormat]
    ) -> list[float]:
        weights, traces = statistics.state
        w = weights[index].detach()
        # A negative estimate (indefinite Hessian, or noise around a flat direction) would
        # predict that quantization lowers the loss; clip to no predicted change.
        weight_per_entry = 0.5 * max(float(traces[index]), 0.0) / w.numel()
        row = []
        for fq in fake_quantize_each(w, palette, statistics.importance_of(index)):
            dw = fq.double() - w.double()
            row.append(weight_per_entry * float(dw.square().sum()))
        return row

    def no_usable_batch(self, skipped: int) -> str:
        return (
            f"all {skipped} Hessian probes gave non-finite Hessian-vector products (loss, "
            "gradient or H*v was NaN/inf); check the model's weights for NaN/inf, run it in "
            "float32 rather than float16, or use a different calibration text"
        )
