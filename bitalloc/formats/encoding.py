"""The packed stored form of a weight, and the bit packing formats need to build one.

An :class:`Encoded` is a list of named sections (codes, scales, zeros, a codebook, ...), each a
byte string with its exact bit length: codes of 3 bits for 5 weights are 15 bits stored in 2
bytes, and the format's cost counts the 15. Summing the sections gives what
:meth:`bitalloc.formats.base.Format.storage_bits` must equal.

Kept here (not in :mod:`bitalloc.kernels.packing`) because formats are a leaf that kernels
import; this layout is a plain little-endian bit stream, meant for checking costs and for
families that have no kernel, not the kernels' word-aligned planes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from bitalloc.errors import BitallocError


@dataclass(frozen=True)
class Section:
    """One stored part of a weight: ``data`` holds ``bits`` bits (the last byte padded)."""

    name: str
    data: bytes
    bits: int

    def __post_init__(self) -> None:
        if self.bits < 0 or len(self.data) != math.ceil(self.bits / 8):
            raise BitallocError(
                f"section {self.name!r} holds {len(self.data)} bytes for {self.bits} bits; "
                f"{self.bits} bits need {math.ceil(max(self.bits, 0) / 8)} bytes"
            )


@dataclass(frozen=True)
class Encoded:
    """A weight's stored form under one format: its name, the weight's shape and the sections."""

    format_name: str
    shape: tuple[int, int]
    sections: tuple[Section, ...]

    @property
    def bits(self) -> int:
        """Stored bits, summed over the sections (padding to whole bytes not counted)."""
        return sum(s.bits for s in self.sections)

    def section(self, name: str) -> Section:
        """The section called ``name``; a clear error when there is none."""
        for s in self.sections:
            if s.name == name:
                return s
        have = [s.name for s in self.sections]
        raise BitallocError(
            f"the {self.format_name} encoding has no {name!r} section; it has {have}"
        )


def pack_codes(name: str, codes: torch.Tensor, bits: int) -> Section:
    """Codes (any shape, values in [0, 2**bits)) as a little-endian stream of ``bits`` each."""
    if not 1 <= bits <= 8:
        raise BitallocError(f"codes are packed at 1 to 8 bits each, got {bits}")
    flat = codes.detach().reshape(-1).to(torch.int64).cpu().numpy()
    if flat.size and (flat.min() < 0 or flat.max() >= 2**bits):
        raise BitallocError(f"section {name!r} has codes outside [0, {2**bits - 1}]")
    planes = ((flat[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
    data = np.packbits(planes.reshape(-1), bitorder="little").tobytes()
    return Section(name, data, int(flat.size) * bits)


def unpack_codes(section: Section, count: int, bits: int) -> torch.Tensor:
    """The ``count`` codes of ``bits`` bits each in ``section``, as a flat int64 tensor."""
    if section.bits != count * bits:
        raise BitallocError(
            f"section {section.name!r} holds {section.bits} bits, not {count} codes of {bits}"
        )
    stream = np.unpackbits(np.frombuffer(section.data, dtype=np.uint8), bitorder="little")
    planes = stream[: count * bits].reshape(count, bits).astype(np.int64)
    return torch.from_numpy(planes @ (1 << np.arange(bits, dtype=np.int64)))


def pack_fp16(name: str, values: torch.Tensor) -> Section:
    """Values (any shape) stored as fp16, 16 bits each."""
    array = values.detach().reshape(-1).to(torch.float16).cpu().numpy()
    return Section(name, array.astype("<f2").tobytes(), 16 * int(array.size))


def unpack_fp16(section: Section) -> torch.Tensor:
    """The fp16 values in ``section`` as a flat float16 tensor."""
    if section.bits % 16:
        raise BitallocError(f"section {section.name!r} holds {section.bits} bits, not fp16 values")
    return torch.from_numpy(np.frombuffer(section.data, dtype="<f2").astype(np.float16))
