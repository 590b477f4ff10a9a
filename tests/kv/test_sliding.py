"""KV-cache quantization on sliding-window and mixed sliding/global attention models (Gemma 2/3,
Mistral, Qwen3 with ``use_sliding_window``), built from configs with random weights: the cache
stores each sliding layer's window and reproduces the unquantized model, stored bits equal the
predicted ones, the profiler measures such layers, and allocation meets its budgets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bitalloc.allocation import Allocation
from bitalloc.errors import BitallocError
from bitalloc.kv import (
    KVFormat,
    QuantizedKVCache,
    QuantizedKVLayer,
    build_kv_cache,
    fake_quantize_kv,
    kv_perplexity,
    kv_units,
)
from bitalloc.kv.formats import parse_kv_format
from bitalloc.kv.plan import kv_cost_table, kv_elements
from bitalloc.kv.profiler import KVProfiler
from tests.allocations import small_allocate
from tests.conftest import make_tiny_llama, random_windows

WINDOW = 16
#: Gemma 3's layout in miniature: sliding layers with a global one between them.
MIXED = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
#: What every tiny model below shares: vocabulary, widths, heads (grouped 2:1), positions.
TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def make_tiny_gemma3(seed: int = 0, window: int = WINDOW, layer_types=None, **fields):
    """A random Gemma3ForCausalLM: sliding and global layers, QK-norm, a final logit soft cap."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    types = list(layer_types or MIXED)
    config = Gemma3TextConfig(
        **TINY,
        num_hidden_layers=len(types),
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=window,
        layer_types=types,
        final_logit_softcapping=30.0,
        **fields,
    )
    return Gemma3ForCausalLM(config).eval()


def _gemma2(seed: int = 0):
    """Gemma 2: alternating sliding/global layers with attention logit soft-capping (eager)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    config = Gemma2Config(
        **TINY, num_hidden_layers=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=12
    )
    return Gemma2ForCausalLM(config).eval()


def _mistral(seed: int = 0):
    """Mistral: every layer slides (``sliding_window`` without ``layer_types``)."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(**TINY, num_hidden_layers=2, sliding_window=12)
    return MistralForCausalLM(config).eval()


