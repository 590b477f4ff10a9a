"""Allocations built without profiling, for tests that only apply them."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from bitalloc.allocation import Allocation, UnitChoice
from bitalloc.formats import parse_format
from bitalloc.models import discover_units, excluded_parameters


def cycling_allocation(model: nn.Module, formats: Sequence[str], budget: float = 8.0) -> Allocation:
    """Unit i of ``model`` (network order) takes ``formats[i % len(formats)]``."""
    units = discover_units(model)
    choices = [
        UnitChoice.of(u, parse_format(formats[i % len(formats)])) for i, u in enumerate(units)
    ]
    return Allocation.from_choices(
        model=type(model).__name__,
        budget=budget,
        units=choices,
        excluded=excluded_parameters(model, units),
    )
