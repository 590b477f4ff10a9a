"""The ``fp`` family: small floating-point elements with shared block scales (MXFP4, NVFP4,
MXFP6, FP8), every stored bit counted.

A name is ``fp<bits>-<element>-<scaling>``:

- elements, the OCP Microscaling (MX) specification v1.0's types (its FP8 E4M3 is the ``fn``
  variant: no infinities, one NaN code per sign, largest value 448): ``e2m1`` (FP4, values
  ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}), ``e3m2`` and ``e2m3`` (FP6, largest 28 and 7.5; the FP6 of
  ZeroQuant(4+2) / FP6-LLM is E3M2), ``e4m3`` (FP8);
- scalings: ``mx``, the MX spec's E8M0 (power-of-two, 8-bit) scale per 32 consecutive weights
  of a row; ``nv``, NVIDIA's NVFP4 layout, an FP8 E4M3 scale per 16 weights times one FP32
  global scale per tensor; ``g32`` / ``g64`` / ``g128``, an fp16 scale per group of that many
  weights (to compare with ``int<b>-g<g>`` at the same group); ``ch``, one FP32 scale per output
  channel (row), any input width.

Supported: ``fp4-e2m1-{mx,nv,g32,g64,g128}``, ``fp6-{e3m2,e2m3}-{mx,g32,g64,g128}``,
``fp8-e4m3-{mx,ch}``. Exact cost for a weight of shape (out, in), ``b`` the element bits:

================= ========================= ====================================== ==========
scaling           scales stored             storage_bits                           bits/weight
================= ========================= ====================================== ==========
mx                E8M0 per 32               out*in*b + out*(in/32)*8               b + 0.25
nv (b = 4)        E4M3 per 16, FP32/tensor  out*in*4 + out*(in/16)*8 + 32          4.5 (+32)
g<g>              fp16 per g                out*in*b + out*(in/g)*16               b + 16/g
ch (b = 8)        FP32 per row              out*in*8 + out*32                      8 + 32/in
================= ========================= ====================================== ==========

so (4096, 4096) costs 4.25 bits per weight in ``fp4-e2m1-mx``, 6.25 in the FP6 MX formats,
4.5 + 32 / 4096**2 in ``fp4-e2m1-nv``. ``in`` must be a multiple of the block (32, 16 or g).

Codes are the elements' own OCP bit patterns (sign bit on top), so an E4M3 code is the
``torch.float8_e4m3fn`` byte; E8M0 scales are their 8-bit codes (``2**(code - 127)``), E4M3
scales their bytes, fp16 / FP32 scales their IEEE bytes: :meth:`FPFormat.encode` holds exactly
:meth:`FPFormat.storage_bits` bits.

Rounding: each scaled weight goes to the nearest representable element, ties to the even code
(the spec's roundTiesToEven), saturating at the largest magnitude. Scales: each block's scale
starts from the spec's choice and a short search keeps the candidate of least squared error
(importance-weighted when ``importance`` is given); the spec's choice is tried first and a later
candidate wins only when strictly better, so the search is never worse than the spec:

- mx: the spec's exponent ``floor(log2(amax)) - emax_elem``, then one above (no saturation,
  coarser) and one below (finer, more clipping);
- nv: the global scale is ``amax(|W|) / (6 * 448)`` (NVIDIA's recipe, stored in FP32), the block
  scale ``block_amax / 6 / global`` rounded to E4M3, then the next E4M3 code above and the five
  below (each a step of 1/16 to 1/8);
- g<g> and ch: ``amax / max_elem`` (in fp16 / FP32) times a grid of shrink ratios starting at 1.

Importance weights each column's squared error within its group, normalised by the group's
largest weight as the ``int`` family does, so equal importances give the plain result.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from bitalloc.errors import BitallocError
from bitalloc.formats.base import ColumnQuantizer, Format, check_importance
from bitalloc.formats.encoding import (
    Encoded,
    Section,
    pack_codes,
    pack_fp16,
    unpack_codes,
    unpack_fp16,
)
from bitalloc.formats.int_grid import _check_shape, _group_weights
from bitalloc.formats.registry import FormatFamily


class ElementType:
    """An element type's representable magnitudes (code order) and its rounding.

    ``finite_codes`` magnitudes from the exponent / mantissa split with bias
    ``2**(exponent_bits - 1) - 1``, subnormals at exponent field 0: the OCP MX definitions. In
    these types the magnitude code order is the value order, so code ``i`` is table entry ``i``.
    """

    def __init__(self, name: str, exponent_bits: int, mantissa_bits: int, finite_codes: int):
        bias = 2 ** (exponent_bits - 1) - 1
        values = []
        for code in range(finite_codes):
            field, fraction = code >> mantissa_bits, (code % 2**mantissa_bits) / 2**mantissa_bits
            if field == 0:
                values.append(fraction * 2.0 ** (1 - bias))
            else:
                values.append((1 + fraction) * 2.0 ** (field - bias))
        self.name = name
        self.bits = 1 + exponent_bits + mantissa_bits
        self.mantissa_bits = mantissa_bits
        self.magnitudes = torch.tensor(values, dtype=torch.float32)
        self.max = values[-1]
        #: floor(log2(max)): the spec's emax_elem, the exponent of the largest normal.
        self.emax = math.frexp(self.max)[1] - 1
        #: The exponent of the smallest normal, which subnormals share as their spacing's.
        self.emin = 1 - bias

    def _step(self, magnitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per value, its binade's exponent (clamped to [emin, emax]) and the spacing of the
        representable values there, ``2**(exponent - mantissa_bits)`` (exact float32, built
        from its bits)."""
        # frexp: m * 2**e with m in [0.5, 1), so floor(log2(x)) = e - 1 (0 gives -1).
        exponent = torch.frexp(magnitude)[1].sub_(1).clamp_(self.emin, self.emax)
        step = (exponent + (127 - self.mantissa_bits)).bitwise_left_shift_(23)
        return exponent, step.view(torch.float32)

    def values(self, scaled: torch.Tensor) -> torch.Tensor:
        """``scaled`` rounded to the nearest representable element (float32): ties to the even
        code (``torch.round`` rounds half to even, and an even multiple of the spacing is an
        even code), saturating at :attr:`max`. Zero is +0."""
        magnitude = scaled.abs()
        _, step = self._step(magnitude)
        # Division and product by a power of two are exact; the spacing is uniform within a
        # binade (and below the smallest normal), and rounding up to the next binade's first
        # value is right too, so this is the nearest representable value.
        rounded = magnitude.div_(step).round_().mul_(step).clamp_(max=self.max)
        # Adding +0 turns the -0 that copysign gives a negative value rounded to 0 into +0.
        return rounded.copysign_(scaled).add_(0.0)

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        """The codes (uint8: sign bit on top, then the magnitude code) of representable
        ``values`` (as :meth:`values` returns)."""
        magnitude = values.abs()
        exponent, step = self._step(magnitude)
        # Within a binade the code is (field << m) + mantissa = value / spacing + (binade -
        # emin) << m, subnormals (field 0) included; frexp puts 0 in binade -1, not emin.
        binade = (exponent.to(torch.int64) - self.emin) << self.mantissa_bits
        binade.masked_fill_(magnitude == 0, 0)
        index = magnitude.div_(step).to(torch.int64) + binade
        # Only a non-finite input lands outside the codes; keep it a valid code.
        index.clamp_(0, len(self.magnitudes) - 1)
        return (index | ((values < 0).to(torch.int64) << (self.bits - 1))).to(torch.uint8)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """The float32 values of element codes (any integer dtype)."""
        codes = codes.to(torch.int64)
        magnitude = self.magnitudes.to(codes.device)[codes % 2 ** (self.bits - 1)]
        return torch.where(codes >> (self.bits - 1) == 1, -magnitude, magnitude)


