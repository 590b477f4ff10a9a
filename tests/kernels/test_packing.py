import math

import pytest
import torch

from bitalloc.errors import BitallocError
from bitalloc.formats import SUPPORTED_BITS, QuantFormat, dequantize
from bitalloc.kernels.packing import (
    PLANES,
    PackedWeight,
    check_packed,
    pack_codes,
    packed_nbytes,
    packed_words,
    planes,
    unpack_codes,
)

# Ragged on purpose: 1 input, odd widths, widths that straddle a word in a plane.
SHAPES = [(1, 1), (3, 5), (7, 33), (2, 31), (16, 64), (5, 200), (4, 96)]


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_every_width_and_ragged_shapes(bits, shape):
    g = torch.Generator().manual_seed(bits * 1000 + shape[1])
    codes = torch.randint(0, 2**bits, shape, generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (shape[0], packed_words(shape[1], bits))
    assert torch.equal(unpack_codes(packed, bits, shape[1]), codes)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_extreme_codes_survive(bits):
    # All-ones codes set the sign bit of int32 words; all-zero codes must stay zero.
    top = torch.full((3, 64), 2**bits - 1, dtype=torch.uint8)
    zero = torch.zeros(3, 64, dtype=torch.uint8)
    assert torch.equal(unpack_codes(pack_codes(top, bits), bits, 64), top)
    assert torch.equal(pack_codes(zero, bits), torch.zeros_like(pack_codes(zero, bits)))


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_no_wasted_bits(bits):
    # A multiple of 32 inputs fills every word exactly: 32 three-bit codes take three words.
    assert packed_words(32, bits) == bits
    assert packed_words(576, bits) * 32 == 576 * bits
    # Otherwise each plane wastes less than one word per row.
    for in_features in (1, 5, 33, 200):
        waste = packed_words(in_features, bits) * 32 - in_features * bits
        assert 0 <= waste < 32 * len(planes(bits))


def test_planes_cover_each_width_low_bits_first():
    for bits, widths in PLANES.items():
        assert sum(widths) == bits and all(32 % w == 0 for w in widths)
    # A 3-bit code 0b101 puts its low two bits (0b01) in plane 0 and its high bit in plane 1.
    packed = pack_codes(torch.tensor([[5]], dtype=torch.uint8), 3)
    assert packed.tolist() == [[1, 1]]


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_dequantize_equals_the_format_reference(bits, group):
    torch.manual_seed(bits + group)
    weight = torch.randn(12, 200) * 0.05  # 200 is not a multiple of any group size
    fmt = QuantFormat(bits, group)
    q = fmt.quantize(weight)
    pw = PackedWeight.from_quantized(q)
    assert torch.equal(pw.codes(), q.codes)
    assert torch.equal(pw.dequantize(), dequantize(q))
    assert torch.equal(pw.dequantize(), fmt.fake_quantize(weight))


@pytest.mark.parametrize("fmt", ["int2-g32", "int3-g128", "int5-g64", "int6-g128", "int8-g32"])
def test_packed_bytes_equal_the_format_storage(fmt):
    f = QuantFormat(int(fmt[3]), int(fmt.split("-g")[1]))
    for shape in [(64, 576), (48, 1536), (16, 96)]:
        pw = PackedWeight.quantize(torch.randn(shape), f)
        assert pw.nbytes == packed_nbytes(shape, f) == f.storage_bits(shape) // 8
    # A ragged row adds under four bytes per plane and row.
    pw = PackedWeight.quantize(torch.randn(10, 200), f)
    extra = pw.nbytes - f.storage_bits((10, 200)) / 8
    assert 0 <= extra < 4 * len(planes(f.bits)) * 10 and pw.nbytes == packed_nbytes((10, 200), f)


@pytest.mark.parametrize("bits", [0, 1, 7, 9, 16])
def test_unsupported_widths_raise(bits):
    with pytest.raises(BitallocError, match="supported widths"):
        pack_codes(torch.zeros(2, 8, dtype=torch.uint8), bits)
    with pytest.raises(BitallocError, match="supported widths"):
        unpack_codes(torch.zeros(2, 1, dtype=torch.int32), bits, 8)


def test_bad_codes_and_tensors_raise():
    with pytest.raises(BitallocError, match=r"outside \[0, 7\]"):
        pack_codes(torch.tensor([[8]]), 3)
    with pytest.raises(BitallocError, match="2-D"):
        pack_codes(torch.zeros(8, dtype=torch.uint8), 4)
    with pytest.raises(BitallocError, match="int32"):
        unpack_codes(torch.zeros(2, 3, dtype=torch.int32), 4, 64)  # 64 inputs need 8 words
    good = PackedWeight.quantize(torch.randn(4, 64), QuantFormat(4, 32))
    with pytest.raises(BitallocError, match="words per row"):
        check_packed(good.qweight[:, :3], good.scales, good.zeros, 4, 32, 64)
    with pytest.raises(BitallocError, match="scales must be float16"):
        check_packed(good.qweight, good.scales.float(), good.zeros, 4, 32, 64)
    with pytest.raises(BitallocError, match=r"zeros must be float16 of shape \(4, 2\)"):
        check_packed(good.qweight, good.scales, good.zeros[:, :1], 4, 32, 64)
    with pytest.raises(BitallocError, match="unsupported code width"):
        check_packed(good.qweight, good.scales, good.zeros, 7, 32, 64)
    with pytest.raises(BitallocError, match="fp16 units"):
        PackedWeight.quantize(torch.randn(4, 64), QuantFormat(16))
    assert math.isclose(good.format.nominal_bits, 5.0)
