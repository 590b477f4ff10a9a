"""KV-cache mixed precision and the joint weights + KV memory budget on the default model.

1. Weights unquantized, KV cache quantized: perplexity against average bits per cached element
   (exact, scales and zeros included) for uniform K8V8, K8V4, K4V4, K4V2, K2V2 and for per-layer
   pairs chosen by ``allocate(kv_avg_bits=...)`` at ``--kv-bits`` (default 3.25 and 4.0), every
   window scored through the quantized cache at ``--context`` tokens. The ILP optimum of the same
   problem is shown beside the default (Lagrangian) solver.
2. One memory budget for weights + KV cache at ``--context`` tokens x ``--batch`` sequences
   (``allocate(memory_bytes=...)``) at each of ``--memory-mib``: the split, and the joint choice
   against the best separate allocations at the same total (KV share set by a uniform pair, the
   weights solved on the rest; KV layers mixed within the share, or all at that pair), each
   predicted and measured (weights fake-quantized and the cache quantized together).

Writes its section of BENCHMARKS.md (between markers), with the command and the machine.

    .venv/bin/python benchmarks/kv.py [--context 2048] [--eval-tokens 8192] [--batch 4]
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

from bitalloc.allocator import measure_assignment, prepare, profile_model
from bitalloc.config import AllocateConfig
from bitalloc.data import tokenize, windows
from bitalloc.kv.allocate import (
    allocate_with_kv,
    joint_space,
    kv_request,
    profile_kv,
    unquantized_weights,
)
from bitalloc.kv.formats import kv_units, parse_kv_format
from bitalloc.kv.plan import (
    build_kv_problem,
    kv_elements,
    solve_separate,
)
from bitalloc.solvers import solve

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- kv:start -->", "<!-- kv:end -->"
UNIFORM = ("K16V16", "K8V8", "K8V4", "K4V4", "K4V2", "K2V2")
MIB = 2**20


def _request(request, *, kv_avg_bits=None, memory_bytes=None):
    """The benchmark's KV request with one budget set (checked as allocate checks it)."""
    return kv_request(
        AllocateConfig.from_flat(
            kv_avg_bits=kv_avg_bits,
            memory_bytes=memory_bytes,
            context_len=request.context_len,
            batch_size=request.batch_size if memory_bytes is not None else 1,
            kv_profiler=request.method,
            kv_tokens=request.tokens,
        )
    )


def replay_speed(prep, calibration_tokens: int) -> tuple[float, float, float]:
    """Seconds of a small KV profile (every layer, K2V2 and K4V4, one window) with and without
    prefix replay, side by side, and the largest difference between the two tables."""
    from bitalloc.kv.profiler import KVProfiler

    units = kv_units(prep.model)
    cal = prep.calibration_windows()
    seconds, tables = [], []
    for replay in (False, True):
        profiler = KVProfiler("kl", tokens=calibration_tokens, replay_prefix=replay)
        start = time.perf_counter()
        tables.append(profiler.profile(prep.model, units, ["K2V2", "K4V4"], cal).loss)
        seconds.append(time.perf_counter() - start)
    return seconds[0], seconds[1], float(abs(tables[0] - tables[1]).max())


def eval_windows(prep, context: int, tokens: int) -> torch.Tensor:
    ids = tokenize(prep.loaded.tokenizer, prep.text.evaluation)
    return windows(ids, context, tokens)


