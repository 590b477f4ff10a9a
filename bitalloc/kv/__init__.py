"""KV-cache quantization: per-layer (key bits, value bits) formats in KIVI's layout, their exact
storage cost, KV units for allocation, and a transformers cache that applies them, on
full-attention, sliding-window and mixed sliding/global attention models.

The cache names are imported on first use: formats and storage accounting stay usable without
importing transformers (the rest of bitalloc also imports it only when a model is involved).
"""

from __future__ import annotations

import importlib
from typing import Any

from bitalloc.kv.formats import (
    KV_BITS,
    AttentionGeometry,
    KVFormat,
    KVUnit,
    attention_geometry,
    kv_palette,
    kv_units,
    parse_kv_format,
)
from bitalloc.kv.quantize import fake_quantize_kv, quantize_keys, quantize_values

_CACHE_NAMES = frozenset(
    {
        "QuantizedKVCache",
        "QuantizedKVLayer",
        "build_kv_cache",
        "generate_ids_with_kv",
        "generate_with_kv",
        "kv_perplexity",
        "resolve_formats",
    }
)


def __getattr__(name: str) -> Any:
    if name in _CACHE_NAMES:
        return getattr(importlib.import_module("bitalloc.kv.cache"), name)
    raise AttributeError(f"module 'bitalloc.kv' has no attribute {name!r}")


# Listed literally (linters read it); the cache names resolve through __getattr__ above.
__all__ = [
    "KV_BITS",
    "AttentionGeometry",
    "KVFormat",
    "KVUnit",
    "QuantizedKVCache",
    "QuantizedKVLayer",
    "attention_geometry",
    "build_kv_cache",
    "fake_quantize_kv",
    "generate_ids_with_kv",
    "generate_with_kv",
    "kv_palette",
    "kv_perplexity",
    "kv_units",
    "parse_kv_format",
    "quantize_keys",
    "quantize_values",
    "resolve_formats",
]


# KV sensitivity profiling and search-space reduction, also imported on first use: the profiler
# needs transformers (through the cache), and neither is needed to read formats.
_LAZY_MODULES = {
    "KVProfiler": "bitalloc.kv.profiler",
    "key_value_sensitivity": "bitalloc.kv.report",
    "kv_sensitivity_table": "bitalloc.kv.report",
    "Clustering": "bitalloc.kv.reduce",
    "Pruning": "bitalloc.kv.reduce",
    "Reduced": "bitalloc.kv.reduce",
    "SpaceSize": "bitalloc.kv.reduce",
    "cluster_layers": "bitalloc.kv.reduce",
    "intra_layer_pruning": "bitalloc.kv.reduce",
    "prune_dominated": "bitalloc.kv.reduce",
    "reduction_cost": "bitalloc.kv.reduce",
}
_cache_getattr = __getattr__


def __getattr__(name: str) -> Any:  # extends the lookup of the cache names above
    if name in _LAZY_MODULES:
        return getattr(importlib.import_module(_LAZY_MODULES[name]), name)
    return _cache_getattr(name)


__all__ += sorted(_LAZY_MODULES)
