"""Simulated KV-cache quantization on tensors of shape (batch, heads, seq, head_dim).

Every function returns the dequantized tensor in the input's dtype: what attention reads from a
real quantized cache. Codes are asymmetric min-max: per group, ``scale = (max - min) / (2**b - 1)``
and ``zero = min``, both computed in float32 and rounded to fp16 because that is how they are
stored, so the error includes fp16 storage of the group parameters. Codes are
``clamp(round((x - zero) / scale), 0, 2**b - 1)``; the clamp absorbs the small overshoot that
rounding the scale and zero to fp16 can cause at the ends of the range.

Width 16 returns the input unchanged. A real cache would hold it in the model's 16-bit dtype;
for the float32 CPU evaluation this treats 16 bits as lossless (fp16 rounding is ~5e-4 relative,
far below any quantized width here) and keeps "all K16V16" exactly equal to no quantization.
"""

from __future__ import annotations

import torch

from bitalloc.errors import BitallocError
from bitalloc.formats import CacheFormat

#: Widths a KV tensor may take; 16 keeps it unquantized (fp16).
KV_BITS = (2, 4, 8, 16)
FULL_BITS = 16

_FP16_MAX = 65504.0
# Smallest normal fp16: a constant group would otherwise get scale 0 and divide by zero.
_FP16_TINY = 6.104e-5


def _check(x: torch.Tensor, bits: int, group_size: int, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise BitallocError(f"{what} must be a (batch, heads, seq, head_dim) tensor, got {shape}")
    if not x.is_floating_point():
        raise BitallocError(f"{what} must be a floating-point tensor, got {x.dtype}")
    if isinstance(bits, bool) or bits not in KV_BITS:
        raise BitallocError(f"unsupported KV width {bits!r} bits; choose one of {KV_BITS}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise BitallocError(f"KV group size must be a positive integer, got {group_size!r}")


def _fake_quantize(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Min-max quantize float32 ``x`` with one (scale, zero) per slice along ``dim``."""
    qmax = float(2**bits - 1)
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    scale = ((hi - lo) / qmax).clamp(max=_FP16_MAX).to(torch.float16).to(torch.float32)
    scale = scale.clamp(min=_FP16_TINY)
    zero = lo.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16).to(torch.float32)
    codes = torch.clamp(torch.round((x - zero) / scale), 0.0, qmax)
    return codes * scale + zero


def quantize_keys(k: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Per-channel key quantization: each channel of each head gets its own (scale, zero) over
    every group of ``group_size`` consecutive tokens (from the first token).

    A trailing partial group (fewer than ``group_size`` tokens) is quantized as a group of its
    own here; :func:`fake_quantize_kv` and the cache keep it at 16 bits instead.
    """
    _check(k, bits, group_size, "keys")
    if bits == FULL_BITS or k.shape[2] == 0:
        return k
    batch, heads, seq, dim = k.shape
    x = k.detach().to(torch.float32)
    n_full = seq // group_size
    parts = []
    if n_full:
        groups = x[:, :, : n_full * group_size].reshape(batch, heads, n_full, group_size, dim)
        parts.append(_fake_quantize(groups, bits, dim=3).reshape(batch, heads, -1, dim))
    if seq % group_size:
        parts.append(_fake_quantize(x[:, :, n_full * group_size :], bits, dim=2))
    return torch.cat(parts, dim=2).to(k.dtype)


def quantize_values(v: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Per-token value quantization: each token of each head gets one (scale, zero) per group of
    ``group_size`` channels; ``group_size >= head_dim`` means one group per head. A group size
    that neither divides nor covers ``head_dim`` is refused."""
    _check(v, bits, group_size, "values")
    if bits == FULL_BITS or v.shape[2] == 0:
        return v
    batch, heads, seq, dim = v.shape
    group = min(group_size, dim)
    if dim % group:
        raise BitallocError(
            f"value groups of {group_size} channels do not divide head_dim {dim}; choose a "
            f"group size that divides {dim} or is >= it"
        )
    x = v.detach().to(torch.float32).reshape(batch, heads, seq, dim // group, group)
    return _fake_quantize(x, bits, dim=4).reshape(batch, heads, seq, dim).to(v.dtype)


def fake_quantize_kv(
    k: torch.Tensor, v: torch.Tensor, fmt: CacheFormat
) -> tuple[torch.Tensor, torch.Tensor]:
    """What a cache holding these keys and values under ``fmt`` returns to attention.

    The last ``fmt.residual`` tokens and the trailing partial key group stay full precision;
    older keys are quantized in whole groups counted from the first token and older values per
    token (:meth:`KVFormat.quantized_tokens` is the rule, shared with the storage count).
    """
    # A KVFormat (bitalloc.kv.formats builds on this module, so it is recognised by family).
    if not isinstance(fmt, CacheFormat) or fmt.family != "kv":
        raise BitallocError(f"expected a KVFormat, got {type(fmt).__name__}; use parse_kv_format")
    _check(k, fmt.key_bits, fmt.group_size, "keys")
    _check(v, fmt.value_bits, fmt.group_size, "values")
    if k.shape[:3] != v.shape[:3]:
        raise BitallocError(
            f"keys {tuple(k.shape)} and values {tuple(v.shape)} differ in batch, heads or tokens"
        )
    n_keys, n_values = fmt.quantized_tokens(k.shape[2])
    if n_keys:
        old = quantize_keys(k[:, :, :n_keys], fmt.key_bits, fmt.group_size)
        k = torch.cat([old, k[:, :, n_keys:]], dim=2)
    if n_values:
        old = quantize_values(v[:, :, :n_values], fmt.value_bits, fmt.group_size)
        v = torch.cat([old, v[:, :, n_values:]], dim=2)
    return k, v
