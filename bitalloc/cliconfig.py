"""Command-line options derived from the config fields (:mod:`bitalloc.config`).

Each config field that is a flag carries its flag, help text and kind in its definition;
:func:`add_config_arguments` turns them into argparse options (so no subcommand defines a
shared flag by hand) and :func:`config_from_args` turns what the user typed back into a config,
on top of a ``--config FILE`` when one is given: only the flags actually given override.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from pydantic.fields import FieldInfo

from bitalloc.cliargs import parse_options, parse_size
from bitalloc.config import (
    FLAT_FIELDS,
    SEARCH_FLAT_FIELDS,
    AllocateConfig,
    SearchConfig,
    Section,
    merge_data,
    read_config_data,
)
from bitalloc.errors import ConfigError

#: Every option name (``allocate()`` and ``search()`` keywords) -> (section, field).
OPTION_FIELDS: dict[str, tuple[str, str]] = {**FLAT_FIELDS, **SEARCH_FLAT_FIELDS}
#: Namespace attribute holding ``dest -> (section, field, kind, flag)`` of the flags given.
GIVEN = "config_given"

#: The options most subcommands share, and those of each group of ``bitalloc allocate``.
COMMON = ("model", "target", "formats", "clipping", "calibration", "evaluation", "seq_len")
COMMON += ("imatrix", "progress")
BUDGET = ("avg_bits", "max_bytes", "max_file_bytes")
KV = ("kv_avg_bits", "memory_bytes", "context_len", "batch_size", "kv_formats")
KV += ("kv_profiler", "kv_tokens")
MEASURING = ("workers", "ray_address", "interactions")
SOLVER = ("solver", "ties", "solver_options")
REPAIR = ("verify", "repair", "repair_budget", "repair_tolerance", "repair_groups")
REPAIR += ("repair_tokens",)


def section_model(section: str) -> type[Section]:
    """The pydantic model of a section name ("" is :class:`AllocateConfig` itself)."""
    if section == "":
        return AllocateConfig
    if section == "search":
        return SearchConfig
    return AllocateConfig.model_fields[section].annotation


def field_info(name: str) -> FieldInfo:
    """The field of an option name."""
    section, field = OPTION_FIELDS[name]
    return section_model(section).model_fields[field]


def option_spec(name: str) -> dict[str, Any]:
    """Flag, help, kind (and metavar / dest) of an option name; an error when it has no flag."""
    info = field_info(name)
    extra = info.json_schema_extra
    if not isinstance(extra, dict) or "flag" not in extra:
        raise ConfigError(f"option {name!r} has no command-line flag")
    spec = {"help": info.description, **extra}
    spec.setdefault("dest", spec["flag"].removeprefix("--").replace("-", "_"))
    return spec


def flag_names() -> dict[tuple[str, str], str]:
    """(section, field) -> its flag, for every option that has one (errors name the flags)."""
    out = {}
    for name, path in OPTION_FIELDS.items():
        extra = field_info(name).json_schema_extra
        if isinstance(extra, dict) and "flag" in extra:
            out[path] = str(extra["flag"])
    return out


def _value_type(annotation: Any) -> tuple[Any, tuple[str, ...] | None]:
    """argparse ``type`` and ``choices`` for a field annotation (None / str: plain text)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = args[0]
    if typing.get_origin(annotation) is Literal:
        return None, tuple(typing.get_args(annotation))
    if annotation in (int, float):
        return annotation, None
    return None, None


