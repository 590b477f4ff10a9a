"""CPU execution paths of a packed linear layer, and the measurement that picks one.

Two paths exist on the CPU:

- ``unpack-matmul``: unpack the codes, dequantize to the input's dtype and call ``F.linear``.
  Works for every format; its cost is the unpacking, paid on every call.
- ``int4pack``: torch's ``_weight_int4pack_mm_for_cpu`` kernel for 4-bit codes. It takes
  bfloat16 activations (the float32 variant is an order of magnitude slower here) and a
  weight in torch's own nibble order, which holds the same bytes as bitalloc's 4-bit plane;
  the layer keeps one of the two layouts, never both, so memory stays what was budgeted.
  torch's order differs per CPU capability; :mod:`bitalloc.kernels.int4pack` learns it from
  torch at first use and turns the path off, saying why, when torch's kernel fails its probe.

:func:`measure_paths` times each path that supports a layer on random inputs (one decode row
and a prefill batch) and rejects a path whose output strays from the dequantized reference by
more than ``tolerance`` (relative Frobenius error). The fastest correct path wins.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bitalloc.errors import BitallocError
from bitalloc.kernels.int4pack import (
    codes_to_int4pack,
    int4pack_available,
    int4pack_mm,
    int4pack_probe,
    int4pack_to_codes,
)

__all__ = [
    "CPU_PATHS",
    "DEFAULT_TOLERANCE",
    "INT4PACK",
    "UNPACK_MATMUL",
    "PathTiming",
    "codes_to_int4pack",
    "crossover_rows",
    "int4pack_available",
    "int4pack_matmul",
    "int4pack_probe",
    "int4pack_shape_unsupported",
    "int4pack_to_codes",
    "int4pack_unsupported",
    "measure_paths",
    "time_call",
]

UNPACK_MATMUL = "unpack-matmul"
INT4PACK = "int4pack"
CPU_PATHS = (UNPACK_MATMUL, INT4PACK)
# bf16 activations give ~0.3% relative error; a wrong layout gives ~100%.
DEFAULT_TOLERANCE = 0.02
_INT4PACK_GROUPS = (32, 64, 128, 256)


def int4pack_unsupported(bits: int, group_size: int, out_features: int, in_features: int) -> str:
    """Why the int4pack path cannot run this layer, or "" when it can.

    The first call per CPU capability for a layer of a shape torch's kernel takes runs
    :func:`~bitalloc.kernels.int4pack.int4pack_probe`; where torch's layout or matmul failed
    the probe, no layer runs on int4pack.
    """
    reason = int4pack_shape_unsupported(bits, group_size, out_features, in_features)
    if reason:
        return reason
    probe = int4pack_probe()
    return "" if probe.ok else probe.describe()


def int4pack_shape_unsupported(
    bits: int, group_size: int, out_features: int, in_features: int
) -> str:
    """Why torch's int4 kernel takes no layer of this format and shape (on any CPU), or ""."""
    if not int4pack_available():
        return "this torch build has no _weight_int4pack_mm_for_cpu"
    if bits != 4:
        return f"it takes 4-bit codes, not {bits}-bit"
    if group_size not in _INT4PACK_GROUPS:
        return f"it takes groups of {_INT4PACK_GROUPS}, not {group_size}"
    if in_features % group_size:
        return f"in_features {in_features} is not a multiple of the group size {group_size}"
    if out_features % 16:
        return f"out_features {out_features} is not a multiple of 16"
    return ""


#: What the int4pack path calls (a name of this module, so tests can stand in another kernel).
int4pack_matmul = int4pack_mm


@dataclass(frozen=True)
class PathTiming:
    """One measured path for one layer shape: seconds per call at one row (``decode_s``), at
    ``prefill_rows`` (``prefill_s``) and at ``large_rows`` (``large_s``), and its relative
    error against the dequantized reference."""

    path: str
    decode_s: float
    prefill_s: float
    large_s: float
    error: float
    correct: bool
    prefill_rows: int = 32
    large_rows: int = 512

    @property
    def total_s(self) -> float:
        """The figure paths are ranked by: one decode call plus one prefill call."""
        return self.decode_s + self.prefill_s


def crossover_rows(small: PathTiming, large: PathTiming) -> int | None:
    """Rows above which ``large`` beats ``small``, from a line through each path's times at
    ``prefill_rows`` and ``large_rows``; None when ``small`` stays faster up to ``large_rows``.
    """
    if large.large_s >= small.large_s:
        return None
    span = small.large_rows - small.prefill_rows
    slope_small = (small.large_s - small.prefill_s) / span
    slope_large = (large.large_s - large.prefill_s) / span
    if large.prefill_s <= small.prefill_s or slope_small <= slope_large:
        return small.prefill_rows
    rows = small.prefill_rows + (large.prefill_s - small.prefill_s) / (slope_small - slope_large)
    return int(min(max(rows, small.prefill_rows), small.large_rows))


def time_call(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure_paths(
    layer: torch.nn.Module,
    paths: tuple[str, ...],
    *,
    prefill_rows: int = 32,
    large_rows: int = 512,
    repeats: int = 5,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
) -> list[PathTiming]:
    """Time ``layer`` (a :class:`~bitalloc.kernels.quant_linear.QuantLinear`) on each path at
    1, ``prefill_rows`` and ``large_rows`` input rows.

    The layer is switched to each path in turn (its layout follows) and left on the last one;
    the caller sets the winner.
    """
    if not paths:
        raise BitallocError("no CPU path to measure; choose from " + ", ".join(CPU_PATHS))
    g = torch.Generator().manual_seed(seed)
    decode = torch.randn(1, layer.in_features, generator=g)
    prefill = torch.randn(prefill_rows, layer.in_features, generator=g)
    large = torch.randn(large_rows, layer.in_features, generator=g)
    with torch.no_grad():
        bias = layer.bias.to(torch.float32) if layer.bias is not None else None
        reference = F.linear(prefill, layer.dequantized_weight(torch.float32), bias)
        results = []
        for path in paths:
            layer.set_cpu_path(path)
            y = layer(prefill)
            error = float((y - reference).norm() / reference.norm().clamp_min(1e-12))
            results.append(
                PathTiming(
                    path=path,
                    decode_s=time_call(lambda: layer(decode), repeats),
                    prefill_s=time_call(lambda: layer(prefill), repeats),
                    large_s=time_call(lambda: layer(large), max(1, repeats // 2)),
                    error=error,
                    correct=error <= tolerance,
                    prefill_rows=prefill_rows,
                    large_rows=large_rows,
                )
            )
    return results
