"""bitalloc: decide how many bits each part of a language model gets when it is quantized.

>>> from bitalloc import allocate
>>> alloc = allocate(avg_bits=3.25)            # embedded default model  # doctest: +SKIP
>>> alloc.save("alloc.json")                   # doctest: +SKIP

Names are imported on first use, so that ``bitalloc.solvers`` (numpy only) does not pay for
importing torch and transformers.
"""

from __future__ import annotations

from bitalloc.lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "Allocation": "bitalloc.allocation",
    "AllocateConfig": "bitalloc.config",
    "SearchConfig": "bitalloc.config",
    "ConfigError": "bitalloc.errors",
    "allocate": "bitalloc.allocator",
    "prepare": "bitalloc.stages",
    "profile_model": "bitalloc.stages",
    "BitallocError": "bitalloc.errors",
    "InfeasibleBudgetError": "bitalloc.errors",
    "Format": "bitalloc.formats",
    "QuantFormat": "bitalloc.formats",
    "default_palette": "bitalloc.formats",
    "parse_format": "bitalloc.formats",
    "Unit": "bitalloc.models",
    "discover_units": "bitalloc.models",
    "load_model": "bitalloc.models",
    "frontier": "bitalloc.planning",
    "solve_profile": "bitalloc.planning",
    "FisherProfiler": "bitalloc.sensitivity",
    "Profile": "bitalloc.sensitivity",
    "Problem": "bitalloc.solvers",
    "Solution": "bitalloc.solvers",
    "solve": "bitalloc.solvers",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports("bitalloc", globals(), _EXPORTS)
