"""Command line: ``bitalloc allocate | profile | solve | frontier | eval | search | report |
dashboard | apply | generate``.

Errors in the user's input print one line (``bitalloc: error: ...``) and exit with status 2;
no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

import numpy as np

from bitalloc.cliargs import check_profiler, parse_options
from bitalloc.cliconfig import (
    BUDGET,
    COMMON,
    KV,
    MEASURING,
    REPAIR,
    SOLVER,
    add_config_arguments,
    config_file_arguments,
    config_from_args,
    save_config,
)
from bitalloc.cliprint import check_outputs, print_measured, quiet_libraries
from bitalloc.dashboards.cli import (
    add_dashboard_parser,
    add_report_parser,
    dashboard_command,
    report_command,
)
from bitalloc.errors import BitallocError
from bitalloc.export.command import add_export_parser
from bitalloc.packed_cli import add_apply_parser, add_generate_parser
from bitalloc.search.cli import add_search_parser
from bitalloc.streaming.cli import add_streaming_parsers

if TYPE_CHECKING:
    from bitalloc.allocation import Allocation
    from bitalloc.config import AllocateConfig

#: solve and frontier call the solver option --method.
METHOD_FLAG = {"flag": "--method", "dest": "method"}


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are the one line the README promises: a bad value
    (``--avg-bits abc``) is one ``bitalloc: error: ...`` line and status 2, without argparse's
    usage block (which for ``allocate`` is 20 lines that hide the message)."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.split(" ", 1)[1] + " " if " " in self.prog else ""
        self.exit(2, f"bitalloc: error: {message} (see `bitalloc {command}--help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and documentation)."""
    # Subparsers inherit the class, so every subcommand reports errors the same way.
    parser = _Parser(
        prog="bitalloc", description="Mixed-precision bit allocation for LLM quantization."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    a = sub.add_parser("allocate", help="choose a format per weight matrix under a bit budget")
    add_config_arguments(
        a,
        (
            *COMMON,
            *BUDGET,
            *KV,
            "profiler",
            "profiler_options",
            *MEASURING,
            "interactions_from",
            "profile",
            *SOLVER,
            "calibration_tokens",
            "eval_tokens",
            *REPAIR,
            "scale_folding",
        ),
    )
    a.add_argument("--out", default=None, metavar="FILE", help="write the allocation as JSON")
    a.add_argument("--units", action="store_true", help="print every unit, not one row per layer")
    add_config_arguments(a, ("use_cache", "policy"))
    config_file_arguments(a)

    p = sub.add_parser("profile", help="compute and save a sensitivity profile")
    add_config_arguments(p, COMMON)
    add_config_arguments(
        p,
        ("profiler", "calibration_tokens"),
        {
            "profiler": {
                "flag": "--method",
                "dest": "method",
                "help": "profiler: fisher (default), hessian, output, kfac, kl, measured",
            },
            "calibration_tokens": {
                "flag": "--tokens",
                "dest": "tokens",
                "help": "calibration tokens (default per method: fisher, output and kfac 8192, "
                "hessian 4096, kl and measured 1024)",
            },
        },
    )
    p.add_argument(
        "--units",
        default=None,
        metavar="REGEX",
        help="profile only the units whose name matches (e.g. 'layers\\.1[0-9]\\.')",
    )
    add_config_arguments(
        p,
        ("profiler_options", *MEASURING),
        {
            "profiler_options": {
                "flag": "--option",
                "dest": "option",
                "help": "profiler option, repeatable (e.g. --option max_probes=32 --option seed=1)",
            }
        },
    )
    p.add_argument(
        "--interaction-formats",
        default=None,
        metavar="FORMATS",
        help="formats to measure interactions at (default: the two lowest-bit integer formats "
        "of the largest group size)",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="where to write the profile (.json, or .safetensors for the table as a tensor)",
    )
    add_config_arguments(p, ("use_cache",))

    s = sub.add_parser(
        "solve", help="allocate from a saved profile, or solve a problem file, without a model"
    )
    source = s.add_mutually_exclusive_group(required=True)
    add_config_arguments(
        source, ("profile",), {"profile": {"help": "profile JSON from `bitalloc profile`"}}
    )
    source.add_argument(
        "--problem",
        metavar="FILE",
        help="problem file (.json or .npz, see bitalloc.solvers.io); budgets come from the file",
    )
    add_config_arguments(s, (*BUDGET, *SOLVER), {"solver": METHOD_FLAG})
    add_config_arguments(
        s, ("formats",), {"formats": {"help": "restrict the palette to these profile columns"}}
    )
    s.add_argument(
        "--out",
        default=None,
        metavar="FILE",
        help="write the allocation (with --profile) or the solution (with --problem) as JSON",
    )
    s.add_argument("--units", action="store_true", help="print every unit, not one row per layer")

    f = sub.add_parser("frontier", help="predicted loss (and perplexity) against many budgets")
    add_config_arguments(f, COMMON)
    add_config_arguments(
        f, ("profile",), {"profile": {"help": "saved profile (default: profile the model, cached)"}}
    )
    f.add_argument(
        "--budgets",
        default="2.5:4.5:0.25",
        help="average bits: start:stop:step or a comma list (default 2.5:4.5:0.25)",
    )
    add_config_arguments(
        f,
        (*SOLVER, "profiler", "calibration_tokens", "verify", "eval_tokens"),
        {
            "solver": METHOD_FLAG,
            "profiler": {"help": "profiler when profiling (default fisher)"},
            "calibration_tokens": {"help": "(default per profiler)"},
            "verify": {"help": "measure every point's perplexity"},
            "eval_tokens": {"help": "evaluation tokens for --verify (4096)"},
        },
    )
    f.add_argument("--out", default=None, metavar="FILE", help="write the frontier as JSON")
    add_config_arguments(f, ("use_cache",))

    e = sub.add_parser("eval", help="measure the perplexity of a saved allocation")
    # The allocation records the clipping its formats were measured with: eval uses that.
    add_config_arguments(e, tuple(n for n in COMMON if n not in ("clipping", "target", "imatrix")))
    e.add_argument("--allocation", required=True, metavar="FILE", help="allocation JSON")
    add_config_arguments(
        e, ("eval_tokens",), {"eval_tokens": {"help": "evaluation tokens (default 4096)"}}
    )
    add_search_parser(sub)
    add_report_parser(sub)
    add_dashboard_parser(sub)
    add_apply_parser(sub)
    add_generate_parser(sub)
    add_export_parser(sub)
    add_streaming_parsers(sub)
    return parser


def _prepare(args: argparse.Namespace, importance=None):
    """Model, units, palette and text from the options every subcommand shares (with
    ``importance``, an allocation's record, instead of gathering one)."""
    from bitalloc.allocator import prepare

    return prepare(
        args.model,
        formats=args.formats,
        calibration=args.calibration,
        evaluation=args.evaluation,
        seq_len=args.seq_len,
        # eval quantizes with the importance its allocation recorded, not a new one.
        clipping=getattr(args, "clipping", "mse"),
        progress=not args.quiet,
        use_cache=not getattr(args, "no_cache", False),
        importance=importance,
    )


def run_allocate(config: AllocateConfig) -> Allocation:
    """Run :func:`bitalloc.allocator.allocate` on ``config`` (the one place the command line
    calls it)."""
    from bitalloc.allocator import allocate

    return allocate(config.model, config)


def _allocate(args: argparse.Namespace) -> None:
    config = config_from_args(args)  # every option checked before anything is loaded
    save_config(args.save_config, config.to_json_dict())
    alloc = run_allocate(config)
    if alloc.data.scale_folding is not None:
        from bitalloc.folding_record import describe

        print(describe(alloc.data.scale_folding))
    _print_allocation(alloc, units=args.units)
    if alloc.measured is not None:
        print_measured(alloc)
    for warning in alloc.warnings():
        print(f"warning: {warning}")
    if args.out:
        alloc.save(args.out)
        print(f"wrote {args.out}")


def _print_allocation(alloc, *, units: bool) -> None:
    print(alloc.table() if units else alloc.layer_table())
    if alloc.data.kv is not None:
        print(alloc.kv_table())
    solver = alloc.data.solver
    if solver is not None:
        gap = "n/a" if solver.gap is None else f"{solver.gap:.3g}"
        print(
            f"solver {solver.method}: {solver.status}, objective {solver.objective:.5g}, "
            f"gap {gap}, {solver.wall_time_s * 1000:.1f} ms"
        )


def _solve(args: argparse.Namespace) -> None:
    options = parse_options(args.option)
    if args.problem:
        from bitalloc.fileio import write_json_atomic
        from bitalloc.solvers import solve
        from bitalloc.solvers.io import load_problem

        if args.avg_bits is not None or args.max_bytes is not None or args.tie or args.formats:
            raise BitallocError(
                "--problem files carry their own budgets and ties; drop --avg-bits, "
                "--max-bytes, --tie and --formats (or edit the file)"
            )
        sol = solve(load_problem(args.problem), method=args.method or "lagrangian", **options)
        gap = "n/a" if sol.gap is None else f"{sol.gap:.3g}"
        used = ", ".join(f"{k} {v:.10g}" for k, v in sol.resources.items())
        print(
            f"{sol.method}: {sol.status}, objective {sol.objective:.10g}, gap {gap}, "
            f"{sol.wall_time_s * 1000:.1f} ms; {used}"
        )
        if args.out:
            write_json_atomic(args.out, sol.to_dict())
            print(f"wrote {args.out}")
        return
    from bitalloc.planning import solve_profile
    from bitalloc.sensitivity import Profile

    if args.avg_bits is None and args.max_bytes is None:
        raise BitallocError("give a budget: --avg-bits and/or --max-bytes")
    alloc = solve_profile(
        Profile.load(args.profile),
        args.avg_bits,
        max_bytes=args.max_bytes,
        method=args.method,
        ties=args.tie,
        formats=args.formats,
        options=options,
    )
    _print_allocation(alloc, units=args.units)
    print(f"{alloc.avg_bits:.4f} bits per weight, {alloc.data.bytes:,.0f} bytes")
    if args.out:
        alloc.save(args.out)
        print(f"wrote {args.out}")


def _frontier(args: argparse.Namespace) -> None:
    from bitalloc.allocator import measure_frontier
    from bitalloc.fileio import write_json_atomic
    from bitalloc.planning import frontier, parse_budgets
    from bitalloc.sensitivity import Profile

    parse_budgets(args.budgets)  # fail on a bad spec before loading anything
    options = parse_options(args.option)
    prep = None
    if args.profile:
        prof = Profile.load(args.profile)
    else:
        prep = _prepare(args)
        prof = _profile_model(args, prep, args.profiler, args.calibration_tokens)
    units = prep.units if prep is not None else None
    formats = [f.name for f in prep.palette] if prep is not None else args.formats
    front = frontier(
        prof,
        args.budgets,
        method=args.method,
        ties=args.tie,
        formats=formats,
        units=units,
        options=options,
    )
    if args.verify:
        prep = prep or _prepare(args)
        front = measure_frontier(prep, front, eval_tokens=args.eval_tokens, progress=not args.quiet)
    print(front.table())
    if args.out:
        write_json_atomic(args.out, front.to_json())
        print(f"wrote {args.out}")


def _profile_model(args: argparse.Namespace, prep, method: str, tokens: int | None, **extra):
    from bitalloc.allocator import profile_model

    return profile_model(
        prep,
        method,
        calibration_tokens=tokens,
        use_cache=not args.no_cache,
        progress=not args.quiet,
        **extra,
    )


def _profile(args: argparse.Namespace) -> None:
    check_profiler(args.method)
    prof = _profile_model(
        args,
        _prepare(args),
        args.method,
        args.tokens,
        profiler_options=parse_options(args.option),
        units=args.units,
        workers=args.workers,
        ray_address=args.ray_address,
        interactions=args.interactions,
        interaction_formats=args.interaction_formats,
    )
    prof.save(args.out)
    meta = prof.metadata
    print(
        f"profile {meta.get('method')}: {len(prof.units)} units x {len(prof.formats)} formats, "
        f"{meta.get('tokens')} tokens, {meta.get('seconds', 0):.1f} s (cache {meta.get('cache')})"
    )
    skipped = meta.get("skipped_batches")
    if skipped:
        print(f"skipped {skipped} calibration batches with non-finite statistics")
    if prof.interactions is not None:
        rho = prof.interactions.rho
        print(
            f"interaction terms: {len(rho)} pairs at {', '.join(prof.interactions.formats)}; "
            f"rho median {float(np.median(rho)):.3g}, range [{rho.min():.3g}, {rho.max():.3g}]"
        )
    print(f"wrote {args.out}")


def _eval(args: argparse.Namespace) -> None:
    from bitalloc.allocation import Allocation
    from bitalloc.allocator import measure

    alloc = Allocation.load(args.allocation)
    # Measured with the clipping its formats were chosen with (eval has no --clipping).
    prep = _prepare(args, importance=alloc.importance())
    if alloc.data.scale_folding is not None:
        from bitalloc.folding_record import apply_recorded_

        # The formats were chosen for the folded weights; this freshly loaded model is ours.
        alloc.check_model(prep.model)
        apply_recorded_(prep.model, alloc.data.scale_folding)
    if alloc.uses_grams:
        import dataclasses

        from bitalloc.sequential import gram_importance

        # +gptq codes depend on the calibration inputs' Gram matrices, which are not saved.
        alloc.check_model(prep.model)
        importance = gram_importance(
            prep.model,
            alloc.formats,
            prep.calibration_windows(),
            prep.importance,
            progress=not args.quiet,
        )
        prep = dataclasses.replace(prep, importance=importance)
    alloc = alloc.with_measured(
        measure(prep, alloc, eval_tokens=args.eval_tokens, progress=not args.quiet)
    )
    print_measured(alloc, recorded_repair=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bitalloc`` console script."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        # --help (0) or a usage error, already printed as one line (2).
        return exc.code if isinstance(exc.code, int) else 2
    handlers = {
        "allocate": _allocate,
        "profile": _profile,
        "solve": _solve,
        "frontier": _frontier,
        "eval": _eval,
        "report": report_command,
        "dashboard": dashboard_command,
    }
    try:
        check_outputs(args)
        with quiet_libraries(getattr(args, "quiet", False)):
            handlers.get(args.command, getattr(args, "handler", None))(args)
    except BitallocError as exc:
        print(f"bitalloc: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bitalloc: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
