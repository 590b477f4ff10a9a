"""Layer-streamed Fisher and K-FAC: the ``fisher`` and ``kfac`` profilers' tables on a model
that is never whole in memory, by recomputing each layer's forward during a backward pass that
streams the layers in reverse.

The in-memory profiler (:class:`~bitalloc.sensitivity.fisher.FisherProfiler`) squares, for each
calibration window, the gradient of one scalar (:func:`~bitalloc.sensitivity.base.window_objective`)
with respect to every unit's weight. Here:

1. **forward**, layer by layer: each window's input to every layer is kept (``layers x tokens x
   hidden`` floats: 0.35 GiB for 1024 tokens of a 3B model), and the units' importance
   vectors are gathered on the way, as the streamed ``output`` profile gathers them;
2. **the head**: each window's gradient of the objective with respect to the last hidden
   states, the head read :data:`~bitalloc.streaming.model.HEAD_ROWS` rows at a time (a first
   pass for the log-sum-exp, a second for the softmax's gradient), the random token signs drawn
   in the in-memory profiler's order;
3. **backward**, layer by layer from the last: the layer is loaded, its forward recomputed from
   the kept input of each window with gradients on, and the window's output gradient sent back
   through it. That gives every unit's weight gradient for the window (squared and summed) and
   the gradient that goes on to the layer before. With the layer still loaded, each unit is
   scored ``0.5 * T * sum(F * (Q(W) - W) ** 2)`` under every format.

``kfac`` runs the same passes with no weight gradient: in the reverse pass the in-memory
profiler's :class:`~bitalloc.sensitivity.kfac.KroneckerAccumulator` gathers each unit's input
Gram matrix and output-gradient factor from the recomputed layer, and each unit is scored
``0.5 * T * sum_i D_i (dW G dWᵀ)_ii``.

Peak memory is one layer in float32 with its gradients, the kept inputs and one window's
activations. With ``spill`` (a directory), the kept inputs go to disk there, one file per
layer, and are read back in reverse; :func:`~bitalloc.streaming.allocate.allocate_streamed`
spills when they would take more than a quarter of the memory available. The table equals
the in-memory profiler's up to float summation order (``tests/streaming/test_fisher.py``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bitalloc.errors import BitallocError
from bitalloc.formats import Format, fake_quantize_each
from bitalloc.importance import Importance, windows_digest
from bitalloc.models import get_linear
from bitalloc.sensitivity.base import (
    allowed_mask,
    check_estimator,
    grad_only_for,
    spread_windows,
)
from bitalloc.sensitivity.kfac import KroneckerAccumulator
from bitalloc.sensitivity.monotone import bit_chains, cap_chains
from bitalloc.sensitivity.profile import Profile
from bitalloc.sequential import block_output, with_hidden
from bitalloc.streaming.model import (
    HEAD_ROWS,
    LayerInputs,
    StreamedModel,
    hidden_of,
    layer_importance,
    run_layer,
)

#: The gradient profilers streamed here.
GRADIENT_METHODS = ("fisher", "kfac")


def streamed_fisher_profile(
    model: StreamedModel,
    palette: Sequence[Format],
    calibration: torch.Tensor,
    *,
    tokens: int = 8192,
    estimator: str = "token",
    seed: int = 0,
    progress: bool = True,
    spill: str | os.PathLike[str] | None = None,
    method: str = "fisher",
) -> tuple[Profile, Importance]:
    """The ``fisher`` profile (or with ``method="kfac"`` the ``kfac`` one) of every unit of
    ``model`` over ``palette`` (see the module docstring) and the importance vectors it
    quantized with; ``tokens``, ``estimator`` and ``seed`` are the in-memory profiler's
    settings; ``spill`` a directory to keep the layers' inputs in instead of memory."""
    start = time.perf_counter()
    check_estimator(estimator)
    if method not in GRADIENT_METHODS:
        raise BitallocError(f"method must be one of {GRADIENT_METHODS}, got {method!r}")
    if calibration.dim() != 2 or calibration.shape[0] == 0:
        raise BitallocError("streamed profiling needs calibration windows (n_windows, seq_len)")
    seq_len = int(calibration.shape[1])
    picks = spread_windows(len(calibration), seq_len, tokens)
    windows = calibration[picks]
    palette = list(palette)
    units = model.units
    row_of = {u.name: i for i, u in enumerate(units)}
    allowed = allowed_mask(units, palette)
    bar = tqdm(
        total=2 * len(model.layers), desc="streamed fisher", unit="layer", disable=not progress
    )
    kept = _KeptInputs(spill)
    vectors, count, last = _forward(model, windows, bar, kept)
    generator = torch.Generator().manual_seed(seed) if estimator == "token" else None
    grads = [
        _head_gradient(model, hidden_of(batch), windows[k : k + 1], generator)
        for k, batch in enumerate(last)
    ]
    del last
    table = np.zeros((len(units), len(palette)))
    importance = Importance(vectors, count, windows=windows_digest(windows))
    scale = 0.5 * (seq_len - 1)
    for index in reversed(range(len(model.layers))):
        layer_units = model.layer_units(index)
        with model.layer(index) as layer:
            backward = _backward_kfac if method == "kfac" else _backward_through
            error_of, grads = backward(model, layer, layer_units, kept.pop(), grads)
            with torch.no_grad():
                for unit in layer_units:
                    i = row_of[unit.name]
                    cols = np.flatnonzero(allowed[i])
                    weight = get_linear(model.skeleton, unit.name).weight.detach()
                    error = error_of[unit.name]
                    table[i, cols] = [
                        scale * error(fq.float() - weight.float())
                        for fq in fake_quantize_each(
                            weight, [palette[j] for j in cols], importance.of(unit.name)
                        )
                    ]
        bar.update()
    bar.close()
    table, fixed = cap_chains(table, bit_chains(palette), allowed)
    profile = Profile(
        units=tuple(u.name for u in units),
        formats=tuple(f.name for f in palette),
        loss=table,
        metadata={
            "method": method,
            "streamed": True,
            "tokens": int(windows.numel()),
            "skipped_batches": 0,
            "estimator": estimator,
            "windows": len(picks),
            "seq_len": seq_len,
            "monotone_fixes": fixed,
            "seconds": time.perf_counter() - start,
        },
    )
    return profile, importance


