"""Triton fused dequantize-matmul for packed weights: ``x @ W.T`` without materializing W.

Two kernels read :class:`~bitalloc.kernels.packing.PackedWeight` tensors directly:

- a GEMV / split-K kernel for 1 to 8 rows (decode), bound by the bytes of the packed weight
  (:mod:`bitalloc.kernels.triton_gemv`);
- a GEMM kernel with ``tl.dot`` tiles for larger batches (prefill)
  (:mod:`bitalloc.kernels.triton_gemm`).

:func:`quant_matmul` validates its arguments, picks the kernel and launches it. Importing this
module never fails: without triton, :func:`triton_available` is False and :func:`quant_matmul`
raises :class:`BitallocError`. On a machine without CUDA the kernels run in Triton's CPU
interpreter when ``TRITON_INTERPRET=1`` is set *before* this module is first imported (triton
decides between compiling and interpreting when the kernels are defined).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Literal

import torch

from bitalloc.errors import BitallocError
from bitalloc.kernels.packing import check_packed, plane_words, planes

try:
    import triton
except ImportError:  # triton is optional: it exists only for Linux x86-64 wheels
    triton = None

if triton is not None:
    from bitalloc.kernels import triton_gemm, triton_gemv

    # Whether the kernels were defined for the interpreter: fixed at import, whatever the
    # environment says later.
    _INTERPRETED = not isinstance(triton_gemm.gemm_kernel, triton.runtime.JITFunction)
else:
    _INTERPRETED = False

GEMV_MAX_ROWS = 8
_GEMM_KEYS = {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"}
_GEMV_KEYS = {"BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps", "num_stages"}
_GEMM_REQUIRED = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
_GEMV_REQUIRED = ("BLOCK_N", "BLOCK_K", "SPLIT_K")


def triton_available() -> bool:
    """True when the kernels can run here: triton imports, and there is a CUDA device or the
    kernels were defined under ``TRITON_INTERPRET=1``."""
    return triton is not None and (torch.cuda.is_available() or _INTERPRETED)


def quant_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    in_features: int,
    kernel: Literal["auto", "gemm", "gemv"] = "auto",
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """``x @ W.T`` for the packed weight W (``(out_features, in_features)``), fused.

    ``x`` is ``(..., in_features)`` float16 or float32 (bfloat16 on CUDA only); the result is
    ``(..., out_features)`` in x's dtype, accumulated in float32. ``qweight``, ``scales`` and
    ``zeros`` are a :class:`~bitalloc.kernels.packing.PackedWeight`'s tensors.

    ``kernel``: ``"auto"`` takes the GEMV kernel for at most 8 rows and the GEMM kernel above;
    ``"gemv"`` and ``"gemm"`` force one (any row count works with either). ``config`` fixes the
    meta-parameters instead of autotuning: ``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K`` (and optional
    ``GROUP_M``) for GEMM; ``BLOCK_N``, ``BLOCK_K``, ``SPLIT_K`` for GEMV; ``num_warps`` and
    ``num_stages`` for both.
    """
    if triton is None:
        raise BitallocError(
            "triton is not installed; install it (pip install triton, Linux x86-64) or use "
            "QuantLinear's CPU paths"
        )
    widths = planes(bits)
    check_packed(qweight, scales, zeros, bits, group_size, in_features)
    _check_input(x, qweight, scales, zeros, in_features)
    if kernel not in ("auto", "gemm", "gemv"):
        raise BitallocError(f"kernel must be 'auto', 'gemm' or 'gemv', got {kernel!r}")

    out_features = qweight.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    use_gemv = kernel == "gemv" or (kernel == "auto" and rows <= GEMV_MAX_ROWS)
    run, kind = (_run_gemv, "gemv") if use_gemv else (_run_gemm, "gemm")
    checked = _checked_config(config, kind, group_size)
    if rows == 0:
        return x.new_empty(*lead, out_features)
    args = dict(
        qweight=qweight.contiguous(),
        scales=scales.contiguous(),
        zeros=zeros.contiguous(),
        bits=bits,
        widths=widths,
        group_size=group_size,
    )
    # Triton launches on the current CUDA device, which need not be x's.
    on_device = torch.cuda.device(x.device) if x.device.type == "cuda" else nullcontext()
    with on_device:
        y = run(x2, config=checked, **args)
    return y.reshape(*lead, out_features)


def _check_input(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    in_features: int,
) -> None:
    """Raise BitallocError unless x fits the weight, dtype and device the kernels take."""
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise BitallocError(
            f"x must end in in_features={in_features} inputs, got shape {tuple(x.shape)}; "
            "pass activations of shape (..., in_features)"
        )
    allowed = (torch.float16, torch.float32)
    if x.dtype == torch.bfloat16 and x.device.type != "cuda":
        raise BitallocError(
            "bfloat16 inputs need a CUDA device (the Triton interpreter's tl.dot is wrong on "
            "bfloat16); cast x to float16 or float32"
        )
    if x.dtype not in (*allowed, torch.bfloat16):
        raise BitallocError(
            f"x must be float16 or float32 (bfloat16 on CUDA), got {x.dtype}; cast it first"
        )
    devices = {t.device for t in (x, qweight, scales, zeros)}
    if len(devices) > 1:
        raise BitallocError(
            f"x, qweight, scales and zeros must be on one device, got "
            f"{sorted(str(d) for d in devices)}; move them with .to(device)"
        )
    if x.device.type != "cuda" and not _INTERPRETED:
        raise BitallocError(
            f"Triton kernels need a CUDA device; on the CPU use QuantLinear's CPU paths "
            f"(x is on {x.device}; set TRITON_INTERPRET=1 before importing bitalloc to run the "
            "kernels in Triton's slow CPU interpreter)"
        )


def _checked_config(config: dict[str, int] | None, kind: str, group_size: int) -> dict | None:
    """An explicit config with defaults filled in, or None; BitallocError for untileable ones."""
    if config is None:
        return None
    allowed, required = (
        (_GEMM_KEYS, _GEMM_REQUIRED) if kind == "gemm" else (_GEMV_KEYS, _GEMV_REQUIRED)
    )
    unknown = sorted(set(config) - allowed)
    missing = [key for key in required if key not in config]
    if unknown or missing:
        raise BitallocError(
            f"a {kind} config takes {sorted(allowed)} and needs {list(required)}; "
            f"got unknown {unknown}, missing {missing}"
        )
    full = {"num_warps": 4, "num_stages": 2, **config}
    if kind == "gemm":
        full.setdefault("GROUP_M", 8)
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        if key in full and not (_is_pow2(full[key]) and full[key] >= triton_gemm.MIN_TILE):
            raise BitallocError(
                f"config {key}={full[key]} is a shape the kernel cannot tile: tiles must be "
                f"powers of two >= {triton_gemm.MIN_TILE} (GPUs reject smaller tl.dot tiles)"
            )
    if group_size % full["BLOCK_K"] != 0:
        raise BitallocError(
            f"config BLOCK_K={full['BLOCK_K']} is a shape the kernel cannot tile: it must divide "
            f"group_size={group_size} so a K tile has one scale per row; use 16 or 32"
        )
    for key in ("SPLIT_K", "GROUP_M", "num_stages"):
        if key in full and not (isinstance(full[key], int) and full[key] >= 1):
            raise BitallocError(f"config {key} must be a positive integer, got {full[key]!r}")
    if not (_is_pow2(full["num_warps"]) and full["num_warps"] <= 32):
        raise BitallocError(f"config num_warps must be 1, 2, 4, ... 32, got {full['num_warps']}")
    return full


def _is_pow2(value: Any) -> bool:
    return isinstance(value, int) and value > 0 and value & (value - 1) == 0


def _layout_args(qweight: torch.Tensor, scales: torch.Tensor, widths: tuple[int, ...], k: int):
    """Runtime arguments describing the packed layout, and the constexpr plane widths."""
    plane1_off = plane_words(k, widths[0])
    w1 = widths[1] if len(widths) > 1 else 0
    return (qweight.stride(0), plane1_off, scales.shape[1]), {"W0": widths[0], "W1": w1}


def _can_autotune(x: torch.Tensor) -> bool:
    """Autotuning needs compiled kernels on a CUDA device (see :func:`_untuned`)."""
    return x.device.type == "cuda" and not _INTERPRETED


def _untuned(configs: list, prune, named: dict) -> dict:
    """The first config that survives pruning, as launch keywords.

    Used off CUDA: ``@triton.autotune`` does not work under ``TRITON_INTERPRET=1`` on CPU
    tensors, as its benchmarker comes from the active GPU driver and there is none (triton 3.9
    raises "0 active drivers"); timing interpreted kernels would mean nothing anyway.
    """
    cfg = prune(configs, named)[0]
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _run_gemm(
    x: torch.Tensor,
    *,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    widths: tuple[int, ...],
    group_size: int,
    config: dict | None,
) -> torch.Tensor:
    m, k = x.shape
    n = qweight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    layout, planes_kw = _layout_args(qweight, scales, widths, k)
    # torch's own fp32 matmul follows allow_tf32; so does ours (tf32 on tensor cores, else ieee).
    precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    meta = {
        "M_KEY": min(1 << max(m - 1, 0).bit_length(), 4096),
        "BITS": bits,
        **planes_kw,
        "GROUP_SIZE": group_size,
        "DOT_PRECISION": precision,
    }
    args = (x, qweight, scales, zeros, y, m, n, k, x.stride(0), y.stride(0), *layout)
    if config is None and _can_autotune(x):

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        triton_gemm.gemm_kernel_tuned[grid](*args, **meta)
        return y
    if config is None:
        config = _untuned(triton_gemm.GEMM_CONFIGS, triton_gemm.prune_gemm_configs, meta)
    launch = (math.ceil(m / config["BLOCK_M"]) * math.ceil(n / config["BLOCK_N"]),)
    triton_gemm.gemm_kernel[launch](*args, **meta, **config)
    return y


def _run_gemv(
    x: torch.Tensor,
    *,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    widths: tuple[int, ...],
    group_size: int,
    config: dict | None,
) -> torch.Tensor:
    m, k = x.shape
    n = qweight.shape[0]
    # Partial sums of the K splits meet in fp32 by atomic adds, so the buffer starts at zero.
    y = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    layout, planes_kw = _layout_args(qweight, scales, widths, k)
    block_m = min(GEMV_MAX_ROWS, 1 << max(m - 1, 0).bit_length())
    meta = {"BITS": bits, **planes_kw, "GROUP_SIZE": group_size, "BLOCK_M": block_m}
    args = (x, qweight, scales, zeros, y, m, n, k, x.stride(0), y.stride(0), *layout)
    if config is None and _can_autotune(x):

        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"], triton.cdiv(m, block_m))

        triton_gemv.gemv_kernel_tuned[grid](*args, **meta)
    else:
        if config is None:
            named = {"K": k, **meta}
            config = _untuned(triton_gemv.GEMV_CONFIGS, triton_gemv.prune_gemv_configs, named)
        launch = (math.ceil(n / config["BLOCK_N"]), config["SPLIT_K"], math.ceil(m / block_m))
        triton_gemv.gemv_kernel[launch](*args, **meta, **config)
    return y if x.dtype == torch.float32 else y.to(x.dtype)