def _qwen3(seed: int = 0):
    """Qwen3 with ``use_sliding_window``: layers from ``max_window_layers`` on slide."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        **TINY,
        num_hidden_layers=3,
        head_dim=16,
        use_sliding_window=True,
        sliding_window=12,
        max_window_layers=1,
    )
    return Qwen3ForCausalLM(config).eval()


MODELS = {
    "gemma3": (make_tiny_gemma3, [16, None, 16, None]),
    "gemma2": (_gemma2, [12, None]),
    "mistral": (_mistral, [12, 12]),
    "qwen3": (_qwen3, [None, 12, 12]),
}


@pytest.fixture(scope="module")
def gemma3():
    return make_tiny_gemma3()


def _decode(model, ids, cache, prefill: int, chunk: int = 0) -> torch.Tensor:
    """Logits of a prefill of ``ids[:, :prefill]``, a second chunk of ``chunk`` tokens, then
    one token per forward, concatenated."""
    cuts = [0, prefill, *range(prefill + chunk, ids.shape[1] + 1)]
    with torch.inference_mode():
        steps = [
            model(input_ids=ids[:, lo:hi], cache=cache, use_cache=True).logits
            for lo, hi in zip(cuts, cuts[1:])
            if hi > lo
        ]
    return torch.cat(steps, dim=1)


def _plain(model, ids) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits


# -- the cache -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_lossless_cache_keeps_each_window_and_matches_the_unquantized_model(name):
    from transformers import DynamicCache

    build, windows = MODELS[name]
    model = build()
    assert [u.window for u in kv_units(model)] == windows
    ids = random_windows(2, 30, seed=1)
    plain = _plain(model, ids)
    for formats in ("K16V16", {}):
        cache = build_kv_cache(model, formats)
        # Prefill up to or past the window, a chunk past it, then decode further past it.
        logits = _decode(model, ids, cache, prefill=14, chunk=9)
        torch.testing.assert_close(logits, plain, atol=1e-5, rtol=1e-5)
        # Sliding layers hold their window, global ones every token, as transformers' own do.
        assert [layer.stored_tokens for layer in cache.layers] == [w or 30 for w in windows]
        assert cache.is_sliding == DynamicCache(config=model.config).is_sliding
        assert cache.get_seq_length() == 30


def test_quantized_sliding_layer_stores_the_last_window_of_the_whole_view():
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 2, 45, 16, generator=g), torch.randn(2, 2, 45, 16, generator=g)
    fmt = KVFormat(2, 4, 8, 3)
    layer = QuantizedKVLayer(fmt, window=12)
    keys, values = layer.update(k, v)
    expected_k, expected_v = fake_quantize_kv(k, v, fmt)
    # Attention reads the whole prefill (the mask applies the window); the layer keeps 12.
    assert torch.equal(keys, expected_k) and torch.equal(values, expected_v)
    assert torch.equal(layer.keys, expected_k[:, :, -12:])
    assert torch.equal(layer.values, expected_v[:, :, -12:])
    assert layer.get_seq_length() == 45 and layer.get_mask_sizes(1) == (13, 33)
    assert layer.stored_bits() == fmt.cache_bits(45, 2, 2, 16, window=12)
    layer.reset()
    assert (layer.get_seq_length(), layer.stored_tokens, layer.stored_bits()) == (0, 0, 0)


def test_sliding_cache_reads_what_a_full_cache_reads_when_groups_fill_inside_the_window(gemma3):
    # Groups of 8 with 4 recent tokens kept fill while all their tokens are in the 16-token
    # window, so each stored token holds what a cache keeping every token holds for it.
    ids = random_windows(1, 52, seed=2)
    fmt = KVFormat(2, 2, 8, 4)
    sliding = build_kv_cache(gemma3, fmt)
    everything = QuantizedKVCache(sliding.formats, len(sliding.layers))  # no windows
    torch.testing.assert_close(
        _decode(gemma3, ids, sliding, 21, chunk=11),
        _decode(gemma3, ids, everything, 21, chunk=11),
        atol=1e-5,
        rtol=0,
    )
    assert [layer.stored_tokens for layer in sliding.layers] == [16, 52, 16, 52]
    assert sliding.stored_bits() < everything.stored_bits()


def test_fewer_bits_move_the_logits_further_on_a_mixed_model(gemma3):
    ids = random_windows(2, 40, seed=3)
    plain = _plain(gemma3, ids)

    def error(formats):
        logits = _decode(gemma3, ids, build_kv_cache(gemma3, formats), prefill=34)
        return float((logits - plain).abs().mean())

    errors = [error(n) for n in ("K8V8-g8-r0", "K4V4-g8-r0", "K2V2-g8-r0")]
    assert 0 < errors[0] < errors[1] < errors[2]
    # Quantizing only the sliding layers changes the output, and by less than all layers.
    sliding_only = error({0: "K2V2-g8-r0", 2: "K2V2-g8-r0"})
    assert 0 < sliding_only < errors[2]


# -- storage -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "window"),
    [
        (KVFormat(2, 4, 8, 6), 12),  # groups fill after losing tokens to the window
        (KVFormat(4, 16, 16, 0), 12),  # key groups longer than the window
        (KVFormat(8, 2, 8, 3), 20),
        (KVFormat(16, 16), 12),
    ],
)
def test_stored_bits_equal_the_predicted_bits_past_the_window(fmt, window):
    model = make_tiny_gemma3(window=window)
    units = kv_units(model)
    ids = random_windows(2, 45, seed=4)
    cache = build_kv_cache(model, fmt)
    with torch.inference_mode():
        # Short prefill, single steps across the window, a long chunk, single steps again.
        for start, stop in [
            (0, 9),
            *[(t, t + 1) for t in range(9, 26)],
            (26, 41),
            *[(t, t + 1) for t in range(41, 45)],
        ]:
            model(input_ids=ids[:, start:stop], cache=cache, use_cache=True)
            predicted = kv_cost_table(units, [fmt], stop, 2)[:, 0]
            stored = [layer.stored_bits() for layer in cache.layers]
            assert stored == predicted.tolist(), f"context {stop}"
            assert cache.stored_bits() == predicted.sum()
            expected_tokens = [min(stop, u.window or stop) for u in units]
            assert [layer.stored_tokens for layer in cache.layers] == expected_tokens
    # What the count says is stored is what layer 0 holds (its states depend only on the
    # embeddings, so an unquantized forward sees the same ones): 16-bit tokens unchanged,
    # quantized ones on at most 2**bits levels per key group and channel.
    reference = build_kv_cache(model, "K16V16")
    with torch.inference_mode():
        model(input_ids=ids, cache=reference, use_cache=True)
    held, raw = cache.layers[0], reference.layers[0]
    first = 45 - held.stored_tokens
    n_keys, n_values = fmt.quantized_tokens(45)
    # (One forward against many: the same states up to float rounding of other shapes.)
    for stored, unquantized, end in (
        (held.keys, raw.keys, n_keys),
        (held.values, raw.values, n_values),
    ):
        old = max(0, end - first)
        torch.testing.assert_close(stored[:, :, old:], unquantized[:, :, old:], atol=1e-5, rtol=0)
        if old:
            assert (stored[:, :, :old] - unquantized[:, :, :old]).abs().max() > 1e-3
    for group in range(first // fmt.group_size, n_keys // fmt.group_size):
        lo = max(group * fmt.group_size, first) - first
        block = held.keys[0, 0, lo : (group + 1) * fmt.group_size - first, 0]
        assert len(torch.unique(block)) <= 2**fmt.key_bits


def test_mixed_model_units_costs_and_elements():
    model = make_tiny_gemma3()
    units = kv_units(model)
    fmt = KVFormat(4, 2, 8, 4)
    table = kv_cost_table(units, [fmt], 64, 3)
    for unit, bits in zip(units, table[:, 0]):
        assert bits == fmt.cache_bits(64, 3, 2, 16, unit.window)
        assert bits == 3 * fmt.storage_bits(unit.shape, 64, unit.window)
    # A sliding layer at 64 tokens stores what any layer stores at 16 (groups aligned here).
    assert table[0, 0] == fmt.cache_bits(16, 3, 2, 16) < table[1, 0] == fmt.cache_bits(64, 3, 2, 16)
    assert kv_elements(units, 64, 3) == 3 * units[0].numel * (16 + 64 + 16 + 64)
    # Within the window a sliding layer costs what a global one does.
    short = kv_cost_table(units, [fmt], 10)
    assert (short == short[1]).all()
    assert KVFormat(16, 16).bits_per_element(16, 2, 64, window=16) == 16.0


# -- profiling -----------------------------------------------------------------------------


PALETTE = [KVFormat(k, v, 8) for k, v in ((2, 2), (2, 16), (16, 2), (8, 8), (16, 16))]


@pytest.mark.parametrize("method", ["loss", "kl"])
def test_profiler_measures_sliding_layers_and_replay_is_exact(gemma3, method):
    units = kv_units(gemma3)
    calibration = random_windows(4, 40, seed=5)
    replayed = KVProfiler(method, batch_size=2).profile(gemma3, units, PALETTE, calibration)
    recomputed = KVProfiler(method, batch_size=2, replay_prefix=False).profile(
        gemma3, units, PALETTE, calibration
    )
    np.testing.assert_allclose(replayed.loss, recomputed.loss, rtol=1e-5, atol=1e-9)
    assert np.isfinite(replayed.loss).all()
    assert (replayed.column("K16V16-g8-r0") == 0).all()
    # Every layer, sliding or global, is measured (a loss difference of a random model can
    # fall below zero by chance and be clipped, so the raw values are read).
    raw = np.array(replayed.metadata["raw"])
    assert (raw[:, replayed.formats.index("K2V2-g8-r0")] != 0).all()
    if method == "loss":
        # An entry is what scoring the windows with that one sliding layer quantized gives.
        base = kv_perplexity(gemma3, calibration, {}).nll
        quantized = kv_perplexity(gemma3, calibration, {units[2].name: PALETTE[0]}).nll
        assert raw[2, 0] == pytest.approx(quantized - base, rel=1e-4, abs=1e-7)


def test_proxy_refuses_sliding_layers_and_names_the_methods_that_work(gemma3):
    with pytest.raises(BitallocError, match=r"sliding-window.*method='kl' or method='loss'"):
        KVProfiler("proxy").profile(gemma3, kv_units(gemma3), PALETTE, random_windows(2, 40))


# -- allocation ----------------------------------------------------------------------------

FORMATS = "int2-g32,int4-g32,int8-g32,fp16"


def test_kv_budget_on_a_mixed_model_is_met_and_stored_as_predicted(
    gemma3, byte_tokenizer, text_files, isolated_cache, tmp_path
):
    alloc = small_allocate(
        gemma3, byte_tokenizer, text_files, None, FORMATS, kv_avg_bits=4.0, kv_tokens=128
    )
    kv = alloc.data.kv
    assert kv.context_len == 64 and kv.avg_bits <= 4.0 + 1e-9
    assert [c.window for c in kv.layers] == [16, None, 16, None]
    units = kv_units(gemma3)
    table = kv_cost_table(units, [parse_kv_format(c.format) for c in kv.layers], 64)
    assert kv.total_bits == sum(table[i, i] for i in range(len(units)))
    assert kv.elements() == kv_elements(units, 64)
    assert kv.uniform_avg_bits("K16V16") == 16.0
    # The cache the allocation builds stores exactly the predicted bits at its context.
    cache = alloc.kv_cache(gemma3)
    with torch.inference_mode():
        gemma3(input_ids=random_windows(1, 64, seed=6), cache=cache, use_cache=True)
    assert cache.stored_bits() == kv.total_bits
    alloc.save(tmp_path / "a.json")
    assert Allocation.load(tmp_path / "a.json").data.kv == kv
    edited = json.loads((tmp_path / "a.json").read_text())
    edited["kv"]["layers"][0]["window"] = 32
    (tmp_path / "b.json").write_text(json.dumps(edited))
    with pytest.raises(BitallocError, match="edited inconsistently"):
        Allocation.load(tmp_path / "b.json")


def test_joint_memory_budget_on_a_mixed_model_fits(
    gemma3, byte_tokenizer, text_files, isolated_cache
):
    from bitalloc.errors import InfeasibleBudgetError

    settings = {"kv_tokens": 128, "context_len": 96, "batch_size": 2}
    with pytest.raises(InfeasibleBudgetError) as err:
        small_allocate(
            gemma3, byte_tokenizer, text_files, None, FORMATS, memory_bytes=1.0, **settings
        )
    lo, hi = err.value.feasible_range
    memory = lo + 0.3 * (hi - lo)
    alloc = small_allocate(
        gemma3, byte_tokenizer, text_files, None, FORMATS, memory_bytes=memory, **settings
    )
    joint, kv = alloc.data.joint, alloc.data.kv
    assert joint.total_bytes <= memory and joint.kv_bytes == kv.bytes
    units = kv_units(gemma3)
    chosen = [parse_kv_format(c.format) for c in kv.layers]
    assert kv.total_bits == sum(f.cache_bits(96, 2, 2, 16, u.window) for f, u in zip(chosen, units))


# -- refusals ------------------------------------------------------------------------------


def test_attention_the_cache_cannot_hold_is_named():
    chunked = make_tiny_gemma3()
    chunked.config.layer_types = ["chunked_attention", "full_attention"] * 2
    with pytest.raises(BitallocError, match=r"\['chunked_attention'\] attention layers"):
        kv_units(chunked)
    llama = make_tiny_llama()
    llama.config.attention_chunk_size = 8
    with pytest.raises(BitallocError, match="sliding_attention layers only, not chunked attention"):
        kv_units(llama)
    bidirectional = make_tiny_gemma3()
    bidirectional.config.use_bidirectional_attention = True
    with pytest.raises(BitallocError, match="bidirectional"):
        kv_units(bidirectional)
    unset = make_tiny_gemma3()
    unset.config.sliding_window = None
    with pytest.raises(BitallocError, match="set sliding_window"):
        kv_units(unset)
