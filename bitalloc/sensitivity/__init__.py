"""Sensitivity profilers: what each unit loses under each format.

Every profiler keeps the :class:`BaseProfiler` contract and is checked by one contract test
suite (``tests/sensitivity/test_contract.py``).
"""

from bitalloc.errors import BitallocError
from bitalloc.sensitivity.base import BaseProfiler, cached_profile
from bitalloc.sensitivity.fisher import FisherAccumulator, FisherProfiler
from bitalloc.sensitivity.hessian import HessianProfiler
from bitalloc.sensitivity.interactions import Interactions, measure_interactions, select_pairs
from bitalloc.sensitivity.kfac import KFACProfiler, KroneckerAccumulator
from bitalloc.sensitivity.measured import KLProfiler, MeasuredProfiler
from bitalloc.sensitivity.output import InputGramAccumulator, OutputProfiler
from bitalloc.sensitivity.profile import Profile

PROFILERS: dict[str, type[BaseProfiler]] = {
    cls.name: cls
    for cls in (
        FisherProfiler,
        HessianProfiler,
        OutputProfiler,
        KFACProfiler,
        KLProfiler,
        MeasuredProfiler,
    )
}
# Methods that score one (unit, format) job at a time and can spread the jobs over Ray.
MEASURING_PROFILERS = frozenset({KLProfiler.name, MeasuredProfiler.name})


def make_profiler(name: str, **options) -> BaseProfiler:
    """Build a profiler by method name with its options (each validated by the profiler)."""
    try:
        cls = PROFILERS[name]
    except KeyError:
        raise BitallocError(
            f"unknown profiler {name!r}; choose one of {sorted(PROFILERS)}"
        ) from None
    try:
        return cls(**options)
    except TypeError as exc:
        raise BitallocError(f"profiler {name!r}: {exc}; see help({cls.__name__})") from None


__all__ = [
    "BaseProfiler",
    "FisherAccumulator",
    "FisherProfiler",
    "HessianProfiler",
    "InputGramAccumulator",
    "Interactions",
    "KFACProfiler",
    "KLProfiler",
    "KroneckerAccumulator",
    "MEASURING_PROFILERS",
    "MeasuredProfiler",
    "OutputProfiler",
    "PROFILERS",
    "Profile",
    "cached_profile",
    "make_profiler",
    "measure_interactions",
    "select_pairs",
]
