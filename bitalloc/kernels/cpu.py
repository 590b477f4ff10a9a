"""CPU execution paths of a packed linear layer, and the measurement that picks one.

Two paths exist on the CPU:

- ``unpack-matmul``: unpack the codes, dequantize to the input's dtype and call ``F.linear``.
  Works for every format; its cost is the unpacking, paid on every call.
- ``int4pack``: torch's ``_weight_int4pack_mm_for_cpu`` kernel for 4-bit codes. It takes
  bfloat16 activations (the float32 variant is an order of magnitude slower here) and a
  weight in torch's own nibble order, which holds the same bytes as bitalloc's 4-bit plane;
  the layer keeps one of the two layouts, never both, so memory stays what was budgeted.

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

UNPACK_MATMUL = "unpack-matmul"
INT4PACK = "int4pack"
CPU_PATHS = (UNPACK_MATMUL, INT4PACK)
# bf16 activations give ~0.3% relative error; a wrong layout gives ~100%.
DEFAULT_TOLERANCE = 0.02
_INT4PACK_GROUPS = (32, 64, 128, 256)


def int4pack_available() -> bool:
    """True when this torch build has the CPU int4 weight kernel."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


def int4pack_unsupported(bits: int, group_size: int, out_features: int, in_features: int) -> str:
    """Why the int4pack path cannot run this layer, or "" when it can."""
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


def codes_to_int4pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``(N, K)`` in [0, 16) -> torch's packed layout ``(N, K / 2)`` uint8.

    The result is read back with :func:`int4pack_to_codes` and compared, so a torch whose
    layout differs from the one bitalloc reads is refused here rather than computing garbage.
    """
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    rows, cols = codes.shape
    if packed.shape != (rows, cols // 2) or not torch.equal(
        int4pack_to_codes(packed, rows, cols), codes.to(torch.uint8)
    ):
        raise BitallocError(
            f"torch {torch.__version__} packs int4 weights in a layout bitalloc does not read; "
            "use the unpack-matmul CPU path"
        )
    return packed


def int4pack_to_codes(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`codes_to_int4pack`, by reshapes only (cheap enough per call).

    torch documents no layout; this is the one its CPU converter writes (read off it by
    converting each element's own index): rows go in blocks of 32, and for each input ``k`` a
    block stores 16 bytes whose low nibbles are rows 0-15 and high nibbles rows 16-31. A last
    block of 16 rows stores 8 bytes per input, rows in pairs (low nibble first).
    """
    flat = packed.reshape(-1)
    full = out_features // 32 * 32
    parts = []
    if full:
        block = flat[: full * in_features // 2].view(full // 32, in_features, 16)
        both = torch.cat([block & 15, block >> 4], dim=2)  # (blocks, K, 32)
        parts.append(both.permute(0, 2, 1).reshape(full, in_features))
    if out_features > full:
        tail = flat[full * in_features // 2 :].view(in_features, 8)
        pairs = torch.stack([tail & 15, tail >> 4], dim=2).reshape(in_features, 16)
        parts.append(pairs.t())
    return torch.cat(parts).contiguous() if len(parts) > 1 else parts[0].contiguous()


def int4pack_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """``x @ W.T`` for a 4-bit weight in int4pack layout; bf16 inside, ``x``'s dtype out.

    torch's kernel computes ``(q - 8) * scale + offset``; bitalloc stores ``(q - zero) * scale``,
    so ``offset = (8 - zero) * scale``. The (groups, N, 2) table is rebuilt per call from the
    fp16 scales and zeros: it is 1/64 of the weight's size and keeps the stored bytes exact.
    """
    s = scales.to(torch.float32).t()
    offset = (8.0 - zeros.to(torch.float32).t()) * s
    table = torch.stack([s, offset], dim=-1).to(torch.bfloat16).contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x.to(torch.bfloat16).contiguous(), packed, group_size, table
    )
    return y.to(x.dtype)


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
