""":class:`SearchConfig`: what the measured search adds to the allocation options, and
``search()``'s keywords split between the two configs."""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import ValidationError, ValidationInfo, field_validator

from bitalloc.config.allocate import FLAT_FIELDS, AllocateConfig
from bitalloc.config.base import Section, check_known, option, to_config_error
from bitalloc.errors import ConfigError

Sampler = Literal["nsga2", "tpe"]
Space = Literal["near", "full"]
#: The samplers and search spaces a search takes (one definition: the config's types).
SAMPLERS: tuple[str, ...] = typing.get_args(Sampler)
SPACES: tuple[str, ...] = typing.get_args(Space)


class SearchConfig(Section):
    """What the measured search adds to the allocation options (:func:`bitalloc.search.search`)."""

    section: ClassVar[str] = "search"

    trials: int = option(
        40,
        "--trials",
        "finished trials the study should hold (a resumed study continues to this count; "
        "default 40)",
    )
    sampler: Sampler = option("nsga2", "--sampler", "(default nsga2)")
    storage: str | None = option(
        None,
        "--storage",
        "Optuna storage: an RDB URL (sqlite:///FILE, postgresql://...) or journal:FILE "
        "(default: sqlite in the run directory)",
        metavar="URL",
    )
    study: str = option("bitalloc", "--study", "study name (default bitalloc)")
    run_dir: str | None = option(
        None,
        "--run-dir",
        "where the study (by default), profile, frontier and best allocation go "
        "(default runs/<study>)",
        metavar="DIR",
    )
    resume: bool = option(
        False, "--resume", "continue the existing study of that name", kind="switch"
    )
    space: Space = option(
        "near",
        "--space",
        "per-unit formats: near the solvers' answers (default) or the whole palette",
    )
    radius: int = option(1, "--radius", "palette steps around the seeds (default 1)")
    seed: int = option(0, "--seed", "sampler seed (default 0)")

    @field_validator("trials")
    @classmethod
    def _trials(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"trials must be >= 1, not {value}")
        return value

    @field_validator("sampler", "space", mode="before")
    @classmethod
    def _choice(cls, value: Any, info: ValidationInfo) -> Any:
        # The choices come from the Literal; the message is the search's own wording.
        allowed = typing.get_args(cls.model_fields[info.field_name].annotation)
        if value not in allowed:
            what = "search space" if info.field_name == "space" else "sampler"
            raise ValueError(f"{what} {value!r} is not one of {', '.join(allowed)}")
        return value

    @field_validator("radius")
    @classmethod
    def _radius(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"radius must be >= 0, not {value}")
        return value

    @field_validator("study")
    @classmethod
    def _study(cls, value: str) -> str:
        if not value:
            raise ValueError("give the study a name (--study NAME)")
        return value

    @classmethod
    def from_flat(cls, **kw: Any) -> SearchConfig:
        """The search's own options from ``search()``'s keywords of that kind."""
        check_known(kw, SEARCH_FLAT_FIELDS, "search()", also=SEARCH_SHARED)
        return cls.build({SEARCH_FLAT_FIELDS[name][1]: value for name, value in kw.items()})

    @classmethod
    def build(
        cls, data: Mapping[str, Any], names: Mapping[tuple[str, str], str] | None = None
    ) -> SearchConfig:
        """Validate ``data``; problems are a :class:`ConfigError` naming the options."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            default = {("search", name): name for name in cls.model_fields}
            raise to_config_error(exc, names or default, prefix="search") from None


SEARCH_FLAT_FIELDS: dict[str, tuple[str, str]] = {
    name: ("search", name) for name in SearchConfig.model_fields
}
#: ``search()`` keywords that are allocation options (the rest are :class:`SearchConfig`'s).
SEARCH_SHARED = (
    "model",
    "avg_bits",
    "solver",
    "profiler",
    "profile",
    "profiler_options",
    "formats",
    "calibration",
    "evaluation",
    "workers",
    "ray_address",
    "calibration_tokens",
    "eval_tokens",
    "seq_len",
    "use_cache",
    "progress",
)


def split_search_flat(**kw: Any) -> tuple[AllocateConfig, SearchConfig]:
    """``search()``'s keywords as the allocation config and the search's own config."""
    check_known(kw, {**SEARCH_FLAT_FIELDS, **dict.fromkeys(SEARCH_SHARED)}, "search()")
    shared = {name: value for name, value in kw.items() if name in SEARCH_SHARED}
    own = {name: value for name, value in kw.items() if name not in SEARCH_SHARED}
    return AllocateConfig.from_flat(**shared), SearchConfig.from_flat(**own)


def search_flat(config: AllocateConfig, search_config: SearchConfig) -> dict[str, Any]:
    """``search()``'s keywords for the two configs (the inverse of :func:`split_search_flat`).

    Allocation options the search has no use for must be at their defaults."""
    flat = config.to_flat()
    default = AllocateConfig.model_construct().to_flat()  # no validation: no budget needed
    unused = [
        name for name in FLAT_FIELDS if name not in SEARCH_SHARED and flat[name] != default[name]
    ]
    if unused:
        raise ConfigError(
            f"the measured search does not use {', '.join(unused)}; leave them out of its config"
        )
    out = {name: flat[name] for name in SEARCH_SHARED}
    out.update(search_config.model_dump())
    return out
