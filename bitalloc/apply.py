"""Fake quantization: replace unit weights by Q(W) in place, permanently or temporarily."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from bitalloc.errors import BitallocError
from bitalloc.formats import Format, QuantFormat, QuantizedWeight, dequantize, parse_format
from bitalloc.models import get_linear

if TYPE_CHECKING:
    from bitalloc.importance import Importance

#: Default cap on what one :class:`QuantizedWeightCache` holds (codes take a byte per weight).
CACHE_BYTES = 2 * 2**30


class QuantizedWeightCache:
    """The quantized weights of one model's units, kept so that measuring many assignments
    (uniform baselines, repair rounds, search trials) quantizes each (unit, format) once: the
    per-group clipping search costs far more than a forward pass over a few windows.

    Entries hold the codes (one byte per weight) with the per-group scales and zeros, not a
    float copy, and dequantize on use, which gives exactly what the format's
    ``fake_quantize`` gives. Only integer formats and formats stored as int codes (``+gptq``)
    are kept (fp16 and other families are cheap or opaque and are quantized each time). The
    least recently used entries go when
    ``max_bytes`` would be passed. An entry is keyed by unit name and format and checked
    against the weight's sum and the importance's fingerprint, so a weight changed since (a
    different model, a folded copy) or quantized with another importance is quantized again
    rather than served stale.
    """

    def __init__(self, max_bytes: int = CACHE_BYTES):
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[
            tuple[str, str], tuple[tuple[float, float | None], QuantizedWeight]
        ] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        """Bytes the kept entries take."""
        return self._bytes

    def fake_quantize(
        self,
        unit: str,
        weight: torch.Tensor,
        fmt: Format,
        importance: Importance | None = None,
    ) -> torch.Tensor:
        """``fmt.fake_quantize(weight, importance.of(unit))``, from the cache when this unit's
        weight was quantized with ``fmt`` and the same importance before."""
        vector = None if importance is None else importance.of(unit)
        if not _stored_as_int(fmt):
            return fmt.fake_quantize(weight, vector)
        key = (unit, fmt.name)
        check = (
            float(weight.detach().sum(dtype=torch.float64)),
            None if importance is None else importance.fingerprint(unit),
        )
        entry = self._entries.get(key)
        if entry is not None and entry[0] == check:
            self._entries.move_to_end(key)
            self.hits += 1
            return dequantize(entry[1]).to(weight.dtype)
        self.misses += 1
        q = fmt.quantize(weight, vector)
        self._store(key, check, q)
        return dequantize(q).to(weight.dtype)

    def _store(
        self, key: tuple[str, str], total: tuple[float, float | None], q: QuantizedWeight
    ) -> None:
        size = _nbytes(q)
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= _nbytes(old[1])
        while self._entries and self._bytes + size > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self._bytes -= _nbytes(evicted)
        if size <= self.max_bytes:
            self._entries[key] = (total, q)
            self._bytes += size


def _stored_as_int(fmt: Format) -> bool:
    """True for an int format, or one stored as int codes (``+gptq``) that gives them by
    ``quantize``: its codes are what the cache keeps."""
    if isinstance(fmt, QuantFormat):
        return not fmt.is_float
    return getattr(fmt, "int_format", None) is not None and hasattr(fmt, "quantize")


def _nbytes(q: QuantizedWeight) -> int:
    return sum(t.numel() * t.element_size() for t in (q.codes, q.scales, q.zeros))


def _resolve(
    model: nn.Module, assignment: Mapping[str, str | QuantFormat]
) -> list[tuple[str, nn.Linear, QuantFormat]]:
    """Check every unit name and format before anything is modified (nothing half-applied)."""
    resolved = []
    for name, fmt in assignment.items():
        resolved.append((name, get_linear(model, name), parse_format(fmt)))
    return resolved


def fake_quantize_(
    model: nn.Module,
    assignment: Mapping[str, str | QuantFormat],
    importance: Importance | None = None,
) -> nn.Module:
    """Quantize-dequantize the named units' weights in place (clipping weighted by each unit's
    ``importance`` where it has one); returns ``model``."""
    with torch.no_grad():
        for name, linear, fmt in _resolve(model, assignment):
            vector = None if importance is None else importance.of(name)
            linear.weight.copy_(fmt.fake_quantize(linear.weight, vector))
    return model


@contextlib.contextmanager
def fake_quantized(
    model: nn.Module,
    assignment: Mapping[str, str | QuantFormat],
    cache: QuantizedWeightCache | None = None,
    importance: Importance | None = None,
) -> Iterator[nn.Module]:
    """Temporarily fake-quantize units; the original weights come back on exit (also on error).
    ``cache`` (kept by the caller across measurements of one model) saves re-quantizing a
    unit in a format it took before; ``importance`` weights each unit's clipping search."""
    resolved = _resolve(model, assignment)
    saved = [linear.weight.detach().clone() for _, linear, _ in resolved]
    try:
        with torch.no_grad():
            for name, linear, fmt in resolved:
                quantized = (
                    fmt.fake_quantize(
                        linear.weight, None if importance is None else importance.of(name)
                    )
                    if cache is None
                    else cache.fake_quantize(name, linear.weight, fmt, importance)
                )
                linear.weight.copy_(quantized)
        yield model
    finally:
        with torch.no_grad():
            for (_, linear, _), original in zip(resolved, saved):
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
