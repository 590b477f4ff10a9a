"""Paths into parsed JSON documents, shared by the fuzz tests that mutate one value."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def json_paths(value: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every path (keys and list indices) to a value inside ``value``, the root ``()`` first."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from json_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from json_paths(item, (*prefix, index))
