"""Layer-output reconstruction error.

Quantizing a linear layer's weight ``W`` to ``Q(W)`` changes its output on input ``x`` by
``dW x`` with ``dW = Q(W) - W``. Averaged over calibration tokens, the squared size of that
change is ``e = trace(dW G dW^T)`` with ``G`` the mean of ``x x^T`` over tokens (the input
Gram matrix, the "Hessian" ``2 X X^T`` that GPTQ builds up batch by batch in ``add_batch``).
This layer-wise objective ``||W X - Q(W) X||^2`` is the one GPTQ (Frantar et al., "GPTQ:
Accurate Post-Training Quantization for Generative Pre-trained Transformers", ICLR 2023) and
Optimal Brain Compression (Frantar & Alistarh, NeurIPS 2022) minimise. Here it is only
measured, for every unit under every format, after one forward pass per calibration window
and no backward pass.

``e`` is in squared-activation units, not nats, and its size differs between models and
between the spots in a network; a loss-increase table has to be in nats like every other
profile. With ``calibrate`` the whole table is multiplied by one global factor, fitted on one
measurement: the calibration loss increase when every unit takes a reference format (4-bit when
the palette has it) divided by the summed ``e`` of all units under that format. One factor
keeps the ranking of units and formats exactly as ``e`` gives it; no unit is measured alone.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bitalloc.apply import fake_quantized
from bitalloc.config.messages import CALIBRATION_TOKENS
from bitalloc.errors import BitallocError
from bitalloc.formats import QuantFormat, fake_quantize_each
from bitalloc.importance import windows_digest
from bitalloc.models import Unit, get_linear
from bitalloc.sensitivity.base import BaseProfiler, Statistics, spread_windows
from bitalloc.sensitivity.profile import finite_or_none
from bitalloc.sensitivity.registry import register_profiler

if TYPE_CHECKING:
    from bitalloc.importance import Importance


def _window_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of one (1, seq_len) window, from the logits."""
    logits = model(input_ids=ids).logits[0, :-1].float()
    return F.cross_entropy(logits, ids[0, 1:])


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Evaluation mode inside the block; every module's own mode restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        yield
    finally:
        for module, mode in modes.items():
            module.training = mode


class InputGramAccumulator:
    """Running mean over calibration tokens of ``x x^T`` for every unit's input ``x``.

    Units whose Linear receives the very same input tensor in a forward pass (q/k/v, gate/up)
    share one Gram matrix, found by tensor identity during the first forward that calls them.
    A window's inputs are held until its forward ends and added only if all are finite, so a
    skipped window leaves no trace. Products are float32 (as in GPTQ): the per-token means of a
    few hundred windows lose nothing measurable, and float64 would double the memory of the
    matrices, which dominates (about 0.4 GB for a 135M-parameter model).
    """

    def __init__(self, model: nn.Module, units: Sequence[Unit]):
        self.model = model
        self.linears = [get_linear(model, u.name) for u in units]
        self.names = [u.name for u in units]
        # owner[i]: index of the unit whose Gram unit i uses (itself unless its input is shared).
        self.owner: list[int | None] = [None] * len(units)
        self._grams: dict[int, torch.Tensor] = {}
        self._seen: dict[int, tuple[torch.Tensor, int]] = {}
        self._pending: list[tuple[int, torch.Tensor]] = []
        self.batches = 0
        self.skipped = 0
        self.tokens = 0
        self.losses: list[float] = []

    def _hook(self, index: int) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0]
            # _seen keeps x alive until the forward ends, so its id cannot be reused meanwhile.
            seen = self._seen.get(id(x))
            if seen is not None:
                slot = seen[1]
            else:
                slot = index if self.owner[index] is None else self.owner[index]
            if self.owner[index] is None:
                self.owner[index] = slot
            if self.owner[index] != slot or (seen is None and slot != index):
                raise BitallocError(
                    f"unit {self.names[index]} shares its input with another unit in one "
                    "calibration window but not in another; the output profiler needs a "
                    "model whose layers are wired the same way for every input"
                )
            if seen is None:
                self._seen[id(x)] = (x, slot)
                self._pending.append((slot, x))

        return hook

    def add_batch(self, window: torch.Tensor) -> bool:
        """One forward pass over a window (1-D or (1, seq_len)); False if it was skipped."""
        ids = window.reshape(1, -1)
        handles = [lin.register_forward_hook(self._hook(i)) for i, lin in enumerate(self.linears)]
        try:
            with torch.inference_mode():
                loss = _window_loss(self.model, ids)
                usable = bool(torch.isfinite(loss)) and all(
                    bool(torch.isfinite(x).all()) for _, x in self._pending
                )
                if usable:
                    self._accumulate(ids.numel())
        finally:
            for h in handles:
                h.remove()
            self._seen.clear()
            self._pending.clear()
        if not usable:
            self.skipped += 1
            return False
        self.batches += 1
        self.losses.append(float(loss))
        return True

    def _accumulate(self, tokens: int) -> None:
        # Kept as a running mean (as GPTQ does) so grams() hands out the matrices without a copy.
        total = self.tokens + tokens
        for g in self._grams.values():
            g.mul_(self.tokens / total)
        for slot, x in self._pending:
            x2 = x.reshape(-1, x.shape[-1]).float()
            if slot not in self._grams:
                self._grams[slot] = x2.new_zeros(x2.shape[1], x2.shape[1])
            self._grams[slot].addmm_(x2.T, x2, alpha=1.0 / total)
        self.tokens = total

    def grams(self) -> list[torch.Tensor]:
        """Per unit, the mean over calibration tokens of ``x x^T``: the accumulator's own tensors
        (no copy; one object for units with a shared input), zeros for a unit never called."""
        if self.batches == 0:
            raise BitallocError(
                f"all {self.skipped} calibration windows gave non-finite activations or loss; "
                "check the model's weights (NaN/inf) or use a different calibration text"
            )
        out = []
        for i, lin in enumerate(self.linears):
            slot = self.owner[i]
            if slot is None or slot not in self._grams:
                n = lin.in_features
                out.append(torch.zeros(n, n, device=lin.weight.device))
            else:
                out.append(self._grams[slot])
        return out


