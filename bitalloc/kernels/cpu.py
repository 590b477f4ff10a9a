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


def _nibble_source(out_features: int, in_features: int) -> torch.Tensor:
    """For each nibble of torch's int4pack layout, the flat index ``n * in + k`` it holds.

    torch documents no layout, so it is read off the converter: converting the 4-bit digits of
    every element's own index shows where each element lands.
    """
    index = torch.arange(out_features * in_features, dtype=torch.int64).view(
        out_features, in_features
    )
    source = torch.zeros(out_features * in_features, dtype=torch.int64)
    digits = max(1, ((out_features * in_features - 1).bit_length() + 3) // 4)
    for d in range(digits):
        digit = ((index >> (4 * d)) & 15).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(digit, 1)
        nibbles = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(-1)
        source |= nibbles.to(torch.int64) << (4 * d)
    return source


def codes_to_int4pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``(N, K)`` in [0, 16) -> torch's packed layout ``(N, K / 2)`` uint8."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)


def int4pack_to_codes(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`codes_to_int4pack`."""
    nibbles = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(-1)
    codes = torch.empty(out_features * in_features, dtype=torch.uint8)
    codes[_nibble_source(out_features, in_features)] = nibbles
    return codes.view(out_features, in_features)


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
    """One measured path for one layer shape: seconds per call and relative error."""

    path: str
    decode_s: float
    prefill_s: float
    error: float
    correct: bool

    @property
    def total_s(self) -> float:
        """The figure paths are ranked by: one decode call plus one prefill call."""
        return self.decode_s + self.prefill_s


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
    repeats: int = 5,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
) -> list[PathTiming]:
    """Time ``layer`` (a :class:`~bitalloc.kernels.quant_linear.QuantLinear`) on each path.

    The layer is switched to each path in turn (its layout follows) and left on the last one;
    the caller sets the winner.
    """
    if not paths:
        raise BitallocError("no CPU path to measure; choose from " + ", ".join(CPU_PATHS))
    g = torch.Generator().manual_seed(seed)
    decode = torch.randn(1, layer.in_features, generator=g)
    prefill = torch.randn(prefill_rows, layer.in_features, generator=g)
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
                    error=error,
                    correct=error <= tolerance,
                )
            )
    return results
