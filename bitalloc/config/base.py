"""The machinery of the config models: fields that are also flags, the strict frozen base
model, and pydantic's errors as one :class:`~bitalloc.errors.ConfigError` naming each option."""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from pathlib import PurePath
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bitalloc.config.names import FLAT_NAMES
from bitalloc.errors import ConfigError

#: The sections of the config files (and their search part).
ALL_SECTIONS = ("data", "target", "profile", "solve", "verify", "kv", "search")
#: Section name -> its class ("" is AllocateConfig), filled as each class is defined, so that
#: an error can suggest a section's fields without importing the modules that define them.
_SECTION_CLASSES: dict[str, type[BaseModel]] = {}


def option(
    default: Any,
    flag: str,
    help: str,
    *,
    kind: str = "value",
    metavar: str | None = None,
    dest: str | None = None,
    aliases: tuple[str, ...] = (),
) -> Any:
    """A config field that is also a command-line option: its ``flag``, ``help`` text and how
    the flag is read (``kind``: ``value``, ``files`` (one or more paths), ``switch`` (a flag
    that sets True), ``invert`` (a flag that sets False: ``--no-cache``), ``size`` (``150MiB``),
    ``options`` (repeatable ``KEY=VALUE``), ``alpha`` (``--scale-folding [ALPHA]``));
    ``aliases`` are other spellings of the flag.

    :mod:`bitalloc.cliconfig` builds the argparse options from these."""
    extra = {"flag": flag, "kind": kind, "metavar": metavar, "dest": dest}
    extra["aliases"] = list(aliases) or None
    extra = {key: value for key, value in extra.items() if value is not None}
    if isinstance(default, dict):
        return Field(default_factory=dict, description=help, json_schema_extra=extra)
    return Field(default, description=help, json_schema_extra=extra)


def positive(cls: type, value: float | int | None) -> float | int | None:
    """Field check: None, or a finite number > 0."""
    if value is not None and not (math.isfinite(value) and value > 0):
        shown = f"{value:g}" if isinstance(value, float) else repr(value)
        raise ValueError(f"must be > 0, got {shown}")
    return value


def _plain(value: Any) -> Any:
    # Paths are stored as text; QuantFormat / KVFormat objects by name (no torch import here).
    if isinstance(value, PurePath):
        return str(value)
    if type(value).__name__ in ("QuantFormat", "KVFormat"):
        return value.name
    return value


def _as_tuple(value: Any, *, commas: bool, pairs: bool = False) -> Any:
    value = _plain(value)
    if isinstance(value, str):
        if pairs:
            return value  # a pair-selection rule or a pairs file
        if commas:
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return (value,)  # one file
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        if pairs:
            return tuple(
                tuple(_plain(x) for x in v) if isinstance(v, list | tuple) else v for v in items
            )
        return tuple(items)
    return value


class Section(BaseModel):
    """Base of the config sections: strict, frozen, no unknown keys; a problem is a
    :class:`ConfigError` naming the option, never pydantic's own error."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    #: The section's name in :class:`AllocateConfig` ("" for the top level).
    section: ClassVar[str] = ""
    #: Fields given as a sequence: comma strings split, text files, unit pairs.
    commas: ClassVar[tuple[str, ...]] = ()
    files: ClassVar[tuple[str, ...]] = ()
    pairs: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        _SECTION_CLASSES[cls.section] = cls

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise to_config_error(exc, FLAT_NAMES, prefix=self.section) from None

    # Only a direct call comes here: nested sections are validated by pydantic itself, so that
    # every problem of a config is collected and named by the caller's ``names``.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    def __setattr__(self, name: str, value: Any) -> None:
        raise ConfigError(
            f"{name}: a config is frozen; make a changed copy with with_flat({name}=...)"
        )

    @model_validator(mode="before")
    @classmethod
    def _normalize(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        out = {}
        for key, value in data.items():
            if key in cls.commas or key in cls.files or key in cls.pairs:
                value = _as_tuple(value, commas=key in cls.commas, pairs=key in cls.pairs)
            elif not isinstance(value, (Mapping, Section)):
                value = _plain(value)
            out[key] = value
        return out


def _suggest(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    if close:
        return f"did you mean {' or '.join(close)}?"
    return f"choose from {', '.join(sorted(choices))}"


def check_known(
    kw: Mapping[str, Any], table: Mapping[str, Any], where: str, also: Iterable[str] = ()
) -> None:
    """Raise :class:`ConfigError` for a keyword not in ``table``, naming the close matches."""
    unknown = [name for name in kw if name not in table]
    if unknown:
        choices = [*table, *also]
        raise ConfigError(
            "; ".join(f"{where} has no option {n!r}; {_suggest(n, choices)}" for n in unknown)
        )


def _section_fields(section: str) -> list[str]:
    model = _SECTION_CLASSES.get(section)
    return [] if model is None else list(model.model_fields)


def to_config_error(
    exc: ValidationError, names: Mapping[tuple[str, str], str], prefix: str = ""
) -> ConfigError:
    """One :class:`ConfigError` for pydantic's errors, one clause per problem, each naming the
    option through ``names`` ((section, field) -> what the user wrote)."""
    problems = []
    for err in exc.errors():
        loc = tuple(str(part) for part in err["loc"])
        if prefix:
            loc = (prefix, *loc)
        key = loc[:2] if len(loc) >= 2 and loc[0] in ALL_SECTIONS else ("", *loc[:1])
        name = names.get(key) or ".".join(loc) or "config"
        message = err["msg"]
        if err["type"] == "value_error":
            message = message.removeprefix("Value error, ")
        elif err["type"] == "extra_forbidden":
            section = loc[0] if len(loc) >= 2 else ""
            message = f"not an option; {_suggest(loc[-1], _section_fields(section))}"
        else:
            shown = repr(err.get("input"))
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            message = f"{message[:1].lower()}{message[1:]}, got {shown}"
        problems.append(f"{name}: {message}")
    return ConfigError("; ".join(problems))
