"""Seeded random-sign block-diagonal Hadamard rotations of a weight's input dimension.

Incoherence processing (QuIP#, QTIP, HIGGS, and the block rotations of the MXFP4 papers)
quantizes ``W R`` instead of ``W``, for an orthogonal ``R``, and computes ``y = (x R) (W R)ᵀ``,
which is ``x Wᵀ`` because ``R Rᵀ = I``. A random rotation spreads each large weight (an outlier
input channel) over many columns, so the per-group ranges the quantizer must cover shrink and
the error of ``W R`` is smaller at the same bits.

The rotation of a width ``n`` used here is::

    R = diag(s) · blockdiag(H_b / sqrt(b), ..., H_b / sqrt(b))        (n / b blocks)

with ``s`` one random sign per input column, drawn from ``torch.Generator().manual_seed(seed)``,
and ``H_b`` the Sylvester Hadamard matrix of order ``b``. ``R`` is orthogonal, and ``x R`` is a
sign flip then a fast Walsh–Hadamard transform of each block of ``b`` channels: ``n · log2(b)``
additions (and ``2 n`` multiplications for the signs and the ``1 / sqrt(b)``) per row, against
the ``n · out`` multiply-adds of the matrix product it feeds.

Block size. ``b`` is the largest power of two that divides ``n`` and is at most
:data:`MAX_BLOCK` (256): 4096 -> 256, 1536 = 6 x 256 -> 256, 576 = 9 x 64 -> 64, 200 = 25 x 8 ->
8. The cap is the largest group size the ``int`` family lists (256), so the columns of every
group of every member lie in one block or in whole blocks and every group's range is the mixed
one; an outlier is already diluted 16-fold (``sqrt(256)``) at 256, while the transform's cost and
the float error of the activations' transform grow with ``log2(b)``, so larger blocks buy little
(the block-rotation MXFP4 results find blocks of the quantization group's size enough). A width
with no power-of-two factor of at least :data:`MIN_BLOCK` (8) — an odd width, or ``4 x odd`` —
cannot be blocked: a 2- or 4-column block mixes too little to matter, and such a rotation is
refused with :class:`~bitalloc.errors.BitallocError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from bitalloc.errors import BitallocError

MIN_BLOCK = 8
MAX_BLOCK = 256
# Seeds torch's generator takes as given (manual_seed accepts 64-bit values); names carry them.
MAX_SEED = 2**63 - 1


def block_size(width: int) -> int:
    """The Hadamard block of a rotation of ``width`` input channels: the largest power of two
    dividing it, at most :data:`MAX_BLOCK`; :class:`BitallocError` when that is under
    :data:`MIN_BLOCK` (the width cannot be blocked)."""
    if isinstance(width, bool) or not isinstance(width, int) or width <= 0:
        raise BitallocError(f"a rotation needs a positive whole width, got {width!r}")
    block = width & -width  # the lowest set bit: the largest power of two dividing ``width``
    block = min(block, MAX_BLOCK)
    if block < MIN_BLOCK:
        raise BitallocError(
            f"a Hadamard rotation cannot block an input width of {width} ({width} = {block} x "
            f"{width // block}): it needs a width divisible by {MIN_BLOCK} (blocks of a power of "
            f"two from {MIN_BLOCK} to {MAX_BLOCK}); drop '+rht' for this weight"
        )
    return block


def check_seed(seed: int) -> int:
    """``seed`` when it is a whole number in ``[0, MAX_SEED]``; a clear error otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise BitallocError(f"a rotation seed must be a whole number from 0 to {MAX_SEED}")
    return seed


@lru_cache(maxsize=256)
def _signs(width: int, seed: int, device: torch.device) -> torch.Tensor:
    # Cached per device: a model's units share a few widths, and a layer's forward must neither
    # draw again nor copy the signs to its device on every call. Callers never modify the
    # tensor (every use multiplies into a new one).
    if device.type != "cpu":
        return _signs(width, seed, torch.device("cpu")).to(device)
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (width,), generator=gen, dtype=torch.int64)
    return (bits * 2 - 1).to(torch.float32)


