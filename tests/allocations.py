"""Allocations built without profiling, for tests that only apply them."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from bitalloc.allocation import Allocation, UnitChoice
from bitalloc.formats import parse_format
from bitalloc.models import discover_units, excluded_parameters


def cycling_allocation(
    model: nn.Module, formats: Sequence[str], budget: float | None = None
) -> Allocation:
    """Unit i of ``model`` (network order) takes ``formats[i % len(formats)]``; the budget is
    the achieved average bits unless given (an allocation never exceeds its budget)."""
    units = discover_units(model)
    choices = [
        UnitChoice.of(u, parse_format(formats[i % len(formats)])) for i, u in enumerate(units)
    ]
    if budget is None:
        bits = sum(parse_format(c.format).storage_bits(c.shape) for c in choices)
        budget = bits / sum(c.numel for c in choices)
    return Allocation.from_choices(
        model=type(model).__name__,
        budget=budget,
        units=choices,
        excluded=excluded_parameters(model, units),
    )


#: What the fast allocate tests share: a few hundred tokens in short windows, no progress bars.
SMALL = {"calibration_tokens": 256, "seq_len": 64, "eval_tokens": 256, "progress": False}


def small_allocate(
    model: nn.Module, tokenizer, files, avg_bits: float, formats: str, **overrides
) -> Allocation:
    """:func:`bitalloc.allocate` on a tiny model with :data:`SMALL` settings; ``files`` is the
    (calibration, evaluation) pair of the ``text_files`` fixture."""
    from bitalloc import allocate

    cal, ev = files
    settings = {"tokenizer": tokenizer, "calibration": cal, "evaluation": ev, "formats": formats}
    return allocate(model, avg_bits, **{**settings, **SMALL, **overrides})


def small_prepare(model: nn.Module, tokenizer, files, formats: str):
    """:func:`bitalloc.allocator.prepare` with the settings of :func:`small_allocate`."""
    from bitalloc.allocator import prepare

    cal, ev = files
    return prepare(
        model, formats=formats, calibration=cal, evaluation=ev, tokenizer=tokenizer, seq_len=64
    )
