"""This machine's measured speeds: what a resource plan divides its work by.

Each speed is the median of a few samples, each of which repeats its work for at least
:data:`SAMPLE_S` seconds. On a virtual machine the hypervisor takes the CPU away at times (the
``steal`` of ``/proc/stat``); the best of a few short timings then catches a quiet moment and
overstates what a run of minutes gets (measured here: a 1024-wide matrix product timed at 196
and at 75 GFLOP/s minutes apart). The median of longer samples is what a long run sees.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bitalloc.formats import Format, fake_quantize_each

#: Columns of the weights the rounding speeds are measured on.
SPEED_COLUMNS = 1024
#: Rows of the two weights each format's rounding is timed on: a line through the two gives
#: a cost per call (Python, conversions, the importance's preparation) and one per weight.
SPEED_ROWS = (64, 512)
#: Seconds each sample repeats its work for, at least, and samples per speed.
SAMPLE_S = 0.1
SAMPLES = 3
#: Elements of the bfloat16 tensor whose conversion to float32 times a layer's loading.
CONVERT_NUMEL = 1 << 23


@dataclass(frozen=True)
class Speed:
    """This machine's measured speeds (see the module docstring).

    ``flops``: matrix products, FLOP/s. ``rounding``: each format's rounding, weights per second
    beyond ``per_call`` seconds per call (as the profile rounds: weighted by a Gram matrix's
    diagonal, ``+gptq`` with the Gram matrix itself). ``convert``: bytes of float32 per second
    when a stored bfloat16 tensor is turned to float32 (a layer's loading). ``steal``: the
    share of CPU time the hypervisor took while these were measured (0 on bare metal)."""

    flops: float
    rounding: Mapping[str, float]
    per_call: Mapping[str, float] = field(default_factory=dict)
    convert: float = math.inf
    steal: float = 0.0

    def rounding_seconds(self, name: str, weights: float, calls: float = 1.0) -> float:
        """Seconds to round ``weights`` weights to format ``name`` in ``calls`` calls."""
        return calls * self.per_call.get(name, 0.0) + weights / self.rounding[name]


def machine_speed(formats: Sequence[Format] = ()) -> Speed:
    """Measure a 1024 x 1024 float32 matrix product, each quantized format's rounding of
    weights of :data:`SPEED_ROWS` rows x :data:`SPEED_COLUMNS` columns, and the conversion of
    a bfloat16 tensor to float32, on this machine (a few seconds)."""
    before = cpu_ticks()
    a = torch.randn(1024, 1024)
    flops = 2 * 1024**3 / median_seconds(lambda: a @ a)
    x = torch.randn(4 * SPEED_COLUMNS, SPEED_COLUMNS)
    gram = x.T @ x / len(x)
    small, large = (torch.randn(rows, SPEED_COLUMNS) * 0.02 for rows in SPEED_ROWS)
    rounding: dict[str, float] = {}
    per_call: dict[str, float] = {}
    for fmt in formats:
        if fmt.is_float or fmt.name in rounding:
            continue
        t_small, t_large = (
            median_seconds(lambda w=w, f=fmt: list(fake_quantize_each(w, [f], gram)))
            for w in (small, large)
        )
        # Noise can leave the two times too close for their difference to mean anything:
        # the per-weight work is then taken as at least half of the larger weight's time.
        per_weight = max(
            (t_large - t_small) / (large.numel() - small.numel()), 0.5 * t_large / large.numel()
        )
        rounding[fmt.name] = 1 / per_weight
        per_call[fmt.name] = max(0.0, t_small - small.numel() * per_weight)
    stored = torch.randn(CONVERT_NUMEL).to(torch.bfloat16)
    convert = 4 * CONVERT_NUMEL / median_seconds(lambda: stored.to(torch.float32))
    return Speed(flops, rounding, per_call, convert, steal_share(before, cpu_ticks()))


def median_seconds(work: Callable[[], object]) -> float:
    """Seconds one call of ``work`` takes: the median of :data:`SAMPLES` samples, each
    repeating it for at least :data:`SAMPLE_S` seconds."""
    samples = []
    for _ in range(SAMPLES):
        calls, start = 0, time.perf_counter()
        while True:
            work()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= SAMPLE_S:
                break
        samples.append(elapsed / calls)
    return statistics.median(samples)


def cpu_ticks() -> tuple[int, int]:
    """(stolen, total) ticks of all CPUs since boot, from ``/proc/stat`` ((0, 0) elsewhere)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return 0, 0
    ticks = [int(v) for v in fields[:8]]
    return (ticks[7] if len(ticks) > 7 else 0), sum(ticks)


def steal_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The share of CPU time the hypervisor took between two :func:`cpu_ticks` readings."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else 0.0
