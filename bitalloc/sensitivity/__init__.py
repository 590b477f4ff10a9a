"""Sensitivity profilers: what each unit loses under each format."""

from bitalloc.errors import BitallocError
from bitalloc.sensitivity.base import BaseProfiler, cached_profile
from bitalloc.sensitivity.fisher import FisherAccumulator, FisherProfiler
from bitalloc.sensitivity.profile import Profile

PROFILERS: dict[str, type[BaseProfiler]] = {FisherProfiler.name: FisherProfiler}


def make_profiler(name: str, **options) -> BaseProfiler:
    """Build a profiler by method name (``fisher``)."""
    try:
        cls = PROFILERS[name]
    except KeyError:
        raise BitallocError(
            f"unknown profiler {name!r}; choose one of {sorted(PROFILERS)}"
        ) from None
    return cls(**options)


__all__ = [
    "BaseProfiler",
    "FisherAccumulator",
    "FisherProfiler",
    "PROFILERS",
    "Profile",
    "cached_profile",
    "make_profiler",
]
