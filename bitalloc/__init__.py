"""bitalloc: decide how many bits each part of a language model gets when it is quantized.

>>> from bitalloc import allocate
>>> alloc = allocate(avg_bits=3.25)            # embedded default model  # doctest: +SKIP
>>> alloc.save("alloc.json")                   # doctest: +SKIP
"""

from bitalloc.allocation import Allocation
from bitalloc.allocator import allocate, prepare, profile_model
from bitalloc.errors import BitallocError, InfeasibleBudgetError
from bitalloc.formats import QuantFormat, default_palette, parse_format
from bitalloc.models import Unit, discover_units, load_model
from bitalloc.sensitivity import FisherProfiler, Profile
from bitalloc.solvers import Problem, Solution, solve

__version__ = "0.1.0"

__all__ = [
    "Allocation",
    "BitallocError",
    "FisherProfiler",
    "InfeasibleBudgetError",
    "Problem",
    "Profile",
    "QuantFormat",
    "Solution",
    "Unit",
    "allocate",
    "default_palette",
    "discover_units",
    "load_model",
    "parse_format",
    "prepare",
    "profile_model",
    "solve",
]
