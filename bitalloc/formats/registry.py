"""The registry of format families: how a name becomes a :class:`~bitalloc.formats.base.Format`.

A family (``int``, ``float``, later ``gguf``, ``gptq``, ...) is a :class:`FormatFamily`: it
recognises and parses its own names, lists its members and its default palette members, and
gives a one-line description with an example name for error messages. Adding a family is
``register_family(MyFamily())``; :func:`parse_format`, :func:`default_palette` and every palette
then accept its names with no other change.

The registry is the module's one piece of mutable state. Tests that register a family use
:func:`registered_family` (a context manager) or :func:`unregister_family`, so nothing leaks
from one test into the next.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager

from bitalloc.errors import BitallocError
from bitalloc.formats.base import Format


class FormatFamily(ABC):
    """A family of weight formats that share one naming scheme and one quantizer.

    Note:
        A subclass must implement:

        - :attr:`name`: short, unique among registered families (``int``), equal to the
          :attr:`Format.family` of every format it parses.
        - :attr:`description`: one line naming the name pattern and its choices, e.g.
          ``"'int<bits>-g<group>' with bits (2, 3, 4, 5, 6, 8) and groups (32, 64, 128)"``.
        - :attr:`example`: one valid name (``int3-g128``); it must parse.
        - :meth:`parse`: ``text`` (stripped, lower case) to a format when the name is this
          family's; None when it is not; :class:`BitallocError` saying what to change when the
          name is this family's pattern with an unsupported value (``int7-g128``).
        - :meth:`members`: every member the family can list (its defaults and the supported
          non-default ones; a representative set when the space is unbounded). The contract
          suite runs over them.

        :meth:`default_members` (the members the default palette includes) defaults to
        :meth:`members`; a family whose formats are opt-in returns ``()``.

        :attr:`wraps` is True for a family whose names are another format's name plus an
        option (``int3-g128+gptq``): when several families refuse a name, the wrapping
        family's reason is the one reported (it knows what the option needs of its base).
    """

    wraps: bool = False

    @property
    @abstractmethod
    def name(self) -> str:
        """The family's unique name."""

    @property
    @abstractmethod
    def description(self) -> str:
        """One line: the name pattern and its choices."""

    @property
    @abstractmethod
    def example(self) -> str:
        """One valid format name of this family."""

    @abstractmethod
    def parse(self, text: str) -> Format | None:
        """The format ``text`` names, None when it is not this family's name."""

    @abstractmethod
    def members(self) -> tuple[Format, ...]:
        """Every member the family can list."""

    def default_members(self) -> tuple[Format, ...]:
        """The members the default palette includes."""
        return self.members()


class FormatRegistry:
    """Registered families by name, in registration order."""

    def __init__(self) -> None:
        self._families: dict[str, FormatFamily] = {}

    def families(self) -> tuple[FormatFamily, ...]:
        """The registered families, in registration order."""
        return tuple(self._families.values())

    def family(self, name: str) -> FormatFamily:
        """The family called ``name``; a clear error listing the others when there is none."""
        if name not in self._families:
            raise BitallocError(
                f"no format family {name!r} is registered; registered: {sorted(self._families)}"
            )
        return self._families[name]

    def register(self, family: FormatFamily) -> FormatFamily:
        """Add ``family``; refuse a taken name, names another family claims, or a bad member."""
        if not isinstance(family, FormatFamily):
            raise BitallocError(
                f"register_family takes a FormatFamily, got {type(family).__name__}"
            )
        name = family.name
        if name in self._families:
            raise BitallocError(
                f"a format family named {name!r} is already registered; unregister it first "
                "or choose another name"
            )
        listed = (*family.members(), *family.default_members())
        own = list(dict.fromkeys([family.example, *(f.name for f in listed)]))
        for text in own:
            fmt = family.parse(text.strip().lower())
            if fmt is None or fmt.family != name or fmt.name != text:
                raise BitallocError(
                    f"family {name!r} does not parse its own name {text!r} back to a format of "
                    f"family {name!r} with that name; fix its parse or its members"
                )
        for other in self._families.values():
            theirs = [other.example, *(f.name for f in other.members())]
            clash = [t for t in own if _claims(other, t)]
            clash += [t for t in theirs if _claims(family, t)]
            if clash:
                raise BitallocError(
                    f"family {name!r} claims names of family {other.name!r} ({clash[0]!r}); "
                    "give its formats names that no registered family parses"
                )
        self._families[name] = family
        return family

    def unregister(self, name: str) -> FormatFamily:
        """Remove the family called ``name`` and return it."""
        family = self.family(name)
        del self._families[name]
        return family

    @contextmanager
    def registered(self, family: FormatFamily) -> Iterator[FormatFamily]:
        """Register ``family`` for the ``with`` block, and unregister it after, even on error."""
        self.register(family)
        try:
            yield family
        finally:
            self._families.pop(family.name, None)

    def parse(self, name: str | Format) -> Format:
        """The format ``name`` names, asking every family; formats pass through."""
        if isinstance(name, Format):
            return name
        text = str(name).strip().lower()
        found: list[Format] = []
        refusals: list[tuple[bool, BitallocError]] = []
        for family in self._families.values():
            try:
                fmt = family.parse(text)
            except BitallocError as exc:
                refusals.append((family.wraps, exc))
                continue
            if fmt:
                found.append(fmt)
        if len(found) == 1:
            return found[0]
        if not found and refusals:
            # A wrapping family's reason first: it names what its option needs of the base.
            raise sorted(refusals, key=lambda r: not r[0])[0][1]
        if found:
            # Registration refuses overlapping families; reaching here means a parse that
            # claims names outside its own examples and members.
            owners = sorted(f.family for f in found)
            raise BitallocError(
                f"format {name!r} is claimed by several families {owners}; unregister one"
            )
        known = "; ".join(
            f"{f.name} ({f.description}; e.g. {f.example!r})" for f in self._families.values()
        )
        raise BitallocError(f"unknown format {name!r}; use a name of a registered family: {known}")

    def default_palette(self) -> tuple[Format, ...]:
        """The default members of every family, cheapest first."""
        formats = [fmt for family in self._families.values() for fmt in family.default_members()]
        return tuple(sorted(formats, key=lambda f: (f.nominal_bits, f.name)))


def _claims(family: FormatFamily, text: str) -> bool:
    """True when ``family`` takes ``text`` as its name: it parses it, or refuses it with an
    error (its pattern with a bad value, ``int7-g128``, is still the int family's name)."""
    try:
        return family.parse(text.strip().lower()) is not None
    except BitallocError:
        return True


REGISTRY = FormatRegistry()
register_family = REGISTRY.register
unregister_family = REGISTRY.unregister
registered_family = REGISTRY.registered
format_families = REGISTRY.families
get_family = REGISTRY.family
parse_format = REGISTRY.parse
default_palette = REGISTRY.default_palette
