"""Readers of command-line values shared by the ``bitalloc`` subcommands (``KEY=VALUE``
options, memory sizes). The options themselves are derived from the config fields
(:mod:`bitalloc.cliconfig`)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from bitalloc.errors import BitallocError


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
    from bitalloc.sensitivity import profiler_class

    profiler_class(name)


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
