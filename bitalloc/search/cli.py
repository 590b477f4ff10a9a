"""``bitalloc search``: the command-line face of :func:`bitalloc.search.search`."""

from __future__ import annotations

import argparse
from typing import Any

from bitalloc.cliargs import check_profiler, common_options, parse_options


def add_search_parser(sub: Any) -> None:
    """Register the ``search`` subcommand on ``sub`` (an argparse subparsers object)."""
    s = sub.add_parser(
        "search",
        help="measured multi-objective search (avg bits, perplexity) in a resumable Optuna study",
    )
    common_options(s)
    s.add_argument("--avg-bits", type=float, required=True, help="budget: average bits per weight")
    s.add_argument(
        "--trials",
        type=int,
        default=40,
        help="finished trials the study should hold (a resumed study continues to this "
        "count; default 40)",
    )
    s.add_argument("--sampler", choices=("nsga2", "tpe"), default="nsga2", help="(default nsga2)")
    s.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="Optuna storage: an RDB URL (sqlite:///FILE, postgresql://...) or journal:FILE "
        "(default: sqlite in the run directory)",
    )
    s.add_argument("--study", default="bitalloc", help="study name (default bitalloc)")
    s.add_argument(
        "--run-dir",
        default=None,
        metavar="DIR",
        help="where the study (by default), profile, frontier and best allocation go "
        "(default runs/<study>)",
    )
    s.add_argument("--resume", action="store_true", help="continue the existing study of that name")
    s.add_argument(
        "--space",
        choices=("near", "full"),
        default="near",
        help="per-unit formats: near the solvers' answers (default) or the whole palette",
    )
    s.add_argument(
        "--radius", type=int, default=1, help="palette steps around the seeds (default 1)"
    )
    s.add_argument("--solver", default=None, help="solver for the seed allocations")
    s.add_argument("--profiler", default="fisher", help="profiler for the seeds (default fisher)")
    s.add_argument(
        "--profiler-option", action="append", default=[], metavar="KEY=VALUE", help="repeatable"
    )
    s.add_argument("--profile", default=None, metavar="FILE", help="reuse a saved profile")
    s.add_argument("--calibration-tokens", type=int, default=None, help="(default per profiler)")
    s.add_argument(
        "--eval-tokens", type=int, default=4096, help="evaluation tokens per trial (default 4096)"
    )
    s.add_argument(
        "--workers",
        type=int,
        default=0,
        help="Ray actors evaluating trials in parallel (default 0: in this process)",
    )
    s.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster for the workers (default $RAY_ADDRESS, else a local Ray)",
    )
    s.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    s.add_argument("--no-cache", action="store_true", help="do not read or write cached profiles")
    s.set_defaults(handler=run_search_command)


def run_search_command(args: argparse.Namespace) -> None:
    """Run the search the arguments describe and print its summary."""
    import optuna

    from bitalloc.search import search

    if args.profile is None:
        check_profiler(args.profiler)
    # One line per trial from Optuna would bury the progress bar; the study keeps everything.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    result = search(
        args.model,
        args.avg_bits,
        trials=args.trials,
        sampler=args.sampler,
        storage=args.storage,
        study=args.study,
        run_dir=args.run_dir,
        resume=args.resume,
        space=args.space,
        radius=args.radius,
        solver=args.solver,
        profiler=args.profiler,
        profile=args.profile,
        profiler_options=parse_options(args.profiler_option),
        formats=args.formats,
        calibration=args.calibration,
        evaluation=args.evaluation,
        workers=args.workers,
        ray_address=args.ray_address,
        calibration_tokens=args.calibration_tokens,
        eval_tokens=args.eval_tokens,
        seq_len=args.seq_len,
        seed=args.seed,
        use_cache=not args.no_cache,
        progress=not args.quiet,
    )
    print(result.summary())
    print(f"wrote {result.run_dir}/search.json" + (", best.json" if result.best else ""))
