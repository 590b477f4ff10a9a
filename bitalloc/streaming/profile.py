"""Layer-streamed profiling: the ``output`` profiler (and every ``+gptq`` format, which needs
the same input Gram matrices) on a model that is never whole in memory.

One pass over the decoder layers, each loaded alone (:meth:`StreamedModel.layer`):

1. the calibration activations entering the layer go through it with hooks that gather each
   unit's importance vector and input Gram matrix (the importance pass and the ``output``
   profiler's statistics, in one);
2. every unit of the layer is quantized under every format of the palette (``+gptq`` with its
   Gram matrix, the others weighted by its vector) and scored ``trace(dW G dWᵀ)``, as
   :class:`~bitalloc.sensitivity.output.OutputProfiler` scores it;
3. the activations go on through the unquantized layer; with ``calibrate``, a second stream
   goes through the layer with every unit at the reference format, and the two final losses
   give the one factor that puts the table in nats (as the in-memory profiler fits it).

Peak memory is one layer in float32, its Gram matrices, the shell (embedding and head in the
checkpoint's dtype) and the activations (two streams of tokens x hidden floats). The result
equals the in-memory ``output`` profile given the same importance (``tests/streaming``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from bitalloc.errors import BitallocError
from bitalloc.formats import Format, fake_quantize_each
from bitalloc.importance import (
    IMPORTANCE_TOKENS,
    Importance,
    windows_digest,
)
from bitalloc.models import get_linear
from bitalloc.sensitivity.base import allowed_mask, spread_windows
from bitalloc.sensitivity.monotone import bit_chains, cap_chains
from bitalloc.sensitivity.output import fitted_scale, output_error, reference_format
from bitalloc.sensitivity.profile import Profile, finite_or_none
from bitalloc.sequential import BATCH
from bitalloc.streaming.model import StreamedModel, hidden_of, layer_importance, run_layer


def streamed_output_profile(
    model: StreamedModel,
    palette: Sequence[Format],
    calibration: torch.Tensor,
    *,
    tokens: int = IMPORTANCE_TOKENS,
    calibrate: bool = True,
    progress: bool = True,
    workers: int = 0,
    ray_address: str | None = None,
) -> tuple[Profile, Importance]:
    """The ``output`` profile of every unit of ``model`` over ``palette`` and the importance
    vectors it quantized with (see the module docstring).

    ``workers`` > 0 scores the units on that many Ray workers (a local Ray, or the cluster at
    ``ray_address`` / ``$RAY_ADDRESS``): each reads its unit's weight from the checkpoint's
    shards itself and receives only the Gram matrix, while this process runs the forward chain;
    a layer's scores are collected when the next layer's are sent, so at most two layers of
    Gram matrices are in flight. The result equals the in-process one."""
    if workers:
        from bitalloc.jobs import ray_session

        with ray_session(ray_address, workers) as ray:
            remote = ray.remote(num_cpus=1)(_score_from_checkpoint)
            scorer = _RayScorer(ray, remote, str(model.checkpoint.path))
            return _profile(model, palette, calibration, tokens, calibrate, progress, scorer)
    return _profile(model, palette, calibration, tokens, calibrate, progress, _LocalScorer())


def _profile(model, palette, calibration, tokens, calibrate, progress, scorer):
    start = time.perf_counter()
    if calibration.dim() != 2 or calibration.shape[0] == 0:
        raise BitallocError("streamed profiling needs calibration windows (n_windows, seq_len)")
    picks = spread_windows(len(calibration), int(calibration.shape[1]), tokens)
    windows = calibration[picks]
    units = model.units
    palette = list(palette)
    allowed = allowed_mask(units, palette)
    table = np.zeros((len(units), len(palette)))
    reference = reference_format(palette, units) if calibrate else None
    clean = model.first_layer_inputs(windows)
    quantized = clean if reference is not None else None
    vectors: dict[str, torch.Tensor] = {}
    count = 0
    row_of = {u.name: i for i, u in enumerate(units)}
    bar = tqdm(total=len(model.layers), desc="streamed output", unit="layer", disable=not progress)
    with torch.inference_mode():
        for index in range(len(model.layers)):
            layer_units = model.layer_units(index)
            with model.layer(index) as layer:
                importance = layer_importance(model, layer, layer_units, clean, grams=True)
                count = importance.tokens
                for unit in layer_units:
                    i = row_of[unit.name]
                    weight = get_linear(model.skeleton, unit.name).weight
                    cols = np.flatnonzero(allowed[i])
                    formats = [palette[j] for j in cols]
                    scorer.submit(i, cols, unit.name, weight, importance.grams[unit.name], formats)
                    vectors[unit.name] = importance.values[unit.name]
                scorer.next_layer(table)
                clean = run_layer(layer, clean)
                if quantized is not None:
                    for unit in layer_units:
                        weight = get_linear(model.skeleton, unit.name).weight
                        weight.copy_(reference.fake_quantize(weight, importance.of(unit.name)))
                    quantized = run_layer(layer, quantized)
            bar.update()
        bar.close()
        scorer.finish(table)
        base = _losses(model, clean, windows)
        table, fixed = cap_chains(table, bit_chains(palette), allowed)
        info = _scale(table, palette, reference, base, model, quantized, windows)
    scale = info["scale"]
    profile = Profile(
        units=tuple(u.name for u in units),
        formats=tuple(f.name for f in palette),
        loss=scale * table,
        metadata={
            "method": "output",
            "streamed": True,
            "tokens": int(count),
            "skipped_batches": 0,
            "windows": len(picks),
            "seq_len": int(calibration.shape[1]),
            "base_loss": finite_or_none(float(np.mean(base))),
            "monotone_fixes": fixed,
            **info,
            "seconds": time.perf_counter() - start,
        },
    )
    recorded = Importance(vectors, int(count), windows=windows_digest(windows))
    return profile, recorded


def _losses(model: StreamedModel, inputs, windows: torch.Tensor) -> list[float]:
    """Per-window losses from the last layer's outputs, batch by batch."""
    losses: list[float] = []
    for k, batch in enumerate(inputs):
        ids = windows[k * BATCH : (k + 1) * BATCH]
        losses += model.loss(hidden_of(batch), ids).tolist()
    return losses