class _KeptInputs:
    """Each layer's inputs, pushed in order and popped in reverse: in memory, or (``spill``)
    their hidden states in one file per layer (the rest of a call, the attention mask and
    rotary embedding, is shared by every layer and stays in memory)."""

    def __init__(self, spill: str | os.PathLike[str] | None):
        self.directory = None if spill is None else Path(spill)
        self.layers: list[LayerInputs] = []

    def append(self, inputs: LayerInputs) -> None:
        if self.directory is None:
            self.layers.append(inputs)
            return
        path = self.directory / f"layer-{len(self.layers):05d}.pt"
        torch.save([hidden_of(batch) for batch in inputs], path)
        self.layers.append([with_hidden(a, k, None) for a, k in inputs])

    def pop(self) -> LayerInputs:
        inputs = self.layers.pop()
        if self.directory is None:
            return inputs
        path = self.directory / f"layer-{len(self.layers):05d}.pt"
        hidden = torch.load(path)
        path.unlink()
        return [with_hidden(a, k, x) for (a, k), x in zip(inputs, hidden)]


def _forward(
    model: StreamedModel, windows: torch.Tensor, bar: tqdm, kept: _KeptInputs
) -> tuple[dict[str, torch.Tensor], int, LayerInputs]:
    """Keep each layer's input for each window (one window per batch, as the in-memory
    profiler differentiates one window at a time); the units' importance vectors gathered on
    the way, their token count, and the last layer's outputs."""
    # Plain tensors, not inference-mode ones: the backward pass differentiates through them.
    inputs = [_plain(model.first_layer_inputs(windows[k : k + 1])[0]) for k in range(len(windows))]
    vectors: dict[str, torch.Tensor] = {}
    count = 0
    with torch.no_grad():
        for index in range(len(model.layers)):
            with model.layer(index) as layer:
                result = layer_importance(model, layer, model.layer_units(index), inputs)
                vectors.update(result.values)
                count = result.tokens
                kept.append(inputs)
                inputs = run_layer(layer, inputs)
            bar.update()
    return vectors, count, inputs


