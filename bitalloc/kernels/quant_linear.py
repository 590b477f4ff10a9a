"""Linear layers that hold quantized weights in their stored form.

:class:`QuantLinear` keeps packed codes, fp16 scales and fp16 zeros (see
:mod:`bitalloc.kernels.packing`) and computes with them: Triton kernels on a GPU, the CPU path
chosen by :func:`bitalloc.kernels.cpu.measure_paths` on the CPU. :class:`Float16Linear` keeps an
``fp16`` unit's weight in 16 bits. Both record which path ran last (``last_path``).

A :class:`QuantLinear` runs any format whose weights are stored as int codes: ``int{b}-g{g}``
itself, and formats that choose the codes another way but store them in an int layout (GPTQ's
``+gptq``). Such a format is known by duck typing (:func:`int_layout`):
an ``int_format`` attribute naming the :class:`~bitalloc.formats.QuantFormat` layout and a
``quantize(weight, importance)`` method giving the codes. The layer records the format it was
built with (``format``), so that manifests and reports name it.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bitalloc.errors import BitallocError
from bitalloc.formats import Format, QuantFormat, QuantizedWeight
from bitalloc.formats.rotation import RotatedFormat
from bitalloc.kernels import cpu
from bitalloc.kernels.packing import (
    PackedWeight,
    check_packed,
    dequantize_codes,
    pack_codes,
    packed_words,
    unpack_codes,
)

TRITON = "triton"
PLANES_LAYOUT = "planes"
INT4PACK_LAYOUT = "int4pack"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def int_layout(fmt: Format) -> QuantFormat | None:
    """The int format whose layout stores ``fmt``'s weights, or None when packed int kernels
    cannot hold it (``fp16`` and formats of other layouts).

    ``int{b}-g{g}`` is its own layout; another format qualifies when it has an ``int_format``
    attribute that is a quantized :class:`~bitalloc.formats.QuantFormat` and a callable
    ``quantize(weight, importance)`` returning a :class:`~bitalloc.formats.QuantizedWeight` in
    that layout, whose dequantized weight is the format's fake-quantized one (GPTQ's does).
    Rotated formats (``+rht``) are not among them: their codes are those of ``W R``, held by a
    :class:`~bitalloc.kernels.rotated.RotatedLinear` that rotates its input.
    """
    if isinstance(fmt, QuantFormat):
        return None if fmt.is_float else fmt
    layout = getattr(fmt, "int_format", None)
    if not isinstance(layout, QuantFormat) or layout.is_float:
        return None
    return layout if callable(getattr(fmt, "quantize", None)) else None


class QuantLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored as packed ``bits``-bit codes per group.

    Buffers (what ``state_dict`` holds, always in the canonical plane layout): ``qweight``
    int32 ``(out, words)``, ``scales`` and ``zeros`` fp16 ``(out, groups)``, and ``bias`` when
    present. On the CPU the layer may keep its codes in torch's int4pack order instead (the
    ``int4pack`` path), never in both, so its bytes stay those of the format.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = False,
        bias_dtype: torch.dtype = torch.float32,
        fmt: Format | None = None,
    ) -> None:
        """``fmt`` is the format the unit was given (recorded as ``format``, the name manifests
        and reports use); None means ``int{bits}-g{group_size}``. It must store its weights as
        that int format (see :func:`int_layout`)."""
        super().__init__()
        layout = QuantFormat(bits, group_size)
        if fmt is None:
            fmt = layout
        elif isinstance(fmt, RotatedFormat):
            # Its codes are those of W R: computing x Wᵀ needs the input rotated first.
            raise BitallocError(
                f"{fmt.name} stores the codes of a rotated weight; hold it in a RotatedLinear "
                "(bitalloc.kernels.rotated), which rotates the input to match"
            )
        elif int_layout(fmt) != layout:
            raise BitallocError(
                f"{fmt.name} is not stored as {layout.name} codes; a QuantLinear of "
                f"{bits}-bit codes in groups of {group_size} cannot hold it"
            )
        if in_features <= 0 or out_features <= 0:
            raise BitallocError(
                f"a layer needs positive sizes, got ({out_features}, {in_features})"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.format = fmt
        n_groups = -(-in_features // group_size)
        words = packed_words(in_features, bits)
        self.register_buffer("qweight", torch.zeros(out_features, words, dtype=torch.int32))
        self.register_buffer("scales", torch.ones(out_features, n_groups, dtype=torch.float16))
        self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=torch.float16))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype))
        else:
            self.bias = None
        self.layout = PLANES_LAYOUT
        self.cpu_path = cpu.UNPACK_MATMUL
        # With the int4pack path: above this many rows, unpack and matmul instead (torch's int4
        # kernel loses to a float matmul on large batches); None keeps int4pack for any batch.
        self.int4pack_max_rows: int | None = None
        # Why ``cpu_path`` was chosen (set by bitalloc.packed.choose_cpu_paths), for reports.
        self.cpu_path_reason = ""
        self.last_path: str | None = None

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def from_packed(
        cls, packed: PackedWeight, bias: torch.Tensor | None = None, fmt: Format | None = None
    ) -> QuantLinear:
        """A layer holding ``packed`` (and ``bias``, kept in its dtype); ``fmt`` is the format
        to record (None: the packed int format)."""
        layer = cls(
            packed.in_features,
            packed.out_features,
            packed.bits,
            packed.group_size,
            bias=bias is not None,
            bias_dtype=bias.dtype if bias is not None else torch.float32,
            fmt=fmt,
        )
        layer.qweight = packed.qweight.clone()
        layer.scales = packed.scales.clone()
        layer.zeros = packed.zeros.clone()
        if bias is not None:
            layer.bias = bias.detach().clone()
        return layer

    @classmethod
    def from_quantized(
        cls, q: QuantizedWeight, bias: torch.Tensor | None = None, fmt: Format | None = None
    ) -> QuantLinear:
        """A layer holding the codes and group parameters of ``q`` (and ``bias``); ``fmt`` is
        the format that chose them, recorded as ``format`` (None: ``int{bits}-g{group}``)."""
        return cls.from_packed(PackedWeight.from_quantized(q), bias, fmt)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, fmt: Format, importance: torch.Tensor | None = None
    ) -> QuantLinear:
        """Quantize ``linear``'s weight with ``fmt`` (an integer format, or a format stored in
        an int layout, see :func:`int_layout`; ``importance`` is passed to its quantizer) and
        pack it."""
        if isinstance(fmt, RotatedFormat):
            raise BitallocError(
                f"{fmt.name} stores the codes of a rotated weight; build a RotatedLinear "
                "(bitalloc.kernels.rotated), which rotates the input to match"
            )
        if int_layout(fmt) is None:
            raise BitallocError(
                f"{fmt.name} is not stored as int codes; a QuantLinear cannot hold it"
            )
        q = fmt.quantize(linear.weight.detach(), importance)
        return cls.from_quantized(q, linear.bias, fmt)

    # --- what is stored ---------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of the quantized weight: codes, scales and zeros (not the bias)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))

    def codes(self) -> torch.Tensor:
        """The uint8 codes ``(out, in)``, whatever the current layout."""
        if self.layout == INT4PACK_LAYOUT:
            return cpu.int4pack_to_codes(
                self.qweight.cpu(), self.out_features, self.in_features
            ).to(self.qweight.device)
        return unpack_codes(self.qweight, self.bits, self.in_features)

    def packed_weight(self) -> PackedWeight:
        """The canonical packed tensors (converted from int4pack order when needed)."""
        qweight = self.qweight
        if self.layout == INT4PACK_LAYOUT:
            qweight = pack_codes(self.codes(), self.bits)
        return PackedWeight(
            qweight, self.scales, self.zeros, self.bits, self.group_size, self.in_features
        )

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W`` as ``dtype`` (what the fake-quantized model computes with)."""
        return dequantize_codes(self.codes(), self.scales, self.zeros, self.group_size, dtype)

    # --- execution paths ----------------------------------------------------------------------
    def cpu_path_unsupported(self, path: str) -> str:
        """Why ``path`` cannot run this layer on the CPU, or "" when it can."""
        if path == cpu.UNPACK_MATMUL:
            return ""
        if path == cpu.INT4PACK:
            return cpu.int4pack_unsupported(
                self.bits, self.group_size, self.out_features, self.in_features
            )
        if path == TRITON:
            from bitalloc.kernels import triton_kernels

            if not triton_kernels.triton_available() or not _interpreting():
                return "Triton runs on the CPU only under TRITON_INTERPRET=1 (for tests)"
            return ""
        return f"unknown path {path!r}; choose from {(*cpu.CPU_PATHS, TRITON)}"

    def set_cpu_path(self, path: str, reason: str = "") -> None:
        """Run on ``path`` on the CPU from now on, converting the code layout if it needs to;
        ``reason`` records why (see ``cpu_path_reason``)."""
        why_not = self.cpu_path_unsupported(path)
        if why_not:
            raise BitallocError(
                f"CPU path {path!r} cannot run {self.format.name} {self.shape}: {why_not}"
            )
        self._set_layout(INT4PACK_LAYOUT if path == cpu.INT4PACK else PLANES_LAYOUT)
        self.cpu_path = path
        self.cpu_path_reason = reason
        self.int4pack_max_rows = None

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features), as the weight it replaces."""
        return (self.out_features, self.in_features)

    def _set_layout(self, layout: str) -> None:
        if layout == self.layout:
            return
        device = self.qweight.device
        if layout == INT4PACK_LAYOUT:
            self.qweight = cpu.codes_to_int4pack(self.codes().cpu()).to(device)
        else:
            self.qweight = pack_codes(self.codes(), self.bits).to(device)
        self.layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise BitallocError(
                f"input has {x.shape[-1]} features; this layer takes {self.in_features}"
            )
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x.device.type != "cpu" or self.cpu_path == TRITON:
            y = self._triton(x2)
        elif self.cpu_path == cpu.INT4PACK and (
            self.int4pack_max_rows is None or x2.shape[0] <= self.int4pack_max_rows
        ):
            y = cpu.int4pack_matmul(x2, self.qweight, self.scales, self.zeros, self.group_size)
            self.last_path = cpu.INT4PACK
        else:
            y = F.linear(x2, self.dequantized_weight(x.dtype))
            self.last_path = cpu.UNPACK_MATMUL
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def _triton(self, x2: torch.Tensor) -> torch.Tensor:
        from bitalloc.kernels import triton_kernels

        if self.layout != PLANES_LAYOUT:
            self._set_layout(PLANES_LAYOUT)
        kernel = "gemv" if x2.shape[0] <= 8 else "gemm"
        y = triton_kernels.quant_matmul(
            x2,
            self.qweight,
            self.scales,
            self.zeros,
            bits=self.bits,
            group_size=self.group_size,
            in_features=self.in_features,
            kernel=kernel,
        )
        self.last_path = f"{TRITON}-{kernel}"
        return y

    # --- state_dict in the canonical layout -----------------------------------------------------
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout != PLANES_LAYOUT:
            destination[prefix + "qweight"] = pack_codes(self.codes(), self.bits)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        self.cpu_path = cpu.UNPACK_MATMUL
        self.cpu_path_reason = "loaded from a state dict"
        self._set_layout(PLANES_LAYOUT)
        super()._load_from_state_dict(state_dict, prefix, *args)
        check_packed(
            self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.in_features
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"format={self.format.name}, bias={self.bias is not None}, cpu_path={self.cpu_path}"
        )


class Float16Linear(nn.Module):
    """An ``fp16`` unit: the weight stored in 16 bits, computed in the input's dtype."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        bias_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.format = QuantFormat(16, None)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.float16))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype))
        else:
            self.bias = None
        self.last_path: str | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Float16Linear:
        """Round ``linear``'s weight to fp16 (and keep its bias as is)."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            bias_dtype=linear.bias.dtype if linear.bias is not None else torch.float32,
        )
        layer.weight = linear.weight.detach().to(torch.float16).clone()
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone()
        return layer

    @property
    def nbytes(self) -> int:
        """Bytes of the fp16 weight (not the bias)."""
        return self.weight.numel() * self.weight.element_size()

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features)."""
        return (self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last_path = "fp16" if x.dtype == torch.float16 else f"fp16-as-{_dtype_name(x.dtype)}"
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format=fp16"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