def _scale(
    table: np.ndarray,
    palette: Sequence[Format],
    reference: Format | None,
    base: list[float],
    model: StreamedModel,
    quantized,
    windows: torch.Tensor,
) -> dict[str, Any]:
    """The factor that puts the table in nats, and what to record about it (as
    :meth:`OutputProfiler._scale` decides it)."""
    if reference is None:
        return {"scale": 1.0, "scale_source": "unscaled", "reference_format": None}
    increase = float(np.mean(_losses(model, quantized, windows))) - float(np.mean(base))
    predicted = float(table[:, list(palette).index(reference)].sum())
    info: dict[str, Any] = {
        "reference_format": reference.name,
        "reference_loss_increase": finite_or_none(increase),
    }
    scale, source = fitted_scale(reference.name, increase, predicted)
    return {**info, "scale": scale, "scale_source": source}


def score_unit(weight: torch.Tensor, gram: torch.Tensor, formats: Sequence[Format]) -> list[float]:
    """``trace(dW G dWᵀ)`` of ``weight`` under each format (``+gptq`` with ``gram``, the
    others weighted by its diagonal)."""
    return [output_error(weight, gram, fq) for fq in fake_quantize_each(weight, formats, gram)]


def _score_from_checkpoint(path: str, unit: str, names: list[str], gram: torch.Tensor):
    """A Ray task: the unit's weight read from the shards here, then :func:`score_unit`."""
    from bitalloc.formats import parse_format
    from bitalloc.streaming.sources import open_checkpoint

    torch.set_num_threads(1)
    weight = open_checkpoint(path).tensor(f"{unit}.weight", torch.float32)
    return score_unit(weight, gram, [parse_format(n) for n in names])


class _LocalScorer:
    """Scores each unit at once, in this process."""

    def __init__(self) -> None:
        self.done: list[tuple[int, np.ndarray, list[float]]] = []

    def submit(self, row, cols, unit, weight, gram, formats) -> None:
        self.done.append((row, cols, score_unit(weight, gram, formats)))

    def next_layer(self, table: np.ndarray) -> None:
        self.finish(table)

    def finish(self, table: np.ndarray) -> None:
        for row, cols, values in self.done:
            table[row, cols] = values
        self.done = []


class _RayScorer:
    """Sends each unit to a Ray task; collects the layer before last when a layer is sent."""

    def __init__(self, ray, remote, path: str):
        self.ray, self.remote, self.path = ray, remote, path
        self.layers: list[list[tuple[int, np.ndarray, object]]] = [[]]

    def submit(self, row, cols, unit, weight, gram, formats) -> None:
        names = [f.name for f in formats]
        self.layers[-1].append((row, cols, self.remote.remote(self.path, unit, names, gram)))

    def next_layer(self, table: np.ndarray) -> None:
        if len(self.layers) > 1:
            self._collect(self.layers.pop(0), table)
        self.layers.append([])

    def finish(self, table: np.ndarray) -> None:
        for layer in self.layers:
            self._collect(layer, table)
        self.layers = [[]]

    def _collect(self, layer, table: np.ndarray) -> None:
        values = self.ray.get([future for _, _, future in layer])
        for (row, cols, _), row_values in zip(layer, values):
            table[row, cols] = row_values
