"""The two format contracts: :class:`Format` for a weight matrix, :class:`CacheFormat` for a
layer's KV cache.

Both are small abstract base classes rather than ``typing.Protocol``: the contract includes
behaviour every implementation shares (``bits_per_weight`` from ``storage_bits``, ``allows``
from ``check_shape``, no packed encoding unless the family has one), and a base class keeps that
behaviour in one place instead of asking every family to write it again. ``isinstance(x,
Format)`` is how the palette code tells a format object from a name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from bitalloc.errors import BitallocError
from bitalloc.formats.encoding import Encoded


class NamedFormat(ABC):
    """What every palette entry, weight or cache, has: a stable name its family parses back,
    and the name of that registered family."""

    @property
    @abstractmethod
    def name(self) -> str:
        """Stable name, parsed back by its family's parser."""

    @property
    @abstractmethod
    def family(self) -> str:
        """Name of the registered family this format belongs to."""


class Format(NamedFormat):
    """One palette entry: a way to store a 2-D weight of shape (out, in).

    A family (see :mod:`bitalloc.formats.registry`) parses names into formats; every format of
    every registered family obeys the contract below, which ``tests/formats/test_contract.py``
    checks member by member.

    Note:
        A subclass must implement:

        - :attr:`name`: stable text that :func:`bitalloc.formats.parse_format` turns back into an
          equal format (allocations and profiles store formats by name).
        - :attr:`family`: the name of the registered family that parses :attr:`name`.
        - :attr:`nominal_bits`: bits per weight for a shape the format fits evenly, for sorting
          and display only; costs always come from :meth:`storage_bits`.
        - :attr:`is_float`: True for a format that keeps the weight in floating point (``fp16``);
          its :meth:`fake_quantize` returns the weight unchanged when it is representable.
        - :meth:`check_shape`: raise :class:`~bitalloc.errors.BitallocError` saying why, and what
          to change, for a shape the format cannot store; return the shape as ``(out, in)``.
        - :meth:`storage_bits`: the exact number of stored bits for a weight of that shape,
          counting every stored bit (codes, scales, zeros, codebooks, padding the layout needs).
          It calls :meth:`check_shape` first.
        - :meth:`fake_quantize`: quantize and dequantize, returning the weight the model computes
          with under this format: same shape and dtype as the input, deterministic (the same
          input gives bit-identical output). ``importance`` is an optional non-negative weight per
          input channel (length ``in``) that a family may use in its rounding search and may
          ignore; every family must accept it, and must give exactly its plain result when it
          is None. It may also be the input Gram matrix (``in`` x ``in``): a family that weighs
          columns independently reads its diagonal (:func:`check_importance` does so), an
          error-feedback family uses all of it. It calls :meth:`check_shape` first.

        A subclass may override:

        - :attr:`ladder`: ``(name, rank)`` when the format is one rung of a ladder of formats
          that store weights the same way at rising precision (``int3-g128`` is rank 3 of
          ``int-g128``, ``gguf:Q4_K`` rank 4.5 of ``gguf-k``), so that a higher rank of one
          ladder never quantizes worse; None (the default) when it is on none. Profiles cap
          their tables along ladders (:func:`bitalloc.sensitivity.monotone.bit_chains`), and the
          contract suite checks that error falls along each.
        - :meth:`encode` / :meth:`decode`: the packed stored form. When :meth:`encode` returns
          an :class:`~bitalloc.formats.encoding.Encoded`, its bit count equals
          :meth:`storage_bits` and :meth:`decode` of it equals :meth:`fake_quantize` (in
          float32). The default returns None: the family has no packed form.
        - :attr:`uses_gram`: True when the format uses the whole input Gram matrix, not only
          its diagonal (a wrapper forwards its base's).
        - :meth:`column_quantizer`: a :class:`ColumnQuantizer` rounding the weight one input
          column at a time on the format's own grid, so that error-feedback quantizers
          (``+gptq``) can use the format; None (the default) when it cannot.
        - :meth:`bits_per_weight` and :meth:`allows`, derived here from the methods above.

        Formats are immutable and compare equal when they store weights the same way (frozen
        dataclasses are the simple way to get both).
    """

    @property
    @abstractmethod
    def nominal_bits(self) -> float:
        """Bits per weight for a shape the format fits evenly (ordering and display)."""

    @property
    @abstractmethod
    def is_float(self) -> bool:
        """True when the weight is kept in floating point rather than quantized."""

    @abstractmethod
    def check_shape(self, shape: Sequence[int]) -> tuple[int, int]:
        """``shape`` as ``(out, in)``, or :class:`BitallocError` saying why it cannot be stored."""

    @abstractmethod
    def storage_bits(self, shape: Sequence[int]) -> int:
        """Exact stored bits for a weight of ``shape``, every stored bit counted."""

    @abstractmethod
    def fake_quantize(
        self, weight: torch.Tensor, importance: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The dequantized weight, in ``weight``'s shape and dtype."""

    @property
    def ladder(self) -> tuple[str, float] | None:
        """``(ladder name, rank)``, or None when the format is on no ladder (see above)."""
        return None

    @property
    def uses_gram(self) -> bool:
        """True when the format quantizes better given the input Gram matrix as
        ``importance`` than given its diagonal (error feedback: ``+gptq``), so that a run
        gathers the Gram matrices. False by default."""
        return False

    def allows(self, shape: Sequence[int]) -> bool:
        """True when :meth:`check_shape` accepts ``shape``."""
        try:
            self.check_shape(shape)
        except BitallocError:
            return False
        return True

    def bits_per_weight(self, shape: Sequence[int]) -> float:
        """Effective bits per weight for ``shape``: :meth:`storage_bits` over the weight count."""
        out_features, in_features = self.check_shape(shape)
        return self.storage_bits(shape) / (out_features * in_features)

    def encode(self, weight: torch.Tensor) -> Encoded | None:
        """The packed stored form of ``weight``, or None when the family has none."""
        return None

    def decode(self, encoded: Encoded) -> torch.Tensor:
        """The float32 weight an :meth:`encode` result stores."""
        raise BitallocError(f"{self.name} has no packed encoding to decode")

    def column_quantizer(
        self, weight: torch.Tensor, importance: torch.Tensor | None = None
    ) -> ColumnQuantizer | None:
        """A :class:`ColumnQuantizer` for ``weight`` (error-feedback quantizers need one), or
        None (the default) when the family cannot be rounded column by column.

        ``weight`` is the original weight: a family may fix parameters that span the whole
        tensor from it (a global scale); ``importance`` is as for :meth:`fake_quantize`.
        """
        return None

    def __str__(self) -> str:
        return self.name


class CacheFormat(NamedFormat):
    """One KV-cache palette entry: how a layer's cached keys and values are stored.

    The sibling of :class:`Format` for tensors that grow with the context instead of weights of
    a fixed shape, so the cost takes the cache geometry and the context length.

    Note:
        A subclass must implement:

        - :attr:`name` and :attr:`family`: as for :class:`Format`; the name parses back to an
          equal format with the family's parser (``parse_kv_format`` for ``kv``).
        - :attr:`is_lossless`: True when nothing is quantized.
        - :meth:`cache_bits`: exact stored bits of one layer's keys and values for ``context``
          tokens, ``batch`` sequences, ``n_kv_heads`` heads of ``head_dim`` channels, every
          stored bit counted (codes, scales, zeros, tokens kept at full precision).
        - :meth:`fake_quantize`: what attention reads back from such a cache for keys and values
          of shape (batch, heads, tokens, head_dim), in their dtype, deterministic.

        :meth:`bits_per_element` derives from :meth:`cache_bits`.
    """

    @property
    @abstractmethod
    def is_lossless(self) -> bool:
        """True when neither keys nor values are quantized."""

    @abstractmethod
    def cache_bits(self, context: int, batch: int, n_kv_heads: int, head_dim: int) -> int:
        """Exact stored bits of one layer's K and V cache."""

    @abstractmethod
    def fake_quantize(
        self, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values as a cache in this format returns them."""

    def bits_per_element(self, head_dim: int, n_kv_heads: int, context: int) -> float:
        """Stored bits per cached element (``2 * n_kv_heads * head_dim`` per token), averaged
        over ``context`` tokens: :meth:`cache_bits` over the element count."""
        if isinstance(context, bool) or not isinstance(context, int) or context < 1:
            raise BitallocError(f"context must be an integer >= 1, got {context!r}")
        elements = 2 * n_kv_heads * head_dim * context
        return self.cache_bits(context, 1, n_kv_heads, head_dim) / elements

    def __str__(self) -> str:
        return self.name


def check_importance(importance: torch.Tensor | None, in_features: int) -> torch.Tensor | None:
    """``importance`` checked for :meth:`Format.fake_quantize`, as per-input-channel weights:
    None, or a 1-D tensor of ``in_features`` finite, non-negative weights (returned as float32
    on its device).

    An ``(in_features, in_features)`` input Gram matrix (``XᵀX / n``, what error-feedback
    quantizers such as GPTQ use) is accepted too: a family that weighs columns independently
    takes its diagonal, which is the per-channel mean squared activation.
    """
    if importance is None:
        return None
    if not isinstance(importance, torch.Tensor):
        raise BitallocError(
            f"importance must be a tensor of {in_features} per-input-channel weights or None, "
            f"got {type(importance).__name__}"
        )
    if tuple(importance.shape) == (in_features, in_features) and in_features > 1:
        importance = torch.diagonal(importance)
    if tuple(importance.shape) != (in_features,):
        raise BitallocError(
            f"importance has shape {tuple(importance.shape)}; it needs one weight per input "
            f"channel, shape ({in_features},), or an input Gram matrix, shape "
            f"({in_features}, {in_features})"
        )
    values = importance.detach().to(torch.float32)
    if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
        raise BitallocError("importance weights must be finite and >= 0")
    return values


def check_gram(importance: torch.Tensor | None, in_features: int) -> torch.Tensor | None:
    """``importance`` as an ``(in, in)`` float32 input Gram matrix for error-feedback
    quantizers: a Gram matrix is checked (finite, square, non-negative diagonal) and returned;
    a 1-D per-channel vector becomes the diagonal matrix it stands for (no cross terms); None
    stays None (plain squared error)."""
    if isinstance(importance, torch.Tensor) and importance.dim() == 2 and in_features > 1:
        if tuple(importance.shape) != (in_features, in_features):
            raise BitallocError(
                f"the input Gram matrix has shape {tuple(importance.shape)}; this weight needs "
                f"({in_features}, {in_features})"
            )
        gram = importance.detach().to(torch.float32)
        if not bool(torch.isfinite(gram).all()):
            raise BitallocError("the input Gram matrix has non-finite values (NaN or inf)")
        if bool((torch.diagonal(gram) < 0).any()):
            raise BitallocError("the input Gram matrix has a negative diagonal; it is not XᵀX")
        return gram
    values = check_importance(importance, in_features)
    return None if values is None else torch.diag(values)


class ColumnQuantizer(ABC):
    """One weight quantized one input column at a time with a format's stored grid, for
    error-feedback quantizers (GPTQ, :mod:`bitalloc.formats.gptq`), which round a column,
    spread its error over the columns not yet rounded, and go on.

    A format that can be quantized this way returns one from :meth:`Format.column_quantizer`;
    the result is in the format's own stored layout, so packing, exports and costs are
    unchanged.

    Note:
        The caller, for a weight of shape (out, in):

        1. calls :meth:`fit` at every multiple of :attr:`group_size` before that column is
           rounded, with the :attr:`fit_width` columns from there (fewer at the end): with
           their current, error-updated values (GPTQ's default), or for every group up front
           with the original weight (static groups, needed when the columns are visited in
           another order);
        2. calls :meth:`round` exactly once for every column, in any order, with that column's
           current values; it returns the dequantized column the model will compute with;
        3. calls :meth:`encode` once every column is rounded.

        A subclass must implement:

        - :attr:`group_size`: columns sharing scale parameters (``in`` when one set per row).
          A quantizer of several formats at once may have groups of several sizes: then it is
          their greatest common divisor, and :attr:`fit_width` (by default
          :attr:`group_size`) is the largest.
        - :meth:`fit`: choose the parameters of the group starting at column ``start`` from
          ``block`` (out, group length); may use ``importance`` given at construction.
        - :meth:`round`: column ``index``'s stored value for ``column`` (out,) under its group's
          fitted parameters (nearest grid point), float32; and remember its codes.
        - :meth:`encode`: the :class:`~bitalloc.formats.encoding.Encoded` stored form of all
          rounded columns, which the format's :meth:`Format.decode` turns back into exactly the
          rounded columns, and whose bit count is :meth:`Format.storage_bits`.
    """

    group_size: int

    @property
    def fit_width(self) -> int:
        """Columns :meth:`fit` is given from its start: :attr:`group_size`, unless the
        quantizer holds groups of several sizes."""
        return self.group_size

    @abstractmethod
    def fit(self, start: int, block: torch.Tensor) -> None:
        """Choose the parameters of the group whose first column is ``start``."""

    @abstractmethod
    def round(self, index: int, column: torch.Tensor) -> torch.Tensor:
        """The dequantized value of column ``index`` (float32, shape (out,))."""

    @abstractmethod
    def encode(self) -> Encoded:
        """The stored form of every rounded column."""
