"""The quantized KV cache on tiny Llamas: exactness at 16 bits, error ordering, incremental
decoding, grouped-query attention, generation, and clear errors."""

import pytest
import torch
from torch import nn

from bitalloc.errors import BitallocError
from bitalloc.evaluate import perplexity
from bitalloc.kv import (
    KVFormat,
    QuantizedKVCache,
    QuantizedKVLayer,
    build_kv_cache,
    fake_quantize_kv,
    generate_ids_with_kv,
    generate_with_kv,
    kv_perplexity,
)
from tests.conftest import ByteTokenizer, make_tiny_llama, random_windows


def _gqa_llama(seed=0):
    """SmolLM2's head layout in miniature: 9 query heads sharing 3 KV heads of 8 channels."""
    return make_tiny_llama(seed, hidden=72, heads=9, kv_heads=3, max_positions=128)


class _LatinTokenizer(ByteTokenizer):
    """Byte tokenizer that decodes one character per id (so length = generated tokens)."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("latin-1")


def _logits(model, ids, cache=None):
    with torch.inference_mode():
        if cache is None:
            return model(input_ids=ids).logits
        return model(input_ids=ids, cache=cache, use_cache=True).logits


def _kv(seq, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 2, seq, 16, generator=g), torch.randn(1, 2, seq, 16, generator=g)


@pytest.mark.parametrize("fmt", [KVFormat(2, 4, 8, 5), KVFormat(4, 2, 8, 0), KVFormat(16, 2, 8, 3)])
def test_layer_grown_step_by_step_equals_the_whole_sequence_view(fmt):
    k, v = _kv(40)
    layer = QuantizedKVLayer(fmt)
    frozen_before = None
    for start, stop in [(0, 11), *[(t, t + 1) for t in range(11, 30)], (30, 33), (33, 40)]:
        keys, values = layer.update(k[:, :, start:stop], v[:, :, start:stop])
        if frozen_before is not None:
            n_k, n_v, old_k, old_v = frozen_before
            assert torch.equal(keys[:, :, :n_k], old_k) and torch.equal(values[:, :, :n_v], old_v)
        frozen_before = (
            layer.frozen_keys,
            layer.frozen_values,
            keys[:, :, : layer.frozen_keys].clone(),
            values[:, :, : layer.frozen_values].clone(),
        )
    expected_k, expected_v = fake_quantize_kv(k, v, fmt)
    assert torch.equal(keys, expected_k) and torch.equal(values, expected_v)
    assert layer.get_seq_length() == 40
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.frozen_keys == layer.frozen_values == 0


def test_sixteen_bits_everywhere_matches_the_model_without_cache(tiny_model):
    ids = random_windows(2, 48)
    plain = _logits(tiny_model, ids)
    for formats in ({0: "K16V16", 1: "K16V16"}, {}):
        cache = build_kv_cache(tiny_model, formats)
        torch.testing.assert_close(_logits(tiny_model, ids, cache), plain, atol=1e-5, rtol=1e-5)
    ppl = kv_perplexity(tiny_model, ids, "K16V16")
    assert ppl.perplexity == pytest.approx(perplexity(tiny_model, ids).perplexity, rel=1e-6)
    assert (ppl.tokens, ppl.windows, ppl.seq_len) == (2 * 47, 2, 48)


def test_fewer_bits_move_the_logits_further(tiny_model):
    ids = random_windows(2, 64)
    plain = _logits(tiny_model, ids)

    def error(name):
        cache = build_kv_cache(tiny_model, name)
        return float((_logits(tiny_model, ids, cache) - plain).abs().mean())

    errors = [error(n) for n in ("K8V8-g16-r0", "K4V4-g16-r0", "K2V2-g16-r0")]
    assert 0 < errors[0] < errors[1] < errors[2]
    # Only the quantized layer's own cache is changed: quantizing layer 1 alone costs less.
    assert 0 < error({1: "K2V2-g16-r0"}) < errors[2]


def test_prefill_stores_the_quantized_view_the_format_describes(tiny_model):
    ids = random_windows(1, 40)
    fmt = KVFormat(2, 4, 16, 4)
    plain = build_kv_cache(tiny_model, "K16V16")
    quantized = build_kv_cache(tiny_model, {0: fmt})
    _logits(tiny_model, ids, plain)
    _logits(tiny_model, ids, quantized)
    # Layer 0's raw states depend only on the embeddings, so both runs cached the same input.
    raw_k, raw_v = plain.layers[0].keys, plain.layers[0].values
    expected_k, expected_v = fake_quantize_kv(raw_k, raw_v, fmt)
    torch.testing.assert_close(quantized.layers[0].keys, expected_k, atol=1e-6, rtol=0)
    torch.testing.assert_close(quantized.layers[0].values, expected_v, atol=1e-6, rtol=0)
    assert (quantized.layers[0].frozen_keys, quantized.layers[0].frozen_values) == (32, 36)


def test_incremental_decode_matches_one_forward_when_the_window_covers_the_sequence(tiny_model):
    ids = random_windows(1, 40)
    whole = _logits(tiny_model, ids)
    cache = build_kv_cache(tiny_model, "K2V2-g16-r64")
    steps = [_logits(tiny_model, ids[:, :25], cache)]
    steps += [_logits(tiny_model, ids[:, t : t + 1], cache) for t in range(25, 40)]
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, atol=1e-4, rtol=1e-4)
    assert cache.get_seq_length() == 40


def test_grouped_query_attention_generation():
    model = _gqa_llama()
    tok = _LatinTokenizer()
    fmt = KVFormat(2, 2, group_size=8, residual=4)
    text = generate_with_kv(model, tok, "The quick brown fox", {0: fmt, 1: fmt}, max_new_tokens=12)
    assert isinstance(text, str) and len(text) == 12
    prompt = torch.tensor([list(b"The quick brown fox")])
    ids = generate_ids_with_kv(model, prompt, "K16V16", 12)
    assert ids.shape == (1, 12)
    # The cache holds KV heads (3), not query heads (9), and quantizes them per KV head.
    cache = build_kv_cache(model, fmt)
    _logits(model, prompt, cache)
    keys = cache.layers[0].keys
    assert keys.shape == (1, 3, 19, 8) and cache.layers[0].frozen_keys == 8
    assert len(torch.unique(keys[0, 2, :8, 5])) <= 4
    # With the window covering everything, quantized generation equals unquantized generation.
    wide = generate_ids_with_kv(model, prompt, KVFormat(2, 2, 8, 64), 12)
    assert torch.equal(wide, ids)


def test_generation_stops_at_eos(tiny_model):
    prompt = random_windows(1, 8)
    first = int(generate_ids_with_kv(tiny_model, prompt, "K4V4", 1)[0, 0])
    out = generate_ids_with_kv(tiny_model, prompt, "K4V4", 10, eos_token_id=first)
    assert out.tolist() == [[first]]


def test_context_beyond_the_model_maximum_is_refused(tiny_model):
    with pytest.raises(BitallocError, match="exceeds the model's maximum of 256"):
        kv_perplexity(tiny_model, random_windows(1, 300), "K8V8")
    with pytest.raises(BitallocError, match="exceeds the model's maximum of 256"):
        generate_ids_with_kv(tiny_model, random_windows(1, 250), "K8V8", 10)


def test_formats_map_must_match_the_model(tiny_model):
    with pytest.raises(BitallocError, match="layer 5 has no attention"):
        build_kv_cache(tiny_model, {5: "K8V8"})
    with pytest.raises(BitallocError, match="not a KV unit of this model"):
        build_kv_cache(tiny_model, {"model.layers.9.self_attn.kv": "K8V8"})
    cache = build_kv_cache(tiny_model, {"model.layers.1.self_attn.kv": "K4V2"})
    assert cache.formats == {1: KVFormat(4, 2)} and len(cache.layers) == 2
    with pytest.raises(BitallocError, match="unsupported key width 3"):
        build_kv_cache(tiny_model, {0: "K3V3"})
    with pytest.raises(BitallocError, match="cache has layers 0..1"):
        QuantizedKVCache({2: "K8V8"}, num_layers=2)


class _NoCacheArgument(nn.Module):
    """A model whose forward takes no cache (its attention cannot be given one)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, input_ids):
        return self.inner(input_ids=input_ids)


