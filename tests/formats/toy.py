"""A toy weight-format family for the contract suite: ``uniform<b>``, symmetric codes of ``b``
bits with one fp16 scale per row, needing the input dimension divisible by 4.

It exists to show that a family added through the registry alone meets the same contract as the
built-in ones, and that a shape rule (the divisibility) is reported the project's way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bitalloc.errors import BitallocError
from bitalloc.formats import Encoded, Format, FormatFamily, check_importance
from bitalloc.formats.encoding import pack_codes, pack_fp16, unpack_codes, unpack_fp16

UNIFORM_BITS = (2, 3, 4, 8)
_NAME = re.compile(r"^uniform(\d+)$")


@dataclass(frozen=True)
class UniformFormat(Format):
    """``uniform<b>``: codes ``round(w / s)`` in [-(2**(b-1) - 1), 2**(b-1) - 1], one fp16 scale
    ``s`` per row (its largest magnitude over the top code)."""

    bits: int

    def __post_init__(self) -> None:
        if self.bits not in UNIFORM_BITS:
            raise BitallocError(f"uniform formats take bits from {UNIFORM_BITS}, got {self.bits}")

    @property
    def name(self) -> str:
        return f"uniform{self.bits}"

    @property
    def family(self) -> str:
        return "uniform"

    @property
    def nominal_bits(self) -> float:
        return float(self.bits)

    @property
    def is_float(self) -> bool:
        return False

    @property
    def ladder(self) -> tuple[str, float]:
        return ("uniform", float(self.bits))

    @property
    def group_size(self) -> None:
        # One scale per row: no groups along the input, for the contract's monotonicity keys.
        return None

    def check_shape(self, shape: Sequence[int]) -> tuple[int, int]:
        dims = tuple(shape)
        if len(dims) != 2 or not all(type(d) is int and d > 0 for d in dims):
            raise BitallocError(f"expected a 2-D weight shape (out, in), got {dims}")
        if dims[1] % 4:
            raise BitallocError(
                f"uniform formats need the input dimension divisible by 4, got {dims[1]}"
            )
        return dims[0], dims[1]

    def storage_bits(self, shape: Sequence[int]) -> int:
        out_features, in_features = self.check_shape(shape)
        return out_features * (in_features * self.bits + 16)

    def _codes(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_shape(tuple(int(d) for d in weight.shape))
        top = 2 ** (self.bits - 1) - 1
        w = weight.detach().to(torch.float32)
        scale = (w.abs().amax(dim=1) / top).to(torch.float16).to(torch.float32).clamp(min=6.2e-5)
        codes = torch.clamp(torch.round(w / scale[:, None]), -top, top) + top
        return codes.to(torch.uint8), scale.to(torch.float16)

    def fake_quantize(
        self, weight: torch.Tensor, importance: torch.Tensor | None = None
    ) -> torch.Tensor:
        check_importance(importance, int(weight.shape[-1]) if weight.dim() else 0)
        codes, scale = self._codes(weight)
        return self._dequantize(codes, scale).to(weight.dtype)

    def _dequantize(self, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        top = 2 ** (self.bits - 1) - 1
        return (codes.to(torch.float32) - top) * scale.to(torch.float32)[:, None]

    def encode(self, weight: torch.Tensor) -> Encoded:
        codes, scale = self._codes(weight)
        shape = (int(weight.shape[0]), int(weight.shape[1]))
        sections = (pack_codes("codes", codes, self.bits), pack_fp16("scales", scale))
        return Encoded(self.name, shape, sections)

    def decode(self, encoded: Encoded) -> torch.Tensor:
        out_features, in_features = encoded.shape
        codes = unpack_codes(encoded.section("codes"), out_features * in_features, self.bits)
        scale = unpack_fp16(encoded.section("scales"))
        return self._dequantize(codes.reshape(out_features, in_features), scale)


class UniformFamily(FormatFamily):
    """The toy family; ``uniform4`` is its one default member."""

    name = "uniform"
    description = f"'uniform<bits>' with bits {UNIFORM_BITS}, one fp16 scale per row"
    example = "uniform4"

    def parse(self, text: str) -> UniformFormat | None:
        match = _NAME.match(text)
        return UniformFormat(int(match.group(1))) if match else None

    def members(self) -> tuple[UniformFormat, ...]:
        return tuple(UniformFormat(b) for b in UNIFORM_BITS)

    def default_members(self) -> tuple[UniformFormat, ...]:
        return (UniformFormat(4),)
