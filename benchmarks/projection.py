"""A projection (not a measurement) of a streamed allocation of Llama-3.1-8B and 70B: peak memory
and time per stage on this machine, on a cluster of workers, and on one GPU host.

The plan is :func:`bitalloc.streaming.resources.plan_streamed` on the public configs
(``benchmarks/configs``: sizes only, no weights), with this machine's speeds measured here (a
matrix product; each format's rounding as the profile rounds). ``benchmarks/scale.py``
measures how close the same plan comes on random checkpoints up to 3B.

- cluster: ``--workers`` Ray workers divide the scoring (each one core, as here); the forward
  chain and the export stay on one process;
- one GPU: what the plan gives when the matrix products run at ``--gpu-tflops`` (a float32
  rate an H100/H200-class GPU sustains without tensor cores) and the rounding, which llama.cpp's
  quantizers do on the CPU, runs on ``--host-cores`` host cores. The streamed path runs on the
  CPU today, so this column is an assumption about a port, stated as such.

    .venv/bin/python benchmarks/projection.py [--workers 16] [--gpu-tflops 50] [--host-cores 16]
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

from _report import cpu_description, write_section

START, END = "<!-- projection:start -->", "<!-- projection:end -->"
PALETTE = "gguf:Q3_K,gguf:Q4_K,gguf:Q6_K,fp16"
CONFIGS = {"Llama-3.1-8B": "llama-3.1-8b.json", "Llama-3.1-70B": "llama-3.1-70b.json"}


def main() -> int:
    from bitalloc.formats import parse_palette
    from bitalloc.streaming.resources import machine_speed, plan_streamed

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--gpu-tflops", type=float, default=50.0)
    parser.add_argument("--host-cores", type=int, default=16)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "BENCHMARKS.md"))
    args = parser.parse_args()
    formats = parse_palette(PALETTE)
    quantized = [f for f in formats if not f.is_float]
    from bitalloc.formats import GGUFFormat

    speed = machine_speed(quantized + [GGUFFormat("Q8_0"), GGUFFormat("Q6_K")])
    cores = os.cpu_count() or 1
    gpu = replace(
        speed,
        flops=args.gpu_tflops * 1e12,
        rounding={k: v * args.host_cores / cores for k, v in speed.rounding.items()},
        per_call={k: v * cores / args.host_cores for k, v in speed.per_call.items()},
    )
    here = Path(__file__).resolve().parent / "configs"
    rows = []
    for name, file in CONFIGS.items():
        config = here / file
        plans = {
            "this machine": plan_streamed(config, formats, args.tokens, speed=speed),
            f"{args.workers} workers": plan_streamed(
                config, formats, args.tokens, workers=args.workers, speed=speed
            ),
            "one GPU host": plan_streamed(config, formats, args.tokens, speed=gpu),
        }
        for where, plan in plans.items():
            rows.append((name, where, plan))
            print(name, where, plan.peak_bytes / 2**30, plan.seconds, flush=True)
    lines = [
        START,
        "## Projection: Llama-3.1-8B and 70B (a projection, not a measurement)",
        "",
        f"`.venv/bin/python benchmarks/projection.py --workers {args.workers} --gpu-tflops "
        f"{args.gpu_tflops:g} --host-cores {args.host_cores}` on {cpu_description()}. The "
        "resource plan of a streamed allocation and GGUF export over "
        f"`{PALETTE}` with {args.tokens} calibration tokens, computed from the public configs "
        "(`benchmarks/configs`, sizes only) and this machine's measured speeds "
        f"({speed.flops / 1e9:.0f} GFLOP/s matrix products; rounding "
        + ", ".join(f"{k} {v / 1e6:.1f} M weights/s" for k, v in speed.rounding.items())
        + f"). Workers: the scoring divided over {args.workers} Ray workers of one core each. "
        f"One GPU host: matrix products at {args.gpu_tflops:g} TFLOP/s and rounding on "
        f"{args.host_cores} host cores; the streamed path runs on the CPU today, so that column "
        "assumes a port. How far the plan is from measurements at 0.14-3.1B: the scale table "
        "above.",
        "",
        "| model | where | peak memory | forward and statistics | scoring | export | total |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, where, plan in rows:
        s = plan.seconds
        lines.append(
            f"| {name} | {where} | {plan.peak_bytes / 2**30:.1f} GiB "
            f"| {_hours(s['forward and statistics'])} | {_hours(s['scoring (formats x units)'])} "
            f"| {_hours(s['export'])} | {_hours(plan.total_seconds)} |"
        )
    lines.append(END)
    write_section(args.out, START, END, "\n".join(lines))
    return 0


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


if __name__ == "__main__":
    sys.exit(main())
