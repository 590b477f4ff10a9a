"""``bitalloc allocate-streamed`` (allocate a checkpoint layer by layer) and ``bitalloc
plan-resources`` (its peak memory and time, before running it)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bitalloc.cliargs import parse_size
from bitalloc.errors import BitallocError
from bitalloc.importance import IMPORTANCE_TOKENS

DEFAULT_FORMATS = "int2-g128,int3-g128,int4-g128,int8-g128,fp16"


def add_streaming_parsers(sub: Any) -> None:
    """Register ``allocate-streamed`` and ``plan-resources`` on ``sub``."""
    a = sub.add_parser(
        "allocate-streamed",
        help="allocate a Hugging Face checkpoint one decoder layer at a time (models bigger "
        "than memory)",
    )
    _common(a)
    a.add_argument("--avg-bits", type=float, required=True, help="bits per weight budget")
    a.add_argument("--calibration", metavar="FILE", help="calibration text (default: built in)")
    a.add_argument("--out", metavar="FILE", help="write the allocation JSON here")
    a.add_argument("--quiet", action="store_true", help="no progress bars")
    a.add_argument(
        "--workers", type=int, default=0, help="Ray workers scoring units (default 0: in process)"
    )
    a.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS or local)")
    a.add_argument(
        "--max-memory",
        metavar="SIZE",
        help="refuse to start when the planned peak exceeds SIZE (e.g. 4GiB)",
    )
    a.add_argument("--profiler", default="output", help="a profiler that streams (output)")
    a.set_defaults(handler=allocate_streamed_command)

    p = sub.add_parser(
        "plan-resources",
        help="peak memory and time of allocate-streamed on a checkpoint, before running it",
    )
    _common(p)
    p.add_argument("--workers", type=int, default=1, help="workers scoring formats (default 1)")
    p.set_defaults(handler=plan_resources_command)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="Hugging Face directory")
    parser.add_argument(
        "--formats", default=DEFAULT_FORMATS, help=f"palette (default {DEFAULT_FORMATS})"
    )
    parser.add_argument(
        "--tokens",
        type=int,
        default=IMPORTANCE_TOKENS,
        help=f"calibration tokens (default {IMPORTANCE_TOKENS})",
    )


def allocate_streamed_command(args: argparse.Namespace) -> None:
    """Run :func:`~bitalloc.streaming.allocate.allocate_streamed` and print the result."""
    from bitalloc.streaming.allocate import allocate_streamed

    text = None
    if args.calibration:
        try:
            text = Path(args.calibration).read_text(encoding="utf-8")
        except OSError as exc:
            raise BitallocError(f"cannot read --calibration {args.calibration}: {exc}") from None
    alloc = allocate_streamed(
        args.model,
        args.avg_bits,
        formats=args.formats,
        calibration=text,
        tokens=args.tokens,
        progress=not args.quiet,
        workers=args.workers,
        ray_address=args.ray_address,
        max_memory=None if args.max_memory is None else int(parse_size(args.max_memory)),
        profiler=args.profiler,
    )
    print(alloc.layer_table())
    if args.out:
        alloc.save(args.out)
        print(f"wrote {args.out}")


def plan_resources_command(args: argparse.Namespace) -> None:
    """Print :func:`~bitalloc.streaming.resources.plan_streamed`'s plan."""
    from bitalloc.streaming.resources import plan_streamed

    if args.workers < 1:
        raise BitallocError(f"--workers must be at least 1, got {args.workers}")
    print(plan_streamed(args.model, args.formats, args.tokens, workers=args.workers).table())
