"""Triton fused dequantize-matmul kernels against the packed weight's own dequantization.

Without CUDA these run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before triton is imported), which is slow: shapes are small and configs explicit, so each call
takes a fraction of a second. Shapes are ragged on purpose: N = 48 is no multiple of the 32-wide
column tiles, K = 176 no multiple of any group size (32, 64, 128) or of BLOCK_K 32, 64 or 128,
and 176 one-bit fields end mid-word.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from bitalloc.errors import BitallocError  # noqa: E402
from bitalloc.formats import QuantFormat  # noqa: E402
from bitalloc.kernels import triton_gemm, triton_gemv  # noqa: E402
from bitalloc.kernels import triton_kernels as tk  # noqa: E402
from bitalloc.kernels.packing import PackedWeight  # noqa: E402

if not tk.triton_available():
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N, K = 48, 176
BITS = (2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128)
# One BLOCK_K per group size: two tiles per group, one tile per group, four tiles per group.
BLOCK_K = {32: 16, 64: 64, 128: 32}
# Error of the fp32 result relative to the largest output: accumulation order only.
FP32_TOL = 1e-4
# fp16: the output is rounded to fp16, and the GEMM rounds the dequantized tile to fp16 for
# tl.dot, so each product carries ~2**-11 relative error.
FP16_TOL = 4e-3


def _packed(bits: int, group: int, n: int = N, k: int = K, seed: int = 0) -> PackedWeight:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen)
    return PackedWeight.quantize(weight, QuantFormat(bits, group))


def _run(x: torch.Tensor, pw: PackedWeight, **kwargs) -> torch.Tensor:
    return tk.quant_matmul(
        x,
        pw.qweight.to(x.device),
        pw.scales.to(x.device),
        pw.zeros.to(x.device),
        bits=pw.bits,
        group_size=pw.group_size,
        in_features=pw.in_features,
        **kwargs,
    )


def _assert_close(y: torch.Tensor, x: torch.Tensor, pw: PackedWeight, tol: float) -> None:
    ref = x.float().cpu() @ pw.dequantize().T
    assert y.shape == ref.shape and y.dtype == x.dtype
    err = (y.float().cpu() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= tol * scale, f"max error {err:.3g} > {tol:g} x output scale {scale:.3g}"


def _x(rows: int, dtype: torch.dtype = torch.float32, k: int = K, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, k, generator=gen).to(dtype).to(DEVICE)


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_gemv_matches_dequantized_weight(bits: int, group: int) -> None:
    pw = _packed(bits, group)
    # SPLIT_K 1 stores directly; 2 and 3 meet by atomic adds (3 splits of 11 or 6 K tiles
    # leave the last split short). Rows 3 pad to a 4-row block, 8 fill one.
    for rows, split_k in ((1, 1), (3, 2), (8, 3)):
        config = {"BLOCK_N": 32, "BLOCK_K": BLOCK_K[group], "SPLIT_K": split_k}
        x = _x(rows)
        _assert_close(_run(x, pw, kernel="gemv", config=config), x, pw, FP32_TOL)
    x = _x(3, torch.float16)
    config = {"BLOCK_N": 32, "BLOCK_K": BLOCK_K[group], "SPLIT_K": 2}
    _assert_close(_run(x, pw, kernel="gemv", config=config), x, pw, FP16_TOL)


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_gemm_matches_dequantized_weight(bits: int, group: int) -> None:
    pw = _packed(bits, group)
    config = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": BLOCK_K[group], "num_warps": 4}
    for rows in (16, 20):
        x = _x(rows)
        _assert_close(_run(x, pw, kernel="gemm", config=config), x, pw, FP32_TOL)
    x = _x(20, torch.float16)
    _assert_close(_run(x, pw, kernel="gemm", config=config), x, pw, FP16_TOL)


def test_gemm_grouped_ordering_covers_every_tile() -> None:
    """3 x 3 output tiles with GROUP_M = 2: the swizzle's last group is one row block high."""
    pw = _packed(4, 32)
    x = _x(40)
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2}
    _assert_close(_run(x, pw, kernel="gemm", config=config), x, pw, FP32_TOL)


