"""The palette: quantization formats a unit may take, their exact storage cost, and
quantize / dequantize.

- :mod:`~bitalloc.formats.base`: the :class:`Format` contract every weight format meets, and
  :class:`CacheFormat`, its sibling for KV caches.
- :mod:`~bitalloc.formats.registry`: format families by name; :func:`parse_format` and
  :func:`default_palette` ask every registered family.
- :mod:`~bitalloc.formats.integer`: the first two families, ``int`` (``int{b}-g{g}``) and
  ``float`` (``fp16``), both as :class:`QuantFormat`.
- :mod:`~bitalloc.formats.encoding`: a weight's packed stored form, for checking costs.
- :mod:`~bitalloc.formats.palette`: palettes from names of any family.

Formats are a leaf: they import nothing from bitalloc but :mod:`bitalloc.errors`.
"""

from __future__ import annotations

from bitalloc.formats.base import CacheFormat, Format, check_importance
from bitalloc.formats.codebook import CodebookFamily, LloydMaxFormat, NormalFloatFormat
from bitalloc.formats.ct import CTFamily, CTFormat
from bitalloc.formats.encoding import Encoded, Section
from bitalloc.formats.fp import FPFamily, FPFormat
from bitalloc.formats.gguf import GGUFFamily, GGUFFormat
from bitalloc.formats.gptq import GPTQFamily, GPTQFormat
from bitalloc.formats.integer import (
    EXTRA_GROUP_SIZES,
    SCALE_ZERO_BITS,
    SUPPORTED_BITS,
    SUPPORTED_GROUP_SIZES,
    FloatFamily,
    IntFamily,
    QuantFormat,
    QuantizedWeight,
    dequantize,
    fake_quantize_each,
    quantize_each,
)
from bitalloc.formats.palette import parse_format_list, parse_palette
from bitalloc.formats.registry import (
    REGISTRY,
    FormatFamily,
    FormatRegistry,
    default_palette,
    format_families,
    get_family,
    parse_format,
    register_family,
    registered_family,
    unregister_family,
)
from bitalloc.formats.rotation import RHTFamily, RotatedFormat
from bitalloc.formats.trellis import TrellisFamily, TrellisFormat
from bitalloc.formats.vq import VectorFormat

# The built-in families, registered once when formats are first imported.
register_family(IntFamily())
register_family(FloatFamily())
register_family(GGUFFamily())
register_family(CTFamily())
register_family(FPFamily())
register_family(CodebookFamily())
register_family(GPTQFamily())
register_family(RHTFamily())
register_family(TrellisFamily())

__all__ = [
    "EXTRA_GROUP_SIZES",
    "REGISTRY",
    "SCALE_ZERO_BITS",
    "SUPPORTED_BITS",
    "SUPPORTED_GROUP_SIZES",
    "CTFamily",
    "CodebookFamily",
    "CTFormat",
    "CacheFormat",
    "Encoded",
    "FPFamily",
    "FPFormat",
    "FloatFamily",
    "Format",
    "FormatFamily",
    "FormatRegistry",
    "GGUFFamily",
    "GGUFFormat",
    "GPTQFamily",
    "GPTQFormat",
    "IntFamily",
    "LloydMaxFormat",
    "NormalFloatFormat",
    "QuantFormat",
    "QuantizedWeight",
    "RHTFamily",
    "RotatedFormat",
    "Section",
    "TrellisFamily",
    "TrellisFormat",
    "VectorFormat",
    "check_importance",
    "default_palette",
    "dequantize",
    "fake_quantize_each",
    "format_families",
    "get_family",
    "parse_format",
    "parse_format_list",
    "parse_palette",
    "quantize_each",
    "register_family",
    "registered_family",
    "unregister_family",
]
