"""Sensitivity profilers: what each unit loses under each format.

Every profiler is built on the :class:`BaseProfiler` skeleton, registers itself by name with
:func:`register_profiler` and is checked by one contract test suite
(``tests/sensitivity/test_contract.py``), run over the whole registry.

Names are imported on first use, so that loading a :class:`Profile` (a plain record) does not
import torch or any measuring code.
"""

from __future__ import annotations

from bitalloc.lazy import lazy_exports

_EXPORTS = {
    "BaseProfiler": "bitalloc.sensitivity.base",
    "Statistics": "bitalloc.sensitivity.base",
    "cached_profile": "bitalloc.sensitivity.base",
    "FisherAccumulator": "bitalloc.sensitivity.fisher",
    "FisherProfiler": "bitalloc.sensitivity.fisher",
    "HessianProfiler": "bitalloc.sensitivity.hessian",
    "Interactions": "bitalloc.sensitivity.interaction_terms",
    "measure_interactions": "bitalloc.sensitivity.interactions",
    "select_pairs": "bitalloc.sensitivity.interactions",
    "KFACProfiler": "bitalloc.sensitivity.kfac",
    "KroneckerAccumulator": "bitalloc.sensitivity.kfac",
    "KLProfiler": "bitalloc.sensitivity.measured",
    "MeasuredProfiler": "bitalloc.sensitivity.measured",
    "InputGramAccumulator": "bitalloc.sensitivity.output",
    "OutputProfiler": "bitalloc.sensitivity.output",
    "Profile": "bitalloc.sensitivity.profile",
    "ProfileRepairWarning": "bitalloc.sensitivity.profile",
    "monotone_in_bits": "bitalloc.sensitivity.monotone",
    "MEASURING_PROFILERS": "bitalloc.sensitivity.registry",
    "PROFILERS": "bitalloc.sensitivity.registry",
    "make_profiler": "bitalloc.sensitivity.registry",
    "profiler_class": "bitalloc.sensitivity.registry",
    "profiler_classes": "bitalloc.sensitivity.registry",
    "register_profiler": "bitalloc.sensitivity.registry",
    "registered_profiler": "bitalloc.sensitivity.registry",
    "unregister_profiler": "bitalloc.sensitivity.registry",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports("bitalloc.sensitivity", globals(), _EXPORTS)
