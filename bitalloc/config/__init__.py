"""One home for every option of ``allocate()`` and ``search()``: their defaults, their checks
and their command-line flags.

:class:`AllocateConfig` gathers the options in sections, in the order the work runs:

* ``data`` (:class:`DataConfig`): calibration / evaluation text, window length and token counts;
* ``target`` (:class:`TargetConfig`): the weight budget (average bits, bytes), the palette and
  ties of fused projections;
* ``profile`` (:class:`ProfileConfig`): the sensitivity profiler and its options, a saved
  profile, interaction terms, Ray workers, the profile cache and scale folding;
* ``solve`` (:class:`SolveConfig`): the solver, its options and an RL policy;
* ``verify`` (:class:`VerifyConfig`): measuring the allocation and repairing it;
* ``kv`` (:class:`KVConfig`): a KV-cache budget, alone or one memory budget for both;

plus the model and whether progress bars are drawn. :class:`SearchConfig` holds what only the
measured search adds (trials, sampler, study, ...).

Every value is checked when a config is built, and the rules between options (a memory budget
needs a context length, a policy needs the rl solver, ...) in ``AllocateConfig._rules``,
before any model is loaded. A problem is a :class:`~bitalloc.errors.ConfigError` naming the
option as the caller wrote it: the keyword (``avg_bits``) from Python, the flag
(``--avg-bits``) from the command line. ``allocate()``'s keywords map to the fields through the
one table :data:`FLAT_FIELDS`; the command line is derived from the fields' metadata
(:mod:`bitalloc.cliconfig`).

Modules: :mod:`~bitalloc.config.sections` (the sections), :mod:`~bitalloc.config.allocate`
(:class:`AllocateConfig`, its keywords, rules and files), :mod:`~bitalloc.config.search`,
:mod:`~bitalloc.config.base` (fields that are flags, error naming) and
:mod:`~bitalloc.config.messages` (defaults and the rules' messages).
"""

from __future__ import annotations

from bitalloc.config.allocate import (
    FLAT_FIELDS,
    FLAT_NAMES,
    AllocateConfig,
    call_arguments,
    config_data,
    merge_data,
    read_config_data,
)
from bitalloc.config.base import Section, check_known, option, to_config_error
from bitalloc.config.messages import (
    ALPHA_NOT_NUMBER,
    ALPHA_RANGE,
    CALIBRATION_TOKENS,
    CONFIG_VERSION,
    CONTEXT_BATCH,
    DEFAULT_ALPHA,
    DEFAULT_EVAL_TOKENS,
    DEFAULT_KV_METHOD,
    DEFAULT_KV_TOKENS,
    DEFAULT_PROFILER,
    DEFAULT_REPAIR_BUDGET,
    DEFAULT_REPAIR_GROUPS,
    DEFAULT_REPAIR_TOKENS,
    DEFAULT_REPAIR_TOLERANCE,
    DEFAULT_SEQ_LEN,
    FOLDING_KV_ONLY,
    INTERACTIONS_WITH_PROFILE,
    JOINT_NEEDS_NATS,
    KV_WITHOUT_BUDGET,
    MEMORY_ALONE,
    MEMORY_NEEDS_CONTEXT,
    NATS_METHODS,
    NO_BUDGET,
    POLICY_NEEDS_RL,
    PREDATES_CONFIG,
    REPAIR_BUDGET,
    REPAIR_TOLERANCE,
    RL_NO_KV,
    UNKNOWN_PROFILER,
)
from bitalloc.config.search import (
    SEARCH_FLAT_FIELDS,
    SEARCH_SHARED,
    SearchConfig,
    search_flat,
    split_search_flat,
)
from bitalloc.config.sections import (
    DataConfig,
    KVConfig,
    ProfileConfig,
    SolveConfig,
    TargetConfig,
    VerifyConfig,
)

__all__ = [
    "call_arguments",
    "ALPHA_NOT_NUMBER",
    "ALPHA_RANGE",
    "CONFIG_VERSION",
    "CONTEXT_BATCH",
    "DEFAULT_ALPHA",
    "DEFAULT_EVAL_TOKENS",
    "DEFAULT_KV_METHOD",
    "DEFAULT_KV_TOKENS",
    "DEFAULT_PROFILER",
    "DEFAULT_REPAIR_BUDGET",
    "DEFAULT_REPAIR_GROUPS",
    "DEFAULT_REPAIR_TOKENS",
    "DEFAULT_REPAIR_TOLERANCE",
    "DEFAULT_SEQ_LEN",
    "FLAT_FIELDS",
    "FLAT_NAMES",
    "INTERACTIONS_WITH_PROFILE",
    "JOINT_NEEDS_NATS",
    "CALIBRATION_TOKENS",
    "KV_WITHOUT_BUDGET",
    "MEMORY_ALONE",
    "MEMORY_NEEDS_CONTEXT",
    "NATS_METHODS",
    "NO_BUDGET",
    "POLICY_NEEDS_RL",
    "PREDATES_CONFIG",
    "REPAIR_BUDGET",
    "REPAIR_TOLERANCE",
    "RL_NO_KV",
    "FOLDING_KV_ONLY",
    "SEARCH_FLAT_FIELDS",
    "SEARCH_SHARED",
    "UNKNOWN_PROFILER",
    "AllocateConfig",
    "DataConfig",
    "KVConfig",
    "ProfileConfig",
    "SearchConfig",
    "Section",
    "SolveConfig",
    "TargetConfig",
    "VerifyConfig",
    "check_known",
    "config_data",
    "merge_data",
    "option",
    "read_config_data",
    "search_flat",
    "split_search_flat",
    "to_config_error",
]