class _IgnoresCache(_NoCacheArgument):
    """Accepts a cache argument but never hands it to its attention."""

    def forward(self, input_ids, cache=None, use_cache=None):
        return self.inner(input_ids=input_ids, use_cache=False)


def test_models_whose_attention_cannot_take_the_cache_are_refused(tiny_model):
    ids = random_windows(1, 16)
    with pytest.raises(BitallocError, match="takes no `cache` / `past_key_values`"):
        kv_perplexity(_NoCacheArgument(tiny_model), ids, "K8V8")
    with pytest.raises(BitallocError, match="did not store its keys and values"):
        kv_perplexity(_IgnoresCache(tiny_model), ids, "K8V8")


def test_a_quantized_cache_cannot_be_cropped(tiny_model):
    cache = build_kv_cache(tiny_model, "K4V4")
    _logits(tiny_model, random_windows(1, 8), cache)
    with pytest.raises(BitallocError, match="cannot drop tokens"):
        cache.crop(-2)
    assert not cache.is_croppable


@pytest.mark.slow
def test_default_model_kv_perplexity_and_generation(default_model):
    from bitalloc.data import default_text, tokenize, windows

    model, tok = default_model.model, default_model.tokenizer
    ids = windows(tokenize(tok, default_text().evaluation), 256, max_tokens=512)
    base = kv_perplexity(model, ids, "K16V16", batch_size=2).perplexity
    k8v8 = kv_perplexity(model, ids, "K8V8", batch_size=2).perplexity
    k2v2 = kv_perplexity(model, ids, "K2V2", batch_size=2).perplexity
    assert abs(k8v8 - base) < 0.01 * base and k2v2 > 1.05 * k8v8
    text = generate_with_kv(model, tok, "The capital of France is", "K8V4", max_new_tokens=8)
    assert text.strip()