def kv_rows(prep, request, units, kv_prof, ev, context, bits_list, progress):
    """Section 1: uniform pairs and mixed allocations, weights unquantized."""
    weights = unquantized_weights(prep).formats
    elements = kv_elements(units, context)
    reference = None
    rows = []

    def row(label, kv_formats, predicted, extra=""):
        nonlocal reference
        n_kv, head_dim = units[0].shape[0] // 2, units[0].shape[1]
        bits = sum(
            parse_kv_format(kv_formats[u.name]).cache_bits(context, 1, n_kv, head_dim)
            for u in units
        )
        start = time.perf_counter()
        ppl = measure_assignment(
            prep, weights, ev, kv_formats=kv_formats, batch_size=1, progress=progress, desc=label
        ).perplexity
        if reference is None:
            reference = ppl
        rows.append(
            (
                label,
                bits / elements,
                bits / 8 / MIB,
                predicted,
                math.log(ppl / reference),
                ppl,
                extra,
            )
        )
        print(
            f"{label}: {bits / elements:.3f} bits, ppl {ppl:.3f} "
            f"({time.perf_counter() - start:.0f} s)"
        )

    column = {name: j for j, name in enumerate(kv_prof.formats)}
    for name in UNIFORM:
        predicted = float(kv_prof.loss[:, column[name]].sum())
        row(name, {u.name: name for u in units}, predicted)
    for bits in bits_list:
        # The path of allocate(kv_avg_bits=...) without avg_bits: weights at fp16, the default
        # solver; the ILP optimum of the same problem beside it.
        alloc = allocate_with_kv(
            prep,
            None,
            _request(request, kv_avg_bits=bits),
            solve_weights=None,
            solver=None,
            solver_options={},
            ties=None,
            progress=progress,
        )
        problem = build_kv_problem(units, request.palette, kv_prof, bits, context_len=context)
        ilp = solve(problem, method="ilp", time_limit=60)
        counts: dict[str, int] = {}
        for name in alloc.kv_formats.values():
            counts[name] = counts.get(name, 0) + 1
        mix = ", ".join(f"{n}x{c}" for n, c in sorted(counts.items(), key=lambda e: -e[1]))
        row(
            f"mixed @ {bits:g}",
            alloc.kv_formats,
            alloc.data.kv.predicted_loss,
            f"ILP optimum {ilp.objective:.4f} ({ilp.status}); {mix}",
        )
    return rows


