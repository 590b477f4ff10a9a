"""Profiler fidelity: how well each profiler predicts measured loss, what it costs, and what
allocation it leads to.

On the default model:

1. ``fisher``, ``hessian`` and ``output`` profile the full palette, each in its own child
   process (wall time and peak memory).
2. ``measured`` runs on Ray workers over the fixed sample, every unit of all 30 layers at
   ``int2-g128`` and ``int3-g128`` (timed alone: the issue's target), then adds ``int4-g128``;
   ``kl`` measures the same three formats. Both journal their jobs under ``.work``, so an
   interrupted benchmark resumes.
3. Spearman and Kendall rank correlation of every profiler's predictions with ``measured`` over
   the sample (420 unit-format pairs), per format, and per layer (the sum over a layer's units
   at ``int2-g128``).
4. The allocation each profiler leads to at 3.25 bits (Lagrangian solver): on the full palette
   for the profilers that cover it, and on the three sample formats for all five, with
   perplexity measured on the evaluation split.

Results go to BENCHMARKS.md between markers. Profiles and journals are kept in
``benchmarks/.work/profilers`` and reused by later runs (``--fresh`` recomputes them).

    .venv/bin/python benchmarks/profilers.py [--eval-tokens 16384] [--workers 2] [--fresh]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _report import cpu_description, peak_mb, write_section
from scipy.stats import kendalltau, spearmanr

START, END = "<!-- profilers:start -->", "<!-- profilers:end -->"
WORK = Path(__file__).resolve().parent / ".work" / "profilers"
SAMPLE_FORMATS = ("int2-g128", "int3-g128")
SMALL_PALETTE = ("int2-g128", "int3-g128", "int4-g128")
BUDGET = 3.25
#: (profiler, options, formats or None for the full palette)
RUNS: list[tuple[str, dict[str, Any], tuple[str, ...] | None]] = [
    ("fisher", {"tokens": 32768}, None),
    ("hessian", {}, None),
    ("output", {}, None),
]


def _profile_child(name: str, options: dict[str, Any], formats, out: str, queue) -> None:
    try:
        import torch

        from bitalloc.allocator import prepare, profile_model

        torch.set_num_threads(max(1, torch.get_num_threads()))
        prep = prepare(formats=list(formats) if formats else None)
        workers = options.pop("workers", 0)
        start = time.perf_counter()
        prof = profile_model(
            prep,
            name,
            profiler_options=options,
            workers=workers,
            use_cache=False,
            progress=False,
        )
        wall = time.perf_counter() - start
        prof.save(out)
        queue.put({"wall_s": wall, "peak_mb": peak_mb()})
    except Exception as exc:  # reported in the table
        queue.put({"error": f"{type(exc).__name__}: {str(exc)[:200]}"})


def run_profile(name: str, options: dict[str, Any], formats, out: Path) -> dict[str, Any]:
    """Profile in a fresh process; returns wall time and peak memory (saved beside ``out``)."""
    import json

    meta = out.with_suffix(".run.json")
    if out.is_file() and meta.is_file():
        return json.loads(meta.read_text())
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_profile_child, args=(name, dict(options), formats, str(out), queue))
    proc.start()
    result = queue.get()
    proc.join()
    if "error" in result:
        raise RuntimeError(f"{name}: {result['error']}")
    meta.write_text(json.dumps(result))
    print(f"{name}: {result}", flush=True)
    return result


def rank_stats(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Spearman and Kendall (tau-b) rank correlation."""
    return float(spearmanr(pred, truth).statistic), float(kendalltau(pred, truth).statistic)