def test_autotuned_path_and_auto_kernel_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """``kernel="auto"`` with no config: GEMV for <= 8 rows, GEMM above, 3-D inputs flattened.

    On CUDA this autotunes; on the interpreter it launches the first config that survives
    pruning (the autotuner's benchmarker needs a GPU driver).
    """
    calls: list[str] = []
    for name in ("_run_gemv", "_run_gemm"):
        real = getattr(tk, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(tk, name, spy)
    pw = _packed(3, 64)
    decode = _x(2).reshape(2, 1, K)
    prefill = _x(12, seed=2).reshape(2, 6, K)
    y_decode = _run(decode, pw)
    y_prefill = _run(prefill, pw)
    assert calls == ["_run_gemv", "_run_gemm"]
    assert y_decode.shape == (2, 1, N) and y_prefill.shape == (2, 6, N)
    _assert_close(y_decode.reshape(2, N), decode.reshape(2, K), pw, FP32_TOL)
    _assert_close(y_prefill.reshape(12, N), prefill.reshape(12, K), pw, FP32_TOL)


def test_pruning_keeps_tiles_that_divide_the_group() -> None:
    gemm = triton_gemm.prune_gemm_configs(
        triton_gemm.GEMM_CONFIGS, {}, GROUP_SIZE=32, M_KEY=16, K=K
    )
    assert gemm and all(32 % c.kwargs["BLOCK_K"] == 0 for c in gemm)
    assert all(c.kwargs["BLOCK_M"] == 16 for c in gemm)
    for configs, prune in (
        (triton_gemm.GEMM_CONFIGS, triton_gemm.prune_gemm_configs),
        (triton_gemv.GEMV_CONFIGS, triton_gemv.prune_gemv_configs),
    ):
        for c in configs:
            assert min(v for key, v in c.kwargs.items() if key.startswith("BLOCK")) >= 16
        for group in GROUPS:
            kept = prune(configs, {"K": 4096}, GROUP_SIZE=group, M_KEY=4096)
            assert kept and all(group % c.kwargs["BLOCK_K"] == 0 for c in kept)
    # A K too short for any split still leaves one config.
    assert triton_gemv.prune_gemv_configs(triton_gemv.GEMV_CONFIGS, {"K": 16}, GROUP_SIZE=32)


def test_3d_input_strided_rows_and_empty_batch() -> None:
    pw = _packed(5, 32)
    x = _x(20).reshape(2, 10, K)
    config = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}
    y = _run(x, pw, kernel="gemm", config=config)
    assert y.shape == (2, 10, N)
    _assert_close(y.reshape(20, N), x.reshape(20, K), pw, FP32_TOL)
    # Rows of a wider tensor: the kernels take the row stride instead of copying.
    wide = _x(4, k=K + 24)
    rows = wide[:, :K]
    assert not rows.is_contiguous()
    for kernel, cfg in (("gemv", {"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2}), ("gemm", config)):
        _assert_close(_run(rows, pw, kernel=kernel, config=cfg), rows, pw, FP32_TOL)
    assert _run(_x(0), pw).shape == (0, N)


def _call(x: torch.Tensor, pw: PackedWeight, **kwargs) -> torch.Tensor:
    """quant_matmul with the weight on x's device unless x is on the meta device."""
    device = DEVICE if x.device.type == "meta" else x.device
    args = {"bits": pw.bits, "group_size": pw.group_size, "in_features": pw.in_features}
    args.update(kwargs)
    qweight, scales, zeros = (t.to(device) for t in (pw.qweight, pw.scales, pw.zeros))
    return tk.quant_matmul(x, qweight, scales, zeros, **args)


def test_wrong_in_features() -> None:
    pw = _packed(4, 32)
    with pytest.raises(BitallocError, match=r"in_features=176.*\(\.\.\., in_features\)"):
        _call(_x(2, k=K + 1), pw)


@pytest.mark.skipif(DEVICE == "cuda", reason="bfloat16 is allowed on CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int32, torch.float64])
def test_unsupported_dtypes(dtype: torch.dtype) -> None:
    pw = _packed(4, 32)
    with pytest.raises(BitallocError, match="float16 or float32"):
        _call(torch.ones(2, K, dtype=dtype), pw)


def test_tensors_on_different_devices() -> None:
    pw = _packed(4, 32)
    with pytest.raises(BitallocError, match="one device.*meta"):
        _call(torch.randn(2, K, device="meta"), pw)


def test_cpu_tensor_without_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tk, "_INTERPRETED", False)
    pw = _packed(4, 32)
    with pytest.raises(BitallocError, match="need a CUDA device; on the CPU use QuantLinear"):
        _call(torch.randn(2, K), pw)


@pytest.mark.parametrize(
    ("kernel", "config", "match"),
    [
        ("gemm", {"BLOCK_M": 8, "BLOCK_N": 32, "BLOCK_K": 32}, "BLOCK_M=8 is a shape the kernel"),
        ("gemv", {"BLOCK_N": 48, "BLOCK_K": 32, "SPLIT_K": 1}, "powers of two >= 16"),
        ("gemv", {"BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 1}, "divide group_size=32"),
        ("gemm", {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128}, "cannot tile"),
        ("gemv", {"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 0}, "SPLIT_K must be a positive"),
        ("gemv", {"BLOCK_N": 32, "BLOCK_K": 32}, r"missing \['SPLIT_K'\]"),
        ("gemm", {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2}, "unknown"),
        ("gemm", {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 3}, "num_warps"),
    ],
)
def test_untileable_configs(kernel: str, config: dict, match: str) -> None:
    pw = _packed(4, 32)
    with pytest.raises(BitallocError, match=match):
        _call(_x(2), pw, kernel=kernel, config=config)


def test_bad_bits_kernel_name_and_missing_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    pw = _packed(4, 32)
    with pytest.raises(BitallocError, match="cannot pack 7-bit codes; supported widths"):
        _call(_x(2), pw, bits=7)
    with pytest.raises(BitallocError, match="'auto', 'gemm' or 'gemv'"):
        _call(_x(2), pw, kernel="dense")
    monkeypatch.setattr(tk, "triton", None)
    assert not tk.triton_available()
    with pytest.raises(BitallocError, match="triton is not installed"):
        _call(_x(2), pw)
