"""Measured quality: perplexity of allocations (weights fake-quantized, and the KV cache
quantized when the allocation has KV formats) beside uniform baselines, on one evaluation set."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from bitalloc.allocation import Allocation, Measured
from bitalloc.apply import fake_quantized
from bitalloc.errors import BitallocError
from bitalloc.evaluate import Perplexity, perplexity
from bitalloc.folding_record import require_folded
from bitalloc.formats import QuantFormat, parse_format
from bitalloc.kv.formats import KVFormat, parse_kv_format
from bitalloc.kv.record import KVAllocation
from bitalloc.models import Unit
from bitalloc.planning import Frontier, FrontierPoint

if TYPE_CHECKING:
    from bitalloc.stages.prepare import Prepared


def uniform_assignment(units: Sequence[Unit], fmt: QuantFormat | str) -> dict[str, str]:
    """Every unit in one format."""
    name = parse_format(fmt).name
    return {u.name: name for u in units}


def uniform_avg_bits(units: Sequence[Unit], fmt: QuantFormat | str) -> float:
    """Exact average stored bits per weight of every unit in one format."""
    f = parse_format(fmt)
    return sum(f.storage_bits(u.shape) for u in units) / sum(u.numel for u in units)


def nearest_around(exact: Sequence[tuple[float, Any]], target: float) -> list[tuple[float, Any]]:
    """Of ``(bits, item)`` pairs, the one with the most bits at or below ``target`` and the one
    with the fewest above it (either left out when there is none)."""
    below = [e for e in exact if e[0] <= target]
    above = [e for e in exact if e[0] > target]
    chosen = []
    if below:
        chosen.append(max(below, key=lambda e: e[0]))
    if above:
        chosen.append(min(above, key=lambda e: e[0]))
    return chosen


def baseline_formats(
    units: Sequence[Unit], palette: Sequence[QuantFormat], avg_bits: float
) -> list[QuantFormat]:
    """Uniform baselines for a budget: the palette formats nearest below and above it (by their
    exact average bits on these units; only formats that can store every unit), ``int4-g128``,
    and ``fp16`` (unquantized)."""
    exact = [
        (uniform_avg_bits(units, f), f)
        for f in palette
        if not f.is_float and all(f.allows(u.shape) for u in units)
    ]
    chosen = [f for _, f in nearest_around(exact, avg_bits)]
    for extra in ("int4-g128", "fp16"):
        fmt = parse_format(extra)
        if fmt not in chosen:
            chosen.append(fmt)
    return chosen


def measure_assignment(
    prep: Prepared,
    assignment: dict[str, str],
    ev: torch.Tensor,
    *,
    kv_formats: Mapping[str, str] | None = None,
    batch_size: int = 4,
    progress: bool = False,
    desc: str = "perplexity",
) -> Perplexity:
    """Perplexity with ``assignment`` (unit -> format) fake-applied and, when ``kv_formats``
    (KV unit -> KV format) is given, the KV cache quantized per layer; the model is restored."""
    with fake_quantized(prep.model, assignment, prep.quantized, prep.importance):
        if kv_formats:
            from bitalloc.kv.cache import kv_perplexity

            return kv_perplexity(
                prep.model,
                ev,
                dict(kv_formats),
                batch_size=batch_size,
                progress=progress,
                desc=desc,
            )
        return perplexity(prep.model, ev, batch_size=batch_size, progress=progress, desc=desc)


def _check_importance(prep: Prepared, allocation: Allocation) -> None:
    """Refuse to measure an allocation with another clipping than it records: the numbers
    would describe weights that applying it does not give."""
    if allocation.all_float:
        return
    recorded = allocation.data.importance
    ours = prep.importance
    if ours is not None:
        ours = ours.restricted(u.name for u in allocation.data.units).record.sha256
    if (None if recorded is None else recorded.sha256) != ours:
        had = "none (plain squared error)" if recorded is None else "importance-weighted"
        raise BitallocError(
            f"the allocation records {had} clipping but the prepared model clips otherwise; "
            "measure it with the importance it records (prepare with clipping='mse' and set "
            "importance=allocation.importance(), as `bitalloc eval` does)"
        )


def measure(
    prep: Prepared,
    allocation: Allocation,
    *,
    eval_tokens: int | None,
    batch_size: int = 4,
    progress: bool = True,
) -> Measured:
    """Perplexity of the allocation beside uniform baselines on the evaluation split."""
    allocation.check_model(prep.model)
    require_folded(prep.model, allocation.data.scale_folding)
    _check_importance(prep, allocation)
    ev = prep.evaluation_windows(eval_tokens)
    baselines: dict[str, float] = {}
    baseline_bits: dict[str, float] = {}
    for fmt in baseline_formats(prep.units, prep.palette, allocation.target_bits):
        result = measure_assignment(
            prep,
            uniform_assignment(prep.units, fmt),
            ev,
            batch_size=batch_size,
            progress=progress,
            desc=f"perplexity {fmt.name}",
        )
        baselines[fmt.name] = result.perplexity
        baseline_bits[fmt.name] = uniform_avg_bits(prep.units, fmt)
    result = measure_assignment(
        prep,
        allocation.formats,
        ev,
        kv_formats=allocation.kv_formats,
        batch_size=batch_size,
        progress=progress,
        desc="perplexity allocation",
    )
    kv_baselines: dict[str, float] = {}
    kv_bits: dict[str, float] = {}
    if allocation.data.kv is not None:
        for fmt, bits in kv_baseline_formats(allocation.data.kv):
            kv_baselines[fmt.name] = measure_assignment(
                prep,
                allocation.formats,
                ev,
                kv_formats=dict.fromkeys(allocation.kv_formats, fmt.name),
                batch_size=batch_size,
                progress=progress,
                desc=f"perplexity weights + {fmt.name}",
            ).perplexity
            kv_bits[fmt.name] = bits
    predicted = allocation.predicted_total_loss
    return Measured(
        perplexity=result.perplexity,
        baselines=baselines,
        baseline_avg_bits=baseline_bits,
        eval_tokens=result.tokens,
        seq_len=result.seq_len,
        measured_loss_increase=math.log(result.perplexity) - math.log(baselines["fp16"]),
        predicted_loss_increase=float(predicted or 0.0),
        kv_baselines=kv_baselines,
        kv_baseline_avg_bits=kv_bits,
    )


#: Uniform KV pairs that :func:`measure` compares a KV allocation with (nearest below and above).
KV_BASELINES = ("K2V2", "K4V2", "K4V4", "K8V4", "K8V8")


def kv_baseline_formats(kv: KVAllocation) -> list[tuple[KVFormat, float]]:
    """The uniform KV pairs nearest below and above the allocation's bits per cached element,
    with the allocation's group size and residual window, and their exact bits at its context."""
    first = parse_kv_format(kv.layers[0].format)
    exact = []
    for name in KV_BASELINES:
        base = parse_kv_format(name)
        fmt = KVFormat(base.key_bits, base.value_bits, first.group_size, first.residual)
        # Counted layer by layer: a sliding-window layer stores fewer tokens than a full one.
        exact.append((kv.uniform_avg_bits(fmt), fmt))
    return [(fmt, bits) for bits, fmt in nearest_around(exact, kv.avg_bits + 1e-9)]


def measure_frontier(
    prep: Prepared,
    front: Frontier,
    *,
    eval_tokens: int | None,
    batch_size: int = 4,
    progress: bool = True,
) -> Frontier:
    """Measure every frontier point's perplexity (and unquantized fp16) on one evaluation set."""
    ev = prep.evaluation_windows(eval_tokens)
    fp16 = measure_assignment(
        prep,
        uniform_assignment(prep.units, "fp16"),
        ev,
        batch_size=batch_size,
        progress=progress,
        desc="perplexity fp16",
    ).perplexity
    points = []
    for point in front.points:
        point.allocation.check_model(prep.model)
        result = measure_assignment(
            prep,
            point.allocation.formats,
            ev,
            batch_size=batch_size,
            progress=progress,
            desc=f"perplexity @ {point.budget:g} bits",
        )
        allocation = point.allocation.with_importance(prep.importance)
        points.append(FrontierPoint(point.budget, allocation, result.perplexity))
    return Frontier(tuple(points), front.method, front.ties, fp16)
