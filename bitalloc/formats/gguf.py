"""The ``gguf`` family: llama.cpp's tensor types (``gguf:Q4_K``, ``gguf:IQ4_XS``, ...), quantized
and costed by llama.cpp's own reference code.

A format is one llama.cpp type, named ``gguf:`` plus the type as llama.cpp spells it. Weights
are quantized with the ``libgguf`` package, which carries llama.cpp's reference quantizers
(``ggml-quants.c``), so :meth:`GGUFFormat.quantize_bytes` returns the bytes llama.cpp writes for
the tensor and :meth:`GGUFFormat.fake_quantize` the weight llama.cpp computes with. Costs are
exact: every row is a run of whole blocks, ``row_size(type, in)`` bytes, so a weight of shape
(out, in) stores ``out * row_size * 8`` bits (Q4_K: 144 bytes per 256 weights, 4.5 bits).

Row-length rules. A row must be a whole number of blocks: the K-quants (Q2_K ... Q6_K) and the
256-block IQ types (IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ4_XS) need an input width that is a
multiple of 256; the 32-block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, MXFP4) need a
multiple of 32; F16 takes any width. llama.cpp does not pad a row, so neither does this family:
:meth:`GGUFFormat.check_shape` refuses a width that does not fit. For SmolLM2-135M, whose hidden
size is 576 = 2.25 x 256, the q/k/v/o and gate/up projections cannot take a 256-block type (they
take the 32-block ones), while down_proj, 1536 = 6 x 256 wide, takes every type.

Importance. ``importance`` (one non-negative value per input column, the mean squared
activation bitalloc gathers) is passed to llama.cpp as its importance matrix ("imatrix"), which
its quantizers use to weight their scale and grid searches. Without one each type quantizes as
``llama-quantize`` does without ``--imatrix``, except the types llama.cpp refuses to quantize
without one (IQ2_XS here), which get an imatrix of ones. Types that ignore the imatrix (Q8_0,
MXFP4) give the same result either way.

Formats import nothing from bitalloc but :mod:`bitalloc.errors` and :mod:`bitalloc.formats`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import libgguf
import numpy as np
import torch

from bitalloc.errors import BitallocError
from bitalloc.formats.base import Format, check_importance
from bitalloc.formats.encoding import Encoded, Section
from bitalloc.formats.integer import _check_shape
from bitalloc.formats.registry import FormatFamily

# The members, K-quant ladder first. Every one of them quantizes with libgguf 0.2.2, so none is
# dropped. libgguf also quantizes IQ2_XXS, IQ1_S, IQ1_M, TQ1_0, TQ2_0, NVFP4 and Q1_0; they are
# left out because no allocation here has asked for them (and the IQ1/IQ2_XXS searches are the
# slowest of all: seconds per SmolLM2 matrix).
SUPPORTED_TYPES = (
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "IQ2_XS",
    "IQ2_S",
    "IQ3_XXS",
    "IQ3_S",
    "IQ4_NL",
    "IQ4_XS",
    "MXFP4",
    "F16",
)
FLOAT_TYPES = ("F16",)
# Types that store weights the same way at rising precision (see GGUFFormat.ladder).
_LADDERS = {
    "gguf-k": ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"),
    "gguf-legacy": ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"),
    "gguf-iq": ("IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS"),
}
_PREFIX = "gguf:"
# Suggested when a 256-block type does not fit a width that a 32-block type does.
_THIRTY_TWO = "gguf:IQ4_NL, gguf:Q4_0 or gguf:Q8_0"


@dataclass(frozen=True)
class GGUFFormat(Format):
    """One llama.cpp tensor type as a palette entry: ``GGUFFormat("Q4_K")`` is ``gguf:Q4_K``.

    ``type`` is the type's name as llama.cpp spells it (upper case; lower case is accepted
    and normalised). :meth:`quantize_bytes` / :meth:`dequantize_bytes` convert between a weight
    and llama.cpp's tensor bytes; :meth:`fake_quantize` is the round trip through them.
    """

    type: str

    def __post_init__(self) -> None:
        canonical = str(self.type).strip().upper()
        if canonical not in SUPPORTED_TYPES:
            raise BitallocError(
                f"unsupported llama.cpp type {self.type!r}; the gguf family supports "
                f"{', '.join(SUPPORTED_TYPES)}"
            )
        # Equality and hashing go by the field, so "q4_k" must become the "Q4_K" it names.
        object.__setattr__(self, "type", canonical)

    @property
    def name(self) -> str:
        """``gguf:`` and the type, e.g. ``gguf:Q4_K``."""
        return _PREFIX + self.type

    @property
    def family(self) -> str:
        """Always ``gguf``."""
        return "gguf"

    @property
    def qtype(self) -> libgguf.GGMLQuantizationType:
        """The type as libgguf's (and llama.cpp's) enum value."""
        return libgguf.GGMLQuantizationType[self.type]

    @property
    def block_size(self) -> int:
        """Weights per block: 256, 32, or 1 for F16. A row is a whole number of blocks."""
        return libgguf.GGML_QUANT_SIZES[self.qtype][0]

    @property
    def type_size(self) -> int:
        """Bytes per block."""
        return libgguf.GGML_QUANT_SIZES[self.qtype][1]

    @property
    def nominal_bits(self) -> float:
        """Bits per weight: block bytes * 8 / block size (Q4_K: 144 * 8 / 256 = 4.5)."""
        return self.type_size * 8 / self.block_size

    @property
    def ladder(self) -> tuple[str, float] | None:
        """The type's rung: the K-quants, the legacy 32-block types and the 256-block IQ types
        are three ladders along which llama.cpp's error falls as bits rise; types across
        ladders are not ordered (Q4_1 at 5.0 bits quantizes worse than IQ4_NL at 4.5)."""
        for name, types in _LADDERS.items():
            if self.type in types:
                return (name, self.nominal_bits)
        return None

    @property
    def is_float(self) -> bool:
        """True for F16."""
        return self.type in FLOAT_TYPES

    def check_shape(self, shape: Sequence[int]) -> tuple[int, int]:
        """``(out, in)`` when ``in`` is a whole number of blocks; otherwise an error saying
        which types fit."""
        out_features, in_features = _check_shape(shape)
        size = self.block_size
        if in_features % size:
            if size > 32 and in_features % 32 == 0:
                advice = f"use a 32-block type such as {_THIRTY_TWO} for this tensor"
            else:
                advice = "no quantized gguf type fits it; keep this tensor in gguf:F16"
            raise BitallocError(
                f"{self.name} stores rows in blocks of {size} weights; an input width of "
                f"{in_features} is not a multiple of {size}: {advice}"
            )
        return out_features, in_features

    def storage_bits(self, shape: Sequence[int]) -> int:
        """Exact stored bits: ``out`` rows of ``row_size(type, in)`` bytes, as llama.cpp
        writes them."""
        out_features, in_features = self.check_shape(shape)
        return out_features * libgguf.row_size(self.qtype, in_features) * 8

    def quantize_bytes(self, weight: torch.Tensor, importance: torch.Tensor | None = None) -> bytes:
        """The GGUF tensor bytes of a 2-D ``weight`` (rows in order, each a run of blocks):
        what llama.cpp writes for it, given ``importance`` as its imatrix (see the module)."""
        out_features, in_features = self.check_shape(tuple(weight.shape))
        importance = check_importance(importance, in_features)
        rows = weight.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
        if self.is_float:
            # llama.cpp's fp32 -> fp16 conversion rounds to nearest even, as numpy's does.
            return rows.astype("<f2").tobytes()
        if importance is None:
            return self._quantize(rows, self._plain_imatrix(in_features)).tobytes()
        imatrix = importance.cpu().numpy().astype(np.float32)
        top = float(imatrix.max())
        if top > 0:
            # llama.cpp's searches weigh candidates by sums of imatrix * weight products, so an
            # importance near float32's limits overflows or underflows there (1e37 zeroes
            # Q4_K blocks). Scaling by a power of two is exact, and where nothing overflows it
            # leaves llama.cpp's bytes unchanged (test_gguf.py checks every member), so bring
            # the largest value to [1, 2).
            imatrix = np.ldexp(imatrix, 1 - int(np.frexp(top)[1])).astype(np.float32)
        out = self._quantize(rows, imatrix)
        # A block whose importance is all zero has no weighted error, so llama.cpp stores it as
        # zeros (every choice ties at zero error). Those columns saw no activation in the
        # calibration data, which does not mean they never will: they get the block llama.cpp
        # writes without an imatrix, as the int family gives such a group its unweighted
        # choice. Blocks are quantized independently, so the splice is exact.
        dead = ~(imatrix.reshape(-1, self.block_size) > 0).any(axis=1)
        if dead.any():
            plain = self._quantize(rows, self._plain_imatrix(in_features))
            blocks = out.reshape(out_features, -1, self.type_size)
            blocks[:, dead] = plain.reshape(out_features, -1, self.type_size)[:, dead]
        return out.tobytes()

    def dequantize_bytes(self, data: bytes, shape: Sequence[int]) -> torch.Tensor:
        """The float32 weight of ``shape`` that GGUF tensor bytes ``data`` store."""
        out_features, in_features = self.check_shape(shape)
        expected = self.storage_bits(shape) // 8
        raw = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
        if raw.size != expected:
            raise BitallocError(
                f"{self.name} stores a ({out_features}, {in_features}) weight in {expected} "
                f"bytes ({out_features} rows of {expected // out_features}); got {raw.size} "
                "bytes: check the tensor's type and shape"
            )
        if self.is_float:
            values = raw.view("<f2").astype(np.float32)
        else:
            rows = raw.reshape(out_features, expected // out_features)
            values = libgguf.dequantize_rows(rows, self.qtype, n_per_row=in_features)
        return torch.from_numpy(np.ascontiguousarray(values).reshape(out_features, in_features))

    def fake_quantize(
        self, weight: torch.Tensor, importance: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The weight llama.cpp computes with under this type, in ``weight``'s shape, dtype and
        device: :meth:`dequantize_bytes` of :meth:`quantize_bytes`."""
        data = self.quantize_bytes(weight, importance)
        values = self.dequantize_bytes(data, tuple(weight.shape))
        return values.to(device=weight.device, dtype=weight.dtype)

    def encode(self, weight: torch.Tensor) -> Encoded:
        """The tensor bytes as one ``blocks`` section (scales and codes interleaved per block,
        as llama.cpp lays them out)."""
        shape = self.check_shape(tuple(weight.shape))
        data = self.quantize_bytes(weight)
        return Encoded(self.name, shape, (Section("blocks", data, 8 * len(data)),))

    def decode(self, encoded: Encoded) -> torch.Tensor:
        """The float32 weight that :meth:`encode` stored."""
        if encoded.format_name != self.name:
            raise BitallocError(
                f"an encoding of {encoded.format_name} cannot be decoded as {self.name}"
            )
        return self.dequantize_bytes(encoded.section("blocks").data, encoded.shape)

    def _plain_imatrix(self, in_features: int) -> np.ndarray | None:
        # llama.cpp refuses to quantize some types (IQ2_XS) without an imatrix. Equal weights
        # are the unweighted choice; libgguf's own fallback, the columns' squared sums over the
        # tensor, would make each row's result depend on the other rows.
        if libgguf.quantize_requires_imatrix(self.qtype):
            return np.ones(in_features, dtype=np.float32)
        return None

    def _quantize(self, rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        return libgguf.quantize_rows(rows, self.qtype, imatrix=imatrix)

    def __str__(self) -> str:
        return self.name


class GGUFFamily(FormatFamily):
    """``gguf:<type>``: a llama.cpp tensor type, quantized by llama.cpp's reference code.

    Opt-in: its members are in no default palette; name them (``--formats gguf:Q4_K,...``).
    """

    name = "gguf"
    description = f"'gguf:<type>' with a llama.cpp type from {', '.join(SUPPORTED_TYPES)}"
    example = "gguf:Q4_K"

    def parse(self, text: str) -> GGUFFormat | None:
        """``gguf:q4_k`` (any case) to ``GGUFFormat("Q4_K")``; an unsupported type raises."""
        if not text.lower().startswith(_PREFIX):
            return None
        given = text[len(_PREFIX) :].strip()
        if given.upper() not in SUPPORTED_TYPES:
            raise BitallocError(
                f"unknown llama.cpp type {given!r} in format {text!r}; use gguf:<type> with a "
                f"type from {', '.join(SUPPORTED_TYPES)}"
            )
        return GGUFFormat(given)

    def members(self) -> tuple[GGUFFormat, ...]:
        """Every supported type."""
        return tuple(GGUFFormat(t) for t in SUPPORTED_TYPES)

    def default_members(self) -> tuple[GGUFFormat, ...]:
        """None: the default palette stays the int family's."""
        return ()
