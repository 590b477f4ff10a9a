"""A packed linear layer for a rotated format (``<format>+rht``).

A rotated format stores the int codes of ``W R`` (:mod:`bitalloc.formats.rotation`), so the
layer computes ``y = (x R) Q(W R)ᵀ + b``: a fast Hadamard transform of the input
(:class:`~bitalloc.formats.hadamard.Rotation`, ``in · log2(b)`` additions per row), then the
inner :class:`~bitalloc.kernels.quant_linear.QuantLinear` on whatever path it runs (Triton on a
GPU, any CPU path).

The inner layer is a registered submodule (``<unit>.inner``), so everything that walks a
model's :class:`QuantLinear` layers (``choose_cpu_paths``, ``cpu_path_report``, byte counts)
handles it as any other, and its tensors are saved as ``<unit>.inner.qweight`` etc. Nothing
else is stored: the rotation is rebuilt from the format's name, which holds the seed.
"""

from __future__ import annotations

import torch
from torch import nn

from bitalloc.errors import BitallocError
from bitalloc.formats.rotation import RotatedFormat
from bitalloc.kernels.quant_linear import QuantLinear, int_layout

#: The name of the inner :class:`QuantLinear` (its tensors are ``<unit>.inner.<tensor>``).
INNER = "inner"


class RotatedLinear(nn.Module):
    """``y = inner(x R)``: a rotated format's packed unit.

    ``inner`` holds the codes of ``W R`` (its ``format`` is the rotated format's base); ``fmt``
    is the rotated format, recorded as ``format`` for manifests and reports.
    """

    def __init__(self, inner: QuantLinear, fmt: RotatedFormat) -> None:
        super().__init__()
        if not isinstance(fmt, RotatedFormat):
            raise BitallocError(f"a RotatedLinear needs a rotated format, got {fmt!r}")
        if not isinstance(inner, QuantLinear):
            raise BitallocError(f"a RotatedLinear wraps a QuantLinear, got {type(inner).__name__}")
        layout = fmt.stored_int_format
        if layout is None or layout != int_layout(inner.format):
            raise BitallocError(
                f"{fmt.name} is stored as {layout.name if layout else 'no int layout'}, but "
                f"the inner layer holds {inner.format.name} codes"
            )
        fmt.check_shape(inner.shape)
        self.inner = inner
        self.format = fmt
        self.rotation = fmt.rotation(inner.in_features)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, fmt: RotatedFormat, importance: torch.Tensor | None = None
    ) -> RotatedLinear:
        """Quantize ``linear``'s weight with ``fmt`` (the codes of ``W R``, with ``importance``
        rotated to match) and pack it; the bias is kept as is (it adds after the product)."""
        if not isinstance(fmt, RotatedFormat):
            raise BitallocError(f"a RotatedLinear needs a rotated format, got {fmt!r}")
        q = fmt.quantize_rotated(linear.weight.detach(), importance)
        inner = QuantLinear.from_quantized(q, linear.bias, fmt.base)
        return cls(inner, fmt)

    # --- what the unit is, as packed code reads it from any packed layer ------------------------
    @property
    def in_features(self) -> int:
        """Input channels."""
        return self.inner.in_features

    @property
    def out_features(self) -> int:
        """Output channels."""
        return self.inner.out_features

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features), as the weight it replaces."""
        return self.inner.shape

    @property
    def bias(self) -> torch.Tensor | None:
        """The inner layer's bias (added after the product, so not rotated)."""
        return self.inner.bias

    @property
    def nbytes(self) -> int:
        """Bytes of the quantized weight: the inner layer's codes, scales and zeros (the
        rotation stores nothing)."""
        return self.inner.nbytes

    @property
    def last_path(self) -> str | None:
        """The path the inner layer ran on in its last call."""
        return self.inner.last_path

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the unit computes with, ``Q(W R) Rᵀ``, as ``dtype`` (equal, to float
        rounding, to the format's fake-quantized weight)."""
        stored = self.inner.dequantized_weight(torch.float32)
        return self.rotation.invert(stored).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise BitallocError(
                f"input has {x.shape[-1]} features; this layer takes {self.in_features}"
            )
        return self.inner(self.rotation.apply(x))

    def extra_repr(self) -> str:
        return f"format={self.format.name}, block={self.rotation.block}"