def machine() -> str:
    """A one-line description of where the numbers were taken."""
    import torch

    return (
        f"{cpu_description()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--workers", type=int, default=2, help="Ray workers for measured and kl")
    parser.add_argument("--measured-tokens", type=int, default=1024)
    parser.add_argument("--fresh", action="store_true", help="recompute cached profiles")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "BENCHMARKS.md"))
    args = parser.parse_args()
    if args.fresh and WORK.exists():
        shutil.rmtree(WORK)
    WORK.mkdir(parents=True, exist_ok=True)
    journal = str(WORK / "measurements.jsonl")
    measuring = {"tokens": args.measured_tokens, "workers": args.workers, "results": journal}

    runs: dict[str, dict[str, Any]] = {}
    for name, options, formats in RUNS:
        runs[name] = run_profile(name, options, formats, WORK / f"{name}.json")
    # measured alone over the sample: the timed target; then the third format; then kl.
    runs["measured"] = run_profile("measured", measuring, SAMPLE_FORMATS, WORK / "sample.json")
    run_profile("measured", measuring, SMALL_PALETTE, WORK / "measured.json")
    runs["kl"] = run_profile("kl", measuring, SMALL_PALETTE, WORK / "kl.json")

    from bitalloc.allocator import allocation_for, measure_assignment, prepare, uniform_assignment
    from bitalloc.planning import build_problem
    from bitalloc.sensitivity import Profile
    from bitalloc.solvers import solve

    profiles = {name: Profile.load(WORK / f"{name}.json") for name in runs if name != "measured"}
    profiles["measured"] = Profile.load(WORK / "measured.json")
    truth_profile = profiles["measured"]
    raw = np.asarray(truth_profile.metadata["raw"])
    cols = [truth_profile.formats.index(f) for f in SAMPLE_FORMATS]
    truth = raw[:, cols]
    units = truth_profile.units
    layers = np.array([int(u.split(".")[2]) for u in units])

    corr_rows = []
    for name in ("fisher", "hessian", "output", "kl"):
        prof = profiles[name]
        pred = np.stack([prof.column(f) for f in SAMPLE_FORMATS], axis=1)
        overall = rank_stats(pred.ravel(), truth.ravel())
        per_format = [rank_stats(pred[:, j], truth[:, j])[0] for j in range(len(SAMPLE_FORMATS))]
        layer_pred = np.array([pred[layers == i, 0].sum() for i in range(layers.max() + 1)])
        layer_true = np.array([truth[layers == i, 0].sum() for i in range(layers.max() + 1)])
        per_layer = rank_stats(layer_pred, layer_true)
        corr_rows.append((name, overall, per_format, per_layer))
        print(name, overall, per_format, per_layer, flush=True)

    prep_full = prepare()
    ev = prep_full.evaluation_windows(args.eval_tokens)
    fp16 = measure_assignment(prep_full, uniform_assignment(prep_full.units, "fp16"), ev)
    alloc_rows = []
    for palette_name, formats, names in (
        ("full palette", None, ("fisher", "hessian", "output")),
        ("int{2,3,4}-g128", SMALL_PALETTE, ("fisher", "hessian", "output", "kl", "measured")),
    ):
        prep = prepare(formats=list(formats) if formats else None)
        for name in names:
            prof = profiles[name]
            if formats:
                keep = [prof.formats.index(f) for f in formats]
                prof = Profile(prof.units, formats, prof.loss[:, keep], prof.metadata)
            problem = build_problem(prep.units, prep.palette, prof, BUDGET)
            alloc = allocation_for(prep, prof, solve(problem, method="lagrangian"), BUDGET)
            ppl = measure_assignment(prep_full, alloc.formats, ev).perplexity
            alloc_rows.append((palette_name, name, alloc.avg_bits, ppl, alloc.data.predicted_loss))
            print(alloc_rows[-1], flush=True)
    uniform = {}
    for fmt in ("int3-g128", "int4-g128"):
        uniform[fmt] = measure_assignment(
            prep_full, uniform_assignment(prep_full.units, fmt), ev
        ).perplexity

    lines = [
        START,
        "## Profiler fidelity (default model)",
        "",
        f"Command: `.venv/bin/python benchmarks/profilers.py --eval-tokens {args.eval_tokens} "
        f"--workers {args.workers} --measured-tokens {args.measured_tokens}`  ",
        f"Machine: {machine()}  ",
        "Sample: all 210 units of the 30 layers at int2-g128 and int3-g128 (420 pairs); the "
        f"truth is `measured` over {truth_profile.metadata['tokens']} calibration tokens "
        "(uncorrected values). Each profiler ran in its own process; `measured` and `kl` ran on "
        f"{args.workers} Ray workers (peak memory is per worker).",
        "",
        "| profiler | tokens | wall time | peak memory | Spearman | Kendall | Spearman int2 / int3 "
        "| per-layer Spearman / Kendall (int2) |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for name, overall, per_format, per_layer in corr_rows:
        run, prof = runs[name], profiles[name]
        mem = run["peak_mb"] if name != "kl" else prof.metadata.get("worker_peak_mb") or 0
        lines.append(
            f"| {name} | {prof.metadata.get('tokens')} | {run['wall_s']:.0f} s | {mem:.0f} MB "
            f"| {overall[0]:.3f} | {overall[1]:.3f} "
            f"| {per_format[0]:.3f} / {per_format[1]:.3f} "
            f"| {per_layer[0]:.3f} / {per_layer[1]:.3f} |"
        )
    m = profiles["measured"].metadata
    sample_meta = Profile.load(WORK / "sample.json").metadata
    lines.append(
        f"| measured (sample, 420 jobs) | {m.get('tokens')} | {runs['measured']['wall_s']:.0f} s "
        f"| {sample_meta.get('worker_peak_mb') or 0:.0f} MB | 1 | 1 | 1 / 1 | 1 / 1 |"
    )
    hess = profiles["hessian"].metadata
    lines += [
        "",
        f"Hessian: {hess.get('probes')} probes (converged: {hess.get('converged')}, last "
        f"relative change {hess.get('relative_change')}), {hess.get('negative_traces')} "
        "negative trace estimates clipped to 0. Output: scale "
        f"{profiles['output'].metadata.get('scale'):.3g} from "
        f"{profiles['output'].metadata.get('reference_format')}.",
        "",
        f"### Allocation at {BUDGET} bits per profiler (Lagrangian), perplexity on {ev.numel()} "
        "evaluation tokens",
        "",
        "| palette | profiler | avg bits | perplexity | predicted / measured loss increase |",
        "|---|---|---:|---:|---|",
    ]
    for palette_name, name, bits, ppl, predicted in alloc_rows:
        measured_inc = math.log(ppl) - math.log(fp16.perplexity)
        lines.append(
            f"| {palette_name} | {name} | {bits:.3f} | {ppl:.2f} "
            f"| {predicted:.3f} / {measured_inc:.3f} |"
        )
    lines += [
        "",
        f"References: fp16 {fp16.perplexity:.2f}, uniform int3-g128 {uniform['int3-g128']:.2f}, "
        f"uniform int4-g128 {uniform['int4-g128']:.2f}.",
        END,
    ]
    write_section(args.out, START, END, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
