"""Integer formats rounded one input column at a time (:class:`IntColumnQuantizer`), the grid
that error-feedback quantizers (``+gptq``) round onto.

A profile needs every width and group size of the palette under GPTQ. The passes of a stack of
formats cost about as much as one pass (the per-column work is a few small tensor operations
whatever the stack's height), so all of them run together: every format is a slice of a stack
``(k, out, in)`` with its own width and group size, and groups are fitted at every multiple of
the sizes' greatest common divisor, each format's only where one of its groups starts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from bitalloc.errors import BitallocError
from bitalloc.formats.base import ColumnQuantizer, check_importance
from bitalloc.formats.encoding import Encoded
from bitalloc.formats.int_grid import (
    QuantizedWeight,
    _check_shape,
    _search,
    _split,
    encode_quantized,
)

if TYPE_CHECKING:
    from bitalloc.formats.integer import QuantFormat


class IntColumnQuantizer(ColumnQuantizer):
    """Integer formats rounded one input column at a time, for error-feedback quantizers.

    Several formats run side by side: the weight is a stack ``(len(formats), out, in)``
    (``(out, in)`` for one format), each slice with its own format, so one error-feedback pass
    serves a whole palette. Their group sizes may differ: :attr:`group_size` is their greatest
    common divisor and :attr:`fit_width` the largest, and :meth:`fit` at a column fits the
    formats whose groups start there, each from its own group's columns. A group's scale and
    zero come from the same clipping search as :meth:`QuantFormat.quantize` (weighted by
    ``importance`` when given), so fitting every group of the original weight and rounding its
    columns gives exactly :meth:`QuantFormat.quantize`.
    """

    def __init__(
        self,
        formats: Sequence[QuantFormat],
        shape: Sequence[int],
        importance: torch.Tensor | None = None,
    ) -> None:
        self.formats = tuple(formats)
        if not self.formats or any(f.is_float or f.group_size is None for f in self.formats):
            raise BitallocError("a column quantizer takes grouped int formats")
        out_features, in_features = _check_shape(tuple(shape)[-2:])
        sizes = [int(f.group_size) for f in self.formats]
        self.group_size = math.gcd(*sizes)
        self._fit_width = max(sizes)
        self.importance = check_importance(importance, in_features)
        n, pieces = len(self.formats), math.ceil(in_features / self.group_size)
        self.shape = (out_features, in_features)
        qmax = torch.tensor([2.0**f.bits - 1 for f in self.formats])
        self._qmax = qmax.reshape(n, 1)
        # Per group size, smallest first: its formats' slices and their rows' largest codes.
        self._by_size = []
        for size in sorted(set(sizes)):
            members = torch.tensor([k for k, s in enumerate(sizes) if s == size])
            row_qmax = qmax[members].reshape(-1, 1).expand(-1, out_features).reshape(-1)
            self._by_size.append((size, members, row_qmax))
        # Parameters per piece of group_size columns (a format's group spans size / gcd
        # pieces, all holding its values), so that any column's parameters, for every format,
        # are one index: round() does the same few operations whatever the group sizes.
        self._scales = torch.ones(n, out_features, pieces)
        self._zeros = torch.zeros(n, out_features, pieces)
        self._codes = torch.zeros(n, out_features, in_features, dtype=torch.uint8)
        self._floor = torch.zeros(n, 1)
        self._current: tuple[int, torch.Tensor, torch.Tensor] = (-1, self._floor, self._floor)

    @property
    def fit_width(self) -> int:
        """The largest group size: :meth:`fit` reads each format's own group from the block."""
        return self._fit_width

    def fit(self, start: int, block: torch.Tensor) -> None:
        """Search the scale and zero of each format's group that starts at ``start``, from the
        first group-size columns of ``block`` (at most :attr:`fit_width` columns)."""
        in_features = self.shape[1]
        if start % self.group_size or not 0 <= start < in_features:
            raise BitallocError(f"column {start} does not start a group of {self.group_size}")
        stack = block.reshape(len(self.formats), self.shape[0], -1).to(torch.float32)
        for size, members, row_qmax in self._by_size:
            if start % size:
                continue
            width = min(size, in_features - start)
            if stack.shape[-1] < width:
                raise BitallocError(
                    f"fit at column {start} needs {width} columns for groups of {size}, got "
                    f"{stack.shape[-1]}"
                )
            part = stack[members, :, :width]
            weights = None if self.importance is None else self.importance[start : start + width]
            # Every member's rows in one search, each row with its own code range: the same
            # arithmetic, row for row, as a search per format, in a fraction of the operations.
            (groups,) = _split(part.reshape(-1, width), width, weights)
            _, scale, zero = _search(groups, 0, row_qmax=row_qmax)
            first, last = start // self.group_size, math.ceil((start + width) / self.group_size)
            shape = (len(members), self.shape[0], 1)
            self._scales[members, :, first:last] = scale.reshape(shape).to(torch.float32)
            self._zeros[members, :, first:last] = zero.reshape(shape).to(torch.float32)
        self._current = (-1, self._floor, self._floor)

    def round(self, index: int, column: torch.Tensor) -> torch.Tensor:
        """``(clamp(round(w / s) + z, 0, qmax) - z) * s`` with the group's fitted s and z."""
        piece = index // self.group_size
        if self._current[0] != piece:
            # The piece's parameters as contiguous columns, taken once per piece rather than
            # gathered from the strided table for every column.
            self._current = (
                piece,
                self._scales[:, :, piece].contiguous(),
                self._zeros[:, :, piece].contiguous(),
            )
        _, scale, zero = self._current
        x = column.reshape(len(self.formats), -1)
        codes = torch.div(x, scale).round_().add_(zero).clamp_(min=self._floor, max=self._qmax)
        self._codes[:, :, index] = codes
        return codes.sub_(zero).mul_(scale).reshape(column.shape)

    def quantized(self, k: int = 0) -> QuantizedWeight:
        """Codes and group parameters of the ``k``-th format."""
        fmt = self.formats[k]
        step = int(fmt.group_size) // self.group_size
        return QuantizedWeight(
            self._codes[k].clone(),
            self._scales[k, :, ::step].to(torch.float16),
            self._zeros[k, :, ::step].to(torch.float16),
            int(fmt.group_size),
            fmt.bits,
        )

    def encode(self, k: int = 0) -> Encoded:
        """The ``k``-th format's stored form of the rounded columns."""
        return encode_quantized(self.formats[k], self.quantized(k))
