"""Simulated KV quantization: error vs bits, KIVI's per-channel keys, residual and frozen groups."""

import pytest
import torch

from bitalloc.errors import BitallocError
from bitalloc.kv import KVFormat, fake_quantize_kv, parse_kv_format, quantize_keys, quantize_values


def _kv(seq=64, dim=16, heads=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (2, heads, seq, dim)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def _err(a, b):
    return float((a - b).square().mean())


def test_error_falls_as_bits_rise_for_keys_and_values():
    k, v = _kv()
    key_err = [_err(quantize_keys(k, b, 16), k) for b in (2, 4, 8)]
    value_err = [_err(quantize_values(v, b, 16), v) for b in (2, 4, 8)]
    for errs in (key_err, value_err):
        assert errs[0] > 4 * errs[1] > 0 and errs[1] > 4 * errs[2] > 0


def test_per_channel_keys_beat_per_token_keys_on_channel_outliers():
    k, _ = _kv(dim=64)
    # Real keys have a few channels of large magnitude that is steady along the sequence.
    k[..., [3, 40]] = k[..., [3, 40]] * 2 + 20
    per_channel = _err(quantize_keys(k, 4, 32), k)
    per_token = _err(quantize_values(k, 4, 32), k)  # values' layout applied to keys
    assert per_channel < 0.2 * per_token


def test_sixteen_bits_is_identity():
    k, v = _kv()
    assert torch.equal(quantize_keys(k, 16, 64), k) and torch.equal(quantize_values(v, 16, 64), v)
    qk, qv = fake_quantize_kv(k, v, parse_kv_format("K16V16"))
    assert torch.equal(qk, k) and torch.equal(qv, v)


def test_codes_per_group_and_dtype():
    k, v = _kv()
    qk = quantize_keys(k, 2, 16)
    # One channel over one group of 16 tokens holds at most 2**2 levels.
    assert len(torch.unique(qk[0, 0, :16, 5])) <= 4
    qv = quantize_values(v, 2, 8)
    assert len(torch.unique(qv[1, 1, 7, :8])) <= 4 and len(torch.unique(qv[1, 1, 7])) > 4
    half = quantize_keys(k.to(torch.bfloat16), 4, 16)
    assert half.dtype == torch.bfloat16
    zeros = torch.zeros(1, 1, 16, 8)
    assert torch.equal(quantize_keys(zeros, 2, 16), zeros)
    assert torch.equal(quantize_values(zeros, 2, 8), zeros)


def test_scales_and_zeros_are_fp16_so_a_group_range_is_reproduced_to_fp16_precision():
    v = torch.linspace(-3.0, 5.0, 16).reshape(1, 1, 1, 16)
    q = quantize_values(v, 8, 16)
    assert float(q.min()) == pytest.approx(-3.0, abs=2e-3)
    assert float(q.max()) == pytest.approx(5.0, abs=2e-2)


def test_residual_window_and_partial_key_group_stay_exact():
    k, v = _kv(seq=37)
    fmt = KVFormat(2, 2, group_size=8, residual=10)
    qk, qv = fake_quantize_kv(k, v, fmt)
    # 27 old tokens: keys quantize 3 whole groups (24 tokens), values all 27.
    assert torch.equal(qk[:, :, 24:], k[:, :, 24:]) and torch.equal(qv[:, :, 27:], v[:, :, 27:])
    assert not torch.equal(qk[:, :, 23], k[:, :, 23]) and not torch.equal(qv[:, :, 26], v[:, :, 26])
    assert torch.equal(qk[:, :, :24], quantize_keys(k[:, :, :24], 2, 8))


def test_a_frozen_key_group_does_not_change_when_tokens_arrive():
    k, v = _kv(seq=60)
    fmt = KVFormat(2, 4, group_size=8, residual=3)
    early_k, early_v = fake_quantize_kv(k[:, :, :20], v[:, :, :20], fmt)
    late_k, late_v = fake_quantize_kv(k, v, fmt)
    assert torch.equal(early_k[:, :, :16], late_k[:, :, :16])  # 2 groups frozen at 20 tokens
    assert torch.equal(early_v[:, :, :17], late_v[:, :, :17])


def test_bad_input_raises():
    k, v = _kv()
    with pytest.raises(BitallocError, match="choose one of"):
        quantize_keys(k, 3, 16)
    with pytest.raises(BitallocError, match=r"\(batch, heads, seq, head_dim\)"):
        quantize_values(v[0], 4, 16)
    with pytest.raises(BitallocError, match="floating-point"):
        quantize_keys(k.long(), 4, 16)
    with pytest.raises(BitallocError, match="do not divide head_dim 16"):
        quantize_values(v, 4, 12)
    with pytest.raises(BitallocError, match="differ in batch"):
        fake_quantize_kv(k, v[:, :, :10], KVFormat(4, 4))
    with pytest.raises(BitallocError, match="parse_kv_format"):
        fake_quantize_kv(k, v, "K4V4")
