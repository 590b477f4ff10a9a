"""The registry of solver methods and :func:`solve`.

A solver joins the registry in one of two ways:

* **Decorating its class** with :func:`register_solver`. The class is registered when its
  module is imported; :mod:`bitalloc.solvers` imports the array-only built-ins (``lagrangian``,
  ``dp``, ``ilp``, ``qp``) so they are always there.
* **An entry point** in the group ``bitalloc.solvers`` (:data:`ENTRY_POINT_GROUP`), named after
  the method and pointing at the class. Such a solver is imported only when it is first looked
  up (:func:`solver_class`, :func:`solve`) or when every method is listed
  (:func:`available_solvers`), so a method with heavy dependencies costs nothing until used.
  bitalloc's own ``rl`` method (torch, stable-baselines3) is declared this way in its
  ``pyproject.toml``, and a third-party package plugs in a method the same way::

      [project.entry-points."bitalloc.solvers"]
      my-method = "my_package.solver:MySolver"

  ``MySolver`` subclasses :class:`~bitalloc.solvers.base.BaseSolver` with
  ``name = "my-method"``. An entry point that fails to import, or that names something other
  than such a class, raises :class:`~bitalloc.errors.BitallocError` naming it, and only when
  that method is asked for or every method is listed: the other methods keep working.

Method names are listed built-ins first (:data:`BUILTIN_ORDER`), then the others by name.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import inspect
import threading
from collections.abc import Iterator
from typing import Any, TypeVar

from bitalloc.errors import BitallocError
from bitalloc.solvers.base import BaseSolver
from bitalloc.solvers.problem import Problem, Solution

#: The entry-point group that declares lazily imported solvers.
ENTRY_POINT_GROUP = "bitalloc.solvers"
#: bitalloc's own methods, in the order they are listed.
BUILTIN_ORDER = ("lagrangian", "dp", "ilp", "qp", "rl")
#: bitalloc's own lazily imported methods (what its ``pyproject.toml`` declares as entry
#: points), so that a source tree used without installing still finds them.
_BUILTIN_LAZY = {"rl": "bitalloc.rl.solver:RLSolver"}

SolverClass = TypeVar("SolverClass", bound=type[BaseSolver])

_registered: dict[str, type[BaseSolver]] = {}
#: method name -> the distinct entry-point targets that declare it; None until first scanned.
_declared: dict[str, list[tuple[str, str]]] | None = None
# Entry points may be loaded from several threads (searches solve in parallel).
_lock = threading.RLock()


def register_solver(cls: SolverClass) -> SolverClass:
    """Class decorator: register ``cls`` under ``cls.name`` and return it unchanged.

    Registering the same class again is a no-op (a module imported twice re-runs its
    decorator).

    Raises:
        BitallocError: ``cls`` is not a concrete :class:`BaseSolver` subclass with a non-empty
            string ``name``, or another class is already registered under that name.
    """
    name = _checked_name(cls, f"{getattr(cls, '__qualname__', cls)!r}")
    with _lock:
        existing = _registered.get(name)
        if existing is not None and not _same_class(existing, cls):
            raise BitallocError(
                f"solver method {name!r} is already registered by {_describe(existing)}; give "
                f"{_describe(cls)} another name or unregister the first"
            )
        _registered[name] = cls
    return cls


def unregister_solver(name: str) -> type[BaseSolver]:
    """Remove the method ``name`` from the registry and return its class.

    A method declared by an entry point is registered again at its next lookup.

    Raises:
        BitallocError: no solver is registered under ``name``.
    """
    with _lock:
        if name not in _registered:
            raise BitallocError(
                f"no solver is registered as {name!r}; registered: {_quoted(_ordered(_registered))}"
            )
        return _registered.pop(name)


@contextlib.contextmanager
def registered_solver(cls: type[BaseSolver]) -> Iterator[type[BaseSolver]]:
    """Register ``cls`` for the duration of a ``with`` block (tests, experiments); a class
    that was registered already stays registered afterwards."""
    with _lock:
        before = _registered.get(getattr(cls, "name", None))
        register_solver(cls)
    try:
        yield cls
    finally:
        with _lock:
            if before is None and _registered.get(cls.name) is cls:
                del _registered[cls.name]


def solver_names() -> list[str]:
    """Every method name, registered or declared by an entry point, without importing any."""
    with _lock:
        return _ordered(set(_registered) | set(_declarations()))


def solver_class(method: str) -> type[BaseSolver]:
    """The solver class registered as ``method``, importing its entry point if need be.

    Raises:
        BitallocError: no such method (the message lists the known ones), or its entry point
            is broken (the message names it).
    """
    with _lock:
        cls = _registered.get(method)
        if cls is not None:
            return cls
        targets = _declarations().get(method)
        if targets is None:
            raise BitallocError(
                f"unknown solver method {method!r}; known methods: {_quoted(solver_names())}"
            )
        return _load(method, targets)


def available_solvers() -> dict[str, type[BaseSolver]]:
    """A fresh dict mapping every method name to its solver class, in listing order.

    Imports every solver declared by an entry point.

    Raises:
        BitallocError: an entry point is broken (the message names it).
    """
    return {name: solver_class(name) for name in solver_names()}


def solve(problem: Problem, method: str = "lagrangian", **options: Any) -> Solution:
    """Solve ``problem`` with the solver registered as ``method``.

    ``options`` are passed to the solver's constructor. An unknown method or option raises
    :class:`~bitalloc.errors.BitallocError` naming the valid ones.
    """
    cls = solver_class(method)
    signature = inspect.signature(cls)
    try:
        signature.bind(**options)
    except TypeError as exc:
        accepted = ", ".join(signature.parameters) or "none"
        raise BitallocError(
            f"bad options for method {method!r} ({exc}); accepted options: {accepted}"
        ) from exc
    return cls(**options).solve(problem)


def _declarations() -> dict[str, list[tuple[str, str]]]:
    """Method name -> distinct ``(target, distribution)`` pairs, scanned once."""
    global _declared
    if _declared is None:
        found: dict[str, list[tuple[str, str]]] = {
            name: [(target, "bitalloc")] for name, target in _BUILTIN_LAZY.items()
        }
        for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(getattr(point, "dist", None), "name", None) or "an unknown package"
            targets = found.setdefault(point.name, [])
            # A package found twice on the path (an editable install beside its build tree)
            # declares the same target twice: one solver, not a conflict.
            if all(target != point.value for target, _ in targets):
                targets.append((point.value, dist))
        _declared = found
    return _declared


def _load(method: str, targets: list[tuple[str, str]]) -> type[BaseSolver]:
    if len(targets) > 1:
        claims = "; ".join(f"{target} (from {dist})" for target, dist in targets)
        raise BitallocError(
            f"solver method {method!r} is declared by several entry points in group "
            f"{ENTRY_POINT_GROUP!r}: {claims}; uninstall all but one of those packages"
        )
    ((target, dist),) = targets
    where = f"entry point {method} = {target} (group {ENTRY_POINT_GROUP!r}, from {dist})"
    try:
        loaded = importlib.metadata.EntryPoint(method, target, ENTRY_POINT_GROUP).load()
    except Exception as exc:  # any failure importing a plugin is that plugin's, reported as such
        raise BitallocError(
            f"solver method {method!r} cannot be loaded: {where} failed with "
            f"{type(exc).__name__}: {exc}; fix or uninstall {dist}"
        ) from exc
    name = _checked_name(loaded, where)
    if name != method:
        raise BitallocError(
            f"{where} names a solver called {name!r}, not {method!r}; the entry point's name "
            "must be the class's name"
        )
    existing = _registered.get(method)
    if existing is not None and not _same_class(existing, loaded):
        raise BitallocError(
            f"solver method {method!r} is registered by {_describe(existing)} and also "
            f"declared by {where}; uninstall one or rename it"
        )
    _registered[method] = loaded
    return loaded


def _checked_name(cls: Any, where: str) -> str:
    if not (inspect.isclass(cls) and issubclass(cls, BaseSolver)):
        raise BitallocError(
            f"{where} is not a solver: a solver is a subclass of bitalloc.solvers.BaseSolver"
        )
    if inspect.isabstract(cls):
        raise BitallocError(f"{where} does not implement _solve, so it cannot be registered")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.strip():
        raise BitallocError(f"{where} needs a class attribute name (a non-empty string)")
    return name


def _same_class(a: type, b: type) -> bool:
    # A module imported again (importlib.reload) makes a new class object for the same solver.
    return a is b or (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def _describe(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _ordered(names: Any) -> list[str]:
    rank = {name: i for i, name in enumerate(BUILTIN_ORDER)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def _quoted(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names) or "none"
