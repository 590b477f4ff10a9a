"""Profilers by name: :func:`register_profiler` (a class decorator) fills the registry.

The built-in profilers register themselves when their modules are imported; the registry
imports those modules the first time it is read, so reading it never depends on what happened
to be imported before. A user's profiler class registers the same way and is then found by
name: ``make_profiler(name)``, ``allocate(..., profiler=name)``, ``--profiler name``.

Each class says which units it profiles (``unit_kind``: ``"weight"`` for weight matrices,
``"kv"`` for KV caches). :data:`PROFILERS` shows the weight profilers, the ones an allocation
can run; :data:`MEASURING_PROFILERS` the names of those that score (unit, format) jobs on a
job pool (``measures_on_pool``).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator, Mapping, Set
from typing import TYPE_CHECKING, Any, TypeVar

from bitalloc.config.messages import UNKNOWN_PROFILER
from bitalloc.errors import BitallocError

if TYPE_CHECKING:
    from bitalloc.sensitivity.base import BaseProfiler

#: Modules whose import registers the built-in profilers.
BUILTIN_MODULES = (
    "bitalloc.sensitivity.fisher",
    "bitalloc.sensitivity.hessian",
    "bitalloc.sensitivity.output",
    "bitalloc.sensitivity.kfac",
    "bitalloc.sensitivity.measured",
    "bitalloc.kv.profiler",
)
UNIT_KINDS = ("weight", "kv")

_REGISTRY: dict[str, type[BaseProfiler]] = {}
_builtins_loaded = False

P = TypeVar("P", bound="type[BaseProfiler]")


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        # Set first: the modules imported below call register_profiler, which lands here.
        _builtins_loaded = True
        for module in BUILTIN_MODULES:
            importlib.import_module(module)


def register_profiler(cls: P) -> P:
    """Class decorator: make a :class:`~bitalloc.sensitivity.base.BaseProfiler` subclass
    available by its ``name``. A name already taken by another class is an error."""
    from bitalloc.sensitivity.base import BaseProfiler

    if not (isinstance(cls, type) and issubclass(cls, BaseProfiler)):
        raise BitallocError(
            f"register_profiler takes a subclass of BaseProfiler, got {cls!r}; derive the "
            "profiler from bitalloc.sensitivity.BaseProfiler"
        )
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise BitallocError(f"profiler class {cls.__name__} needs a non-empty string `name`")
    if getattr(cls, "unit_kind", None) not in UNIT_KINDS:
        raise BitallocError(
            f"profiler {name!r}: unit_kind must be one of {UNIT_KINDS}, got "
            f"{getattr(cls, 'unit_kind', None)!r}"
        )
    taken = _REGISTRY.get(name)
    if taken is not None and taken is not cls:
        raise BitallocError(
            f"a profiler named {name!r} is already registered ({taken.__module__}."
            f"{taken.__qualname__}); give {cls.__qualname__} another name or unregister the "
            "first with unregister_profiler"
        )
    _REGISTRY[name] = cls
    return cls


def unregister_profiler(name: str) -> type[BaseProfiler]:
    """Remove a registered profiler and return its class; an unknown name is an error."""
    _load_builtins()
    try:
        return _REGISTRY.pop(name)
    except KeyError:
        raise BitallocError(
            f"no profiler named {name!r} is registered; registered: {sorted(_REGISTRY)}"
        ) from None


@contextlib.contextmanager
def registered_profiler(cls: P) -> Iterator[P]:
    """Register ``cls`` for the duration of a ``with`` block (tests, one-off experiments)."""
    _load_builtins()
    register_profiler(cls)
    try:
        yield cls
    finally:
        if _REGISTRY.get(cls.name) is cls:
            del _REGISTRY[cls.name]


def profiler_classes(kind: str | None = None) -> dict[str, type[BaseProfiler]]:
    """A snapshot of the registry: every profiler, or those of one ``unit_kind``."""
    _load_builtins()
    return {n: c for n, c in _REGISTRY.items() if kind is None or c.unit_kind == kind}


class _Profilers(Mapping[str, "type[BaseProfiler]"]):
    """Live read-only view of the registered weight profilers (name -> class)."""

    def __getitem__(self, name: str) -> type[BaseProfiler]:
        return profiler_classes("weight")[name]

    def __iter__(self) -> Iterator[str]:
        return iter(profiler_classes("weight"))

    def __len__(self) -> int:
        return len(profiler_classes("weight"))

    def __repr__(self) -> str:
        return f"PROFILERS({sorted(self)})"


class _Measuring(Set[str]):
    """Live view of the names of weight profilers that run jobs on a pool."""

    def _names(self) -> set[str]:
        return {n for n, c in profiler_classes("weight").items() if c.measures_on_pool}

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._names()))

    def __len__(self) -> int:
        return len(self._names())

    def __repr__(self) -> str:
        return f"MEASURING_PROFILERS({sorted(self)})"


#: Weight profilers by name (a live view of the registry).
PROFILERS: Mapping[str, type[BaseProfiler]] = _Profilers()
#: Names of the weight profilers that score one (unit, format) job at a time and can spread the
#: jobs over Ray (a live view of the registry).
MEASURING_PROFILERS: Set[str] = _Measuring()


def profiler_class(name: str, error: type[BitallocError] = BitallocError) -> type[BaseProfiler]:
    """The weight profiler registered as ``name``; otherwise ``error`` (the caller's kind of
    :class:`BitallocError`) naming the registered ones. The one check behind the config's rule,
    the CLI's early check and :func:`make_profiler`."""
    try:
        return PROFILERS[name]
    except (KeyError, TypeError):
        raise error(UNKNOWN_PROFILER.format(name=name, choices=sorted(PROFILERS))) from None


def make_profiler(name: str, **options: Any) -> BaseProfiler:
    """Build a weight profiler by method name with its options (each validated by the
    profiler)."""
    cls = profiler_class(name)
    try:
        return cls(**options)
    except TypeError as exc:
        raise BitallocError(f"profiler {name!r}: {exc}; see help({cls.__name__})") from None
