"""``bitalloc allocate-streamed`` (allocate a checkpoint layer by layer) and ``bitalloc
plan-resources`` (its peak memory and time, before running it)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bitalloc.cliargs import parse_size
from bitalloc.cliconfig import add_config_arguments
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
    add_config_arguments(
        a,
        ("avg_bits", "calibration", "profiler", "workers", "ray_address", "progress"),
        {
            "avg_bits": {"required": True},
            "profiler": {"help": "a profiler that streams: output (default), fisher or kfac"},
            "workers": {"help": "Ray workers scoring units (default 0: in this process)"},
        },
    )
    a.add_argument("--out", metavar="FILE", help="write the allocation JSON here")
    a.add_argument(
        "--max-memory",
        metavar="SIZE",
        help="refuse to start when the planned peak exceeds SIZE (e.g. 4GiB)",
    )
    # The config's default profiler (fisher) needs the whole model: here it is output.
    a.set_defaults(handler=allocate_streamed_command, profiler="output")

    p = sub.add_parser(
        "plan-resources",
        help="peak memory and time of allocate-streamed on a checkpoint, before running it "
        "(--model may be a config.json alone: a model not at hand)",
    )
    _common(p)
    add_config_arguments(
        p,
        ("avg_bits", "profiler", "workers"),
        {
            "avg_bits": {"help": "the budget, when known: the export's time is that mix's"},
            "profiler": {"help": "the streamed profiler planned: output (default), fisher, kfac"},
            "workers": {"help": "workers scoring formats"},
        },
    )
    p.set_defaults(handler=plan_resources_command, profiler="output")


def _common(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(
        parser,
        ("model", "formats"),
        {
            "model": {
                "required": True,
                "help": "Hugging Face directory (safetensors shards) or a .gguf file",
            },
            "formats": {"help": f"palette (default {DEFAULT_FORMATS})"},
        },
    )
    parser.add_argument(
        "--tokens",
        type=int,
        default=IMPORTANCE_TOKENS,
        help=f"calibration tokens (default {IMPORTANCE_TOKENS})",
    )


def _formats(value: Any) -> str:
    if not value:
        return DEFAULT_FORMATS
    return value if isinstance(value, str) else ",".join(value)


def allocate_streamed_command(args: argparse.Namespace) -> None:
    """Run :func:`~bitalloc.streaming.allocate.allocate_streamed` and print the result."""
    from bitalloc.streaming.allocate import allocate_streamed

    text = None
    if args.calibration:
        files = [args.calibration] if isinstance(args.calibration, str) else args.calibration
        try:
            text = "\n".join(Path(f).read_text(encoding="utf-8") for f in files)
        except OSError as exc:
            raise BitallocError(f"cannot read --calibration {files}: {exc}") from None
    alloc = allocate_streamed(
        args.model,
        args.avg_bits,
        formats=_formats(args.formats),
        calibration=text,
        tokens=args.tokens,
        progress=not args.quiet,
        workers=args.workers or 0,
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

    workers = max(1, args.workers or 0)
    if args.profiler not in ("output", "fisher", "kfac"):
        raise BitallocError(
            "plan-resources plans the streamed profilers (output, fisher, kfac), not "
            f"{args.profiler!r}"
        )
    plan = plan_streamed(
        args.model,
        _formats(args.formats),
        args.tokens,
        workers=workers,
        avg_bits=args.avg_bits,
        profiler=args.profiler,
    )
    print(plan.table())
