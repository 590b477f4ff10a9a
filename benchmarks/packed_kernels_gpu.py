"""GPU timings of the Triton fused dequantize-matmul against fp16 ``torch.nn.functional.linear``.

Used by ``benchmarks/packed_kernels.py`` when CUDA is available: :func:`gpu_rows` times every
(shape, bits, group, batch) case and :func:`gpu_markdown` renders the table. A decode step
(batch 1) reads each weight once, so its time is set by bytes moved: the table reports achieved
bandwidth, its fraction of the GPU's peak, and the target speedup over fp16 of
``0.7 * 16 / bits`` (70% of the ideal byte ratio) for batch 1.

    .venv/bin/python benchmarks/packed_kernels_gpu.py          # default cases, needs CUDA
    .venv/bin/python benchmarks/packed_kernels_gpu.py --smoke  # one tiny case

Without CUDA, ``--smoke`` runs in Triton's CPU interpreter: it exercises the code, and its
numbers mean nothing.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence

import torch

#: (out_features, in_features) of Llama-3-8B-like projections: q/o, k/v, gate/up, down.
DEFAULT_SHAPES = ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336))
DEFAULT_BATCHES = (1, 4, 16, 64)
#: Peak HBM bandwidth in GB/s by device-name fragment; the first match wins.
_PEAK_GBPS = (("H100 PCIe", 2000.0), ("H100 NVL", 3900.0), ("H200", 4800.0), ("H100", 3350.0))


def guess_peak_gbps(device_name: str | None = None) -> float | None:
    """Peak memory bandwidth (GB/s) of the current (or named) CUDA device, None if unknown."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    for fragment, gbps in _PEAK_GBPS:
        if fragment.lower() in device_name.lower():
            return gbps
    return None


def speedup_target(bits: int) -> float:
    """Batch-1 speedup over fp16 the kernels should reach: 70% of the byte ratio 16 / bits."""
    return 0.7 * 16 / bits


def _bench(fn: Callable[[], object], warmup: int, reps: int, device: torch.device) -> float:
    """Median time of ``fn`` in microseconds; ``warmup`` and ``reps`` are budgets in ms.

    On CUDA this is ``triton.testing.do_bench``, which also clears L2 between runs so weights
    come from HBM as in a real decode step. Elsewhere (the interpreter smoke run) it is a
    perf_counter loop over the same budgets, at least one run each.
    """
    fn()  # compile, autotune, and fill caches outside the timed runs
    if device.type == "cuda":
        import triton.testing

        return 1e3 * triton.testing.do_bench(fn, warmup=warmup, rep=reps, return_mode="median")
    deadline = time.perf_counter() + warmup / 1e3
    while time.perf_counter() < deadline:
        fn()
    times: list[float] = []
    deadline = time.perf_counter() + reps / 1e3
    while not times or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def _random_packed(n: int, k: int, bits: int, group: int, device: torch.device):
    """A valid packed weight of random codes, built on the device.

    Every int32 word is a valid packing of fields (unused tail bits are ignored), so random words
    stand in for a quantized weight without running the CPU quantizer on large matrices.
    """
    from bitalloc.kernels.packing import PackedWeight, packed_words

    gen = torch.Generator(device=device).manual_seed(0)
    words = packed_words(k, bits)
    qweight = torch.randint(
        -(2**31), 2**31, (n, words), dtype=torch.int32, device=device, generator=gen
    )
    groups = math.ceil(k / group)
    scales = (torch.rand(n, groups, device=device, generator=gen) * 0.02 + 0.001).half()
    zeros = torch.randint(0, 2**bits, (n, groups), device=device, generator=gen).half()
    return PackedWeight(qweight, scales, zeros, bits, group, k)


