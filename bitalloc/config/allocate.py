""":class:`AllocateConfig`: every option of ``allocate()``, its keywords (:data:`FLAT_FIELDS`),
the rules between options and the config files."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, ValidationError, model_validator

from bitalloc.config.base import ALL_SECTIONS, Section, check_known, option, to_config_error
from bitalloc.config.messages import (
    CALIBRATION_TOKENS,
    CONFIG_VERSION,
    CONTEXT_BATCH,
    DEFAULT_KV_TOKENS,
    FOLDING_KV_ONLY,
    IMATRIX_FOLDING,
    INTERACTIONS_WITH_PROFILE,
    JOINT_NEEDS_NATS,
    KV_WITHOUT_BUDGET,
    MEMORY_ALONE,
    MEMORY_NEEDS_CONTEXT,
    NATS_METHODS,
    NO_BUDGET,
    POLICY_NEEDS_RL,
    PREDATES_CONFIG,
    RL_NO_KV,
)
from bitalloc.config.names import FLAT_FIELDS, FLAT_NAMES
from bitalloc.config.sections import (
    DataConfig,
    KVConfig,
    ProfileConfig,
    SolveConfig,
    TargetConfig,
    VerifyConfig,
)
from bitalloc.errors import BitallocError, ConfigError
from bitalloc.fileio import parse_json, read_json_object, write_json_atomic


class AllocateConfig(Section):
    """Every option of :func:`bitalloc.allocator.allocate`, in sections (see the module)."""

    section: ClassVar[str] = ""

    model: str | None = option(
        None,
        "--model",
        "Hugging Face directory (safetensors) or .gguf file "
        "(default: the embedded SmolLM2-135M-Instruct)",
    )
    data: DataConfig = Field(default_factory=DataConfig)
    target: TargetConfig = Field(default_factory=TargetConfig)
    profile: ProfileConfig = Field(default_factory=ProfileConfig)
    solve: SolveConfig = Field(default_factory=SolveConfig)
    verify: VerifyConfig = Field(default_factory=VerifyConfig)
    kv: KVConfig = Field(default_factory=KVConfig)
    progress: bool = option(True, "--quiet", "no progress bars", kind="invert")

    @model_validator(mode="after")
    def _rules(self) -> AllocateConfig:
        """The rules between options, in the order the work would meet them."""
        kv, target, prof = self.kv, self.target, self.profile
        if not kv.requested:
            given = [
                name
                for name, value in (("context_len", kv.context_len), ("kv_formats", kv.formats))
                if value is not None
            ]
            if given or kv.batch_size != 1:
                raise ConfigError(KV_WITHOUT_BUDGET.format(given=", ".join(given) or "batch_size"))
        else:
            if kv.joint and (
                target.avg_bits is not None or kv.avg_bits is not None or target.max_bytes
            ):
                raise ConfigError(MEMORY_ALONE)
            if kv.joint and kv.context_len is None:
                raise ConfigError(MEMORY_NEEDS_CONTEXT)
            if self.solve.solver == "rl":
                raise ConfigError(RL_NO_KV)
            if not kv.joint and target.avg_bits is None and prof.scale_folding is not None:
                raise ConfigError(FOLDING_KV_ONLY)
            if kv.joint and kv.profiler not in NATS_METHODS:
                raise ConfigError(JOINT_NEEDS_NATS.format(methods=NATS_METHODS, method=kv.profiler))
            context = 1 if kv.context_len is None else kv.context_len
            for what, value in (("context_len", context), ("batch_size", kv.batch_size)):
                if value < 1:
                    raise ConfigError(CONTEXT_BATCH.format(what=what, value=value))
            tokens = DEFAULT_KV_TOKENS if kv.tokens is None else kv.tokens
            if tokens < 1:
                raise ConfigError(CALIBRATION_TOKENS.format(value=tokens))
        if target.imatrix is not None and prof.scale_folding is not None:
            raise ConfigError(IMATRIX_FOLDING)
        if target.avg_bits is None and target.max_file_bytes is None and not kv.requested:
            raise ConfigError(NO_BUDGET)
        if prof.profile is None:
            from bitalloc.sensitivity import profiler_class

            profiler_class(prof.profiler, ConfigError)
        elif prof.interactions is not None:
            raise ConfigError(INTERACTIONS_WITH_PROFILE)
        solver = self.solve.solver
        if self.solve.policy is not None and solver != "rl":
            # allocate() names the method the solver falls back to.
            with_terms = prof.interactions is not None or prof.interactions_from is not None
            default = "qp" if with_terms else "lagrangian"
            raise ConfigError(POLICY_NEEDS_RL.format(solver=solver or default))
        return self

    # ------------------------------------------------------------- flat keywords

    @classmethod
    def from_flat(cls, **kw: Any) -> AllocateConfig:
        """The config from ``allocate()``'s keywords (defaults for the rest)."""
        return cls.build(_nest(kw, FLAT_FIELDS, "allocate()"))

    def with_flat(self, **kw: Any) -> AllocateConfig:
        """This config with ``allocate()`` keywords on top."""
        return type(self).build(merge_data(self.model_dump(), _nest(kw, FLAT_FIELDS, "allocate()")))

    def to_flat(self) -> dict[str, Any]:
        """``allocate()``'s keywords for this config (the inverse of :meth:`from_flat`)."""
        out = {name: _get(self, path) for name, path in FLAT_FIELDS.items()}
        for name in ("solver_options", "profiler_options"):
            out[name] = dict(out[name])
        # allocate() spells "no folding" False.
        out["scale_folding"] = False if out["scale_folding"] is None else out["scale_folding"]
        return out

    @classmethod
    def build(
        cls, data: Mapping[str, Any], names: Mapping[tuple[str, str], str] | None = None
    ) -> AllocateConfig:
        """Validate nested ``data``; a problem is a :class:`ConfigError` naming each option as
        ``names`` maps (section, field) to it (default: the ``allocate()`` keyword)."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise to_config_error(exc, names or FLAT_NAMES) from None

    # ------------------------------------------------------------- files

    def to_json_dict(self) -> dict[str, Any]:
        """The config as JSON values, with its ``version``."""
        try:
            # Checked on the Python values: pydantic's JSON mode would write NaN as null.
            json.dumps(self.model_dump(), allow_nan=False)
        except (TypeError, ValueError) as exc:
            # An option value such as an array, a callable or NaN.
            reason = str(exc).splitlines()[0][:120]
            raise ConfigError(
                f"this config holds an option value that is not JSON ({reason}); pass such "
                "values to allocate() directly instead of saving them"
            ) from None
        data = self.model_dump(mode="json")
        return {"version": CONFIG_VERSION, **data}

    def save(self, path: str | Path) -> Path:
        """Write the config as JSON, atomically."""
        return write_json_atomic(path, self.to_json_dict())

    @classmethod
    def from_json_dict(cls, raw: Mapping[str, Any], where: str = "config") -> AllocateConfig:
        """The config from a dict :meth:`to_json_dict` wrote (or an allocation holding one)."""
        return cls.build(config_data(raw, where))

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "config") -> AllocateConfig:
        """The config from JSON text, parsed strictly."""
        raw = parse_json(text, where)
        if not isinstance(raw, dict):
            raise ConfigError(f"{where} is not a JSON object; it is not a config")
        return cls.from_json_dict(raw, where)

    @classmethod
    def load(cls, path: str | Path) -> AllocateConfig:
        """A config JSON file, or an allocation JSON that recorded the config it was made with."""
        return cls.build(read_config_data(path))


def call_arguments(
    model: Any, config: Any, flat: dict[str, Any]
) -> tuple[AllocateConfig | None, dict[str, Any]]:
    """``allocate(model, config, **kw)`` and ``search(...)`` read their first two arguments
    the same way: a number as ``config`` is ``avg_bits``, a path as ``model`` is the ``model``
    option. Returns the config given (or None) and the keywords with those two folded in."""
    flat = dict(flat)
    if isinstance(config, (int, float)) and not isinstance(config, bool):
        flat.setdefault("avg_bits", config)
        config = None
    if isinstance(model, (str, Path)):
        flat.setdefault("model", str(model))
    if config is not None and not isinstance(config, AllocateConfig):
        raise BitallocError(
            f"config must be an AllocateConfig or avg_bits (a number of bits per weight), not "
            f"{type(config).__name__}"
        )
    return config, flat


def config_data(raw: Mapping[str, Any], where: str = "config") -> dict[str, Any]:
    """The nested option values of a config JSON object (its ``version`` checked), or of the
    ``"config"`` an allocation JSON recorded; not yet validated, so that more options can be
    put on top first."""
    if "version" not in raw and "config" in raw:
        raw = raw["config"]
        if raw is None:
            raise ConfigError(f"{where}: {PREDATES_CONFIG}")
        if not isinstance(raw, Mapping):
            raise ConfigError(f'{where}: its "config" is not a JSON object; fix the file')
    elif "version" not in raw and {"units", "avg_bits", "budget"} <= raw.keys():
        raise ConfigError(f"{where}: {PREDATES_CONFIG}")
    data = dict(raw)
    version = data.pop("version", None)
    if version != CONFIG_VERSION:
        raise ConfigError(
            f"{where} is config version {version!r}; this bitalloc reads version "
            f"{CONFIG_VERSION} (write it again with `bitalloc allocate --save-config FILE`)"
        )
    return data


def read_config_data(path: str | Path) -> dict[str, Any]:
    """:func:`config_data` of a config or allocation JSON file, read strictly."""
    return config_data(read_json_object(path, "config"), f"config file {path}")


def _get(config: Section, path: tuple[str, str]) -> Any:
    section, name = path
    return getattr(getattr(config, section) if section else config, name)


def _nest(kw: Mapping[str, Any], table: Mapping[str, tuple[str, str]], where: str) -> dict:
    """Flat keywords as nested ``{section: {field: value}}`` (checked against ``table``)."""
    check_known(kw, table, where)
    out: dict[str, Any] = {}
    for name, value in kw.items():
        section, field = table[name]
        if section:
            out.setdefault(section, {})[field] = value
        else:
            out[field] = value
    return out


def merge_data(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Nested option values ``update`` put on top of ``base``, section by section."""
    out = dict(base)
    for key, value in update.items():
        nested = isinstance(value, Mapping) and isinstance(out.get(key), Mapping)
        if nested and key in ALL_SECTIONS:
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out
