"""The flat keywords of ``allocate()`` and where each lives in :class:`AllocateConfig` (a leaf:
the sections' validation names options through it)."""

from __future__ import annotations

#: ``allocate()`` keyword -> (section, field) of :class:`AllocateConfig` ("" is the top level).
FLAT_FIELDS: dict[str, tuple[str, str]] = {
    "model": ("", "model"),
    "avg_bits": ("target", "avg_bits"),
    "profiler": ("profile", "profiler"),
    "solver": ("solve", "solver"),
    "ties": ("target", "ties"),
    "max_bytes": ("target", "max_bytes"),
    "target": ("target", "target"),
    "max_file_bytes": ("target", "max_file_bytes"),
    "imatrix": ("target", "imatrix"),
    "solver_options": ("solve", "options"),
    "profiler_options": ("profile", "options"),
    "formats": ("target", "formats"),
    "clipping": ("target", "clipping"),
    "calibration": ("data", "calibration"),
    "evaluation": ("data", "evaluation"),
    "verify": ("verify", "enabled"),
    "repair": ("verify", "repair"),
    "repair_budget": ("verify", "budget"),
    "repair_tolerance": ("verify", "tolerance"),
    "repair_tokens": ("verify", "tokens"),
    "repair_groups": ("verify", "groups"),
    "profile": ("profile", "profile"),
    "interactions": ("profile", "interactions"),
    "interactions_from": ("profile", "interactions_from"),
    "workers": ("profile", "workers"),
    "ray_address": ("profile", "ray_address"),
    "calibration_tokens": ("data", "calibration_tokens"),
    "eval_tokens": ("data", "eval_tokens"),
    "seq_len": ("data", "seq_len"),
    "use_cache": ("profile", "use_cache"),
    "progress": ("", "progress"),
    "policy": ("solve", "policy"),
    "scale_folding": ("profile", "scale_folding"),
    "kv_avg_bits": ("kv", "avg_bits"),
    "memory_bytes": ("kv", "memory_bytes"),
    "context_len": ("kv", "context_len"),
    "batch_size": ("kv", "batch_size"),
    "kv_formats": ("kv", "formats"),
    "kv_profiler": ("kv", "profiler"),
    "kv_tokens": ("kv", "tokens"),
}
#: (section, field) -> its ``allocate()`` keyword: how errors name options from Python.
FLAT_NAMES = {path: name for name, path in FLAT_FIELDS.items()}
