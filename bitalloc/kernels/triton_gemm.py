"""Triton fused dequantize + GEMM for packed weights (batches of more than 8 rows).

Imports triton at the top: load it through :mod:`bitalloc.kernels.triton_kernels`, which guards
the import and validates arguments. The layout the kernels read is described in
:mod:`bitalloc.kernels.packing`. :func:`dequant_words` is shared with the GEMV kernel.
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl

# Smallest tile side `tl.dot` accepts on GPUs. The interpreter takes smaller tiles, so the
# wrapper and the config lists enforce this themselves.
MIN_TILE = 16


@triton.jit
def dequant_words(
    row_words,
    s_ptr,
    z_ptr,
    n,
    n_mask,
    j,
    i,
    k0,
    K,
    plane1_off,
    n_groups,
    W0: tl.constexpr,
    W1: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
):
    """Dequantized fp32 weights ``W[n, k]`` for inputs ``k = k0 + j * (32 // W0) + i``.

    ``j`` numbers the plane-0 words of the tile and ``i`` the fields inside a word; ``n``, ``j``
    and ``i`` are broadcastable 3-D index tensors whose placement picks the tile's shape
    (``[BN, WK, PW]`` for the GEMV, ``[WK, PW, BN]`` for the GEMM). ``row_words`` points at the
    first word of each row ``n``. Each plane-0 word is loaded once and expanded to its fields
    in registers: per-field gathers of the same word cost several times the registers and, in
    the GEMM's software pipeline, the shared memory.

    ``k0`` is a multiple of BLOCK_K (>= 16 >= 32 // W0, so words start at field 0) and BLOCK_K
    divides GROUP_SIZE, so the whole tile lies in group ``k0 // GROUP_SIZE``: one scale and zero
    per row. Fields past K decode to finite garbage; callers zero the matching inputs.
    """
    PW0: tl.constexpr = 32 // W0
    kw = k0 + j * PW0  # first input of each plane-0 word
    word_mask = n_mask & (kw < K)
    words = tl.load(row_words + (k0 // PW0 + j), mask=word_mask, other=0)
    # The arithmetic right shift of a negative word fills with sign bits; the mask drops them
    # because shift + width <= 32.
    code = (words >> (i * W0)) & ((1 << W0) - 1)
    if W1 > 0:
        # Plane 1 is narrower (W1 < W0), so one of its words spans whole plane-0 words: the
        # word and the offset in it depend on kw alone, and field i follows at kw % PW1 + i.
        PW1: tl.constexpr = 32 // W1
        words1 = tl.load(row_words + plane1_off + kw // PW1, mask=word_mask, other=0)
        code = code | (((words1 >> ((kw % PW1 + i) * W1)) & ((1 << W1) - 1)) << W0)
    g = k0 // GROUP_SIZE
    scale = tl.load(s_ptr + n * n_groups + g, mask=n_mask, other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + n * n_groups + g, mask=n_mask, other=0.0).to(tl.float32)
    return (code.to(tl.float32) - zero) * scale


@triton.jit(do_not_specialize=["M_KEY"])
def gemm_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_ym,
    stride_qn,
    plane1_off,
    n_groups,
    M_KEY,  # only an autotune key (M rounded up to a power of two); unused in the body
    BITS: tl.constexpr,
    W0: tl.constexpr,
    W1: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``y[M, N] = x[M, K] @ W[N, K].T`` with W dequantized tile by tile, fp32 accumulation."""
    PW0: tl.constexpr = 32 // W0
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # GROUP_M swizzle: consecutive programs walk GROUP_M row blocks of one column band, so the
    # packed weight tiles of that band are reused from L2 instead of reloaded per row block.
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    # The weight tile is built as [words, fields, BLOCK_N] and reshaped to [BLOCK_K, BLOCK_N]
    # for tl.dot: input k0 + j * PW0 + i sits at row j * PW0 + i, row-major order.
    n3 = offs_n[None, None, :]
    n_mask3 = n_mask[None, None, :]
    j = tl.arange(0, BLOCK_K // PW0)[:, None, None]
    i = tl.arange(0, PW0)[None, :, None]
    row_words = qw_ptr + n3 * stride_qn
    # 64-bit row offsets: M * K or M * N can pass 2**31 for large prefills and vocabularies.
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(
            x_rows + offs_k[None, :], mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0
        )
        w = dequant_words(
            row_words,
            s_ptr,
            z_ptr,
            n3,
            n_mask3,
            j,
            i,
            k0,
            K,
            plane1_off,
            n_groups,
            W0,
            W1,
            GROUP_SIZE,
        )
        w = tl.reshape(w, (BLOCK_K, BLOCK_N))
        acc = tl.dot(a, w.to(a.dtype), acc, input_precision=DOT_PRECISION)
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _gemm_config(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
        num_warps=warps,
        num_stages=stages,
    )


# Small-M tiles first: on the CPU the wrapper takes the first config that survives pruning.
# Every config compiles for sm_90 without register spills for fp16 and bf16 inputs (checked
# offline with triton.compile; 128 x 256 tiles and 4-warp 64 x 64 x 128 tiles spilled).
# BLOCK_K 16/32 divides every group size; 64 and 128 are pruned for smaller groups.
GEMM_CONFIGS = [
    _gemm_config(16, 64, 32, 4, 3),
    _gemm_config(16, 128, 32, 4, 3),
    _gemm_config(16, 64, 64, 4, 3),
    _gemm_config(32, 64, 32, 4, 4),
    _gemm_config(64, 64, 32, 4, 4),
    _gemm_config(64, 128, 32, 4, 3),
    _gemm_config(128, 64, 32, 4, 4),
    _gemm_config(128, 128, 32, 8, 3),
    _gemm_config(64, 128, 64, 4, 3),
    _gemm_config(128, 128, 64, 8, 3),
    _gemm_config(64, 64, 128, 8, 3),
]


def prune_gemm_configs(configs: list[Any], named_args: dict, **kwargs: Any) -> list[Any]:
    """Configs whose BLOCK_K divides the group size and whose BLOCK_M fits the batch bucket.

    Always keeps at least the first config whose BLOCK_K divides the group size.
    """
    args = {**named_args, **kwargs}
    group_size = int(args["GROUP_SIZE"])
    m_key = int(args["M_KEY"])
    fits = [c for c in configs if group_size % c.kwargs["BLOCK_K"] == 0]
    small = [c for c in fits if c.kwargs["BLOCK_M"] <= max(MIN_TILE, m_key)]
    return small or fits[:1]


gemm_kernel_tuned = triton.autotune(
    configs=GEMM_CONFIGS,
    key=["M_KEY", "N", "K", "BITS", "GROUP_SIZE"],
    prune_configs_by={"early_config_prune": prune_gemm_configs},
)(gemm_kernel)