ELEMENT_TYPES = {
    "e2m1": ElementType("e2m1", 2, 1, 8),
    "e3m2": ElementType("e3m2", 3, 2, 32),
    "e2m3": ElementType("e2m3", 2, 3, 32),
    # 0x7F is E4M3fn's NaN: 127 finite magnitudes, the largest 448.
    "e4m3": ElementType("e4m3", 4, 3, 127),
}
#: The scalings each element is offered with.
SUPPORTED = {
    "e2m1": ("mx", "nv", "g32", "g64", "g128"),
    "e3m2": ("mx", "g32", "g64", "g128"),
    "e2m3": ("mx", "g32", "g64", "g128"),
    "e4m3": ("mx", "ch"),
}
MX_BLOCK = 32
NV_BLOCK = 16
#: The input width :attr:`FPFormat.nominal_bits` assumes for ``ch`` (its cost depends on it).
NOMINAL_IN_FEATURES = 4096
#: Exponent offsets tried after the MX spec's (0): one coarser, one finer.
_MX_STEPS = (0, 1, -1)
#: E4M3 code offsets tried after the rounded NVFP4 block scale (0).
_NV_STEPS = (0, 1, -1, -2, -3, -4, -5)
#: Shrink ratios of ``amax / max_elem`` for fp16 (group) and FP32 (channel) scales; 1 first.
_GROUP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)
_CHANNEL_RATIOS = (1.0, 0.97, 0.94, 0.91, 0.88)
_NV_GLOBAL_DIVISOR = 6.0 * 448.0
# Candidate x weight elements per step of the search: bounds its temporary memory.
_CHUNK_ELEMENTS = 1 << 20
# Scale code -> value: E8M0 2**(c - 127) (255 is NaN, never stored) and E4M3 via torch's dtype.
_E8M0_VALUES = torch.tensor([2.0 ** (c - 127) for c in range(255)] + [math.nan])
_E4M3_VALUES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
_NAME = re.compile(r"^fp(\d+)-(e\d+m\d+)-([a-z0-9]+)$")
_MEMBERS = tuple(f"fp{ELEMENT_TYPES[e].bits}-{e}-{s}" for e, ss in SUPPORTED.items() for s in ss)


