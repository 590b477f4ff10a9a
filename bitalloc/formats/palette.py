"""Palettes: lists of formats a unit may take, parsed from names of any registered family."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from bitalloc.errors import BitallocError
from bitalloc.formats.base import Format
from bitalloc.formats.registry import default_palette, parse_format

T = TypeVar("T")


def parse_format_list(
    items: Iterable[Any] | str, parse: Callable[[Any], T], *, what: str, example: str
) -> tuple[T, ...]:
    """``items`` (a comma list or an iterable of names or formats) parsed with ``parse``; an
    empty list or one naming a format twice raises :class:`BitallocError` naming ``what``."""
    if isinstance(items, str):
        items = [part for part in items.split(",") if part.strip()]
    parsed = tuple(parse(item) for item in items)
    if not parsed:
        raise BitallocError(f"the {what} is empty; pass at least one format such as {example!r}")
    names = [f.name for f in parsed]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise BitallocError(f"the {what} lists {duplicates} more than once; list each format once")
    return parsed


def parse_palette(formats: Iterable[str | Format] | str | None) -> tuple[Format, ...]:
    """Normalise a user's palette (a comma list, or names or formats of any registered family),
    cheapest first; None gives :func:`default_palette`."""
    if formats is None:
        return default_palette()
    palette = parse_format_list(formats, parse_format, what="palette", example="int4-g128")
    return tuple(sorted(palette, key=lambda f: (f.nominal_bits, f.name)))
