"""The stages of an allocation, each a function with typed input and output:

``prepare`` (model, units, palette, text) -> ``profile`` (cached sensitivity table) ->
``plan`` (the problem: costs, budgets, ties, solver) -> ``solve`` (an :class:`Allocation`) ->
``verify`` (measured quality, repair).

:func:`bitalloc.allocator.allocate` runs them in that order; the KV-cache allocator
(:mod:`bitalloc.kv.allocate`) and the measured search (:mod:`bitalloc.search`) use them too,
never the allocator.
"""

from bitalloc.stages.plan import Plan, allocation_for, plan, requested_budget
from bitalloc.stages.prepare import Prepared, prepare, prepare_for, select_units
from bitalloc.stages.profile import (
    cached_profile_of,
    load_profile_for,
    prepare_and_profile,
    profile_for,
    profile_model,
)
from bitalloc.stages.verify import verify

__all__ = [
    "Plan",
    "Prepared",
    "allocation_for",
    "cached_profile_of",
    "load_profile_for",
    "plan",
    "prepare",
    "prepare_and_profile",
    "prepare_for",
    "profile_for",
    "profile_model",
    "requested_budget",
    "select_units",
    "verify",
]
