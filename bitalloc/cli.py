"""Command line: ``bitalloc allocate | profile | eval``.

Errors in the user's input print one line (``bitalloc: error: ...``) and exit with status 2;
no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bitalloc.errors import BitallocError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="Hugging Face directory (safetensors) or .gguf file "
        "(default: the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--formats",
        default=None,
        help="comma-separated palette, e.g. int2-g64,int3-g128,int4-g128,fp16 "
        "(default: int{2,3,4,5,6,8}-g{32,64,128} and fp16)",
    )
    p.add_argument(
        "--calibration",
        nargs="+",
        default=None,
        metavar="FILE",
        help="calibration text files (default: pydoc_data.topics calibration split)",
    )
    p.add_argument(
        "--evaluation",
        nargs="+",
        default=None,
        metavar="FILE",
        help="evaluation text files (default: pydoc_data.topics evaluation split)",
    )
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and documentation)."""
    parser = argparse.ArgumentParser(
        prog="bitalloc", description="Mixed-precision bit allocation for LLM quantization."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    a = sub.add_parser("allocate", help="choose a format per weight matrix under a bit budget")
    _common(a)
    a.add_argument(
        "--avg-bits",
        type=float,
        required=True,
        help="budget: average stored bits per weight of the allocated matrices",
    )
    a.add_argument("--profiler", default="fisher", help="sensitivity profiler (default fisher)")
    a.add_argument(
        "--profile",
        default=None,
        metavar="FILE",
        help="reuse a saved profile (from `bitalloc profile`) instead of profiling",
    )
    a.add_argument("--solver", default="lagrangian", help="solver (default lagrangian)")
    a.add_argument(
        "--calibration-tokens",
        type=int,
        default=8192,
        help="calibration tokens for profiling (default 8192)",
    )
    a.add_argument(
        "--eval-tokens",
        type=int,
        default=4096,
        help="evaluation tokens for --verify (default 4096 = 8 windows of 512)",
    )
    a.add_argument(
        "--verify",
        action="store_true",
        help="measure perplexity of the allocation beside uniform baselines",
    )
    a.add_argument("--out", default=None, metavar="FILE", help="write the allocation as JSON")
    a.add_argument("--units", action="store_true", help="print every unit, not one row per layer")
    a.add_argument("--no-cache", action="store_true", help="do not read or write cached profiles")

    p = sub.add_parser("profile", help="compute and save a sensitivity profile")
    _common(p)
    p.add_argument("--method", default="fisher", help="profiler (default fisher)")
    p.add_argument("--tokens", type=int, default=8192, help="calibration tokens (default 8192)")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the profile JSON")
    p.add_argument("--no-cache", action="store_true", help="do not read or write cached profiles")

    e = sub.add_parser("eval", help="measure the perplexity of a saved allocation")
    _common(e)
    e.add_argument("--allocation", required=True, metavar="FILE", help="allocation JSON")
    e.add_argument("--eval-tokens", type=int, default=4096, help="evaluation tokens (default 4096)")
    return parser


def _prepare(args: argparse.Namespace):
    """Model, units, palette and text from the options every subcommand shares."""
    from bitalloc.allocator import prepare

    return prepare(
        args.model,
        formats=args.formats,
        calibration=args.calibration,
        evaluation=args.evaluation,
        seq_len=args.seq_len,
    )


def _allocate(args: argparse.Namespace) -> None:
    from bitalloc.allocator import allocate

    alloc = allocate(
        args.model,
        args.avg_bits,
        profiler=args.profiler,
        solver=args.solver,
        formats=args.formats,
        calibration=args.calibration,
        evaluation=args.evaluation,
        verify=args.verify,
        profile=args.profile,
        calibration_tokens=args.calibration_tokens,
        eval_tokens=args.eval_tokens,
        seq_len=args.seq_len,
        use_cache=not args.no_cache,
        progress=not args.quiet,
    )
    print(alloc.table() if args.units else alloc.layer_table())
    solver = alloc.data.solver
    if solver is not None:
        gap = "n/a" if solver.gap is None else f"{solver.gap:.3g}"
        print(
            f"solver {solver.method}: {solver.status}, objective {solver.objective:.5g}, "
            f"gap {gap}, {solver.wall_time_s * 1000:.1f} ms"
        )
    if alloc.measured is not None:
        _print_measured(alloc)
    if args.out:
        alloc.save(args.out)
        print(f"wrote {args.out}")


def _print_measured(alloc) -> None:
    m = alloc.measured
    print(f"\nperplexity on {m.eval_tokens} evaluation tokens ({m.seq_len}-token windows):")
    print(f"  {'allocation':<12} {alloc.avg_bits:6.3f} bits  ppl {m.perplexity:9.3f}")
    for name, ppl in m.baselines.items():
        print(f"  {name:<12} {m.baseline_avg_bits[name]:6.3f} bits  ppl {ppl:9.3f}")
    print(
        f"  loss increase: predicted {m.predicted_loss_increase:.4f}, "
        f"measured {m.measured_loss_increase:.4f} nats/token"
    )


def _profile(args: argparse.Namespace) -> None:
    from bitalloc.allocator import profile_model

    prep = _prepare(args)
    prof = profile_model(
        prep,
        args.method,
        calibration_tokens=args.tokens,
        use_cache=not args.no_cache,
        progress=not args.quiet,
    )
    prof.save(args.out)
    meta = prof.metadata
    print(
        f"profile {meta.get('method')}: {len(prof.units)} units x {len(prof.formats)} formats, "
        f"{meta.get('tokens')} tokens, {meta.get('seconds', 0):.1f} s (cache {meta.get('cache')})"
    )
    print(f"wrote {args.out}")


def _eval(args: argparse.Namespace) -> None:
    from bitalloc.allocation import Allocation
    from bitalloc.allocator import measure

    alloc = Allocation.load(args.allocation)
    prep = _prepare(args)
    alloc = alloc.with_measured(
        measure(prep, alloc, eval_tokens=args.eval_tokens, progress=not args.quiet)
    )
    _print_measured(alloc)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bitalloc`` console script."""
    args = build_parser().parse_args(argv)
    handlers = {"allocate": _allocate, "profile": _profile, "eval": _eval}
    try:
        handlers[args.command](args)
    except BitallocError as exc:
        print(f"bitalloc: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bitalloc: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
