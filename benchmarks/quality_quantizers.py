"""Quality at a budget with better quantizers: the same allocation (Fisher profile, Lagrangian
solver) over round-to-nearest formats and over the same formats quantized by GPTQ (``+gptq``),
one pass and sequential, on the embedded default model.

Each budget's row shows the allocation restricted to round-to-nearest formats beside the one
that may use GPTQ, so that the gain of the quantizer and the gain of the allocation are seen
separately. Writes its section of BENCHMARKS.md.

    .venv/bin/python benchmarks/quality_quantizers.py [--eval-tokens 4096] [--budgets 2.5,3.25,4.25]
"""

from __future__ import annotations

import argparse
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
from bitalloc.evaluate import perplexity
from bitalloc.solvers import solve


def markers(tokens: int) -> tuple[str, str]:
    """The BENCHMARKS.md section of one evaluation length (each length keeps its own)."""
    name = f"quality-quantizers-{tokens}"
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


BITS = (2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128)


def palette(suffix: str) -> list[str]:
    return [f"int{b}-g{g}{suffix}" for b in BITS for g in GROUPS] + ["fp16"]


def run(suffix: str, args, budgets: list[float]) -> dict:
    """Profile, uniform rows and allocations over one palette; sequential rows for GPTQ."""
    out: dict = {"rows": {}, "uniform": {}}
    start = time.perf_counter()
    prep = prepare(formats=palette(suffix), use_cache=False, progress=False)
    out["prepare_s"] = time.perf_counter() - start
    start = time.perf_counter()
    profile = profile_model(prep, "fisher", use_cache=False, progress=False)
    out["profile_s"] = time.perf_counter() - start
    ev = prep.evaluation_windows(args.eval_tokens)
    out["tokens"] = int(ev.numel())
    for name in ("int4-g128", "int3-g128", "int2-g64"):
        fmt = name + suffix
        out["uniform"][name] = measure_assignment(
            prep, uniform_assignment(prep.units, fmt), ev
        ).perplexity
        print(suffix or "rtn", fmt, out["uniform"][name], flush=True)
    for budget in budgets:
        problem = build_problem(prep.units, prep.palette, profile, budget)
        alloc = allocation_for(prep, profile, solve(problem, method="lagrangian"), budget)
        row = {
            "bits": alloc.avg_bits,
            "ppl": measure_assignment(prep, alloc.formats, ev).perplexity,
        }
        if suffix:
            start = time.perf_counter()
            model = prep.recorded(alloc).apply(
                prep.model, calibration=prep.calibration_windows(), sequential=True, progress=False
            )
            row["sequential"] = perplexity(model, ev).perplexity
            row["sequential_s"] = time.perf_counter() - start
            del model
        out["rows"][budget] = row
        print(suffix or "rtn", budget, row, flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--budgets", default="2.5,3.25,4.25")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "BENCHMARKS.md"))
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    began = time.perf_counter()
    rtn = run("", args, budgets)
    gptq = run("+gptq", args, budgets)
    start_marker, end_marker = markers(args.eval_tokens)
    lines = [
        start_marker,
        f"## Quality with GPTQ formats (default model, {args.eval_tokens} evaluation tokens)",
        "",
        f"`.venv/bin/python benchmarks/quality_quantizers.py --eval-tokens {args.eval_tokens} "
        f"--budgets {args.budgets}` on {cpu_description()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {(time.perf_counter() - began) / 60:.0f} min. "
        f"Perplexity on {rtn['tokens']} evaluation tokens (the windows of the quality table). "
        "Fisher profile, Lagrangian solver; palettes int{2,3,4,5,6,8}-g{32,64,128} + fp16, "
        "round to nearest (importance-weighted clipping) or the same with `+gptq` (GPTQ with "
        "the calibration inputs' Gram matrices over 8,192 tokens, same stored bits). "
        "Sequential: the GPTQ allocation applied block by block with each block's inputs from "
        "the quantized blocks before it. The weights are Q4_1 dequantized (4-bit grid in "
        "blocks of 32), which favours 32-aligned formats at 4+ bits.",
        "",
        "| configuration | avg bits | round to nearest | GPTQ, one pass | GPTQ, sequential |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in rtn["uniform"]:
        lines.append(
            f"| uniform {name} | | {rtn['uniform'][name]:.2f} | {gptq['uniform'][name]:.2f} | |"
        )
    for budget in budgets:
        a, b = rtn["rows"][budget], gptq["rows"][budget]
        lines.append(
            f"| allocation @ {budget:g} | {a['bits']:.3f} / {b['bits']:.3f} | {a['ppl']:.2f} "
            f"| {b['ppl']:.2f} | {b['sequential']:.2f} |"
        )
    lines += [
        "",
        f"Times: round to nearest prepare {rtn['prepare_s']:.0f} s, profile "
        f"{rtn['profile_s']:.0f} s; GPTQ prepare (importance and Gram matrices) "
        f"{gptq['prepare_s']:.0f} s, profile (every unit x 18 GPTQ formats) "
        f"{gptq['profile_s']:.0f} s; sequential apply "
        + ", ".join(f"{gptq['rows'][b]['sequential_s']:.0f} s" for b in budgets)
        + ".",
        end_marker,
    ]
    write_section(args.out, start_marker, end_marker, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
