"""Argument groups shared by the ``bitalloc`` subcommands (the main CLI and the search and
dashboard commands that live beside their packages)."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from typing import Any

from bitalloc.errors import BitallocError


def common_options(p: argparse.ArgumentParser) -> None:
    """Model, palette and text options."""
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


def solver_options(p: argparse.ArgumentParser, method_flag: str) -> None:
    """Solver method, ties and solver options."""
    p.add_argument(
        method_flag,
        default=None,
        help="solver: lagrangian (default; qp when the profile has interaction terms), dp, ilp, "
        "qp, or any registered method",
    )
    p.add_argument(
        "--tie",
        default=None,
        metavar="KINDS",
        help="tie fused projections to one format: qkv, gateup or qkv,gateup",
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="solver option, repeatable (e.g. --option time_limit=30 --option backend=cp-sat); "
        "VALUE is read as JSON when it parses, else as a string",
    )


def budget_options(p: argparse.ArgumentParser, *, required: bool) -> None:
    """The average-bits and bytes budgets."""
    p.add_argument(
        "--avg-bits",
        type=float,
        required=required,
        help="budget: average stored bits per weight of the allocated matrices",
    )
    p.add_argument(
        "--max-bytes",
        type=float,
        default=None,
        help="budget: stored bytes of the allocated matrices (codes, scales, zeros)",
    )


def measuring_options(p: argparse.ArgumentParser) -> None:
    """Ray workers and pairwise interaction terms."""
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="Ray workers for measured, kl and interactions (default 0: in this process)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to run the workers on (default $RAY_ADDRESS, else a local Ray)",
    )
    p.add_argument(
        "--interactions",
        default=None,
        metavar="PAIRS",
        help="also measure pairwise terms: neighbours, top:K, or a file of 'unit_a,unit_b' lines",
    )


def scale_folding_option(p: argparse.ArgumentParser) -> None:
    """``--scale-folding [ALPHA]``: fold per-channel scales into the model before profiling."""
    p.add_argument(
        "--scale-folding",
        nargs="?",
        type=float,
        const=0.5,
        default=None,
        metavar="ALPHA",
        help="scale-fold the model before profiling (move activation outliers into the weights, "
        "function unchanged) with migration strength ALPHA in (0, 1) (default 0.5); the "
        "allocation records the scales and `bitalloc apply` folds them in again",
    )


def parse_options(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` items as a dict (VALUE read as JSON when it parses, else a string)."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BitallocError(f"--option {item!r}: write KEY=VALUE, e.g. time_limit=30")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def check_profiler(name: str) -> None:
    """Fail on an unknown profiler before the model is loaded."""
    from bitalloc.sensitivity import PROFILERS

    if name not in PROFILERS:
        raise BitallocError(f"unknown profiler {name!r}; choose one of {sorted(PROFILERS)}")


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}


def parse_size(text: str) -> float:
    """Bytes from ``"150MiB"``, ``"1.5GiB"``, ``"200MB"``, ``"2e8"`` (a clear error otherwise)."""
    value = str(text).strip().lower().replace(" ", "")
    number = value.rstrip("kmgib")
    unit = value[len(number) :]
    try:
        amount = float(number)
    except ValueError:
        amount = math.nan
    if unit not in _SIZE_UNITS or not math.isfinite(amount) or amount <= 0:
        raise BitallocError(
            f"memory size {text!r}: give a positive number of bytes, optionally with a unit "
            "(KiB, MiB, GiB, KB, MB, GB), e.g. 150MiB"
        )
    return amount * _SIZE_UNITS[unit]


def kv_options(p: argparse.ArgumentParser) -> None:
    """KV-cache budgets: ``--kv-avg-bits``, or one ``--memory`` for weights and KV cache."""
    p.add_argument(
        "--kv-avg-bits",
        type=float,
        default=None,
        help="also choose a (key bits, value bits) pair per attention layer: average stored "
        "bits per cached element (scales included) at --context-len; without --avg-bits the "
        "weights stay at fp16",
    )
    p.add_argument(
        "--memory",
        default=None,
        metavar="SIZE",
        help="one budget for weights + KV cache (e.g. 150MiB): weight formats and KV pairs are "
        "chosen together for --context-len tokens x --batch-size sequences (use it instead "
        "of --avg-bits / --kv-avg-bits)",
    )
    p.add_argument(
        "--context-len",
        type=int,
        default=None,
        help="tokens the KV cache must hold (needed with --memory; default --seq-len)",
    )
    p.add_argument(
        "--batch-size", type=int, default=1, help="sequences the KV cache holds (default 1)"
    )
    p.add_argument(
        "--kv-formats",
        default=None,
        help="KV palette, e.g. K2V2,K4V2,K4V4,K8V4,K8V8 (default: all 16 pairs of 2/4/8/16 bits)",
    )
    p.add_argument(
        "--kv-profiler",
        default="kl",
        choices=("kl", "loss", "proxy"),
        help="KV sensitivity measure (default kl; --memory needs kl or loss)",
    )
    p.add_argument(
        "--kv-tokens", type=int, default=None, help="KV profile calibration tokens (default 1024)"
    )
