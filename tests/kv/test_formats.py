"""KV formats: names, validation, exact storage accounting, KV units."""

import pytest
from torch import nn

from bitalloc.errors import BitallocError
from bitalloc.kv import KV_BITS, KVFormat, kv_palette, kv_units, parse_kv_format
from tests.conftest import make_tiny_llama


def test_every_name_parses_and_round_trips():
    variants = [*kv_palette(), *kv_palette(group_size=32, residual=128), KVFormat(4, 2, 64, 16)]
    assert len({f.name for f in variants}) == len(variants) == 33
    for fmt in variants:
        assert parse_kv_format(fmt.name) == fmt
        assert parse_kv_format(fmt.name).name == fmt.name
        assert parse_kv_format(fmt) is fmt
    assert KVFormat(8, 4).name == "K8V4"
    assert KVFormat(8, 4, 32, 128).name == "K8V4-g32-r128"
    assert KVFormat(8, 4, 64, 128).name == "K8V4-g64-r128"


def test_aliases_and_partial_suffixes():
    assert parse_kv_format("KV8") == parse_kv_format("K8V8") == KVFormat(8, 8)
    assert parse_kv_format("KV8").name == "K8V8"
    assert parse_kv_format(" k4v2 ") == KVFormat(4, 2)
    assert parse_kv_format("KV4-g32") == KVFormat(4, 4, 32, 0)
    assert parse_kv_format("K2V4-r128") == KVFormat(2, 4, 64, 128)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("K3V4", "key width 3"),
        ("K8V5", "value width 5"),
        ("K8V4-g12", "multiple of 8"),
        ("K8V4-g0", ">= 1"),
        ("K8", "unknown KV format"),
        ("int4-g128", "unknown KV format"),
        ("K8V4-r-1", "unknown KV format"),
    ],
)
def test_bad_names_raise_with_the_fix(name, text):
    with pytest.raises(BitallocError, match=text):
        parse_kv_format(name)


def test_bad_fields_raise():
    with pytest.raises(BitallocError, match=r"bits from \(2, 4, 8, 16\)"):
        KVFormat(1, 4)
    with pytest.raises(BitallocError, match="residual"):
        KVFormat(4, 4, 64, -1)
    with pytest.raises(BitallocError, match="group size"):
        KVFormat(4, 4, True)


def test_palettes():
    default = kv_palette()
    assert len(default) == 16 and {(f.key_bits, f.value_bits) for f in default} == {
        (k, v) for k in KV_BITS for v in KV_BITS
    }
    bits = [f.avg_bits for f in default]
    assert bits == sorted(bits) and default[0].name == "K2V2" and default[-1].name == "K16V16"
    assert [f.name for f in kv_palette("K8V8, K2V2,K4V2")] == ["K2V2", "K4V2", "K8V8"]
    with pytest.raises(BitallocError, match="more than once"):
        kv_palette("K8V8,KV8")
    with pytest.raises(BitallocError, match="empty"):
        kv_palette(" , ")


def test_cache_bits_hand_count_with_residual_and_partial_group():
    fmt = KVFormat(4, 2, group_size=8, residual=5)
    # 22 tokens, 5 kept at 16 bits -> 17 old ones: keys quantize 2 whole groups (16 tokens) and
    # keep 6 at 16 bits; values quantize all 17 (two groups of 8 channels per token and head).
    keys = 16 * 16 * 4 + 2 * 16 * 32 + 6 * 16 * 16
    values = 17 * 16 * 2 + 17 * 2 * 32 + 5 * 16 * 16
    assert fmt.quantized_tokens(22) == (16, 17)
    assert fmt.cache_bits(22, batch=2, n_kv_heads=3, head_dim=16) == 2 * 3 * (keys + values)
    per_element = 3 * (keys + values) / (2 * 3 * 16 * 22)
    assert fmt.bits_per_element(16, 3, 22) == pytest.approx(per_element, rel=1e-12)
    assert fmt.storage_bits((6, 16), context=22) == 3 * (keys + values)


def test_short_context_keeps_keys_at_16_bits_and_long_context_reaches_avg_bits():
    fmt = KVFormat(2, 2)
    # No key group is full yet (keys stay at 16 bits); every value token is quantized.
    assert fmt.bits_per_element(64, 3, 63) == (16 + 2 + 32 / 64) / 2
    assert KVFormat(16, 16).bits_per_element(64, 3, 100) == 16.0 == KVFormat(16, 16).avg_bits
    assert KVFormat(4, 2).bits_per_element(64, 3, 640) == KVFormat(4, 2).avg_bits == 3.5
    # head_dim below the group size: one value group per head, so values cost more.
    assert KVFormat(4, 2).bits_per_element(16, 3, 640) > KVFormat(4, 2).avg_bits


def test_bits_per_element_falls_as_bits_fall():
    def bpe(name):
        return parse_kv_format(name).bits_per_element(64, 3, 512)

    chain = [bpe(n) for n in ("K8V8", "K8V4", "K4V4", "K4V2", "K2V2")]
    assert all(a > b for a, b in zip(chain, chain[1:]))
    for fixed in KV_BITS:
        by_key = [KVFormat(k, fixed).bits_per_element(64, 3, 512) for k in KV_BITS]
        by_value = [KVFormat(fixed, v).bits_per_element(64, 3, 512) for v in KV_BITS]
        assert by_key == sorted(by_key) and by_value == sorted(by_value)


def test_value_group_must_divide_head_dim():
    with pytest.raises(BitallocError, match="do not divide head_dim 48"):
        KVFormat(4, 4, 32).cache_bits(10, 1, 2, 48)
    assert KVFormat(4, 4, 64).value_group(48) == 48


def test_kv_units_of_a_grouped_query_llama():
    model = make_tiny_llama(layers=3)  # 4 query heads, 2 KV heads of 16 channels
    units = kv_units(model)
    assert [u.name for u in units] == [f"model.layers.{i}.self_attn.kv" for i in range(3)]
    assert all(u.kind == "kv" and u.role == "kv" and u.group == u.name for u in units)
    assert [u.layer for u in units] == [0, 1, 2]
    assert units[0].shape == (4, 16) and units[0].numel == 2 * 2 * 16  # K+V elements per token
    fmt = KVFormat(4, 2, 16)
    assert fmt.storage_bits(units[0].shape, context=100) == fmt.cache_bits(100, 1, 2, 16)


class _NoAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = make_tiny_llama().config
        self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])


def test_kv_units_errors():
    with pytest.raises(BitallocError, match="no Llama-like attention"):
        kv_units(_NoAttention())
    bare = nn.Module()
    bare.layers = nn.ModuleList([nn.Linear(8, 8)])
    with pytest.raises(BitallocError, match="has no config"):
        kv_units(bare)
    wrong = make_tiny_llama()
    wrong.config.num_key_value_heads = 4
    with pytest.raises(BitallocError, match="not num_key_value_heads x head_dim"):
        kv_units(wrong)
    sliding = make_tiny_llama()
    sliding.config.sliding_window = 16
    with pytest.raises(BitallocError, match="sliding-window"):
        kv_units(sliding)


def test_empty_context_costs_nothing_and_bad_counts_raise():
    assert KVFormat(8, 4).cache_bits(0, 1, 1, 64) == 0
    with pytest.raises(BitallocError, match="context must be an integer >= 1"):
        KVFormat(8, 4).bits_per_element(64, 1, 0)
    with pytest.raises(BitallocError, match="n_kv_heads"):
        KVFormat(8, 4).cache_bits(10, 1, 0, 64)