def joint_rows(prep, wprof, request, units, kv_prof, ev, memory_mib, progress):
    """Section 2: joint allocation against the best separate ones at each budget."""
    out = []
    space = joint_space(prep, wprof, units, kv_prof, request, request.context_len)
    lo, hi = space.memory_range()
    print(f"memory range {lo / MIB:.2f} .. {hi / MIB:.2f} MiB")
    for mib in memory_mib:
        memory = mib * MIB
        req = _request(request, memory_bytes=memory)
        start = time.perf_counter()
        alloc = allocate_with_kv(
            prep,
            wprof,
            req,
            solve_weights=None,
            solver=None,
            solver_options={},
            ties=None,
            progress=progress,
        )
        seconds = time.perf_counter() - start
        joint = alloc.data.joint
        print(joint.report())
        candidates = [("joint", alloc.formats, alloc.kv_formats, joint, None)]
        for label, uniform in (("separate, mixed KV", False), ("separate, uniform KV", True)):
            best = joint.best_separate(uniform_kv=uniform)
            share = [f.name for f in request.palette].index(best.kv_share)
            weights_sol, kv_sol = solve_separate(space, memory, share, method="lagrangian")
            weights = {
                u.name: prep.palette[int(j)].name for u, j in zip(prep.units, weights_sol.choice)
            }
            if uniform:
                kv = {u.name: best.kv_share for u in units}
            else:
                kv = {u.name: request.palette[int(j)].name for u, j in zip(units, kv_sol.choice)}
            candidates.append((label, weights, kv, best, uniform))
        for label, weights, kv, record, uniform in candidates:
            ppl = measure_assignment(
                prep, weights, ev, kv_formats=kv, batch_size=1, progress=progress, desc=label
            ).perplexity
            if record is joint:
                w_bits, kv_mib = alloc.avg_bits, joint.kv_bytes / MIB
                predicted, w_loss = joint.predicted_loss, joint.weight_loss
                kv_loss, kv_bits = joint.kv_loss, alloc.data.kv.avg_bits
            else:
                w_bits, kv_mib, w_loss = (
                    record.weight_avg_bits,
                    record.kv_bytes / MIB,
                    record.weight_loss,
                )
                kv_loss = record.kv_loss_uniform if uniform else record.kv_loss_mixed
                predicted = w_loss + kv_loss
                kv_bits = (
                    8
                    * record.kv_bytes
                    / kv_elements(units, request.context_len, request.batch_size)
                )
            out.append(
                (mib, label, w_bits, kv_bits, kv_mib, w_loss, kv_loss, predicted, ppl, seconds)
            )
            print(f"{mib} MiB {label}: ppl {ppl:.3f}")
            seconds = None
    return out, (lo, hi, space.fixed_bytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=2048, help="KV context (tokens)")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--kv-bits", default="3.25,4.0")
    parser.add_argument("--batch", type=int, default=4, help="sequences for the memory budget")
    parser.add_argument("--memory-mib", default="150,200")
    parser.add_argument("--kv-tokens", type=int, default=1024, help="KV profile calibration tokens")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    progress = not args.quiet
    wall = time.perf_counter()

    prep = prepare(None, seq_len=512)
    request = kv_request(
        AllocateConfig.from_flat(
            memory_bytes=1.0,  # only to validate the options; the budgets come below
            context_len=args.context,
            batch_size=args.batch,
            kv_profiler="kl",
            kv_tokens=args.kv_tokens,
        )
    )
    start = time.perf_counter()
    units, kv_prof = profile_kv(prep, request, progress=progress)
    kv_seconds = kv_prof.metadata.get("seconds", time.perf_counter() - start)
    start = time.perf_counter()
    wprof = profile_model(prep, "fisher", progress=progress)
    ev = eval_windows(prep, args.context, args.eval_tokens)
    bits_list = [float(b) for b in args.kv_bits.split(",")]
    rows = kv_rows(prep, request, units, kv_prof, ev, args.context, bits_list, progress)
    memory = [float(m) for m in args.memory_mib.split(",")]
    joint, (lo, hi, fixed) = joint_rows(prep, wprof, request, units, kv_prof, ev, memory, progress)
    slow, fast, diff = replay_speed(prep, prep.seq_len)
    print(f"KV profile of 2 pairs: {slow:.0f} s recomputing, {fast:.0f} s replaying")
    wall = time.perf_counter() - wall

    lines = [
        START,
        "## KV cache: mixed precision and one memory budget (default model)",
        "",
        f"`.venv/bin/python benchmarks/kv.py --context {args.context} --eval-tokens "
        f"{args.eval_tokens} --batch {args.batch} --memory-mib {args.memory_mib}` on "
        f"{cpu_description()}, Python {platform.python_version()}, torch {torch.__version__}; "
        f"{wall / 60:.0f} min in all"
        + (" (profiles from the cache)." if kv_prof.metadata.get("cache") == "hit" else "."),
        "",
        f"KV profile: `kl` on {kv_prof.metadata.get('tokens')} calibration tokens "
        f"({kv_prof.metadata.get('seq_len')}-token windows), {kv_seconds:.0f} s when computed, "
        f"{len(units)} layers x {len(kv_prof.formats)} pairs. Evaluation: "
        f"{ev.shape[0]} windows of {args.context} tokens, every window scored through the "
        "quantized cache. Bits are exact stored bits per cached element at that context "
        "(fp16 scale and zero per group of 64 included), so K4V4 is 4.5, not 4.",
        "",
        f"Profiling speed, side by side (every layer, K2V2 and K4V4, one {prep.seq_len}-token "
        f"window): {slow:.0f} s recomputing every block, {fast:.0f} s replaying the blocks "
        f"before the quantized layer ({slow / fast:.2f}x faster; tables differ by at most "
        f"{diff:.1e}).",
        "",
        "### Perplexity against KV bits (weights unquantized)",
        "",
        "| cache | bits / element | MiB per sequence | predicted KL (nats) | measured loss "
        "increase | perplexity | notes |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for label, bits, mib, predicted, measured, ppl, extra in rows:
        lines.append(
            f"| {label} | {bits:.3f} | {mib:.2f} | {predicted:.4f} | {measured:+.4f} | "
            f"{ppl:.3f} | {extra} |"
        )
    lines += [
        "",
        f"### One memory budget: weights + KV cache for {args.context} tokens x batch {args.batch}",
        "",
        f"Parameters outside the allocation (embeddings, norms) count {fixed / MIB:.2f} MiB at "
        f"16 bits. Feasible budgets: {lo / MIB:.2f} MiB (everything cheapest) to {hi / MIB:.2f} "
        "MiB (everything richest). Separate allocations give the KV cache the bytes of one "
        "uniform pair and solve weights and KV on their own shares; the best over all pairs is "
        "shown. Predicted losses are the Fisher (weights) and KL (KV) profiles' sums.",
        "",
        "| budget MiB | allocation | weight bits | KV bits / element | KV MiB | predicted "
        "weights | predicted KV | predicted total | perplexity |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mib, label, w_bits, kv_bits, kv_mib, w_loss, kv_loss, predicted, ppl, _ in joint:
        lines.append(
            f"| {mib:g} | {label} | {w_bits:.3f} | {kv_bits:.3f} | {kv_mib:.2f} | {w_loss:.4f} | "
            f"{kv_loss:.4f} | {predicted:.4f} | {ppl:.3f} |"
        )
    solve_s = [r[-1] for r in joint if r[-1] is not None]
    lines += [
        "",
        f"Joint solve with the separate comparison: {', '.join(f'{s:.1f}' for s in solve_s)} s "
        "per budget (profiles cached).",
        END,
    ]
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        write_section(ROOT / "BENCHMARKS.md", START, END, section)


if __name__ == "__main__":
    sys.exit(main())
