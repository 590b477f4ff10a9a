"""The quantized-weight cache that measuring keeps across assignments of one model."""

from __future__ import annotations

import torch

from bitalloc.apply import QuantizedWeightCache, fake_quantized
from bitalloc.formats import parse_format


def _weight(seed: int = 0) -> torch.Tensor:
    return torch.randn(24, 96, generator=torch.Generator().manual_seed(seed))


def test_a_cached_weight_is_bit_identical_to_quantizing_again():
    cache = QuantizedWeightCache()
    w = _weight()
    for name in ("int3-g32", "int4-g64", "int2-g32", "fp16"):
        fmt = parse_format(name)
        first = cache.fake_quantize("u", w, fmt)
        again = cache.fake_quantize("u", w, fmt)
        assert torch.equal(first, fmt.fake_quantize(w)) and torch.equal(again, first)
    # fp16 is not kept; each integer format was quantized once and served once.
    assert (cache.misses, cache.hits) == (3, 3)


def test_a_changed_weight_is_quantized_again_not_served_stale():
    cache = QuantizedWeightCache()
    fmt = parse_format("int3-g32")
    w = _weight()
    cache.fake_quantize("u", w, fmt)
    changed = w.clone()
    changed[0, 0] += 1.0
    assert torch.equal(cache.fake_quantize("u", changed, fmt), fmt.fake_quantize(changed))
    assert cache.hits == 0 and cache.misses == 2


def test_the_least_recently_used_entries_go_at_the_cap():
    fmt = parse_format("int4-g32")
    w = _weight()
    one = QuantizedWeightCache()
    one.fake_quantize("a", w, fmt)
    size = one.nbytes
    cache = QuantizedWeightCache(max_bytes=2 * size)
    for unit in ("a", "b", "a", "c"):  # "b" is the least recently used when "c" comes
        cache.fake_quantize(unit, w, fmt)
    assert cache.nbytes <= 2 * size
    cache.fake_quantize("a", w, fmt)
    assert cache.hits == 2  # "a" stayed
    cache.fake_quantize("b", w, fmt)
    assert cache.misses == 4  # "b" had gone


def test_fake_quantized_with_a_cache_measures_the_same_and_restores(tiny_model):
    names = [n for n, m in tiny_model.named_modules() if isinstance(m, torch.nn.Linear)][:4]
    assignment = {n: "int3-g32" for n in names}
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    with torch.no_grad():
        with fake_quantized(tiny_model, assignment):
            plain = tiny_model(ids).logits
        cache = QuantizedWeightCache()
        for _ in range(2):
            with fake_quantized(tiny_model, assignment, cache):
                cached = tiny_model(ids).logits
            assert torch.equal(cached, plain)
    assert cache.hits == len(names) and cache.misses == len(names)
    assert all(torch.equal(p, before[n]) for n, p in tiny_model.named_parameters())
