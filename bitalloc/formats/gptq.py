"""The ``gptq`` family: error-feedback quantization (GPTQ, Frantar et al. 2023, on the Optimal
Brain Quantization framework of Frantar & Alistarh 2022) on any format with a column grid.

``int3-g128+gptq`` stores a weight exactly as ``int3-g128`` does (same codes, scales and zeros,
same bits: the packed path, the exports and the bit accounting are unchanged) but chooses the
codes to minimise the layer's output error ``||X (W - Q)ᵀ||²`` over the calibration inputs
instead of each weight's own rounding error. With ``H = XᵀX / n`` (the input Gram matrix, passed
as the format's ``importance``), GPTQ rounds one input column at a time and spreads the column's
error over the columns not yet rounded, in proportion to ``H⁻¹``: the columns still free absorb
what the rounded one got wrong. Without a Gram matrix (``importance`` None, or a 1-D vector: a
diagonal ``H``, no cross terms) there is nothing to feed back and the result is exactly the base
format's (importance-weighted) rounding, which is the cheaper option where a full GPTQ is not
wanted.

The algorithm, as in the reference implementation:

- dampening: ``H + λ I`` with ``λ = 1%`` of the mean diagonal; inputs that never fire (a zero
  diagonal) get 1 on the diagonal. When the Cholesky factorisation still fails (a singular or
  indefinite ``H``), ``λ`` is raised tenfold, up to :data:`DAMP_RAISES` times; each raise is
  counted (:attr:`GPTQResult.damp_raises`) and warned about, and a Gram that is still not
  positive definite, or not finite, is a :class:`~bitalloc.errors.BitallocError`;
- ``U`` = the upper Cholesky factor of ``H⁻¹``; column ``j`` is rounded, its error divided by
  ``U[j, j]`` is subtracted, times ``U[j, j+1:]``, from the later columns of the block, and a
  block of 128 columns is applied to the rest at once (lazy batch updates);
- group parameters (scales, zeros) are fitted when a group's first column is reached, from the
  group's error-updated values; with activation order (``+gptq-act``: columns visited by falling
  ``H[j, j]``) every group is fitted up front from the original weight ("static groups"), so
  the stored format, groups along the input dimension, is unchanged.

Formats of the int family run side by side in one pass, whatever their widths and group sizes
(:meth:`GPTQFormat.fake_quantize_many`), which is what profiling a whole palette costs.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bitalloc.errors import BitallocError
from bitalloc.formats.base import ColumnQuantizer, Format, check_gram, check_importance
from bitalloc.formats.encoding import Encoded
from bitalloc.formats.int_columns import IntColumnQuantizer
from bitalloc.formats.integer import QuantFormat, QuantizedWeight, _check_shape
from bitalloc.formats.registry import FormatFamily, parse_format

#: Dampening, as a fraction of the mean diagonal of ``H`` (the reference's ``percdamp``).
DAMP = 0.01
#: Tenfold raises of the dampening tried when ``H + λ I`` is not positive definite.
DAMP_RAISES = 4
#: Columns per lazy batch update (the reference's ``blocksize`` is 128). Blocks must start at
#: every group start, so that a group is fitted from fully updated values; the result does not
#: depend on the block size (up to float rounding), and 32 makes the column-by-column updates,
#: the costly part on a CPU, 4x smaller than 128 does.
BLOCK = 32
_NAME = re.compile(r"^(.+)\+gptq(-act)?$")


@dataclass(frozen=True)
class GPTQResult:
    """What one GPTQ pass gives: the dequantized weight(s) and the dampening it needed."""

    weight: torch.Tensor
    damp: float
    damp_raises: int


def inverse_factor(gram: torch.Tensor, damp: float = DAMP) -> tuple[torch.Tensor, float, int]:
    """``U`` (upper Cholesky factor of ``(H + λ I)⁻¹``, float32), ``λ`` and the raises it took.

    ``gram`` is checked by the caller (finite, square). Dead inputs (zero diagonal) get 1.
    """
    h = gram.to(torch.float64).clone()
    diagonal = torch.diagonal(h)
    dead = diagonal == 0
    diagonal[dead] = 1.0
    mean = float(diagonal.mean())
    if not math.isfinite(mean) or mean <= 0:
        raise BitallocError("the input Gram matrix has no positive diagonal; it is not XᵀX")
    eye = torch.eye(h.shape[0], dtype=torch.float64)
    lam = damp * mean
    for raises in range(DAMP_RAISES + 1):
        factor, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                if raises:
                    warnings.warn(
                        f"GPTQ: the input Gram matrix needed dampening {lam:.3g} "
                        f"({raises} tenfold raise(s) of {damp:.3g} x mean diagonal) to factor",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                return upper.to(torch.float32), lam, raises
        lam *= 10.0
    raise BitallocError(
        f"GPTQ cannot factor the input Gram matrix even with dampening {lam / 10:.3g} "
        f"({DAMP_RAISES} tenfold raises): it is not positive semi-definite; gather it again "
        "from more calibration tokens, or quantize this unit without +gptq"
    )


def gptq_pass(
    weight: torch.Tensor,
    upper: torch.Tensor,
    quantizer: ColumnQuantizer,
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """Round ``weight`` (``(out, in)``, or a stack ``(k, out, in)`` that ``quantizer`` rounds
    slice by slice) column by column with error feedback through ``upper``.

    ``upper`` is :func:`inverse_factor`'s factor for the columns in visiting ``order`` (a
    permutation of the input columns; None visits them in order and fits each group when its
    first column comes; a permutation fits every group up front from the original weight).
    Returns the dequantized weight in the original column order, float32.
    """
    w = weight.detach().to(torch.float32)
    stacked = w if w.dim() == 3 else w.unsqueeze(0)
    in_features = stacked.shape[-1]
    size, width = quantizer.group_size, quantizer.fit_width

    def own(t: torch.Tensor) -> torch.Tensor:
        # The quantizer sees the caller's layout, (out, ...) or a stack (k, out, ...); the
        # pass keeps columns as contiguous rows, (k, in, out), so that a column and the block
        # of columns after it are contiguous memory (strided updates were 10x slower).
        t = t.transpose(-1, -2)
        return t if weight.dim() == 3 else t[0]

    if order is not None:
        for start in range(0, in_features, size):
            quantizer.fit(start, own(stacked[..., start : start + width].transpose(-1, -2)))
        stacked = stacked[..., order]
    columns = stacked.transpose(-1, -2).contiguous()
    block = BLOCK if size % BLOCK == 0 or BLOCK % size == 0 else size
    result = torch.empty_like(columns)
    pivots = torch.diagonal(upper).tolist()
    for first in range(0, in_features, block):
        last = min(first + block, in_features)
        part = columns[:, first:last]
        errors = torch.empty_like(part)
        for i in range(last - first):
            k = first + i
            j = k if order is None else int(order[k])
            if order is None and j % size == 0:
                quantizer.fit(j, own(columns[:, j : j + width]))
            column = part[:, i]
            rounded = quantizer.round(j, column if weight.dim() == 3 else column[0])
            result[:, k] = rounded.reshape(column.shape)
            error = errors[:, i]
            torch.sub(column, result[:, k], out=error).div_(pivots[k])
            if i + 1 < last - first:
                part[:, i + 1 :].addcmul_(
                    upper[k, k + 1 : last, None], error.unsqueeze(1), value=-1
                )
        if last < in_features:
            # One product per slice: the same arithmetic, slice for slice, however many formats
            # are stacked, so a format's result does not depend on its companions.
            for s in range(columns.shape[0]):
                columns[s, last:] -= upper[first:last, last:].T @ errors[s]
    result = result.transpose(-1, -2)
    if order is not None:
        restored = torch.empty_like(result)
        restored[..., order] = result
        result = restored
    return result if weight.dim() == 3 else result[0]


def visiting_order(gram: torch.Tensor, act_order: bool) -> torch.Tensor | None:
    """Columns by falling ``H[j, j]`` (stable), or None for the natural order."""
    if not act_order:
        return None
    return torch.argsort(torch.diagonal(gram), descending=True, stable=True)


@dataclass(frozen=True)
class GPTQFormat(Format):
    """``<base>+gptq`` (or ``+gptq-act``): ``base``'s stored layout, codes chosen by GPTQ."""

    base: Format
    act_order: bool = False

    def __post_init__(self) -> None:
        if self.base.is_float:
            raise BitallocError(f"{self.base.name} keeps the weight as is; +gptq needs a grid")
        if self.base.family in ("gptq", "rht"):
            hint = self.base.name.replace("+rht", "")
            raise BitallocError(
                f"{self.base.name}+gptq: write GPTQ before the rotation ({hint}+gptq+rht), and "
                "+gptq once"
            )
        if type(self.base).column_quantizer is Format.column_quantizer:
            raise BitallocError(
                f"{self.base.name} ({self.base.family} family) cannot be rounded column by "
                "column, so +gptq cannot use it; use an int, fp or codebook format"
            )

    @property
    def name(self) -> str:
        """The base's name plus ``+gptq`` or ``+gptq-act``."""
        return self.base.name + ("+gptq-act" if self.act_order else "+gptq")

    @property
    def family(self) -> str:
        """``gptq``."""
        return "gptq"

    @property
    def nominal_bits(self) -> float:
        """The base's: GPTQ stores nothing more."""
        return self.base.nominal_bits

    @property
    def is_float(self) -> bool:
        """False: the weight is quantized."""
        return False

    @property
    def uses_gram(self) -> bool:
        """True: error feedback needs the input Gram matrix."""
        return True

    @property
    def int_format(self) -> QuantFormat | None:
        """The int format whose layout stores this one (what the packed kernels run), or None
        for a base of another family."""
        return self.base if isinstance(self.base, QuantFormat) else None

    def check_shape(self, shape: Sequence[int]) -> tuple[int, int]:
        """The base's shape rule."""
        return self.base.check_shape(shape)

    def storage_bits(self, shape: Sequence[int]) -> int:
        """Exactly the base's: same codes, same scales."""
        return self.base.storage_bits(shape)

    def run(self, weight: torch.Tensor, importance: torch.Tensor | None = None) -> GPTQResult:
        """GPTQ on ``weight`` with ``importance`` as ``H`` (see the module docstring); the
        quantizer is left holding the codes (:meth:`quantize`, :meth:`encode` read it)."""
        result, _ = self._run(weight, importance)
        return result

    def _run(
        self, weight: torch.Tensor, importance: torch.Tensor | None
    ) -> tuple[GPTQResult, ColumnQuantizer]:
        out_features, in_features = self.check_shape(tuple(weight.shape))
        quantizer = self.base.column_quantizer(weight, check_importance(importance, in_features))
        gram = check_gram(importance, in_features)
        if gram is None or _is_diagonal(gram):
            # No cross terms: GPTQ's feedback is zero, rounding is the base's own.
            dequantized = _round_plain(weight, quantizer)
            return GPTQResult(dequantized, 0.0, 0), quantizer
        upper, lam, raises = inverse_factor(_ordered(gram, self.act_order))
        order = visiting_order(gram, self.act_order)
        dequantized = gptq_pass(weight, upper, quantizer, order)
        return GPTQResult(dequantized, lam, raises), quantizer

    def fake_quantize(
        self, weight: torch.Tensor, importance: torch.Tensor | None = None
    ) -> torch.Tensor:
        """GPTQ's dequantized weight, in ``weight``'s dtype: with an ``(in, in)`` Gram matrix as
        ``importance``, error feedback; with a vector or None, the base's rounding."""
        return self.run(weight, importance).weight.to(weight.dtype)

    def quantize(
        self, weight: torch.Tensor, importance: torch.Tensor | None = None
    ) -> QuantizedWeight:
        """Codes and group parameters (int base only), for the packed kernels."""
        if not isinstance(self.base, QuantFormat):
            raise BitallocError(f"{self.name} is not stored as int codes; use encode")
        _, quantizer = self._run(weight, importance)
        return quantizer.quantized()

    def encode(self, weight: torch.Tensor, importance: torch.Tensor | None = None) -> Encoded:
        """The base's stored form of GPTQ's codes, under this format's name."""
        _, quantizer = self._run(weight, importance)
        encoded = quantizer.encode()
        return Encoded(self.name, encoded.shape, encoded.sections)

    def decode(self, encoded: Encoded) -> torch.Tensor:
        """What the base decodes from the same sections."""
        if encoded.format_name != self.name:
            raise BitallocError(
                f"an encoding of {encoded.format_name} cannot be decoded as {self.name}"
            )
        return self.base.decode(Encoded(self.base.name, encoded.shape, encoded.sections))

    @staticmethod
    def fake_quantize_many(
        weight: torch.Tensor,
        formats: Sequence[GPTQFormat],
        importance: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """``[f.fake_quantize(weight, importance) for f in formats]``, bit for bit, with one
        factorisation per visiting order and the int formats of each order, every width and
        group size, stacked into one pass."""
        if not formats:
            return []
        _, in_features = _check_shape(tuple(weight.shape))
        gram = check_gram(importance, in_features)
        if gram is None or _is_diagonal(gram):
            return [f.fake_quantize(weight, importance) for f in formats]
        vector = check_importance(importance, in_features)
        results: dict[int, torch.Tensor] = {}
        stacks: dict[bool, list[int]] = {}
        for i, fmt in enumerate(formats):
            fmt.check_shape(tuple(weight.shape))
            if isinstance(fmt.base, QuantFormat):
                stacks.setdefault(fmt.act_order, []).append(i)
            else:
                results[i] = fmt.fake_quantize(weight, importance)
        for act_order, members in stacks.items():
            upper = inverse_factor(_ordered(gram, act_order))[0]
            bases = [formats[i].base for i in members]
            quantizer = IntColumnQuantizer(bases, (len(bases), *weight.shape), vector)
            stack = weight.detach().to(torch.float32).expand(len(bases), *weight.shape)
            order = visiting_order(gram, act_order)
            dequantized = gptq_pass(stack, upper, quantizer, order)
            for k, i in enumerate(members):
                results[i] = dequantized[k].to(weight.dtype)
        return [results[i] for i in range(len(formats))]


def _ordered(gram: torch.Tensor, act_order: bool) -> torch.Tensor:
    order = visiting_order(gram, act_order)
    return gram if order is None else gram[order][:, order]


def _is_diagonal(gram: torch.Tensor) -> bool:
    return not bool(torch.count_nonzero(gram - torch.diag(torch.diagonal(gram))))


def _round_plain(weight: torch.Tensor, quantizer: ColumnQuantizer) -> torch.Tensor:
    """Every group fitted and every column rounded from the original weight: the base's own
    rounding, through the column quantizer (so its codes are there to encode)."""
    w = weight.detach().to(torch.float32)
    in_features = w.shape[-1]
    for start in range(0, in_features, quantizer.group_size):
        quantizer.fit(start, w[..., start : start + quantizer.fit_width])
    return torch.stack([quantizer.round(j, w[..., j]) for j in range(in_features)], dim=-1)


class GPTQFamily(FormatFamily):
    """``<format>+gptq`` and ``<format>+gptq-act``: GPTQ on a format with a column grid."""

    name = "gptq"
    description = (
        "'<format>+gptq' or '<format>+gptq-act' (activation order), for int, fp and codebook "
        "formats"
    )
    example = "int3-g128+gptq"
    wraps = True

    def parse(self, text: str) -> GPTQFormat | None:
        """``int3-g128+gptq`` to ``GPTQFormat(int3-g128)``; a base that cannot take GPTQ
        raises."""
        match = _NAME.match(text)
        if not match:
            return None
        return GPTQFormat(parse_format(match.group(1)), act_order=match.group(2) is not None)

    def members(self) -> tuple[GPTQFormat, ...]:
        """Every int width at groups 32 and 128, and activation order at 128."""
        bases = [QuantFormat(b, g) for b in (2, 3, 4, 8) for g in (32, 128)]
        return tuple(GPTQFormat(b) for b in bases) + (GPTQFormat(QuantFormat(3, 128), True),)

    def default_members(self) -> tuple[GPTQFormat, ...]:
        """None: GPTQ needs the input Gram matrices, gathered only when asked for."""
        return ()