def output_error(weight: torch.Tensor, gram: torch.Tensor, quantized: torch.Tensor) -> float:
    """``trace(dW G dW^T)`` with ``dW = quantized - weight``: mean squared change of the unit's
    output per token when its weight is replaced by ``quantized`` (Q(W) under some format)."""
    w = weight.detach()
    dw = quantized.float() - w.float()
    value = float(((dw @ gram.to(dw.device, torch.float32)) * dw).sum())
    # G is PSD, so a negative value is rounding error around zero.
    return max(value, 0.0)


def fitted_scale(reference: str, increase: float, predicted: float) -> tuple[float, str]:
    """The factor that puts output errors in nats: the measured loss increase with every unit
    at ``reference`` over the errors' sum under it, and its source (``calibrated``, or why it
    is 1: ``unscaled: ...``)."""
    if not math.isfinite(increase):
        why = f"the loss with every unit at {reference} is not finite"
    elif increase <= 0:
        why = f"every unit at {reference} did not increase the loss ({increase:.3g} nats)"
    elif predicted <= 0:
        why = f"zero output error under {reference}"
    else:
        return increase / predicted, "calibrated"
    return 1.0, f"unscaled: {why}"


def reference_format(
    palette: Sequence[QuantFormat], units: Sequence[Unit] = ()
) -> QuantFormat | None:
    """The format used to calibrate the scale: of the quantized formats that can store every
    unit, 4 bits with the largest group if present, else the one nearest to 4 bits (ties:
    larger group, then fewer bits; a family without code widths counts its nominal bits);
    None without one."""
    quantized = [f for f in palette if not f.is_float and all(f.allows(u.shape) for u in units)]
    if not quantized:
        return None

    def bits(f: QuantFormat) -> float:
        return float(getattr(f, "bits", f.nominal_bits))

    # Fewer bits on a full tie: the larger loss increase is measured with less relative noise.
    return min(
        quantized, key=lambda f: (abs(bits(f) - 4), -(getattr(f, "group_size", 0) or 0), bits(f))
    )


