"""Profiler fidelity: how well each profiler predicts measured loss, what it costs, and what
allocation it leads to.

On the default model:

1. ``fisher`` (32,768 tokens), ``hessian``, ``output`` and ``kfac`` profile the full palette,
   each in its own child process (wall time and peak memory); ``fisher`` and ``kfac`` also with
   the older per-window gradient estimator (``-window`` rows).
2. ``measured`` runs on Ray workers over the unit sample, every unit of all 30 layers at
   ``int2-g128`` and ``int3-g128`` (timed alone: the issue's target), then adds ``int4-g128``;
   ``kl`` measures the same three formats; then the layer sample: all 7 units of a layer at
   once, 30 layers x the same 2 formats, over more tokens. Every job is journaled under
   ``.work``, so an interrupted benchmark resumes.
3. Spearman and Kendall rank correlation of every profiler's predictions with the measured
   truth: over the 420 unit-format pairs, per format, and over the 60 layer-format pairs (the
   sum of a layer's unit predictions against the measured layer).
4. The allocation each profiler leads to at 3.25 bits (Lagrangian solver): on the full palette
   for the profilers that cover it, and on the three sample formats for all of them, with
   perplexity measured on the evaluation split.

Results go to BENCHMARKS.md between markers. Profiles and journals are kept in
``benchmarks/.work/profilers`` and reused by later runs (``--fresh`` recomputes them).

    .venv/bin/python benchmarks/profilers.py [--eval-tokens 8192] [--workers 2] [--fresh]

``--quant-table`` runs only the timing of the (unit x format) table of quantized weights that
the weight-error profilers build: format by format with ``bitalloc/formats.py`` as it was at
``--baseline-rev`` (loaded from git beside the current module) against the current shared
path, in one process on the same weights, rounds alternating, checking that both give the
same bits; ``--fisher-tokens N`` also times whole Fisher profiles with each table path.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from _report import cpu_description, peak_mb, write_section
from scipy.stats import kendalltau, spearmanr

START, END = "<!-- profilers:start -->", "<!-- profilers:end -->"
TABLE_START, TABLE_END = "<!-- quant-table:start -->", "<!-- quant-table:end -->"
WORK = Path(__file__).resolve().parent / ".work" / "profilers"
SAMPLE_FORMATS = ("int2-g128", "int3-g128")
SMALL_PALETTE = ("int2-g128", "int3-g128", "int4-g128")
BUDGET = 3.25
#: (label, profiler, options) run on the full palette. ``-window`` rows keep the gradient of
#: each window's mean loss, the estimator that the per-token default replaced.
RUNS: list[tuple[str, str, dict[str, Any]]] = [
    ("fisher", "fisher", {"tokens": 32768}),
    ("fisher-window", "fisher", {"tokens": 32768, "estimator": "window"}),
    ("hessian", "hessian", {}),
    ("output", "output", {}),
    ("kfac", "kfac", {}),
    ("kfac-window", "kfac", {"estimator": "window"}),
]
PREDICTORS = [label for label, _, _ in RUNS] + ["kl"]


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


def _layers_child(tokens: int, workers: int, journal: str, out: str, queue) -> None:
    try:
        import json

        import torch

        from bitalloc.allocator import prepare
        from bitalloc.jobs import job_key
        from bitalloc.sensitivity.measured import measured_journal, run_measured_jobs

        torch.set_num_threads(max(1, torch.get_num_threads()))
        prep = prepare()
        start = time.perf_counter()
        windows, jr = measured_journal(prep.model, prep.calibration_windows(), tokens, journal)
        layers = sorted({u.layer for u in prep.units})
        jobs = [()] + [
            tuple((u.name, fmt) for u in prep.units if u.layer == layer)
            for layer in layers
            for fmt in SAMPLE_FORMATS
        ]
        results = run_measured_jobs(
            prep.model,
            windows,
            prep.units,
            jobs,
            jr,
            workers=workers,
            progress=False,
            keep_logprobs=False,
        )
        base = results[job_key(())]["loss"]
        table = [
            [results[job_key(job)]["loss"] - base for job in jobs[1 + 2 * i : 3 + 2 * i]]
            for i in range(len(layers))
        ]
        wall = time.perf_counter() - start
        peak = max((r.get("worker_peak_mb") or 0.0 for r in results.values()), default=0.0)
        Path(out).write_text(json.dumps({"tokens": int(windows.numel()), "increase": table}))
        queue.put({"wall_s": wall, "peak_mb": peak})
    except Exception as exc:  # reported in the table
        queue.put({"error": f"{type(exc).__name__}: {str(exc)[:200]}"})


def run_child(target, args: tuple, out: Path) -> dict[str, Any]:
    """Run ``target(*args, queue)`` in a fresh process unless ``out`` exists; returns (and
    saves beside ``out``) its wall time and peak memory."""
    import json

    meta = out.with_suffix(".run.json")
    if out.is_file() and meta.is_file():
        return json.loads(meta.read_text())
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    if "error" in result:
        raise RuntimeError(f"{out.stem}: {result['error']}")
    meta.write_text(json.dumps(result))
    print(f"{out.stem}: {result}", flush=True)
    return result


def run_profile(name: str, options: dict[str, Any], formats, out: Path) -> dict[str, Any]:
    """Profile in a fresh process; returns wall time and peak memory (saved beside ``out``)."""
    return run_child(_profile_child, (name, dict(options), formats, str(out)), out)


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


def baseline_formats(rev: str) -> types.ModuleType:
    """The integer formats as committed at ``rev`` (``bitalloc/formats.py``, or
    ``bitalloc/formats/integer.py`` once formats became a package), as a module of its own."""
    root = Path(__file__).resolve().parents[1]
    for path in ("bitalloc/formats/integer.py", "bitalloc/formats.py"):
        shown = subprocess.run(
            ["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True, text=True
        )
        if shown.returncode == 0:
            break
    else:
        raise SystemExit(f"{rev} holds neither bitalloc/formats.py nor bitalloc/formats/integer.py")
    module = types.ModuleType("formats_at_baseline")
    # dataclasses look their module up in sys.modules.
    sys.modules[module.__name__] = module
    exec(compile(shown.stdout, f"{rev}:{path}", "exec"), module.__dict__)
    return module


def baseline_format(module: types.ModuleType, name: str) -> Any:
    """``name`` as a format of the baseline module (whichever layout it has)."""
    if hasattr(module, "parse_format"):
        return module.parse_format(name)
    return module.IntFamily().parse(name) or module.FloatFamily().parse(name)


def quant_table(args: argparse.Namespace) -> None:
    """Time the quantization table, before (the baseline revision's formats: shared across
    formats where it had ``fake_quantize_each``, else format by format) and after (the current
    ``fake_quantize_each``), and optionally whole Fisher profiles with each."""
    import torch

    import bitalloc.sensitivity.fisher as fisher_module
    from bitalloc.allocator import prepare
    from bitalloc.formats import fake_quantize_each
    from bitalloc.models import get_linear
    from bitalloc.sensitivity import FisherProfiler

    old = baseline_formats(args.baseline_rev)
    prep = prepare()
    palette = prep.palette
    old_palette = [baseline_format(old, f.name) for f in palette]
    # Every layer has the same shapes, so the first few time a fixed share of the table.
    units = [u for u in prep.units if args.layers is None or u.layer < args.layers]
    weights = [get_linear(prep.model, u.name).weight.detach() for u in units]

    shared_before = hasattr(old, "fake_quantize_each")

    def before(w: torch.Tensor, _palette) -> Iterator[torch.Tensor]:
        if shared_before:
            return old.fake_quantize_each(w, old_palette)
        return (f.fake_quantize(w) for f in old_palette)

    paths: dict[str, Callable[..., Iterator[torch.Tensor]]] = {
        "before": before,
        "after": fake_quantize_each,
    }
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, path in paths.items():
            start = time.perf_counter()
            for w in weights:
                for _ in path(w, palette):
                    pass
            seconds[name].append(time.perf_counter() - start)
    # Same bits: every table entry of both paths, compared once outside the timing.
    for w in weights:
        for a, b in zip(before(w, palette), fake_quantize_each(w, palette), strict=True):
            if not torch.equal(a, b):
                raise SystemExit("the shared path differs from the baseline: not bit-identical")
    best = {name: min(v) for name, v in seconds.items()}
    n_elems = sum(w.numel() for w in weights)
    lines = [
        TABLE_START,
        "## Quantization table of the weight-error profilers (default model)",
        "",
        f"Machine: {machine()}; load average at the start "
        f"{' '.join(f'{x:.1f}' for x in args.load)}.",
        "",
        f"The table that `fisher` (and `hessian`, `kfac`, `output`) fill, over {len(weights)} of "
        f"the {len(prep.units)} units"
        + (f" (layers below {args.layers}; every layer has the same shapes)" if args.layers else "")
        + f": {len(weights)} units "
        f"({n_elems / 1e6:.1f} M weights) x {len(palette)} formats, Q(W) for every pair. "
        + (
            f"Before: `fake_quantize_each` at {args.baseline_rev}. After: the current "
            "`fake_quantize_each`. "
            if shared_before
            else f"Before: format by format with `bitalloc/formats.py` at {args.baseline_rev} "
            "(one float32 copy, grouping and range per format; one pass over the weights per "
            "clipping ratio). After: `fake_quantize_each` (grouping and ranges once per group "
            "size; all 14 ratios in one pass per chunk). "
        )
        + "Both in one process on the same weights, rounds alternating; all Q(W) compared "
        "equal bit for bit.",
        "",
        "| path | seconds per table (each round) | best | speed-up |",
        "|---|---|---:|---:|",
    ]
    for name in paths:
        rounds = ", ".join(f"{x:.1f}" for x in seconds[name])
        lines.append(
            f"| {name} | {rounds} | {best[name]:.1f} | {best['before'] / best[name]:.2f}x |"
        )
    if args.fisher_tokens:
        calibration = prep.calibration_windows()
        walls: dict[str, float] = {}
        for name in ("before", "after"):
            fisher_module.fake_quantize_each = paths[name]
            try:
                profiler = FisherProfiler(tokens=args.fisher_tokens, progress=False)
                start = time.perf_counter()
                profiler.profile(prep.model, prep.units, palette, calibration)
                walls[name] = time.perf_counter() - start
            finally:
                fisher_module.fake_quantize_each = fake_quantize_each
        lines += [
            "",
            f"Whole `fisher` profile ({args.fisher_tokens} calibration tokens, gradients "
            f"included): {walls['before']:.0f} s before, {walls['after']:.0f} s after "
            f"({walls['before'] / walls['after']:.2f}x).",
        ]
    lines += [
        "",
        "    .venv/bin/python benchmarks/profilers.py --quant-table "
        f"--baseline-rev {args.baseline_rev} --rounds {args.rounds}"
        + (f" --layers {args.layers}" if args.layers else "")
        + (f" --fisher-tokens {args.fisher_tokens}" if args.fisher_tokens else ""),
        TABLE_END,
    ]
    write_section(args.out, TABLE_START, TABLE_END, "\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quant-table", action="store_true", help="time the table alone")
    parser.add_argument("--baseline-rev", default="4abc0eb", help="git revision of 'before'")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per path")
    parser.add_argument("--fisher-tokens", type=int, default=0, help="also time fisher profiles")
    parser.add_argument("--layers", type=int, default=None, help="table over the first layers")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--workers", type=int, default=2, help="Ray workers for measured and kl")
    parser.add_argument("--measured-tokens", type=int, default=1024)
    parser.add_argument("--kl-tokens", type=int, default=512)
    parser.add_argument("--layer-tokens", type=int, default=4096)
    parser.add_argument("--fresh", action="store_true", help="recompute cached profiles")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "BENCHMARKS.md"))
    args = parser.parse_args()
    if args.quant_table:
        args.load = os.getloadavg()
        return quant_table(args)
    if args.fresh and WORK.exists():
        shutil.rmtree(WORK)
    WORK.mkdir(parents=True, exist_ok=True)
    journal = str(WORK / "measurements.jsonl")
    measuring = {"tokens": args.measured_tokens, "workers": args.workers, "results": journal}

    runs: dict[str, dict[str, Any]] = {}
    for label, name, options in RUNS:
        runs[label] = run_profile(name, options, None, WORK / f"{label}.json")
    # measured alone over the sample: the timed target; then the third format; then kl.
    runs["measured"] = run_profile("measured", measuring, SAMPLE_FORMATS, WORK / "sample.json")
    run_profile("measured", measuring, SMALL_PALETTE, WORK / "measured.json")
    kl_options = dict(measuring, tokens=args.kl_tokens, results=str(WORK / "kl.jsonl"))
    runs["kl"] = run_profile("kl", kl_options, SMALL_PALETTE, WORK / "kl.json")
    layer_out = WORK / "layers.out"
    layer_journal = str(WORK / "layers.jsonl")
    runs["layers"] = run_child(
        _layers_child, (args.layer_tokens, args.workers, layer_journal, str(layer_out)), layer_out
    )

    import json

    from bitalloc.allocator import allocation_for, measure_assignment, prepare, uniform_assignment
    from bitalloc.planning import build_problem
    from bitalloc.sensitivity import Profile
    from bitalloc.solvers import solve

    names = PREDICTORS
    profiles = {name: Profile.load(WORK / f"{name}.json") for name in names}
    profiles["measured"] = Profile.load(WORK / "measured.json")
    sample = profiles["measured"]
    raw = np.asarray(sample.metadata["raw"])
    truth = raw[:, [sample.formats.index(f) for f in SAMPLE_FORMATS]]
    layer_of = np.array([int(u.split(".")[2]) for u in sample.units])
    layer_doc = json.loads((WORK / "layers.out").read_text())
    layer_truth = np.asarray(layer_doc["increase"])  # layers x SAMPLE_FORMATS

    corr_rows = []
    for name in names:
        prof = profiles[name]
        pred = np.stack([prof.column(f) for f in SAMPLE_FORMATS], axis=1)
        units = rank_stats(pred.ravel(), truth.ravel())
        per_format = [rank_stats(pred[:, j], truth[:, j])[0] for j in range(len(SAMPLE_FORMATS))]
        layer_pred = np.array([pred[layer_of == i].sum(axis=0) for i in range(len(layer_truth))])
        layers = rank_stats(layer_pred.ravel(), layer_truth.ravel())
        layers_int2 = rank_stats(layer_pred[:, 0], layer_truth[:, 0])
        corr_rows.append((name, units, per_format, layers, layers_int2))
        print(name, units, per_format, layers, layers_int2, flush=True)

    prep_full = prepare()
    ev = prep_full.evaluation_windows(args.eval_tokens)
    fp16 = measure_assignment(prep_full, uniform_assignment(prep_full.units, "fp16"), ev)
    alloc_rows = []
    for palette_name, formats, chosen in (
        ("full", None, tuple(label for label, _, _ in RUNS)),
        ("int{2,3,4}-g128", SMALL_PALETTE, (*names, "measured")),
    ):
        prep = prepare(formats=list(formats) if formats else None)
        for name in chosen:
            prof = profiles[name]
            if formats:
                keep = [prof.formats.index(f) for f in formats]
                prof = Profile(prof.units, formats, prof.loss[:, keep], prof.metadata)
            problem = build_problem(prep.units, prep.palette, prof, BUDGET)
            alloc = allocation_for(prep, prof, solve(problem, method="lagrangian"), BUDGET)
            ppl = measure_assignment(prep_full, alloc.formats, ev).perplexity
            alloc_rows.append((palette_name, name, alloc.avg_bits, ppl, alloc.data.predicted_loss))
            print(alloc_rows[-1], flush=True)
    uniform = {
        fmt: measure_assignment(prep_full, uniform_assignment(prep_full.units, fmt), ev).perplexity
        for fmt in ("int3-g128", "int4-g128")
    }

    negative = float((truth < 0).mean())
    lines = [
        START,
        "## Profiler fidelity (default model)",
        "",
        f"Command: `.venv/bin/python benchmarks/profilers.py --eval-tokens {args.eval_tokens} "
        f"--workers {args.workers} --measured-tokens {args.measured_tokens} --kl-tokens "
        f"{args.kl_tokens} --layer-tokens {args.layer_tokens}`  ",
        f"Machine: {machine()}  ",
        "Each profiler ran in its own process; `measured` and `kl` on "
        f"{args.workers} Ray workers (one torch thread each; memory is per worker).",
        "",
        "Two samples of ground truth:",
        f"- **units**: `measured` over {sample.metadata['tokens']} calibration tokens for every "
        "one of the 210 units of the 30 layers at int2-g128 and int3-g128 (420 pairs, "
        f"uncorrected values). {negative:.0%} of them are negative: at this token count the "
        "loss change of one small unit is often within the noise of the measurement.",
        f"- **layers**: the measured loss increase when all 7 units of a layer take the format, "
        f"over {layer_doc['tokens']} tokens, 30 layers x the same 2 formats (60 points), "
        "against the sum of the profiler's unit predictions.",
        "",
        "| profiler | tokens | wall time | peak memory | units: Spearman / Kendall "
        "| units int2 / int3 Spearman | layers: Spearman / Kendall | layers int2 Spearman |",
        "|---|---:|---:|---:|---|---|---|---|",
    ]
    for name, units, per_format, layers, layers_int2 in corr_rows:
        run, prof = runs[name], profiles[name]
        mem = run["peak_mb"] if name != "kl" else prof.metadata.get("worker_peak_mb") or 0
        lines.append(
            f"| {name} | {prof.metadata.get('tokens')} | {run['wall_s']:.0f} s | {mem:.0f} MB "
            f"| {units[0]:.3f} / {units[1]:.3f} | {per_format[0]:.3f} / {per_format[1]:.3f} "
            f"| {layers[0]:.3f} / {layers[1]:.3f} | {layers_int2[0]:.3f} |"
        )
    sample_meta = Profile.load(WORK / "sample.json").metadata
    lines += [
        f"| measured, 420 unit jobs | {sample.metadata.get('tokens')} "
        f"| {runs['measured']['wall_s']:.0f} s | {sample_meta.get('worker_peak_mb') or 0:.0f} MB "
        "| (truth) | | | |",
        f"| measured, 60 layer jobs | {layer_doc['tokens']} | {runs['layers']['wall_s']:.0f} s "
        f"| {runs['layers']['peak_mb']:.0f} MB | | | (truth) | |",
    ]
    hess, out = profiles["hessian"].metadata, profiles["output"].metadata
    lines += [
        "",
        f"Hessian: {hess.get('probes')} probes (converged: {hess.get('converged')}, last "
        f"relative change {hess.get('relative_change'):.3g}), {hess.get('negative_traces')} "
        f"negative trace estimates clipped to 0. Output: scale {out.get('scale'):.3g} fitted "
        f"on {out.get('reference_format')}.",
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