def hadamard_matrix(order: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The unnormalised Sylvester Hadamard matrix of ``order`` (a power of two): entries ±1,
    ``H[i, j] = (-1) ** popcount(i & j)``, symmetric, ``H Hᵀ = order · I``."""
    if order < 1 or order & (order - 1):
        raise BitallocError(f"a Sylvester Hadamard matrix needs a power-of-two order, got {order}")
    index = torch.arange(order)
    parity = torch.zeros(order, order, dtype=torch.int64)
    both = index[:, None] & index[None, :]
    while bool(both.any()):
        parity ^= both & 1
        both = both >> 1
    return (1 - 2 * parity).to(dtype)


@dataclass(frozen=True)
class Rotation:
    """``R`` for ``width`` input channels and ``seed`` (see the module docstring).

    :meth:`apply` computes ``x R`` and :meth:`invert` ``y Rᵀ`` over the last dimension of any
    tensor (activations ``(..., width)`` or a weight ``(out, width)``, whose columns rotate), in
    float32 for half-precision inputs and in the input's dtype otherwise, returned in the input's
    dtype. Equal arguments give bit-identical results.
    """

    width: int
    seed: int = 0

    def __post_init__(self) -> None:
        block_size(self.width)
        check_seed(self.seed)

    @property
    def block(self) -> int:
        """The Hadamard block size ``b``."""
        return block_size(self.width)

    def signs(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The ±1 float32 sign of every input channel (on ``device``)."""
        return _signs(self.width, self.seed, torch.device(device or "cpu"))

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``R`` as an explicit ``(width, width)`` matrix (for checks; use :meth:`apply`)."""
        block = hadamard_matrix(self.block, dtype) / math.sqrt(self.block)
        blocks = torch.block_diag(*[block] * (self.width // self.block))
        return self.signs().to(dtype)[:, None] * blocks

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x R`` over the last dimension: flip signs, then a Hadamard transform per block."""
        work = self._check(x)
        out = fwht(work * self.signs(x.device).to(work.dtype), self.block)
        return out.mul_(1.0 / math.sqrt(self.block)).to(x.dtype)

    def invert(self, y: torch.Tensor) -> torch.Tensor:
        """``y Rᵀ`` over the last dimension (the inverse of :meth:`apply`): a Hadamard transform
        per block (``H`` is symmetric), then the signs."""
        work = self._check(y)
        out = fwht(work, self.block).mul_(1.0 / math.sqrt(self.block))
        return out.mul_(self.signs(y.device).to(work.dtype)).to(y.dtype)

    def conjugate_gram(self, gram: torch.Tensor) -> torch.Tensor:
        """``Rᵀ G R``: the input Gram matrix of the rotated inputs ``x R`` when ``G`` is that of
        ``x`` (``(x R)ᵀ (x R) = Rᵀ xᵀx R``)."""
        if tuple(gram.shape) != (self.width, self.width):
            raise BitallocError(
                f"the input Gram matrix has shape {tuple(gram.shape)}; a rotation of "
                f"{self.width} channels needs ({self.width}, {self.width})"
            )
        # Rows first (G R), then the columns of the transpose (Rᵀ (G R)).
        return self.apply(self.apply(gram).mT).mT.contiguous()

    def conjugate_diagonal(self, values: torch.Tensor) -> torch.Tensor:
        """The diagonal of ``Rᵀ diag(v) R``: ``R[i, j]**2`` is ``1 / b`` inside a block and 0
        outside, so each channel gets the mean of ``v`` over its Hadamard block (signs square
        away)."""
        if tuple(values.shape) != (self.width,):
            raise BitallocError(
                f"per-channel values have shape {tuple(values.shape)}; a rotation of "
                f"{self.width} channels needs ({self.width},)"
            )
        means = values.reshape(-1, self.block).mean(dim=1)
        return means.repeat_interleave(self.block)

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.width:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise BitallocError(
                f"a rotation of {self.width} channels takes tensors whose last dimension is "
                f"{self.width}, got {shape}"
            )
        if not x.dtype.is_floating_point:
            raise BitallocError(f"a rotation takes floating-point tensors, got {x.dtype}")
        # Half-precision sums of 8 stages would lose bits the quantizer then sees: use float32.
        return x.to(torch.float32) if x.element_size() < 4 else x


def fwht(x: torch.Tensor, block: int) -> torch.Tensor:
    """The unnormalised Walsh–Hadamard transform (Sylvester order) of every consecutive block
    of ``block`` entries of the last dimension of ``x``: ``x_block @ H_block``, in ``log2(block)``
    vectorised butterfly stages (no loop over rows). Returns a new tensor of ``x``'s dtype."""
    width = x.shape[-1]
    if block < 1 or block & (block - 1) or width % block:
        raise BitallocError(
            f"the Hadamard block {block} must be a power of two dividing the width {width}"
        )
    if block == 1:
        return x.clone()
    shape = x.shape
    y = x.reshape(-1, block)
    half = 1
    while half < block:
        # Pair entry i with i + half inside each run of 2 * half: (a, c) -> (a + c, a - c).
        pairs = y.view(-1, block // (2 * half), 2, half)
        a, c = pairs[:, :, 0], pairs[:, :, 1]
        y = torch.stack((a + c, a - c), dim=2).view(-1, block)
        half *= 2
    return y.reshape(shape)


def rotate(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``x R`` for activations ``(..., in)`` (``R`` of ``in`` channels and ``seed``)."""
    return Rotation(int(x.shape[-1]), seed).apply(x)


def unrotate(y: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``y Rᵀ``, the inverse of :func:`rotate`."""
    return Rotation(int(y.shape[-1]), seed).invert(y)


def rotate_weight(weight: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``W R`` for a weight ``(out, in)``: its columns (input channels) rotated, so that
    ``(x R) (W R)ᵀ == x Wᵀ``."""
    if weight.dim() != 2:
        raise BitallocError(f"expected a 2-D weight (out, in), got shape {tuple(weight.shape)}")
    return rotate(weight, seed)


def unrotate_weight(weight: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``W Rᵀ``, the inverse of :func:`rotate_weight`."""
    if weight.dim() != 2:
        raise BitallocError(f"expected a 2-D weight (out, in), got shape {tuple(weight.shape)}")
    return unrotate(weight, seed)
