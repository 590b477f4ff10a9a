"""The ``trellis`` family: trellis-coded quantization, ``tcq{k}-l{L}``.

Scalar and vector codebooks stay 2-3x above the Gaussian distortion-rate bound ``2**(-2R)``
at 2-4 bits (BENCHMARKS.md). Trellis-coded quantization (Marcellin & Fischer 1990) gets much
closer by coding a whole row as one path through a trellis, found by the Viterbi algorithm.
This is the "bitshift" trellis of QTIP (Tseng et al. 2024, "QTIP: Quantization with Trellises
and Incoherence Processing"):

- a row of ``in`` weights is a bit stream: ``L`` bits for the first weight, then ``k`` bits per
  weight. Weight ``t``'s state is the stream's last ``L`` bits, ``s_t = (s_{t-1} << k | b_t)
  mod 2**L``, and it decodes to ``scale * codebook[s_t]``;
- the codebook has ``2**L`` values: the standard normal's quantiles at ``(i + 1/2) / 2**L``, in
  a fixed pseudo-random order (:func:`trellis_codebook`, a bijective integer hash of the
  state), so that the ``2**k`` states reachable from any state take values spread over the
  whole range. It is a function of ``L`` alone: nothing is stored for it;
- each row has one fp16 scale. The row is divided by its root mean square, the Viterbi
  algorithm finds the path of least (importance-weighted) squared error, and the scale is then
  refitted by least squares on that path (which never raises the error).

Cost, exactly, for a weight of shape (out, in)::

    bits = out * (L + (in - 1) * k + 16)

so ``tcq2-l12`` on a 576-wide row is 2 + (12 - 2 + 16) / 576 = 2.045 bits per weight. On
Gaussian data it is within 1.15x of the bound at 2 bits, 1.23x at 3 and 1.37x at 4 (L = 12;
``benchmarks/quantizers.py``). The codebook is Gaussian: rows that are far from it (outliers,
the default model's 4-bit grid) gain from ``+rht`` first, as QTIP does.

The price is time: the Viterbi search does ``2**L`` work per weight (``tcq*-l12`` about 70 µs
per weight on one core, ``-l8`` about 5 µs), so whole-model profiles with ``-l12`` take hours
on a CPU. The family is opt-in, in no default palette. Decoding is a shift and a table lookup
per weight; there is no packed kernel, and no engine runs the format.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bitalloc.errors import BitallocError
from bitalloc.formats.base import Format, check_importance
from bitalloc.formats.encoding import Encoded, pack_codes, pack_fp16, unpack_codes, unpack_fp16
from bitalloc.formats.integer import _check_shape
from bitalloc.formats.registry import FormatFamily
from bitalloc.formats.vq import checked_weight, fp16_scales, pack_wide_codes, unpack_wide_codes

FAMILY = "trellis"
#: Bits per weight (``k``) and state bits (``L``) the family supports.
CODE_BITS = (2, 3, 4)
STATE_BITS = (8, 10, 12)
SCALE_BITS = 16
#: Bytes of Viterbi back-pointers held at once (rows are searched in chunks that fit).
_BACKPOINTER_BYTES = 64 << 20
_NAME = re.compile(r"^tcq(\d+)-l(\d+)$")


def trellis_codebook(state_bits: int) -> torch.Tensor:
    """The ``2**L`` values (float32) of the states: standard normal quantiles, each state's
    value the quantile at a bijective hash of the state (multiply by an odd constant, fold the
    high half onto the low, multiply again, all modulo ``2**L``)."""
    size = 1 << state_bits
    states = torch.arange(size, dtype=torch.int64)
    mixed = (states * 0x9E3779B1) % size
    mixed = mixed ^ (mixed >> (state_bits // 2))
    mixed = (mixed * 0x85EBCA6B) % size
    levels = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    quantiles = torch.distributions.Normal(0.0, 1.0).icdf(levels)
    return quantiles[mixed].to(torch.float32)


def viterbi(
    x: torch.Tensor, weights: torch.Tensor | None, codebook: torch.Tensor, step_bits: int
) -> torch.Tensor:
    """The states (rows, T) int64 of the least-error path of every row of ``x`` (rows, T)
    through the bitshift trellis of ``codebook`` (``2**L`` values), ``step_bits`` new bits
    per step; ``weights`` (T,) weighs each column's squared error (None: all 1)."""
    rows, steps = x.shape
    size = codebook.numel()
    state_bits = size.bit_length() - 1
    branches = 1 << step_bits
    kept = size // branches
    book = codebook[None, :]
    chunk = max(1, _BACKPOINTER_BYTES // max(1, steps * kept))
    out = torch.empty(rows, steps, dtype=torch.int64)
    for first in range(0, rows, chunk):
        part = x[first : first + chunk]
        n = part.shape[0]
        back = torch.empty(steps, n, kept, dtype=torch.uint8)

        def distance(t: int, part: torch.Tensor = part) -> torch.Tensor:
            d = (part[:, t : t + 1] - book).square_()
            return d if weights is None else d.mul_(weights[t])

        cost = distance(0)
        for t in range(1, steps):
            # State q * 2**k + b comes from the states whose low L - k bits are q, i.e.
            # q + h * 2**(L - k) for every h: a min over the view's middle axis.
            best, high = cost.view(n, branches, kept).min(dim=1)
            back[t] = high
            cost = (best[:, :, None] + distance(t).view(n, kept, branches)).view(n, size)
        state = cost.argmin(dim=1)
        path = out[first : first + n]
        path[:, -1] = state
        for t in range(steps - 1, 0, -1):
            low = state >> step_bits
            high = back[t].gather(1, low[:, None])[:, 0].to(torch.int64)
            state = low | (high << (state_bits - step_bits))
            path[:, t - 1] = state
    return out


@dataclass(frozen=True)
class TrellisFormat(Format):
    """``tcq{bits}-l{state_bits}``: bitshift trellis-coded quantization with ``bits`` bits per
    weight, ``2**state_bits`` states and one fp16 scale per row (see the module docstring)."""

    bits: int
    state_bits: int

    def __post_init__(self) -> None:
        if self.bits not in CODE_BITS:
            raise BitallocError(
                f"trellis: unsupported bits per weight {self.bits}; choose one of {CODE_BITS}"
            )
        if self.state_bits not in STATE_BITS:
            raise BitallocError(
                f"trellis: unsupported state bits {self.state_bits}; choose one of {STATE_BITS}"
            )

    @property
    def name(self) -> str:
        """``tcq2-l12`` style."""
        return f"tcq{self.bits}-l{self.state_bits}"

    @property
    def family(self) -> str:
        """``trellis``."""
        return FAMILY

    @property
    def nominal_bits(self) -> float:
        """``bits``: the first weight's extra bits and the scale are a few per row."""
        return float(self.bits)

    @property
    def is_float(self) -> bool:
        """False: the weight is quantized."""
        return False

    @property
    def ladder(self) -> tuple[str, float]:
        """Rank ``bits`` of ``tcq-l{state_bits}``: more bits per step, finer paths."""
        return f"tcq-l{self.state_bits}", float(self.bits)

    def check_shape(self, shape: Sequence[int]) -> tuple[int, int]:
        """Any 2-D shape with at least one weight per row."""
        return _check_shape(shape)

    def storage_bits(self, shape: Sequence[int]) -> int:
        """Per row: the first state, ``bits`` per further weight and the fp16 scale."""
        out_features, in_features = self.check_shape(shape)
        return out_features * (self.state_bits + (in_features - 1) * self.bits + SCALE_BITS)

    def quantize(
        self, weight: torch.Tensor, importance: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """States (out, in) int64 and float32 fp16-valued row scales (out,) of ``weight``;
        ``importance`` (or a Gram matrix's diagonal) weighs each column's squared error."""
        _, in_features = self.check_shape(tuple(weight.shape))
        imp = check_importance(importance, in_features)
        w = checked_weight(weight, self.name)
        if imp is not None and not bool(imp.sum() > 0):
            imp = None  # weighs nothing: the plain error is the only one left to minimise
        weights = None if imp is None else imp.to(device="cpu", dtype=torch.float32)
        column_weights = torch.ones(in_features) if weights is None else weights
        rms = (w.square() * column_weights).sum(1) / column_weights.sum()
        rms = rms.sqrt().where(rms > 0, torch.ones_like(rms))
        book = trellis_codebook(self.state_bits)
        states = viterbi(w / rms[:, None], weights, book, self.bits)
        # Least squares on the path: the scale of least weighted error for these values.
        values = book[states]
        num = (w * values * column_weights).sum(1, dtype=torch.float64)
        den = (values.square() * column_weights).sum(1, dtype=torch.float64)
        scale = torch.where(den > 0, num / den.clamp(min=1e-300), 0.0).to(torch.float32)
        stored = fp16_scales(scale.abs()) * scale.sign()
        return states, torch.where(scale == 0, 0.0, stored)

    def fake_quantize(
        self, weight: torch.Tensor, importance: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``scale * codebook[state]`` for every weight, in ``weight``'s dtype and device."""
        states, scales = self.quantize(weight, importance)
        return self._dequantize(states, scales).to(weight.device, weight.dtype)

    def _dequantize(self, states: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return trellis_codebook(self.state_bits)[states] * scales[:, None]

    def encode(self, weight: torch.Tensor) -> Encoded:
        """Each row's first state (``L`` bits), the ``k`` new bits of every further state and
        the fp16 row scales."""
        shape = self.check_shape(tuple(weight.shape))
        states, scales = self.quantize(weight)
        steps = states[:, 1:] & ((1 << self.bits) - 1)
        sections = (
            *pack_wide_codes("first", states[:, 0], self.state_bits),
            pack_codes("steps", steps, self.bits),
            pack_fp16("scales", scales),
        )
        return Encoded(self.name, shape, sections)

    def decode(self, encoded: Encoded) -> torch.Tensor:
        """The float32 weight :meth:`encode` stored: each state rebuilt from the one before."""
        if encoded.format_name != self.name:
            raise BitallocError(
                f"an encoding of {encoded.format_name} cannot be decoded as {self.name}"
            )
        out_features, in_features = self.check_shape(encoded.shape)
        first = unpack_wide_codes(encoded, "first", out_features, self.state_bits)
        count = out_features * (in_features - 1)
        steps = unpack_codes(encoded.section("steps"), count, self.bits)
        steps = steps.reshape(out_features, in_features - 1)
        scales = unpack_fp16(encoded.section("scales")).to(torch.float32)
        states = torch.empty(out_features, in_features, dtype=torch.int64)
        states[:, 0] = first
        mask = (1 << self.state_bits) - 1
        for t in range(1, in_features):
            states[:, t] = ((states[:, t - 1] << self.bits) | steps[:, t - 1]) & mask
        return self._dequantize(states, scales)


class TrellisFamily(FormatFamily):
    """``tcq{bits}-l{state_bits}``: trellis-coded quantization; opt-in, in no default
    palette."""

    name = FAMILY
    description = (
        f"'tcq<bits>-l<state bits>' (bitshift trellis, bits {CODE_BITS}, state bits "
        f"{STATE_BITS}, one fp16 scale per row)"
    )
    example = "tcq2-l10"

    def parse(self, text: str) -> TrellisFormat | None:
        """``tcq2-l10`` to ``TrellisFormat(2, 10)``; None for another pattern."""
        match = _NAME.match(text)
        if not match:
            return None
        return TrellisFormat(int(match[1]), int(match[2]))

    def members(self) -> tuple[TrellisFormat, ...]:
        """Every width with 8 and 12 state bits (10 parses too)."""
        return tuple(TrellisFormat(b, s) for s in (8, 12) for b in CODE_BITS)

    def default_members(self) -> tuple[TrellisFormat, ...]:
        """None: the family is opt-in (its search is slow)."""
        return ()
