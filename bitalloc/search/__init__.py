"""Measured search: candidate allocations evaluated (in parallel on Ray) and stored in a
resumable Optuna study. See :func:`bitalloc.search.run.search`.

Names are imported on first use, so that the CLI can register ``bitalloc search`` without
importing torch.
"""

from __future__ import annotations

from bitalloc.lazy import lazy_exports

_EXPORTS = {
    "DEFAULT_STUDY": "bitalloc.search.storage",
    "SAMPLERS": "bitalloc.search.run",
    "SPACES": "bitalloc.search.run",
    "SearchResult": "bitalloc.search.run",
    "default_run_dir": "bitalloc.search.storage",
    "search": "bitalloc.search.run",
    "search_space": "bitalloc.search.run",
    "default_storage_url": "bitalloc.search.storage",
    "open_storage": "bitalloc.search.storage",
    "METRIC_NAMES": "bitalloc.search.study",
    "pareto_front": "bitalloc.search.study",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports("bitalloc.search", globals(), _EXPORTS)
