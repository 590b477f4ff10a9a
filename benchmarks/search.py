"""Measured search and verify-and-repair on the embedded default model.

1. ``bitalloc.search.search`` at one budget: an NSGA-II study seeded by the solver's
   allocations, every trial evaluated on Ray workers, in a fresh study under the work dir.
2. The solver-only frontier (Fisher profile + Lagrangian) at budgets around it and uniform
   formats, measured on the same evaluation windows.
3. Verify-and-repair of the solver's allocation at the budget: predicted and measured loss
   before and after, and the evaluation perplexity of both allocations.

Writes its section of BENCHMARKS.md (between markers), with the command and the machine.

    .venv/bin/python benchmarks/search.py [--trials 40] [--workers 2] [--eval-tokens 4096]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import time
from pathlib import Path

import optuna
import torch
from _report import cpu_description, write_section

from bitalloc.allocator import (
    allocation_for,
    build_problem,
    measure_assignment,
    prepare,
    profile_model,
    uniform_assignment,
    uniform_avg_bits,
)
from bitalloc.formats import parse_format
from bitalloc.repair import verify_and_repair
from bitalloc.search import search
from bitalloc.search.study import best_within
from bitalloc.solvers import solve

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".work" / "search"
START, END = "<!-- search:start -->", "<!-- search:end -->"
FRONTIER = [2.75, 3.0, 3.25, 3.5, 3.75, 4.0, 4.25]
UNIFORM = ["int3-g128", "int3-g64", "int4-g128", "int4-g64"]


def machine() -> str:
    """A one-line description of where the numbers were taken."""
    return f"{cpu_description()}, torch {torch.__version__}, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--avg-bits", type=float, default=3.25)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sampler", default="nsga2")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--repair-budget", type=int, default=24)
    parser.add_argument("--repair-groups", default="unit,layer", help="comma-separated")
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    prep = prepare()
    profile = profile_model(prep, "fisher")
    ev = prep.evaluation_windows(args.eval_tokens)

    shutil.rmtree(WORK, ignore_errors=True)
    start = time.perf_counter()
    result = search(
        prep.model,
        args.avg_bits,
        trials=args.trials,
        sampler=args.sampler,
        run_dir=WORK,
        workers=args.workers,
        eval_tokens=args.eval_tokens,
        profile=profile,
        formats=[f.name for f in prep.palette],
    )
    search_s = time.perf_counter() - start
    print(result.summary(), flush=True)
    study = optuna.load_study(study_name=result.study_name, storage=result.storage)
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))

    fp16 = measure_assignment(prep, uniform_assignment(prep.units, "fp16"), ev).perplexity
    uniform = []
    for name in UNIFORM:
        f = parse_format(name)
        bits = uniform_avg_bits(prep.units, f)
        uniform.append(
            (name, bits, measure_assignment(prep, uniform_assignment(prep.units, f), ev).perplexity)
        )
        print(uniform[-1], flush=True)

    def solve_with(table, budget):
        problem = build_problem(prep.units, prep.palette, table, budget)
        return allocation_for(prep, table, solve(problem, method="lagrangian"), budget)

    solver_rows = []
    start = time.perf_counter()
    for budget in FRONTIER:
        alloc = solve_with(profile, budget)
        ppl = measure_assignment(prep, alloc.formats, ev).perplexity
        found = best_within(trials, budget)
        solver_rows.append((budget, alloc, ppl, found))
        print(budget, alloc.avg_bits, ppl, found and found.values, flush=True)
    frontier_s = time.perf_counter() - start

    first = solve_with(profile, args.avg_bits)
    first_ppl = measure_assignment(prep, first.formats, ev).perplexity
    repairs = []
    for groups in args.repair_groups.split(","):
        repaired, record = verify_and_repair(
            prep.model,
            prep.calibration_windows(),
            prep.units,
            profile,
            first,
            lambda table: solve_with(table, args.avg_bits),
            budget=args.repair_budget,
            groups=groups,
        )
        ppl = (
            measure_assignment(prep, repaired.formats, ev).perplexity
            if record.changed
            else first_ppl
        )
        moved = sum(repaired.formats[k] != v for k, v in first.formats.items())
        repairs.append((groups, record, ppl, moved))
        print(groups, record.measured_before, record.measured_after, ppl, flush=True)

    evaluations = len({tuple(sorted(t.params.items())) for t in trials})
    lines = [
        START,
        "## Measured search and verify-and-repair (default model)",
        "",
        f"Command: `.venv/bin/python benchmarks/search.py --avg-bits {args.avg_bits:g} "
        f"--trials {args.trials} --workers {args.workers} --eval-tokens {args.eval_tokens} "
        f"--repair-groups {args.repair_groups}`  ",
        f"Machine: {machine()}  ",
        f"Evaluation: {ev.numel()} tokens of the evaluation split ({len(ev)} windows of "
        f"{ev.shape[1]}). Profile: Fisher (default, {profile.metadata.get('tokens')} "
        "calibration tokens). Search: "
        f"{args.sampler}, space `near` (one palette step around the solver's seeds), "
        f"{args.trials} trials ({evaluations} distinct allocations evaluated, plus "
        f"{len(result.uniform) + 1} baselines) on {args.workers} Ray workers in "
        f"{search_s:.0f} s ({search_s / max(1, result.evaluations):.1f} s per evaluation).",
        "",
        "### Best measured perplexity within each budget",
        "",
        "| budget | solver (Fisher + Lagrangian) | search (best trial within budget) "
        "| search / solver |",
        "|---:|---:|---:|---:|",
    ]
    for budget, alloc, ppl, found in solver_rows:
        if found is None:
            lines.append(f"| {budget:g} | {ppl:.2f} ({alloc.avg_bits:.3f} bits) | none | |")
        else:
            lines.append(
                f"| {budget:g} | {ppl:.2f} ({alloc.avg_bits:.3f} bits) | {found.values[1]:.2f} "
                f"({found.values[0]:.3f} bits, trial {found.number}, "
                f"{found.user_attrs['source']}) | {found.values[1] / ppl:.3f} |"
            )
    lines += [
        "",
        f"Unquantized: {fp16:.2f}. Uniform: "
        + ", ".join(f"{n} {p:.2f} ({b:.3f} bits)" for n, b, p in uniform)
        + ".",
        "",
        "Measured Pareto front of the search (avg bits / perplexity): "
        + ", ".join(f"{b:.3f} / {p:.2f}" for _, b, p in result.pareto)
        + f". Solver frontier: {len(FRONTIER)} budgets measured in {frontier_s:.0f} s.",
        "",
        f"### Verify-and-repair at {args.avg_bits:g} bits",
        "",
        f"Budget {args.repair_budget} evaluations on {repairs[0][1].tokens} calibration tokens, "
        f"tolerance {repairs[0][1].tolerance:g}. Losses are increases over the unquantized model "
        "in nats/token on the repair windows; perplexity is on the evaluation windows.",
        "",
        "| allocation | predicted loss | measured loss | evaluation perplexity "
        "| evaluations | time | units changed |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| solver's (Fisher + Lagrangian) | {repairs[0][1].predicted_before:.4f} "
        f"| {repairs[0][1].measured_before:.4f} | {first_ppl:.2f} | | | |",
    ]
    for groups, record, ppl, moved in repairs:
        lines.append(
            f"| repaired, groups `{groups}` | {record.predicted_after:.4f} "
            f"| {record.measured_after:.4f} | {ppl:.2f} | {record.evaluations} "
            f"| {record.wall_time_s:.0f} s | {moved} of {len(first.formats)} |"
        )
    lines += [
        "",
        "Rounds: "
        + " / ".join(
            f"`{groups}`: "
            + "; ".join(
                f"{r.action} (predicted {r.predicted:.4f}, measured {r.measured:.4f})"
                for r in record.rounds
            )
            for groups, record, _, _ in repairs
        ),
        END,
    ]
    write_section(args.out, START, END, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