def _head_gradient(
    model: StreamedModel,
    hidden: torch.Tensor,
    ids: torch.Tensor,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The gradient of :func:`~bitalloc.sensitivity.base.window_objective` for one window with
    respect to the last layer's output ``hidden`` (1, seq, dim): the head read in blocks of
    rows, twice (log-sum-exp, then the softmax's gradient), never whole in float32."""
    head = model.skeleton.lm_head.weight
    targets = ids[0, 1:]
    steps = targets.numel()
    # The objective is mean_t(s_t * loss_t): each token's logits get s_t / T times
    # (softmax - one-hot); the signs are drawn as window_objective draws them.
    weights = torch.full((steps,), 1.0 / steps)
    if generator is not None:
        signs = torch.randint(0, 2, (steps,), generator=generator) * 2 - 1
        weights = weights * signs.to(weights)
    with torch.enable_grad():
        x = hidden.detach().clone().requires_grad_(True)
        normed = model.skeleton.model.norm(x)
        flat = normed[0, :-1]
        with torch.no_grad():
            total = torch.full((steps,), float("-inf"))
            for start in range(0, head.shape[0], HEAD_ROWS):
                block = head[start : start + HEAD_ROWS].to(torch.float32)
                total = torch.logaddexp(total, torch.logsumexp(F.linear(flat, block), dim=-1))
            grad = torch.zeros_like(flat)
            for start in range(0, head.shape[0], HEAD_ROWS):
                block = head[start : start + HEAD_ROWS].to(torch.float32)
                probs = torch.exp(F.linear(flat, block) - total[:, None])
                grad += (probs * weights[:, None]) @ block
            grad -= weights[:, None] * head[targets].to(torch.float32)
        flat.backward(grad)
    return x.grad.detach()


def _backward_through(
    model: StreamedModel,
    layer: torch.nn.Module,
    units,
    inputs: LayerInputs,
    grads: list[torch.Tensor],
) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Send each window's output gradient back through ``layer`` (its forward recomputed from
    the kept input): each unit's Fisher error ``sum(F dW^2)``, ``F`` the mean over windows of
    its squared weight gradient, and each window's gradient with respect to the layer's
    input."""
    weights = {u.name: get_linear(model.skeleton, u.name).weight for u in units}
    sums = {name: torch.zeros_like(w) for name, w in weights.items()}
    back: list[torch.Tensor] = []
    with grad_only_for(layer, list(weights.values())):
        for (args, kwargs), grad in zip(inputs, grads):
            x, hidden = _recompute(layer, args, kwargs)
            with torch.enable_grad():
                hidden.backward(grad)
            for name, w in weights.items():
                if w.grad is None or not bool(torch.isfinite(w.grad).all()):
                    raise BitallocError(
                        f"{name} got a non-finite gradient on a calibration window; check the "
                        "model's weights (NaN/inf) or use a different calibration text"
                    )
                sums[name] += w.grad.float().square()
                w.grad = None
            back.append(x.grad.detach())
    return {name: _fisher_error(total / len(inputs)) for name, total in sums.items()}, back


def _fisher_error(fisher: torch.Tensor):
    """``sum(F * dW^2)`` for a unit's mean squared gradient ``F``."""
    return lambda dw: float((fisher * dw.square()).sum())


def _backward_kfac(
    model: StreamedModel,
    layer: torch.nn.Module,
    units,
    inputs: LayerInputs,
    grads: list[torch.Tensor],
) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Send each window's output gradient back through ``layer`` with no weight gradient (as
    the in-memory ``kfac`` profiler does), gathering each unit's input Gram matrix and output
    gradient factor with its accumulator: each unit's ``sum_i D_i (dW G dW^T)_ii`` and each
    window's gradient with respect to the layer's input."""
    acc = KroneckerAccumulator(model.skeleton, units)
    back: list[torch.Tensor] = []
    with grad_only_for(layer, []):
        for (args, kwargs), grad in zip(inputs, grads):
            x = hidden_of((args, kwargs)).detach().clone().requires_grad_(True)
            call_args, call_kwargs = with_hidden(args, kwargs, x)

            def objective(a=call_args, k=call_kwargs, g=grad) -> torch.Tensor:
                # Its gradient at the layer's output is the window's.
                return (block_output(layer, a, k) * g).sum()

            if not acc.add_batch_through(objective, int(x.shape[0] * x.shape[1])):
                raise BitallocError(
                    "a calibration window gave non-finite activations or gradients; check the "
                    "model's weights (NaN/inf) or use a different calibration text"
                )
            back.append(x.grad.detach())
    grams, factors = acc.grams(), acc.output_factors()
    errors = {u.name: _kfac_error(g, d) for u, g, d in zip(units, grams, factors)}
    return errors, back


def _kfac_error(gram: torch.Tensor, factor: torch.Tensor):
    """``sum_i D_i (dW G dW^T)_ii`` for a unit's input Gram ``G`` and output factor ``D``."""
    return lambda dw: float((factor * ((dw @ gram) * dw).sum(dim=1).clamp_min(0)).sum())


def _recompute(
    layer: torch.nn.Module, args: tuple, kwargs: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``layer``'s forward on a kept input, with gradients on: the input made a leaf that
    receives its gradient, and the output hidden states."""
    x = hidden_of((args, kwargs)).detach().clone().requires_grad_(True)
    with torch.enable_grad():
        return x, block_output(layer, *with_hidden(args, kwargs, x))


def _plain(value: Any) -> Any:
    """``value`` with every tensor in it cloned outside inference mode."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
