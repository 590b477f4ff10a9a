"""Fake quantization: replace unit weights by Q(W) in place, permanently or temporarily."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from bitalloc.errors import BitallocError
from bitalloc.formats import QuantFormat, parse_format
from bitalloc.models import get_linear


def _resolve(
    model: nn.Module, assignment: Mapping[str, str | QuantFormat]
) -> list[tuple[nn.Linear, QuantFormat]]:
    """Check every unit name and format before anything is modified (nothing half-applied)."""
    resolved = []
    for name, fmt in assignment.items():
        resolved.append((get_linear(model, name), parse_format(fmt)))
    return resolved


def fake_quantize_(model: nn.Module, assignment: Mapping[str, str | QuantFormat]) -> nn.Module:
    """Quantize-dequantize the named units' weights in place; returns ``model``."""
    with torch.no_grad():
        for linear, fmt in _resolve(model, assignment):
            linear.weight.copy_(fmt.fake_quantize(linear.weight))
    return model


@contextlib.contextmanager
def fake_quantized(
    model: nn.Module, assignment: Mapping[str, str | QuantFormat]
) -> Iterator[nn.Module]:
    """Temporarily fake-quantize units; the original weights come back on exit (also on error)."""
    resolved = _resolve(model, assignment)
    saved = [linear.weight.detach().clone() for linear, _ in resolved]
    try:
        with torch.no_grad():
            for linear, fmt in resolved:
                linear.weight.copy_(fmt.fake_quantize(linear.weight))
        yield model
    finally:
        with torch.no_grad():
            for (linear, _), original in zip(resolved, saved):
                linear.weight.copy_(original)


def check_assignment(model: nn.Module, assignment: Mapping[str, str | QuantFormat]) -> None:
    """Raise :class:`BitallocError` if a unit is missing from the model or a format is unknown."""
    missing = []
    for name in assignment:
        try:
            get_linear(model, name)
        except BitallocError:
            missing.append(name)
    if missing:
        raise BitallocError(
            f"{len(missing)} unit(s) of the allocation are not in this model (first: "
            f"{missing[0]!r}); the allocation was made for a different model"
        )
    for fmt in assignment.values():
        parse_format(fmt)