def gpu_rows(
    shapes: Iterable[tuple[int, int]] = DEFAULT_SHAPES,
    bits_list: Iterable[int] = (2, 3, 4, 8),
    groups: Iterable[int] = (128,),
    batches: Sequence[int] = DEFAULT_BATCHES,
    warmup: int = 25,
    reps: int = 100,
    *,
    peak_gbps: float | None = None,
) -> list[dict]:
    """Time ``quant_matmul`` against fp16 ``F.linear`` for every (shape, bits, group, batch).

    ``shapes`` are weight shapes ``(N, K)`` (out, in); ``warmup`` and ``reps`` are timing budgets
    in milliseconds (``triton.testing.do_bench``'s units). ``peak_gbps`` defaults to
    :func:`guess_peak_gbps`. Each row holds the times in microseconds, the speedup over fp16,
    achieved bandwidth in GB/s (ours: packed weight + scales + zeros + x + y; fp16: weight + x +
    y), its fraction of peak (None when the peak is unknown), the maximum error relative to the
    output scale, and for batch 1 the target speedup with pass/fail.

    Runs on CUDA; without it only under ``TRITON_INTERPRET=1`` (tiny shapes, for smoke tests).
    """
    from bitalloc.kernels.triton_kernels import GEMV_MAX_ROWS, quant_matmul

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if peak_gbps is None:
        peak_gbps = guess_peak_gbps()
    rows = []
    for n, k in shapes:
        for bits in bits_list:
            for group in groups:
                pw = _random_packed(n, k, bits, group, device)
                w16 = pw.dequantize(torch.float16)
                for m in batches:
                    x = torch.randn(m, k, device=device).half()
                    act_bytes = 2 * m * (k + n)

                    def ours(x=x, pw=pw):
                        return quant_matmul(
                            x,
                            pw.qweight,
                            pw.scales,
                            pw.zeros,
                            bits=pw.bits,
                            group_size=pw.group_size,
                            in_features=pw.in_features,
                        )

                    def fp16(x=x, w16=w16):
                        return torch.nn.functional.linear(x, w16)

                    ref = x.float() @ w16.float().T
                    err = (ours().float() - ref).abs().max().item() / ref.abs().max().item()
                    ours_us = _bench(ours, warmup, reps, device)
                    fp16_us = _bench(fp16, warmup, reps, device)
                    ours_gbps = (pw.nbytes + act_bytes) / ours_us / 1e3
                    fp16_gbps = (2 * n * k + act_bytes) / fp16_us / 1e3
                    speedup = fp16_us / ours_us
                    target = speedup_target(bits) if m == 1 else None
                    rows.append(
                        {
                            "device": torch.cuda.get_device_name()
                            if device.type == "cuda"
                            else "cpu",
                            "n": n,
                            "k": k,
                            "bits": bits,
                            "group": group,
                            "batch": m,
                            "kernel": "gemv" if m <= GEMV_MAX_ROWS else "gemm",
                            "ours_us": ours_us,
                            "fp16_us": fp16_us,
                            "speedup": speedup,
                            "ours_gbps": ours_gbps,
                            "fp16_gbps": fp16_gbps,
                            "ours_peak_frac": ours_gbps / peak_gbps if peak_gbps else None,
                            "fp16_peak_frac": fp16_gbps / peak_gbps if peak_gbps else None,
                            "max_rel_err": err,
                            "target": target,
                            "passed": None if target is None else speedup >= target,
                        }
                    )
                del w16
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def gpu_markdown(rows: Sequence[dict]) -> str:
    """A markdown table of :func:`gpu_rows`' rows (one line per case)."""
    header = (
        "| shape (N x K) | bits | group | batch | kernel | ours µs | fp16 µs | speedup "
        "| ours GB/s | ours % peak | fp16 GB/s | fp16 % peak | target (batch 1) | pass "
        "| max rel err |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        passed = {None: "–", True: "yes", False: "**no**"}[r["passed"]]
        ours_pct = None if r["ours_peak_frac"] is None else 100 * r["ours_peak_frac"]
        fp16_pct = None if r["fp16_peak_frac"] is None else 100 * r["fp16_peak_frac"]
        lines.append(
            f"| {r['n']} x {r['k']} | {r['bits']} | {r['group']} | {r['batch']} | {r['kernel']} "
            f"| {r['ours_us']:.1f} | {r['fp16_us']:.1f} | {r['speedup']:.2f}x "
            f"| {r['ours_gbps']:.0f} | {_fmt(ours_pct, '.0f')} | {r['fp16_gbps']:.0f} "
            f"| {_fmt(fp16_pct, '.0f')} | {_fmt(r['target'], '.2f')} | {passed} "
            f"| {r['max_rel_err']:.1e} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Print the table for the default cases, or for one tiny case with ``--smoke``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="one tiny case with short budgets; without CUDA it runs in Triton's interpreter",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        if not torch.cuda.is_available():
            # Must precede the first import of the kernels: triton picks the interpreter when a
            # kernel is defined.
            os.environ.setdefault("TRITON_INTERPRET", "1")
        rows = gpu_rows(((64, 256),), (3,), (64,), (1, 16), warmup=1, reps=1)
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke to exercise the code in the interpreter")
    else:
        rows = gpu_rows()
    print(gpu_markdown(rows))


if __name__ == "__main__":
    main()
