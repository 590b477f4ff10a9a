"""Triton fused dequantize + GEMV / split-K for packed weights (batches of 1 to 8 rows).

Imports triton at the top: load it through :mod:`bitalloc.kernels.triton_kernels`. A decode step
reads every weight once for a handful of rows, so the kernel is bound by memory bandwidth, not
by arithmetic: each program dequantizes one ``BLOCK_N x BLOCK_K`` tile at a time and reduces it
against the rows with multiply + ``tl.sum`` (no ``tl.dot``, whose 16-row minimum would waste
work). Split-K spreads a short N over enough programs to fill the GPU; partial sums meet by
``tl.atomic_add`` in a zeroed fp32 buffer.
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl

from bitalloc.kernels.triton_gemm import dequant_words


@triton.jit
def gemv_kernel(
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
    BITS: tl.constexpr,
    W0: tl.constexpr,
    W1: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """Add ``x[M, K-range] @ W[N, K-range].T`` into fp32 ``y`` (zeroed unless SPLIT_K is 1).

    Grid: (N blocks, SPLIT_K, row blocks of BLOCK_M rows, BLOCK_M a power of two <= 8).
    """
    PW0: tl.constexpr = 32 // W0
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    # The weight tile is [BLOCK_N, words, fields]: input k0 + j * PW0 + i at [n, j, i]. The
    # inputs x are loaded in the same [1, words, fields] shape, so no reshape is needed.
    n3 = offs_n[:, None, None]
    n_mask3 = n_mask[:, None, None]
    j = tl.arange(0, BLOCK_K // PW0)[None, :, None]
    i = tl.arange(0, PW0)[None, None, :]
    row_words = qw_ptr + n3 * stride_qn
    rows = tl.arange(0, BLOCK_M)
    first_row = pid_m * BLOCK_M
    # Each split covers whole BLOCK_K tiles, so a tile never straddles two groups or two splits.
    tiles = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_begin = pid_k * tiles * BLOCK_K
    k_end = min(k_begin + tiles * BLOCK_K, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # One row (decode): products accumulate elementwise and are reduced across K once at the
    # end, keeping the cross-thread reduction out of the loop. (Unused for more rows, where the
    # compiler drops it.)
    wide = tl.zeros((BLOCK_N, BLOCK_K // PW0, PW0), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
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
        k = k0 + j * PW0 + i
        k_mask = k < K
        if BLOCK_M == 1:
            xr = tl.load(x_ptr + first_row.to(tl.int64) * stride_xm + k, mask=k_mask, other=0.0)
            wide += w * xr.to(tl.float32)
        else:
            # One dequantized tile serves every row; a row's partial sums land in its
            # accumulator row through a select, which costs BLOCK_M * BLOCK_N against the
            # tile's BLOCK_N * BLOCK_K.
            for r in tl.static_range(BLOCK_M):
                # Rows past M re-read row M - 1 (no row mask needed); the store drops them.
                row = min(first_row + r, M - 1).to(tl.int64)
                xr = tl.load(x_ptr + row * stride_xm + k, mask=k_mask, other=0.0)
                part = tl.sum(tl.sum(w * xr.to(tl.float32), axis=2), axis=1)
                acc = tl.where((rows == r)[:, None], acc + part[None, :], acc)
    if BLOCK_M == 1:
        acc = tl.sum(tl.sum(wide, axis=2), axis=1)[None, :]
    out_rows = first_row + rows
    y_ptrs = y_ptr + out_rows[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    out_mask = (out_rows < M)[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc, mask=out_mask)
    else:
        # Splits only add: their order does not matter, so relaxed ordering suffices.
        tl.atomic_add(y_ptrs, acc, mask=out_mask, sem="relaxed")


def _gemv_config(bn: int, bk: int, split_k: int, warps: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split_k}, num_warps=warps, num_stages=2
    )


# Small tiles first: on the CPU the wrapper takes the first config that survives pruning.
# BLOCK_K 32 divides every group size; 64 and 128 are pruned for smaller groups. Warps grow
# with the tile to keep <= 32 weights per thread: compiled for sm_90, larger shares spilled.
GEMV_CONFIGS = [
    _gemv_config(32, 32, 1, 2),
    _gemv_config(64, 32, 4, 4),
    _gemv_config(128, 32, 8, 8),
    _gemv_config(64, 64, 2, 4),
    _gemv_config(64, 64, 8, 4),
    _gemv_config(128, 64, 4, 8),
    _gemv_config(32, 128, 1, 8),
    _gemv_config(64, 128, 4, 8),
    _gemv_config(128, 128, 8, 16),
]


def prune_gemv_configs(configs: list[Any], named_args: dict, **kwargs: Any) -> list[Any]:
    """Configs whose BLOCK_K divides the group size and whose splits each get a K tile.

    Always keeps at least the first config whose BLOCK_K divides the group size.
    """
    args = {**named_args, **kwargs}
    group_size = int(args["GROUP_SIZE"])
    k = int(args["K"])
    fits = [c for c in configs if group_size % c.kwargs["BLOCK_K"] == 0]
    busy = [c for c in fits if c.kwargs["SPLIT_K"] * c.kwargs["BLOCK_K"] <= k]
    return busy or fits[:1]


# Benchmarking runs a config several times into the same buffer; atomics would accumulate the
# runs, so the autotuner zeroes y before each run (and before the final one).
gemv_kernel_tuned = triton.autotune(
    configs=GEMV_CONFIGS,
    key=["N", "K", "BITS", "GROUP_SIZE", "BLOCK_M"],
    prune_configs_by={"early_config_prune": prune_gemv_configs},
    reset_to_zero=["y_ptr"],
)(gemv_kernel)
