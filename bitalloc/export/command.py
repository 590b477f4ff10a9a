"""``bitalloc export``: an allocation as a file an engine loads."""

from __future__ import annotations

import argparse
import time
from typing import Any

from bitalloc.cliconfig import add_config_arguments


def add_export_parser(sub: Any) -> None:
    """Register ``export`` on ``sub`` (an argparse subparsers object)."""
    e = sub.add_parser(
        "export",
        help="write an allocation as a GGUF file (llama.cpp, Ollama) or a compressed-tensors "
        "checkpoint (vLLM, transformers)",
    )
    e.add_argument("allocation", metavar="ALLOCATION", help="allocation JSON (from allocate)")
    e.add_argument(
        "--out",
        required=True,
        metavar="PATH",
        help="model.gguf for a GGUF file; a directory for a compressed-tensors checkpoint",
    )
    e.add_argument(
        "--format",
        choices=("gguf", "compressed-tensors"),
        default=None,
        help="the file format (default: from --out: .gguf is GGUF, else compressed-tensors)",
    )
    add_config_arguments(
        e,
        ("model",),
        {"model": {"help": "the model the allocation was made for (default: the one it records)"}},
    )
    e.add_argument("--force", action="store_true", help="replace --out if it exists")
    e.add_argument(
        "--stream",
        action="store_true",
        help="read the model one layer at a time, never whole (models larger than memory; "
        "--model: a Hugging Face directory of safetensors shards or a .gguf file)",
    )
    add_config_arguments(
        e,
        ("workers", "ray_address", "progress"),
        {"workers": {"help": "with --stream: Ray workers quantizing tensors (GGUF) or layers"}},
    )
    e.set_defaults(handler=export_command)


def export_command(args: argparse.Namespace) -> None:
    """Export, check the file read back, and print what was written."""
    from bitalloc.allocation import Allocation
    from bitalloc.export import export_allocation

    alloc = Allocation.load(args.allocation)
    for warning in alloc.warnings():
        print(f"warning: {warning}")
    start = time.perf_counter()
    report = export_allocation(
        alloc,
        args.out,
        model=args.model,
        format=args.format,
        force=args.force,
        progress=not args.quiet,
        stream=args.stream,
        workers=args.workers or 0,
        ray_address=args.ray_address,
    )
    seconds = time.perf_counter() - start
    predicted = alloc.data.total_bits / 8
    print(report.summary())
    print(
        f"checked: every tensor read back with its planned type and bytes; units "
        f"{report.unit_bytes:,} bytes, allocation {predicted:,.0f} (ratio "
        f"{report.unit_bytes / predicted:.4f}); {seconds:.1f} s"
    )