@dataclass(frozen=True)
class FPFormat(Format):
    """One ``fp`` palette entry: ``FPFormat("e2m1", "mx")`` is ``fp4-e2m1-mx``."""

    element: str
    scaling: str

    def __post_init__(self) -> None:
        element = self.element if isinstance(self.element, str) else None
        if not isinstance(self.scaling, str) or self.scaling not in SUPPORTED.get(element, ()):
            raise BitallocError(
                f"unsupported fp format element {self.element!r} with scaling "
                f"{self.scaling!r}; choose one of {', '.join(_MEMBERS)}"
            )

    @property
    def name(self) -> str:
        """``fp<bits>-<element>-<scaling>``, e.g. ``fp4-e2m1-mx``."""
        return f"fp{self.bits}-{self.element}-{self.scaling}"

    @property
    def family(self) -> str:
        """Always ``fp``."""
        return "fp"

    @property
    def bits(self) -> int:
        """Bits of one element code (4, 6 or 8)."""
        return ELEMENT_TYPES[self.element].bits

    @property
    def block(self) -> int | None:
        """Weights per scale along a row (32, 16 or g); None for ``ch`` (one per row)."""
        if self.scaling == "mx":
            return MX_BLOCK
        if self.scaling == "nv":
            return NV_BLOCK
        return None if self.scaling == "ch" else int(self.scaling[1:])

    @property
    def scale_bits(self) -> int:
        """Bits of one block scale: 8 (E8M0, E4M3), 16 (fp16) or 32 (FP32 per row)."""
        return {"mx": 8, "nv": 8, "ch": 32}.get(self.scaling, 16)

    @property
    def is_float(self) -> bool:
        """False: every member quantizes."""
        return False

    @property
    def nominal_bits(self) -> float:
        """Bits per weight (``ch`` at :data:`NOMINAL_IN_FEATURES`; ``nv`` without its global)."""
        return self.bits + self.scale_bits / (self.block or NOMINAL_IN_FEATURES)

    def check_shape(self, shape: Sequence[int]) -> tuple[int, int]:
        """``(out, in)``; ``in`` must be a whole number of blocks."""
        out_features, in_features = _check_shape(shape)
        if self.block and in_features % self.block:
            raise BitallocError(
                f"{self.name} stores one scale per {self.block} input columns, so the input "
                f"width must be a multiple of {self.block}; got {in_features}. Choose a format "
                "whose block divides it (e.g. fp8-e4m3-ch takes any width)"
            )
        return out_features, in_features

    def storage_bits(self, shape: Sequence[int]) -> int:
        """Exact stored bits: codes, block scales and (``nv``) the FP32 global scale."""
        out_features, in_features = self.check_shape(shape)
        scales = out_features * (in_features // self.block if self.block else 1)
        extra = 32 if self.scaling == "nv" else 0
        return out_features * in_features * self.bits + scales * self.scale_bits + extra

    def fake_quantize(
        self, weight: torch.Tensor, importance: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The dequantized weight in ``weight``'s dtype (block scales searched as the module
        says, weighted by ``importance`` when given)."""
        values, _, effective, _ = self._quantize(weight, importance)
        return self._dequantize(values, effective).to(weight.dtype)

    def encode(self, weight: torch.Tensor) -> Encoded:
        """Element codes at :attr:`bits` bits, block scales as stored, (``nv``) the global."""
        values, stored, _, global_scale = self._quantize(weight, None)
        codes = ELEMENT_TYPES[self.element].encode(values)
        return self._pack(codes, stored, global_scale)

    def decode(self, encoded: Encoded) -> torch.Tensor:
        """The float32 weight that :meth:`encode` stored."""
        if encoded.format_name != self.name:
            raise BitallocError(
                f"an encoding of {encoded.format_name} cannot be decoded as {self.name}"
            )
        out_features, in_features = self.check_shape(encoded.shape)
        n_groups = in_features // self.block if self.block else 1
        codes = unpack_codes(encoded.section("codes"), out_features * in_features, self.bits)
        section = encoded.section("scales")
        global_scale = None
        if self.scaling == "nv":
            global_scale = _unpack_fp32(encoded.section("global_scale"))[0]
        if self.scaling in ("mx", "nv"):
            stored = unpack_codes(section, out_features * n_groups, 8)
        elif self.scaling == "ch":
            stored = _unpack_fp32(section)
        else:
            stored = unpack_fp16(section)
        effective = self._effective(stored.reshape(out_features, n_groups), global_scale)
        values = ELEMENT_TYPES[self.element].decode(codes)
        return self._dequantize(values.reshape(out_features, in_features), effective)

    def column_quantizer(
        self, weight: torch.Tensor, importance: torch.Tensor | None = None
    ) -> FPColumnQuantizer:
        """A :class:`FPColumnQuantizer`; ``nv``'s global scale is fixed from ``weight``."""
        return FPColumnQuantizer(self, weight, importance)

    # --- the quantizer ---------------------------------------------------------------------
    def _global_scale(self, weight: torch.Tensor) -> torch.Tensor | None:
        """``nv``'s FP32 global scale ``amax(|W|) / (6 * 448)`` (1 when that is 0 or not
        finite: every block is then zero, or the weight has no usable range); else None."""
        if self.scaling != "nv":
            return None
        value = weight.detach().to(torch.float32).abs().amax() / _NV_GLOBAL_DIVISOR
        return torch.where((value > 0) & torch.isfinite(value), value, 1.0)

    def _weights(self, importance: torch.Tensor | None, in_features: int) -> torch.Tensor | None:
        """Per-group column weights (n_groups, group), each group scaled to a maximum of 1."""
        values = check_importance(importance, in_features)
        if values is None:
            return None
        size = self.block or in_features
        return _group_weights(values, in_features // size, size)

    def _quantize(
        self, weight: torch.Tensor, importance: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Element values (out, in) (float32, on the grid), stored scales and effective
        float32 scales (out, n_groups), and the global scale (``nv``) of ``weight``."""
        out_features, in_features = self.check_shape(tuple(weight.shape))
        weights = self._weights(importance, in_features)
        w = weight.detach().to(torch.float32)
        size = self.block or in_features
        global_scale = self._global_scale(w)
        values, stored, effective = self._search(
            w.reshape(out_features, in_features // size, size), weights, global_scale
        )
        return values.reshape(out_features, in_features), stored, effective, global_scale

    def _candidates(
        self, amax: torch.Tensor, global_scale: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate scales for blocks of absolute maximum ``amax`` (rows, n_groups): as
        stored (E8M0 / E4M3 codes, fp16, FP32) and as float32 values, both (k, rows, n)."""
        element = ELEMENT_TYPES[self.element]
        if self.scaling == "mx":
            # frexp: amax = m * 2**e with m in [0.5, 1), so floor(log2(amax)) = e - 1 exactly.
            exponent = torch.frexp(amax)[1].to(torch.int64) - 1 - element.emax
            steps = torch.tensor(_MX_STEPS, device=amax.device).reshape(-1, 1, 1)
            stored = torch.clamp(exponent + steps + 127, 0, 254)
        elif self.scaling == "nv":
            block_scale = torch.clamp(amax / 6.0 / global_scale, 0.0, 448.0)
            code = block_scale.to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int64)
            steps = torch.tensor(_NV_STEPS, device=amax.device).reshape(-1, 1, 1)
            # Positive E4M3 codes 0..126 are in value order (127 is NaN).
            stored = torch.clamp(code + steps, 0, 126)
        else:
            ratios = _CHANNEL_RATIOS if self.scaling == "ch" else _GROUP_RATIOS
            ratio = torch.tensor(ratios, device=amax.device).reshape(-1, 1, 1)
            stored = amax / element.max * ratio
            if self.scaling != "ch":
                stored = torch.clamp(stored, max=65504.0).to(torch.float16)
        return stored, self._effective(stored, global_scale)

    def _effective(self, stored: torch.Tensor, global_scale: torch.Tensor | None) -> torch.Tensor:
        """Float32 scales from stored ones, computed the same way by search and decode."""
        if self.scaling == "mx":
            return _E8M0_VALUES.to(stored.device)[stored.to(torch.int64)]
        if self.scaling == "nv":
            return _E4M3_VALUES.to(stored.device)[stored.to(torch.int64)] * global_scale
        return stored.to(torch.float32)

    def _search(
        self, x: torch.Tensor, weights: torch.Tensor | None, global_scale: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Best-scale element values (rows, n, g), stored and effective scales (rows, n) of
        ``x`` (rows, n, g), trying every candidate at once on chunks of rows."""
        element = ELEMENT_TYPES[self.element]
        rows, n_groups, size = x.shape
        n_candidates = {"mx": len(_MX_STEPS), "nv": len(_NV_STEPS), "ch": len(_CHANNEL_RATIOS)}
        k = n_candidates.get(self.scaling, len(_GROUP_RATIOS))
        step = max(1, _CHUNK_ELEMENTS // (k * n_groups * size))
        values, stored_parts, effective_parts = [], [], []
        for start in range(0, rows, step):
            xs = x[start : start + step]
            stored, effective = self._candidates(xs.abs().amax(dim=-1), global_scale)
            err = element.values(_scaled(xs, effective[..., None])) * effective[..., None]
            err = err.sub_(xs).square_()
            if weights is not None:
                err = err.mul_(weights)
            # NaN never wins; argmin takes the first least error, so a later candidate wins only
            # when strictly better (the spec's, tried first, keeps ties).
            err = err.sum(dim=-1)
            err = torch.where(err < math.inf, err, math.inf)
            pick = err.movedim(0, -1).contiguous().argmin(dim=-1)[None]
            best_stored = stored.gather(0, pick)[0]
            best = effective.gather(0, pick)[0]
            values.append(element.values(_scaled(xs, best[..., None])))
            stored_parts.append(best_stored)
            effective_parts.append(best)
        return torch.cat(values), torch.cat(stored_parts), torch.cat(effective_parts)

    def _dequantize(self, values: torch.Tensor, effective: torch.Tensor) -> torch.Tensor:
        """Float32 weight (out, in) from element values (out, in) and scales (out, n_groups)."""
        out_features, in_features = values.shape
        grouped = values.reshape(out_features, effective.shape[1], -1)
        return (grouped * effective[..., None]).reshape(out_features, in_features)

    def _pack(
        self, codes: torch.Tensor, stored: torch.Tensor, global_scale: torch.Tensor | None
    ) -> Encoded:
        """The :class:`Encoded` of codes (out, in), stored scales and the global scale."""
        sections = [pack_codes("codes", codes, self.bits)]
        if self.scaling in ("mx", "nv"):
            sections.append(pack_codes("scales", stored, 8))
        elif self.scaling == "ch":
            sections.append(_pack_fp32("scales", stored))
        else:
            sections.append(pack_fp16("scales", stored))
        if global_scale is not None:
            sections.append(_pack_fp32("global_scale", global_scale))
        return Encoded(self.name, tuple(codes.shape), tuple(sections))


class FPColumnQuantizer(ColumnQuantizer):
    """An :class:`FPFormat` weight rounded one input column at a time (for GPTQ): :meth:`fit`
    runs the format's scale search on one block of columns for every row, :meth:`round`
    rounds a column with its block's scales. ``nv``'s global scale comes from the weight given
    at construction."""

    def __init__(self, fmt: FPFormat, weight: torch.Tensor, importance: torch.Tensor | None = None):
        out_features, in_features = fmt.check_shape(tuple(weight.shape))
        self.fmt = fmt
        self.group_size = fmt.block or in_features
        self._weights = fmt._weights(importance, in_features)
        self._global = fmt._global_scale(weight)
        n_groups = in_features // self.group_size
        device = weight.device
        self._codes = torch.zeros((out_features, in_features), dtype=torch.uint8, device=device)
        self._rounded = torch.zeros(in_features, dtype=torch.bool)
        self._stored: list[torch.Tensor | None] = [None] * n_groups
        self._effective: list[torch.Tensor | None] = [None] * n_groups

    def fit(self, start: int, block: torch.Tensor) -> None:
        """Search the scales of the group starting at column ``start`` from ``block``."""
        out_features, in_features = self._codes.shape
        if start % self.group_size or not 0 <= start < in_features:
            raise BitallocError(
                f"{self.fmt.name} groups start at multiples of {self.group_size} below "
                f"{in_features}; got start={start}"
            )
        if tuple(block.shape) != (out_features, self.group_size):
            raise BitallocError(
                f"fit needs a block of shape ({out_features}, {self.group_size}) for "
                f"{self.fmt.name}; got {tuple(block.shape)}"
            )
        group = start // self.group_size
        weights = None if self._weights is None else self._weights[group : group + 1]
        x = block.detach().to(torch.float32).reshape(out_features, 1, self.group_size)
        _, stored, effective = self.fmt._search(x, weights, self._global)
        self._stored[group], self._effective[group] = stored[:, 0], effective[:, 0]

    def round(self, index: int, column: torch.Tensor) -> torch.Tensor:
        """Column ``index`` on its group's grid (float32, (out,)); its codes are kept."""
        effective = self._effective[index // self.group_size]
        if effective is None:
            raise BitallocError(
                f"column {index} of {self.fmt.name} is rounded before its group (starting at "
                f"{index - index % self.group_size}) was fitted; call fit first"
            )
        element = ELEMENT_TYPES[self.fmt.element]
        values = element.values(_scaled(column.detach().to(torch.float32), effective))
        self._codes[:, index] = element.encode(values)
        self._rounded[index] = True
        return values * effective

    def encode(self) -> Encoded:
        """The stored form of every rounded column (all must be rounded)."""
        if not bool(self._rounded.all()):
            missing = int((~self._rounded).sum())
            raise BitallocError(f"{missing} columns are not rounded yet; round every column")
        stored = torch.stack([s for s in self._stored if s is not None], dim=1)
        return self.fmt._pack(self._codes, stored, self._global)


class FPFamily(FormatFamily):
    """``fp<bits>-<element>-<scaling>``: MX / NVFP4 / grouped / per-channel float elements."""

    name = "fp"
    description = f"'fp<bits>-<element>-<scaling>', one of {', '.join(_MEMBERS)}"
    example = "fp4-e2m1-mx"

    def parse(self, text: str) -> FPFormat | None:
        """``fp4-e2m1-mx`` to ``FPFormat("e2m1", "mx")``; an ``fp<n>-...`` name that is not
        supported raises; other names (``fp16`` included) are not this family's."""
        if not re.match(r"^fp\d+-", text):
            return None
        match = _NAME.match(text)
        element = match and ELEMENT_TYPES.get(match[2])
        if not match or not element or element.bits != int(match[1]):
            raise BitallocError(f"unknown fp format {text!r}; choose one of {', '.join(_MEMBERS)}")
        return FPFormat(match[2], match[3])

    def members(self) -> tuple[FPFormat, ...]:
        """Every supported element and scaling."""
        return tuple(FPFormat(e, s) for e, scalings in SUPPORTED.items() for s in scalings)

    def default_members(self) -> tuple[FPFormat, ...]:
        """None: the family is opt-in."""
        return ()


def _scaled(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale``, 0 where the scale is 0 (an all-zero block, or an underflowed scale)."""
    return torch.where(scale > 0, x / scale, 0.0)


def _pack_fp32(name: str, values: torch.Tensor) -> Section:
    array = values.detach().reshape(-1).to(torch.float32).cpu().numpy()
    return Section(name, array.astype("<f4").tobytes(), 32 * int(array.size))


def _unpack_fp32(section: Section) -> torch.Tensor:
    if section.bits % 32:
        raise BitallocError(f"section {section.name!r} holds {section.bits} bits, not FP32 values")
    return torch.from_numpy(np.frombuffer(section.data, dtype="<f4").astype(np.float32))
