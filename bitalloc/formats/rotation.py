"""The ``rht`` family: any weight format behind a randomized Hadamard rotation (``+rht``).

``<format>+rht`` (seed 0) and ``<format>+rht-s<seed>`` quantize ``W R`` with ``<format>``
instead of ``W``, where ``R`` is the seeded random-sign block-diagonal Hadamard rotation of the
input dimension of :mod:`bitalloc.formats.hadamard` (incoherence processing, as in QuIP#, QTIP,
HIGGS and the block-rotation MXFP4 papers). The model computes ``(x R) Q(W R)ᵀ``, which is
``x (Q(W R) Rᵀ)ᵀ``: the fake-quantized weight is ``Q(W R) Rᵀ`` and a packed layer rotates its
input instead (:class:`bitalloc.kernels.rotated.RotatedLinear`).

Names: ``int3-g128+rht``, ``int3-g128+rht-s7``, and options inside the rotation, which is
outermost: ``int3-g128+gptq+rht`` runs the error-feedback quantizer on the rotated weight with
the rotated Gram matrix (the parser hands whatever precedes ``+rht`` to the registry). ``-s0`` is
accepted and named without the suffix. The base may be any registered, non-float, unrotated
format.

Storage (for a weight of shape (out, in))::

    format            stored bits
    ----------------  -------------------------------------------------------------
    <base>+rht        <base>.storage_bits((out, in))          (int3-g128+rht: 3.25/w)
    <base>+rht-s<s>   <base>.storage_bits((out, in))

The rotation adds no stored bit: ``R`` is rebuilt from the seed, which the format's name holds
(an allocation, a profile or a packed model's manifest records the name), not stored per
weight; the encoding is the base's encoding of ``W R``. The shape rule adds to the base's that
``in`` has a power-of-two factor of at least 8 (see :func:`~bitalloc.formats.hadamard.block_size`).

Forward-pass cost of a packed rotated layer: one fast Walsh–Hadamard transform of each input
row, ``in · log2(b)`` additions plus ``2 · in`` multiplications for the signs and scale (``b``
the block size, at most 256), against the ``in · out`` multiply-adds of the matrix product:
about ``8 / out`` of it (0.2 % for a 4096 x 4096 layer).

Importance is rotated with the weight. Inputs ``x`` become ``x R``, so an input Gram matrix
``G`` becomes ``Rᵀ G R``, passed on whole (an error-feedback base uses all of it; a diagonal
one reads its diagonal). A per-channel vector ``v`` stands for ``diag(v)``, whose rotation's
diagonal is exactly the mean of ``v`` over each Hadamard block.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bitalloc.errors import BitallocError
from bitalloc.formats.base import ColumnQuantizer, Format, check_gram, check_importance
from bitalloc.formats.encoding import Encoded
from bitalloc.formats.hadamard import Rotation, block_size, check_seed
from bitalloc.formats.integer import QuantFormat, QuantizedWeight
from bitalloc.formats.registry import FormatFamily, parse_format

SUFFIX = "+rht"
_OPTION = re.compile(r"^rht(?:-s(\d+))?$")


@dataclass(frozen=True)
class RotatedFormat(Format):
    """``base`` applied to ``W R`` (``R`` of the weight's input width and ``seed``).

    Build one with :func:`~bitalloc.formats.parse_format` (``int3-g128+rht-s7``) or directly;
    the constructor refuses a float base (nothing to gain) and a rotated one.
    """

    base: Format
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.base, Format):
            raise BitallocError(
                f"a rotated format wraps a weight format, got {type(self.base).__name__}"
            )
        if self.base.is_float:
            raise BitallocError(
                f"{self.base.name} keeps weights in floating point: a rotation gains nothing "
                f"there; drop '{SUFFIX}' or rotate a quantized format (e.g. int4-g128{SUFFIX})"
            )
        if isinstance(self.base, RotatedFormat):
            raise BitallocError(
                f"{self.base.name} is rotated already; rotate once (one '{SUFFIX}' option)"
            )
        check_seed(self.seed)

    # --- naming -------------------------------------------------------------------------------
    @property
    def suffix(self) -> str:
        """``+rht`` for seed 0, ``+rht-s<seed>`` otherwise."""
        return SUFFIX if self.seed == 0 else f"{SUFFIX}-s{self.seed}"

    @property
    def name(self) -> str:
        """The base's name and the rotation option, e.g. ``int3-g128+rht-s7``."""
        return self.base.name + self.suffix

    @property
    def family(self) -> str:
        """``rht``."""
        return "rht"

    @property
    def nominal_bits(self) -> float:
        """The base's: the rotation stores nothing."""
        return float(self.base.nominal_bits)

    @property
    def is_float(self) -> bool:
        """False: the base is quantized."""
        return False

    @property
    def uses_gram(self) -> bool:
        """True: the importance of a rotated column is the diagonal of ``Rᵀ G R``, which
        depends on the whole Gram matrix ``G`` (a vector gives only its block means)."""
        return True

    @property
    def ladder(self) -> tuple[str, float] | None:
        """The base's ladder with the rotation option: the same rotation of the same weight
        keeps the base ladder's order (the error of ``Q(W R) Rᵀ`` is that of ``Q(W R)``)."""
        ladder = self.base.ladder
        return None if ladder is None else (ladder[0] + self.suffix, ladder[1])

    # --- the stored layout, for packed kernels --------------------------------------------------
    # Deliberately not ``int_format`` / ``quantize``, the duck-typed pair by which GPTQ-like
    # formats say "my codes dequantize to my fake-quantized weight": these codes are those of
    # W R, which dequantize to Q(W R), not to Q(W R) Rᵀ. A consumer that dequantizes them (a
    # packed layer, a cache of codes) must rotate its input or the result as well, so it has to
    # know the format is rotated (bitalloc.kernels.rotated.RotatedLinear does).
    @property
    def stored_int_format(self) -> QuantFormat | None:
        """The int layout the codes of ``W R`` are stored in (the base's), or None when the
        base stores no int layout (packed kernels then cannot hold it)."""
        if isinstance(self.base, QuantFormat):
            return self.base
        layout = getattr(self.base, "int_format", None)
        return layout if isinstance(layout, QuantFormat) and not layout.is_float else None

    def rotation(self, in_features: int) -> Rotation:
        """``R`` for a weight of ``in_features`` input channels."""
        return Rotation(in_features, self.seed)

    # --- the contract ---------------------------------------------------------------------------
    def check_shape(self, shape: Sequence[int]) -> tuple[int, int]:
        """The base's shape rule, and an input width the rotation can block."""
        out_features, in_features = self.base.check_shape(shape)
        try:
            block_size(in_features)
        except BitallocError as exc:
            raise BitallocError(f"{self.name}: {exc}") from None
        return out_features, in_features

    def storage_bits(self, shape: Sequence[int]) -> int:
        """The base's stored bits for ``shape``: the seed is in the name, not in the weight."""
        self.check_shape(shape)
        return self.base.storage_bits(shape)

    def fake_quantize(
        self, weight: torch.Tensor, importance: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``base.fake_quantize(W R, rotated importance) · Rᵀ`` in ``weight``'s dtype."""
        rotation, rotated = self._rotated(weight)
        importance = self.rotate_importance(importance, rotation.width)
        quantized = self.base.fake_quantize(rotated, importance)
        return rotation.invert(quantized.to(torch.float32)).to(weight.dtype)

    def quantize_rotated(
        self, weight: torch.Tensor, importance: torch.Tensor | None = None
    ) -> QuantizedWeight:
        """The codes of ``W R`` in the base's int layout, with the rotated importance: what a
        packed layer stores (it rotates its input to match). They dequantize to ``Q(W R)``;
        :meth:`fake_quantize` is that times ``Rᵀ``."""
        quantize = getattr(self.base, "quantize", None)
        if self.stored_int_format is None or not callable(quantize):
            raise BitallocError(
                f"{self.name} has no int codes: {self.base.name} stores no int layout; use its "
                "fake-quantized weights"
            )
        rotation, rotated = self._rotated(weight)
        return quantize(rotated, self.rotate_importance(importance, rotation.width))

    def encode(self, weight: torch.Tensor) -> Encoded | None:
        """The base's encoding of ``W R``, under this format's name."""
        _, rotated = self._rotated(weight)
        encoded = self.base.encode(rotated)
        if encoded is None:
            return None
        return Encoded(self.name, encoded.shape, encoded.sections)

    def decode(self, encoded: Encoded) -> torch.Tensor:
        """The base's decoding of the stored ``Q(W R)``, rotated back: ``Q(W R) Rᵀ``."""
        if encoded.format_name != self.name:
            raise BitallocError(
                f"an encoding of {encoded.format_name} cannot be decoded as {self.name}"
            )
        _, in_features = self.check_shape(encoded.shape)
        inner = Encoded(self.base.name, encoded.shape, encoded.sections)
        decoded = self.base.decode(inner).to(torch.float32)
        return self.rotation(in_features).invert(decoded)

    def column_quantizer(
        self, weight: torch.Tensor, importance: torch.Tensor | None = None
    ) -> ColumnQuantizer | None:
        """None: columns of ``W R`` mix every column of a block of ``W``, so ``W`` cannot be
        rounded column by column; GPTQ on the rotated weight is spelt ``<base>+gptq+rht``."""
        return None

    def rotate_importance(
        self, importance: torch.Tensor | None, in_features: int
    ) -> torch.Tensor | None:
        """``importance`` for the rotated weight: an ``(in, in)`` Gram matrix ``G`` becomes
        ``Rᵀ G R``; a per-channel vector ``v`` the diagonal of ``Rᵀ diag(v) R`` (its block
        means); None stays None."""
        rotation = self.rotation(in_features)
        if isinstance(importance, torch.Tensor) and importance.dim() == 2:
            gram = check_gram(importance, in_features)
            return rotation.conjugate_gram(gram)
        values = check_importance(importance, in_features)
        return None if values is None else rotation.conjugate_diagonal(values)

    def _rotated(self, weight: torch.Tensor) -> tuple[Rotation, torch.Tensor]:
        """``R`` and ``W R`` in float32 (one computation for fake_quantize, quantize and
        encode, so that they see the same rotated weight bit for bit)."""
        if not isinstance(weight, torch.Tensor):
            raise BitallocError(f"expected a weight tensor, got {type(weight).__name__}")
        _, in_features = self.check_shape(tuple(weight.shape))
        rotation = self.rotation(in_features)
        return rotation, rotation.apply(weight.detach().to(torch.float32))

    def __str__(self) -> str:
        return self.name


class RHTFamily(FormatFamily):
    """``<format>+rht`` / ``<format>+rht-s<seed>``: a registered format on rotated weights."""

    name = "rht"
    description = (
        "'<format>+rht' or '<format>+rht-s<seed>': a quantized format of another family applied "
        "after a seeded random Hadamard rotation of the input dimension"
    )
    example = "int3-g128+rht"
    wraps = True

    def parse(self, text: str) -> RotatedFormat | None:
        """``int3-g128+rht-s7`` to ``RotatedFormat(int3-g128, 7)``; None without a rotation
        option; a bad option, seed or base raises."""
        rest, plus, option = text.rpartition("+")
        if not plus or not option.startswith("rht"):
            return None
        match = _OPTION.match(option)
        if not match:
            raise BitallocError(
                f"unknown rotation option {'+' + option!r} in {text!r}; use '{SUFFIX}' (seed 0) "
                f"or '{SUFFIX}-s<seed>' with a whole seed, e.g. int3-g128{SUFFIX}-s7"
            )
        if not rest:
            raise BitallocError(
                f"{text!r} names no format to rotate; write one before '{SUFFIX}', "
                f"e.g. int3-g128{SUFFIX}"
            )
        seed = int(match.group(1) or 0)
        try:
            base = parse_format(rest)
        except BitallocError as exc:
            raise BitallocError(f"{text!r}: the format before '+{option}': {exc}") from None
        return RotatedFormat(base, check_seed(seed))

    def members(self) -> tuple[RotatedFormat, ...]:
        """int{2,3,4}-g{32,128} rotated with seed 0, and int3-g128 with seed 7."""
        plain = tuple(
            RotatedFormat(QuantFormat(bits, group)) for bits in (2, 3, 4) for group in (32, 128)
        )
        return (*plain, RotatedFormat(QuantFormat(3, 128), 7))

    def default_members(self) -> tuple[RotatedFormat, ...]:
        """None: rotation is opt-in."""
        return ()