class _ConfigAction(argparse.Action):
    """Stores a config flag like the plain action would, and records that it was given."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        self.path = kwargs.pop("path")
        self.kind = kwargs.pop("kind")
        super().__init__(option_strings, dest, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if self.nargs == 0:
            value = self.const
        elif self.kind == "options":
            value = [*(getattr(namespace, self.dest, None) or []), values]
        else:
            value = values
        setattr(namespace, self.dest, value)
        given = namespace.__dict__.setdefault(GIVEN, {})
        given[self.dest] = (*self.path, self.kind, self.option_strings[0])


def _expand(names: Iterable[str]) -> list[str]:
    out = []
    for name in names:
        if name in OPTION_FIELDS:
            out.append(name)
            continue
        fields = [n for n, (section, _) in OPTION_FIELDS.items() if section == name]
        if not fields:
            raise ConfigError(f"no config section or option {name!r}")
        out += [n for n in fields if "flag" in (field_info(n).json_schema_extra or {})]
    return out


def add_config_arguments(
    parser: Any,
    sections: Iterable[str],
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Add the flags of ``sections`` (section names, or option names such as ``avg_bits``) to
    ``parser`` (a parser or an argument group). ``overrides`` changes, per option name, what
    a subcommand says differently: ``flag``, ``help``, ``required``, ``metavar``, ``dest``."""
    overrides = overrides or {}
    for name in _expand(sections):
        spec = {**option_spec(name), **overrides.get(name, {})}
        info = field_info(name)
        kind = spec["kind"]
        kwargs: dict[str, Any] = {
            "dest": spec["dest"],
            "help": spec["help"],
            "action": _ConfigAction,
            "path": OPTION_FIELDS[name],
            "kind": kind,
        }
        for key in ("metavar", "required"):
            if key in spec:
                kwargs[key] = spec[key]
        if kind in ("switch", "invert"):
            kwargs.update(nargs=0, const=True, default=False)
        elif kind == "files":
            kwargs.update(nargs="+", default=None)
            kwargs.setdefault("metavar", "FILE")
        elif kind == "options":
            kwargs.update(default=[])
            kwargs.setdefault("metavar", "KEY=VALUE")
        elif kind == "alpha":
            kwargs.update(nargs="?", type=float, const=0.5, default=None)
        elif kind == "size":
            kwargs.update(default=None)
        else:
            value_type, choices = _value_type(info.annotation)
            kwargs.update(default=info.get_default(call_default_factory=True))
            if value_type is not None:
                kwargs["type"] = value_type
            if choices is not None:
                kwargs["choices"] = choices
        parser.add_argument(spec["flag"], *spec.get("aliases", ()), **kwargs)


def config_file_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` and ``--save-config FILE``."""
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="start from this config JSON (from --save-config) or the config an allocation "
        "JSON recorded; the flags given go on top",
    )
    parser.add_argument(
        "--save-config",
        default=None,
        metavar="FILE",
        help="write the resolved config as JSON (to rerun with --config FILE) and continue",
    )


def _cli_value(kind: str, value: Any) -> Any:
    if kind == "switch":
        return True
    if kind == "invert":
        return False
    if kind == "size":
        return parse_size(value)
    if kind == "options":
        return parse_options(value)
    return value


def given_data(args: argparse.Namespace, sections: Iterable[str]) -> dict[str, Any]:
    """Nested option values of the config flags given on the command line, for the sections
    named (``""`` the top level)."""
    wanted = set(sections)
    out: dict[str, Any] = {}
    for dest, (section, field, kind, _) in getattr(args, GIVEN, {}).items():
        if section not in wanted:
            continue
        value = _cli_value(kind, getattr(args, dest))
        if section:
            out.setdefault(section, {})[field] = value
        else:
            out[field] = value
    return out


def _names(args: argparse.Namespace) -> dict[tuple[str, str], str]:
    names = flag_names()
    for section, field, _, flag in getattr(args, GIVEN, {}).values():
        names[(section, field)] = flag
    return names


def _with_options(base: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """``merge_data``, except that KEY=VALUE options add to the file's instead of replacing."""
    merged = merge_data(base, given)
    for section in ("profile", "solve"):
        old = base.get(section, {}).get("options")
        new = given.get(section, {}).get("options")
        if isinstance(old, Mapping) and new is not None:
            merged[section] = {**merged[section], "options": {**old, **new}}
    return merged


def _file_data(args: argparse.Namespace) -> dict[str, Any]:
    path = getattr(args, "config", None)
    return {} if path is None else read_config_data(path)


_ALLOCATE_SECTIONS = ("", "data", "target", "profile", "solve", "verify", "kv")


def config_from_args(args: argparse.Namespace) -> AllocateConfig:
    """The :class:`AllocateConfig` the command line describes: ``--config FILE`` (when given),
    then the flags given on top; problems name the flags."""
    data = dict(_file_data(args))
    data.pop("search", None)
    data = _with_options(data, given_data(args, _ALLOCATE_SECTIONS))
    return AllocateConfig.build(data, _names(args))


def search_config_from_args(args: argparse.Namespace) -> SearchConfig:
    """The :class:`SearchConfig` of the command line (``--config FILE``'s ``search`` first)."""
    base = _file_data(args).get("search") or {}
    if not isinstance(base, Mapping):
        raise ConfigError(f'config file {args.config}: its "search" is not a JSON object')
    data = {**base, **given_data(args, ("search",)).get("search", {})}
    return SearchConfig.build(data, _names(args))


def save_config(path: str | None, data: dict) -> None:
    """``--save-config``: write the resolved config (checked to be writable first)."""
    if path is not None:
        from bitalloc.fileio import write_json_atomic
        from bitalloc.outputs import check_output_file

        check_output_file(path, "--save-config", example="config.json")
        write_json_atomic(path, data)
        print(f"wrote {path}")
