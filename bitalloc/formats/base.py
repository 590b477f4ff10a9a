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
          is None. It calls :meth:`check_shape` first.

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
    """``importance`` checked for :meth:`Format.fake_quantize`: None, or a 1-D tensor of
    ``in_features`` finite, non-negative weights (returned as float32 on its device)."""
    if importance is None:
        return None
    if not isinstance(importance, torch.Tensor):
        raise BitallocError(
            f"importance must be a tensor of {in_features} per-input-channel weights or None, "
            f"got {type(importance).__name__}"
        )
    if tuple(importance.shape) != (in_features,):
        raise BitallocError(
            f"importance has shape {tuple(importance.shape)}; it needs one weight per input "
            f"channel, shape ({in_features},)"
        )
    values = importance.detach().to(torch.float32)
    if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
        raise BitallocError("importance weights must be finite and >= 0")
    return values
