"""The cache-format contract (:class:`bitalloc.formats.CacheFormat`) over KV formats: every pair
of the default KV palette and a few with other groups and residual windows.

The KV code has no packed form of its own, so this suite builds one from the storage rule of
:mod:`bitalloc.kv.formats` (codes at the format's widths, fp16 scale and zero per group, the
16-bit tokens as fp16) and checks both that its size is :meth:`KVFormat.cache_bits` and that it
decodes to exactly what :meth:`KVFormat.fake_quantize` returns: the count describes the real
quantizer, not a formula of its own.
"""

from __future__ import annotations

import pytest
import torch

from bitalloc.errors import BitallocError
from bitalloc.formats import CacheFormat
from bitalloc.formats.encoding import Section, pack_codes, pack_fp16, unpack_codes
from bitalloc.kv import KVFormat, kv_palette, parse_kv_format

FORMATS = [
    *kv_palette(),
    KVFormat(4, 2, 32, 16),
    KVFormat(8, 4, 128, 0),
    KVFormat(2, 8, 16, 40),
    KVFormat(16, 16, 32, 8),
]
# (tokens, heads, head_dim): a partial key group, tokens inside the residual window only,
# whole groups, and value groups smaller than the head.
GEOMETRIES = [(100, 2, 32), (5, 1, 16), (128, 2, 16), (70, 3, 64)]


def cache(tokens: int, heads: int, head_dim: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, heads, tokens, head_dim, generator=gen)
    keys[..., 0] *= 20  # a key outlier channel, as KIVI observes
    return keys, torch.randn(1, heads, tokens, head_dim, generator=gen)


def encode_groups(x: torch.Tensor, bits: int, dim: int, what: str) -> tuple[list, torch.Tensor]:
    """Min-max codes of ``x`` with one fp16 (scale, zero) per slice along ``dim``, as sections,
    and the tensor those sections decode to."""
    qmax = 2**bits - 1
    lo, hi = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    scale = ((hi - lo) / qmax).half().float().clamp(min=6.104e-5)
    zero = lo.half().float()
    codes = torch.clamp(torch.round((x - zero) / scale), 0, qmax)
    sections = [
        pack_codes(f"{what} codes", codes, bits),
        pack_fp16(f"{what} scales", scale),
        pack_fp16(f"{what} zeros", zero),
    ]
    unpacked = unpack_codes(sections[0], codes.numel(), bits).reshape(codes.shape)
    scale, zero = scale.half().float(), zero.half().float()
    return sections, unpacked.float() * scale + zero


def encode(fmt: KVFormat, keys: torch.Tensor, values: torch.Tensor):
    """(sections, decoded keys, decoded values) of a cache holding ``keys`` and ``values``."""
    batch, heads, tokens, head_dim = keys.shape
    n_keys, n_values = fmt.quantized_tokens(tokens)
    sections: list[Section] = []
    decoded_keys, decoded_values = keys, values
    if n_keys:
        groups = keys[:, :, :n_keys].reshape(batch, heads, -1, fmt.group_size, head_dim)
        parts, out = encode_groups(groups, fmt.key_bits, 3, "key")
        sections += parts
        decoded_keys = torch.cat(
            [out.reshape(batch, heads, n_keys, head_dim), keys[:, :, n_keys:]], 2
        )
    if n_values:
        group = fmt.value_group(head_dim)
        old = values[:, :, :n_values].reshape(batch, heads, n_values, -1, group)
        parts, out = encode_groups(old, fmt.value_bits, 4, "value")
        sections += parts
        old = out.reshape(batch, heads, n_values, head_dim)
        decoded_values = torch.cat([old, values[:, :, n_values:]], 2)
    sections.append(pack_fp16("16-bit keys", keys[:, :, n_keys:]))
    sections.append(pack_fp16("16-bit values", values[:, :, n_values:]))
    return sections, decoded_keys, decoded_values


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_cache_bits_equal_a_real_encoding(fmt):
    for seed, (tokens, heads, head_dim) in enumerate(GEOMETRIES):
        keys, values = cache(tokens, heads, head_dim, seed)
        sections, decoded_keys, decoded_values = encode(fmt, keys, values)
        assert sum(s.bits for s in sections) == fmt.cache_bits(tokens, 1, heads, head_dim)
        got_keys, got_values = fmt.fake_quantize(keys, values)
        # The 16-bit tokens come back as they went in (float32 here, see kv.quantize).
        assert torch.equal(got_keys, decoded_keys)
        assert torch.equal(got_values, decoded_values)
        assert fmt.bits_per_element(head_dim, heads, max(tokens, 1)) == fmt.cache_bits(
            tokens, 1, heads, head_dim
        ) / (2 * heads * head_dim * tokens)
    assert fmt.cache_bits(100, 3, 2, 32) == 3 * fmt.cache_bits(100, 1, 2, 32)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_protocol_naming_and_determinism(fmt):
    assert isinstance(fmt, CacheFormat)
    assert fmt.family == "kv" and str(fmt) == fmt.name
    assert parse_kv_format(fmt.name) == fmt and parse_kv_format(fmt.name.lower()) == fmt
    keys, values = cache(70, 2, 32, seed=5)
    first = fmt.fake_quantize(keys, values)
    again = fmt.fake_quantize(keys.clone(), values.clone())
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(t.shape == keys.shape and t.dtype == keys.dtype for t in first)
    if fmt.is_lossless:
        assert torch.equal(first[0], keys) and torch.equal(first[1], values)
    assert fmt.is_lossless == (fmt.key_bits == fmt.value_bits == 16)
    with pytest.raises(BitallocError, match="head_dim"):
        fmt.fake_quantize(keys[0], values[0])


def test_error_never_rises_with_bits_or_residual():
    keys, values = cache(96, 2, 32, seed=9)

    def errors(fmt: KVFormat) -> tuple[float, float]:
        k, v = fmt.fake_quantize(keys, values)
        return (k - keys).square().mean().item(), (v - values).square().mean().item()

    widths = (2, 4, 8, 16)
    for group, residual in ((64, 0), (32, 16)):
        table = {
            (kb, vb): errors(KVFormat(kb, vb, group, residual)) for kb in widths for vb in widths
        }
        for fixed in widths:
            key_errors = [table[(kb, fixed)][0] for kb in widths]
            value_errors = [table[(fixed, vb)][1] for vb in widths]
            assert key_errors == sorted(key_errors, reverse=True) and key_errors[-1] == 0.0
            assert value_errors == sorted(value_errors, reverse=True) and value_errors[-1] == 0.0
    # More recent tokens at 16 bits: the older ones keep their groups, so nothing gets worse.
    by_residual = [errors(KVFormat(2, 2, 32, r)) for r in (0, 8, 32, 64, 96)]
    for side in (0, 1):
        assert [e[side] for e in by_residual] == sorted(
            (e[side] for e in by_residual), reverse=True
        )
    assert by_residual[-1] == (0.0, 0.0)