@register_profiler
class OutputProfiler(BaseProfiler):
    """Layer-output reconstruction-error profiler (``output``); no gradients are computed.

    ``tokens`` caps the calibration tokens (windows spread evenly over the split); ``calibrate``
    puts the errors on the loss scale with one measured factor (see the module docstring).
    """

    name = "output"

    def __init__(self, tokens: int = 8192, progress: bool = True, *, calibrate: bool = True):
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
            raise BitallocError(CALIBRATION_TOKENS.format(value=tokens))
        if not isinstance(calibrate, bool):
            raise BitallocError(f"calibrate must be True or False, got {calibrate!r}")
        self.tokens = tokens
        self.progress = progress
        self.calibrate = calibrate

    def options(self) -> dict[str, Any]:
        scaling = "uniform-reference-fit" if self.calibrate else "none"
        return {"tokens": self.tokens, "calibrate": self.calibrate, "scaling": scaling}

    progress_desc = "inputs"

    def gather(
        self, model: nn.Module, units: Sequence[Unit], calibration: torch.Tensor, bar: tqdm
    ) -> Statistics:
        seq_len = calibration.shape[1]
        picks = spread_windows(len(calibration), seq_len, self.tokens)
        bar.reset(total=len(picks))
        with _eval_mode(model):
            acc = InputGramAccumulator(model, units)
            used = []
            for idx in picks:
                if acc.add_batch(calibration[idx]):
                    used.append(idx)
                bar.update()
        metadata = {
            "windows": acc.batches,
            "seq_len": seq_len,
            "gram_matrices": len({o for o in acc.owner if o is not None}),
            "units_without_input": sum(o is None for o in acc.owner),
            "base_loss": finite_or_none(float(np.mean(acc.losses))) if acc.losses else None,
        }
        grams = acc.grams() if acc.batches else None
        state = (acc.linears, grams, calibration[used], acc.losses)
        return Statistics(acc.tokens, acc.batches, acc.skipped, state, metadata)

    def reuse(
        self,
        model: nn.Module,
        units: Sequence[Unit],
        calibration: torch.Tensor,
        bar: tqdm,
        importance: Importance | None,
    ) -> Statistics | None:
        """The importance's Gram matrices when they are over exactly this profiler's windows
        (gathered for ``+gptq`` formats with the same token count and no window skipped): then
        only each window's loss is computed, by a plain forward pass without hooks."""
        seq_len = calibration.shape[1]
        picks = spread_windows(len(calibration), seq_len, self.tokens)
        windows = calibration[picks]
        if (
            importance is None
            or importance.grams is None
            or importance.windows != windows_digest(windows)
            or importance.tokens != windows.numel()
            or any(u.name not in importance.grams for u in units)
        ):
            return None
        bar.reset(total=len(picks))
        losses = []
        with _eval_mode(model), torch.inference_mode():
            for window in windows:
                losses.append(float(_window_loss(model, window.reshape(1, -1))))
                bar.update()
        if not all(math.isfinite(v) for v in losses):
            return None  # gather() skips those windows and says so
        grams = [importance.grams[u.name] for u in units]
        metadata = {
            "windows": len(picks),
            "seq_len": seq_len,
            "gram_matrices": len({id(g) for g in grams}),
            "units_without_input": 0,
            "base_loss": finite_or_none(float(np.mean(losses))),
            "gram_source": "importance",
        }
        linears = [get_linear(model, u.name) for u in units]
        state = (linears, grams, windows, losses)
        return Statistics(int(windows.numel()), len(picks), 0, state, metadata)

    def unit_losses(
        self, index: int, statistics: Statistics, palette: Sequence[QuantFormat]
    ) -> list[float]:
        linears, grams, _, _ = statistics.state
        lin = linears[index]
        return [
            output_error(lin.weight, grams[index], fq)
            for fq in fake_quantize_each(
                lin.weight.detach(), palette, statistics.importance_of(index)
            )
        ]

    def finalize(
        self,
        table: np.ndarray,
        statistics: Statistics,
        model: nn.Module,
        units: Sequence[Unit],
        palette: Sequence[QuantFormat],
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Multiply the (already capped) errors by the fitted factor; a positive factor keeps
        the order of every column."""
        _, _, windows, losses = statistics.state
        with _eval_mode(model):
            scale, info = self._scale(
                model, units, palette, table, windows, losses, statistics.importance
            )
        return scale * table, info

    def no_usable_batch(self, skipped: int) -> str:
        return (
            f"all {skipped} calibration windows gave non-finite activations or loss; check the "
            "model's weights (NaN/inf) or use a different calibration text"
        )

    def _scale(
        self,
        model: nn.Module,
        units: Sequence[Unit],
        palette: Sequence[QuantFormat],
        raw: np.ndarray,
        windows: torch.Tensor,
        base_losses: list[float],
        importance: Importance | None = None,
    ) -> tuple[float, dict[str, Any]]:
        """The global factor and what to record about it."""
        if not self.calibrate:
            return 1.0, {"scale": 1.0, "scale_source": "unscaled"}
        ref = reference_format(palette, units)
        info: dict[str, Any] = {
            "reference_format": ref.name if ref else None,
            "reference_loss_increase": None,
        }
        if ref is None:
            return 1.0, {**info, "scale": 1.0, "scale_source": "unscaled: no integer format"}
        assignment = {u.name: ref for u in units}
        with fake_quantized(model, assignment, importance=importance), torch.inference_mode():
            quant = [float(_window_loss(model, w.reshape(1, -1))) for w in windows]
        increase = float(np.mean(quant)) - float(np.mean(base_losses))
        predicted = float(raw[:, list(palette).index(ref)].sum())
        info["reference_loss_increase"] = finite_or_none(increase)
        scale, source = fitted_scale(ref.name, increase, predicted)
        return scale, {**info, "scale": scale, "scale_source": source}
