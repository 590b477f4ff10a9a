"""Kernels that apply an allocation for real: bit packing, the quantized linear layer, its CPU
paths and the Triton kernels it uses on a GPU.

A leaf package: it imports formats and errors, nothing above them.
"""

from __future__ import annotations

from bitalloc.lazy import lazy_exports

_EXPORTS = {
    "PackedWeight": "bitalloc.kernels.packing",
    "pack_codes": "bitalloc.kernels.packing",
    "unpack_codes": "bitalloc.kernels.packing",
    "QuantLinear": "bitalloc.kernels.quant_linear",
    "Float16Linear": "bitalloc.kernels.quant_linear",
    "measure_paths": "bitalloc.kernels.cpu",
    "quant_matmul": "bitalloc.kernels.triton_kernels",
    "triton_available": "bitalloc.kernels.triton_kernels",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports("bitalloc.kernels", globals(), _EXPORTS)
