"""The sections of :class:`~bitalloc.config.AllocateConfig`: data, target, profile, solve,
verify and kv."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import field_validator, model_validator

from bitalloc.config.base import Section, option, positive
from bitalloc.config.messages import (
    ALPHA_NOT_NUMBER,
    ALPHA_RANGE,
    DEFAULT_ALPHA,
    DEFAULT_EVAL_TOKENS,
    DEFAULT_KV_METHOD,
    DEFAULT_PROFILER,
    DEFAULT_REPAIR_BUDGET,
    DEFAULT_REPAIR_GROUPS,
    DEFAULT_REPAIR_TOKENS,
    DEFAULT_REPAIR_TOLERANCE,
    DEFAULT_SEQ_LEN,
    REPAIR_BUDGET,
    REPAIR_TOLERANCE,
)
from bitalloc.errors import BitallocError, ConfigError


class DataConfig(Section):
    """Text and token counts: what is profiled on and what is measured on."""

    section: ClassVar[str] = "data"
    files: ClassVar[tuple[str, ...]] = ("calibration", "evaluation")

    calibration: tuple[str, ...] | None = option(
        None,
        "--calibration",
        "calibration text files (default: pydoc_data.topics calibration split)",
        kind="files",
    )
    evaluation: tuple[str, ...] | None = option(
        None,
        "--evaluation",
        "evaluation text files (default: pydoc_data.topics evaluation split)",
        kind="files",
    )
    seq_len: int = option(DEFAULT_SEQ_LEN, "--seq-len", "tokens per window (default 512)")
    calibration_tokens: int | None = option(
        None,
        "--calibration-tokens",
        "calibration tokens for profiling (default per profiler: fisher 8192)",
    )
    eval_tokens: int | None = option(
        DEFAULT_EVAL_TOKENS,
        "--eval-tokens",
        "evaluation tokens for --verify (default 4096 = 8 windows of 512)",
    )

    _positive = field_validator("seq_len", "calibration_tokens", "eval_tokens")(positive)


class TargetConfig(Section):
    """The weight budget and what it is spent on."""

    section: ClassVar[str] = "target"
    commas: ClassVar[tuple[str, ...]] = ("formats", "ties")

    avg_bits: float | None = option(
        None,
        "--avg-bits",
        "budget: average stored bits per weight of the allocated matrices",
    )
    max_bytes: float | None = option(
        None,
        "--max-bytes",
        "budget: stored bytes of the allocated matrices (codes, scales, zeros)",
    )
    target: Literal["bitalloc", "gguf", "ct"] = option(
        "bitalloc",
        "--target",
        "where the allocation runs: bitalloc (default; its own int formats and packed "
        "kernels), gguf (llama.cpp types, for `bitalloc export --out model.gguf`) or ct "
        "(compressed-tensors schemes for vLLM, q/k/v and gate/up tied as vLLM fuses them); "
        "picks the default palette and how tensors outside the allocation are stored",
    )
    max_file_bytes: float | None = option(
        None,
        "--file-size",
        "budget: bytes of the whole exported file (e.g. 90MiB), counting every tensor and "
        "the metadata; needs --target gguf or ct",
        kind="size",
        metavar="SIZE",
        dest="file_size",
        aliases=("--max-file-bytes",),
    )
    formats: tuple[str, ...] | None = option(
        None,
        "--formats",
        "comma-separated palette, e.g. int2-g64,int3-g128,int4-g128,fp16 "
        "(default: the target's palette; for bitalloc int{2,3,4,5,6,8}-g{32,64,128} and fp16)",
    )
    ties: tuple[str, ...] | None = option(
        None,
        "--tie",
        "tie fused projections to one format: qkv, gateup or qkv,gateup",
        metavar="KINDS",
        dest="tie",
    )
    clipping: Literal["weighted", "mse"] = option(
        "weighted",
        "--clipping",
        "what each group's clipping search minimises: weighted (default; squared error "
        "weighted by each input column's mean squared activation on the calibration text, the "
        "statistic of llama.cpp's importance matrix) or mse (plain squared weight error)",
    )
    imatrix: str | None = option(
        None,
        "--imatrix",
        "weight the clipping with this llama.cpp importance matrix (llama-imatrix's .gguf or "
        ".dat file) instead of gathering one from the calibration text",
        metavar="FILE",
    )

    _positive = field_validator("avg_bits", "max_bytes", "max_file_bytes")(positive)

    @model_validator(mode="after")
    def _target_rules(self) -> TargetConfig:
        from bitalloc.targets import check_target_palette

        if self.max_file_bytes is not None and self.target == "bitalloc":
            raise ValueError(
                "a file-size budget (--file-size) counts an exported file: pass --target gguf "
                "or --target ct with it"
            )
        if self.imatrix is not None and self.clipping != "weighted":
            raise ValueError(
                "an importance matrix (--imatrix) weights the clipping: leave --clipping at "
                "weighted"
            )
        if self.formats is not None:
            try:
                check_target_palette(self.target, self.formats)
            except BitallocError as exc:
                raise ValueError(str(exc)) from None
        return self

    @field_validator("formats")
    @classmethod
    def _palette(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None:
            from bitalloc.formats import parse_palette

            try:
                parse_palette(value)
            except BitallocError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("ties")
    @classmethod
    def _ties(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None:
            from bitalloc.planning import parse_ties

            try:
                parse_ties(value)
            except BitallocError as exc:
                raise ValueError(str(exc)) from None
        return value


class ProfileConfig(Section):
    """How sensitivity is profiled (or where a saved profile is)."""

    section: ClassVar[str] = "profile"
    pairs: ClassVar[tuple[str, ...]] = ("interactions",)

    profiler: str = option(
        DEFAULT_PROFILER,
        "--profiler",
        "sensitivity profiler: fisher (default), hessian, output, kfac, kl, measured",
    )
    options: dict[str, Any] = option(
        {},
        "--profiler-option",
        "profiler option, repeatable (e.g. max_probes=32 for hessian)",
        kind="options",
        dest="profiler_option",
    )
    profile: str | None = option(
        None,
        "--profile",
        "reuse a saved profile (from `bitalloc profile`) instead of profiling",
        metavar="FILE",
    )
    interactions: str | tuple[tuple[str, str], ...] | None = option(
        None,
        "--interactions",
        "also measure pairwise terms: neighbours, top:K, or a file of 'unit_a,unit_b' lines",
        metavar="PAIRS",
    )
    interactions_from: str | None = option(
        None,
        "--interactions-from",
        "take interaction terms from this profile (combine with --profile or --profiler)",
        metavar="FILE",
    )
    workers: int = option(
        0,
        "--workers",
        "Ray workers for measured, kl and interactions (default 0: in this process)",
    )
    ray_address: str | None = option(
        None,
        "--ray-address",
        "Ray cluster to run the workers on (default $RAY_ADDRESS, else a local Ray)",
    )
    use_cache: bool = option(
        True, "--no-cache", "do not read or write cached profiles", kind="invert"
    )
    scale_folding: float | None = option(
        None,
        "--scale-folding",
        "scale-fold the model before profiling (move activation outliers into the weights, "
        "function unchanged) with migration strength ALPHA in (0, 1) (default 0.5); the "
        "allocation records the scales and `bitalloc apply` folds them in again",
        kind="alpha",
        metavar="ALPHA",
    )

    @field_validator("workers")
    @classmethod
    def _workers(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"must be >= 0 (0: in this process), got {value!r}")
        return value

    @field_validator("scale_folding", mode="before")
    @classmethod
    def _alpha(cls, value: Any) -> float | None:
        # allocate() takes True for the usual alpha and False for off.
        if value is None or value is False:
            return None
        if value is True:
            return DEFAULT_ALPHA
        if not isinstance(value, (int, float)):
            raise ValueError(ALPHA_NOT_NUMBER.format(alpha=value))
        if not 0.0 < float(value) < 1.0:
            raise ValueError(ALPHA_RANGE.format(alpha=float(value)))
        return float(value)


class SolveConfig(Section):
    """The solver that turns a profile into a choice per unit."""

    section: ClassVar[str] = "solve"

    solver: str | None = option(
        None,
        "--solver",
        "solver: lagrangian (default; qp when the profile has interaction terms), dp, ilp, "
        "qp, or any registered method",
    )
    options: dict[str, Any] = option(
        {},
        "--option",
        "solver option, repeatable (e.g. --option time_limit=30 --option backend=cp-sat); "
        "VALUE is read as JSON when it parses, else as a string",
        kind="options",
    )
    policy: str | None = option(
        None,
        "--policy",
        "apply this saved RL policy (with --solver rl) instead of training one",
        metavar="FILE",
    )


class VerifyConfig(Section):
    """Measuring the allocation against its prediction, and repairing it."""

    section: ClassVar[str] = "verify"

    enabled: bool = option(
        False,
        "--verify",
        "measure the allocation against its prediction, repair it when the two disagree, "
        "return the best measured of it, its repairs and the uniform allocations within the "
        "budget, and measure perplexity beside uniform baselines",
        kind="switch",
    )
    repair: bool = option(
        True, "--no-repair", "with --verify: measure only, never re-solve", kind="invert"
    )
    budget: int = option(
        DEFAULT_REPAIR_BUDGET,
        "--repair-budget",
        "evaluations verify-and-repair may spend (default 24)",
    )
    tolerance: float = option(
        DEFAULT_REPAIR_TOLERANCE,
        "--repair-tolerance",
        "accepted relative gap between measured and predicted loss, either way (default 0.1)",
    )
    tokens: int = option(
        DEFAULT_REPAIR_TOKENS,
        "--repair-tokens",
        "calibration tokens per repair measurement (default 2048)",
    )
    groups: Literal["unit", "layer"] = option(
        DEFAULT_REPAIR_GROUPS,
        "--repair-groups",
        "what repair measures to correct terms: each unit alone (default) or each layer",
    )

    _positive = field_validator("tokens")(positive)

    @model_validator(mode="after")
    def _repair(self) -> VerifyConfig:
        if self.budget < 2:
            raise ConfigError(REPAIR_BUDGET.format(budget=self.budget))
        if not self.tolerance >= 0:  # NaN too
            raise ConfigError(REPAIR_TOLERANCE.format(tolerance=self.tolerance))
        return self


class KVConfig(Section):
    """A KV-cache budget (bits per cached element), or one memory budget for weights and cache."""

    section: ClassVar[str] = "kv"
    commas: ClassVar[tuple[str, ...]] = ("formats",)

    avg_bits: float | None = option(
        None,
        "--kv-avg-bits",
        "also choose a (key bits, value bits) pair per attention layer: average stored "
        "bits per cached element (scales included) at --context-len; without --avg-bits the "
        "weights stay at fp16",
    )
    memory_bytes: float | None = option(
        None,
        "--memory",
        "one budget for weights + KV cache (e.g. 150MiB): weight formats and KV pairs are "
        "chosen together for --context-len tokens x --batch-size sequences (use it instead "
        "of --avg-bits / --kv-avg-bits)",
        kind="size",
        metavar="SIZE",
        dest="memory",
    )
    context_len: int | None = option(
        None,
        "--context-len",
        "tokens the KV cache must hold (needed with --memory; default --seq-len)",
    )
    batch_size: int = option(1, "--batch-size", "sequences the KV cache holds (default 1)")
    formats: tuple[str, ...] | None = option(
        None,
        "--kv-formats",
        "KV palette, e.g. K2V2,K4V2,K4V4,K8V4,K8V8 (default: all 16 pairs of 2/4/8/16 bits)",
    )
    profiler: Literal["kl", "loss", "proxy"] = option(
        DEFAULT_KV_METHOD,
        "--kv-profiler",
        "KV sensitivity measure (default kl; --memory needs kl or loss)",
    )
    tokens: int | None = option(None, "--kv-tokens", "KV profile calibration tokens (default 1024)")

    _positive = field_validator("avg_bits", "memory_bytes")(positive)

    @field_validator("formats")
    @classmethod
    def _palette(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None:
            from bitalloc.kv.formats import kv_palette

            try:
                kv_palette(value)
            except BitallocError as exc:
                raise ValueError(str(exc)) from None
        return value

    @property
    def requested(self) -> bool:
        """Whether a KV budget (``avg_bits`` or ``memory_bytes``) is given."""
        return self.avg_bits is not None or self.memory_bytes is not None

    @property
    def joint(self) -> bool:
        """Whether the budget is one memory budget for weights and KV cache."""
        return self.memory_bytes is not None
