"""The column quantizer of int formats: rounding every column of the original weight after
fitting every group gives exactly the format's own quantization, for a stack of formats of
several widths and group sizes, and bad calls are refused."""

from __future__ import annotations

import pytest
import torch

from bitalloc.errors import BitallocError
from bitalloc.formats import QuantFormat
from bitalloc.formats.int_columns import IntColumnQuantizer

FORMATS = [QuantFormat(2, 32), QuantFormat(3, 128), QuantFormat(4, 64), QuantFormat(8, 128)]


@pytest.mark.parametrize("importance", [False, True])
def test_a_stack_of_group_sizes_rounds_as_each_format_quantizes(importance):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 200, generator=gen)  # 200 = 128 + 72: short tail groups for 64 and 128
    imp = torch.rand(200, generator=gen) if importance else None
    quantizer = IntColumnQuantizer(FORMATS, (len(FORMATS), *w.shape), imp)
    assert (quantizer.group_size, quantizer.fit_width) == (32, 128)
    stack = w.expand(len(FORMATS), *w.shape)
    for start in range(0, 200, quantizer.group_size):
        quantizer.fit(start, stack[..., start : start + quantizer.fit_width])
    rounded = torch.stack([quantizer.round(j, stack[..., j]) for j in range(200)], dim=-1)
    for k, fmt in enumerate(FORMATS):
        expected = fmt.quantize(w, imp)
        got = quantizer.quantized(k)
        assert torch.equal(got.codes, expected.codes), fmt.name
        assert torch.equal(got.scales, expected.scales), fmt.name
        assert torch.equal(got.zeros, expected.zeros), fmt.name
        assert torch.equal(rounded[k], fmt.fake_quantize(w, imp)), fmt.name
        encoded = quantizer.encode(k)
        assert encoded.bits == fmt.storage_bits(w.shape)
        assert torch.equal(fmt.decode(encoded), fmt.fake_quantize(w, imp)), fmt.name


def test_bad_calls_are_refused():
    with pytest.raises(BitallocError, match="grouped int formats"):
        IntColumnQuantizer([QuantFormat(16, None)], (4, 64))
    quantizer = IntColumnQuantizer(FORMATS, (len(FORMATS), 4, 256))
    with pytest.raises(BitallocError, match="does not start a group"):
        quantizer.fit(16, torch.zeros(len(FORMATS), 4, 128))
    with pytest.raises(BitallocError, match="needs 64 columns"):
        quantizer.fit(0, torch.zeros(len(FORMATS), 4, 32))
