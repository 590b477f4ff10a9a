"""The KV sensitivity profiler: the profiler contract (checked here, since the weight contract
suite feeds weight units), each measure against an independent computation, the orderings a
quantized cache must show, key vs value sensitivity, and clear errors."""

import math

import numpy as np
import pytest
import torch

from bitalloc.errors import BitallocError
from bitalloc.kv import KVFormat, build_kv_cache, kv_perplexity, kv_units
from bitalloc.kv.formats import parse_kv_format
from bitalloc.kv.profiler import KVProfiler, key_value_sensitivity, kv_sensitivity_table
from bitalloc.models import discover_units
from bitalloc.sensitivity import Profile, cached_profile
from tests.conftest import make_tiny_llama, random_windows
from tests.sensitivity.contract import (
    assert_kv_free_format_is_zero,
    assert_metadata,
    assert_model_restored,
    assert_save_load,
    assert_table,
)

METHODS = ("loss", "kl", "proxy")
# Groups of 16 tokens, so 32-token windows hold two whole key groups.
FULL = [KVFormat(k, v, 16) for k in (2, 4, 8, 16) for v in (2, 4, 8, 16)]
# Given out of storage order, formats mixed with names: columns must follow this order.
PALETTE = ["K16V16-g16-r0", KVFormat(2, 2, 16), "K2V16-g16-r0", KVFormat(16, 2, 16), "K8V4-g16-r0"]
NAMES = ("K16V16-g16-r0", "K2V2-g16-r0", "K2V16-g16-r0", "K16V2-g16-r0", "K8V4-g16-r0")


def _calibration(n=4, seq_len=32, seed=0):
    return random_windows(n=n, seq_len=seq_len, seed=seed)


def _periodic(n, seq_len=32, seed=0, period=4, vocab=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, period), generator=g).repeat(1, seq_len // period)


@pytest.fixture(scope="module")
def trained_model():
    """A tiny Llama trained (40 steps, about a second) to continue period-4 sequences.

    Predicting a token means finding the one 4 positions back, so the loss depends on what
    attention reads from the cache. A random model's loss barely does, and a small change
    moves it up or down by chance, so orderings of measured loss are asserted on this model.
    """
    model = make_tiny_llama(seed=0)
    model.train()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(40):
        ids = _periodic(16, seed=1000 + step)
        loss = model(input_ids=ids, labels=ids).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def _table(prof: Profile, key: int, value: int) -> np.ndarray:
    return prof.column(KVFormat(key, value, 16).name)


# -- the contract ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_contract_shape_values_metadata_and_model_unchanged(method, tiny_model):
    units = kv_units(tiny_model)[::-1]  # rows follow the given order, not the network's
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    flags = [p.requires_grad for p in tiny_model.parameters()]
    prof = KVProfiler(method, tokens=96).profile(tiny_model, units, PALETTE, _calibration())
    assert_table(prof, units, [parse_kv_format(f) for f in PALETTE])
    assert prof.formats == NAMES
    assert_kv_free_format_is_zero(prof)
    if method != "loss":  # a loss difference may be clipped to 0 on a random model
        assert (prof.column("K2V2-g16-r0") > 0).all()
    assert_metadata(prof, "kv", _calibration())
    meta = prof.metadata
    assert meta["kv_method"] == method and meta["monotone_fixes"] == 0
    assert meta["tokens"] == 96 and meta["windows"] == 3
    assert_model_restored(tiny_model, before, flags)


@pytest.mark.parametrize("method", METHODS)
def test_contract_deterministic_and_options_key_the_cache(method, tiny_model, isolated_cache):
    units = kv_units(tiny_model)
    run = KVProfiler(method, tokens=64, batch_size=1)
    first = run.profile(tiny_model, units, PALETTE, _calibration())
    again = KVProfiler(method, tokens=64, batch_size=1).profile(
        tiny_model, units, PALETTE, _calibration()
    )
    np.testing.assert_array_equal(first.loss, again.loss)
    # The batch size only reorders float sums, so it does not key the cache.
    assert run.options() == KVProfiler(method, tokens=64, batch_size=2).options()
    assert run.options() != KVProfiler(method, tokens=32).options()
    others = [m for m in METHODS if m != method]
    assert all(run.options() != KVProfiler(m, tokens=64).options() for m in others)
    formats = [KVFormat(2, 2, 16), KVFormat(16, 16, 16)]
    fingerprints = {"model_fingerprint": "tiny", "calibration_fingerprint": "random"}
    stored = cached_profile(run, tiny_model, units, formats, _calibration(), **fingerprints)
    hit = cached_profile(run, tiny_model, units, formats, _calibration(), **fingerprints)
    assert stored.metadata["cache"] == "miss" and hit.metadata["cache"] == "hit"
    np.testing.assert_array_equal(hit.loss, stored.loss)
    other = KVProfiler(others[0], tokens=64)
    cached_profile(other, tiny_model, units, formats, _calibration(), **fingerprints)
    assert len(list((isolated_cache / "profiles").iterdir())) == 2


def test_contract_save_load_and_subset_of_units(tiny_model, tmp_path):
    units = kv_units(tiny_model)
    prof = KVProfiler("proxy", tokens=64).profile(tiny_model, units[1:], FULL, _calibration())
    assert prof.units == (units[1].name,)
    assert_save_load(prof, tmp_path / "kv.safetensors")


def test_batches_with_non_finite_losses_are_skipped_and_counted(tiny_model, monkeypatch):
    import bitalloc.kv.profiler as profiler

    cal = _calibration(n=3)
    bad = int(cal[1, 0])
    assert bad not in (int(cal[0, 0]), int(cal[2, 0]))
    real = profiler._nll

    def nll(logits, ids):
        return math.nan if int(ids[0, 0]) == bad else real(logits, ids)

    monkeypatch.setattr(profiler, "_nll", nll)
    run = KVProfiler("loss", batch_size=1)
    prof = run.profile(tiny_model, kv_units(tiny_model), PALETTE, cal)
    assert prof.metadata["skipped_batches"] == 1
    assert prof.metadata["windows"] == 2 and prof.metadata["tokens"] == 64
    with pytest.raises(BitallocError, match="every calibration batch"):
        run.profile(tiny_model, kv_units(tiny_model), PALETTE, cal[1:2])


# -- each measure against an independent computation ---------------------------------------


def _logprobs(model, ids, formats):
    with torch.inference_mode():
        cache = build_kv_cache(model, formats)
        logits = model(input_ids=ids, cache=cache, use_cache=True).logits[:, :-1].float()
    return torch.log_softmax(logits, dim=-1)


@pytest.mark.parametrize("method", ["loss", "kl"])
def test_measured_values_quantize_one_layer_only(method, trained_model):
    """Each value is what scoring the windows with only that layer's cache quantized gives:
    the perplexity protocol's loss difference, or the KL of its next-token distribution."""
    windows = _periodic(3, seed=7)
    units = kv_units(trained_model)
    fmt = KVFormat(4, 2, 16)
    prof = KVProfiler(method, batch_size=2).profile(trained_model, units, [fmt], windows)
    base = kv_perplexity(trained_model, windows, {})
    assert prof.metadata["base_loss"] == pytest.approx(base.nll, rel=1e-6)
    reference = _logprobs(trained_model, windows, {})
    for i, unit in enumerate(units):
        if method == "loss":
            expected = kv_perplexity(trained_model, windows, {unit.name: fmt}).nll - base.nll
        else:
            quantized = _logprobs(trained_model, windows, {unit.name: fmt})
            kl = (reference.exp() * (reference - quantized)).sum() / base.tokens
            expected = float(kl)
        assert prof.metadata["raw"][i][0] == pytest.approx(expected, rel=1e-4, abs=1e-8)
        assert abs(expected) > 1e-5  # the layer's quantization is measurable here


def test_proxy_equals_the_error_of_the_models_own_attention(trained_model):
    """The offline attention error equals the one measured by running the model with the
    layer's cache quantized and reading its attention output (the o_proj input)."""
    windows = _periodic(2, seed=3)
    unit = kv_units(trained_model)[1]
    fmt = KVFormat(2, 4, 16)
    prof = KVProfiler("proxy").profile(trained_model, [unit], [fmt], windows)
    attn = trained_model.get_submodule(unit.name.removesuffix(".kv"))
    seen = []
    handle = attn.o_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        kv_perplexity(trained_model, windows, {})
        kv_perplexity(trained_model, windows, {unit.name: fmt})
    finally:
        handle.remove()
    exact, quantized = seen
    expected = float(((quantized - exact) ** 2).sum() / (exact**2).sum())
    assert prof.loss[0, 0] == pytest.approx(expected, rel=1e-3)


def test_proxy_refuses_attention_it_cannot_reproduce(tiny_model):
    attn = tiny_model.get_submodule(kv_units(tiny_model)[0].name.removesuffix(".kv"))
    # Something between attention and o_proj that plain softmax attention does not do.
    handle = attn.o_proj.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    try:
        with pytest.raises(BitallocError, match="could not reproduce.*method='loss'"):
            KVProfiler("proxy").profile(tiny_model, kv_units(tiny_model), FULL, _calibration())
    finally:
        handle.remove()


# -- orderings -----------------------------------------------------------------------------


def test_proxy_orders_formats_and_zeroes_k16v16(trained_model):
    # The trained model: in a random one attention is nearly uniform, so key errors barely
    # move its output and K4V2 can tie K2V2.
    units = kv_units(trained_model)
    prof = KVProfiler("proxy").profile(trained_model, units, FULL, _periodic(4, seed=5))
    assert (_table(prof, 16, 16) == 0).all()
    assert (prof.loss.argmax(axis=1) == prof.formats.index("K2V2-g16-r0")).all()
    # One side quantized, the other kept: error falls as bits rise. (With both quantized the
    # two errors can cancel a little, so e.g. K2V8 may come out a hair below K2V16.)
    for low, high in ((2, 4), (4, 8), (8, 16)):
        assert (_table(prof, low, 16) > _table(prof, high, 16)).all()
        assert (_table(prof, 16, low) > _table(prof, 16, high)).all()


def test_loss_falls_as_key_bits_rise(trained_model):
    units = kv_units(trained_model)
    prof = KVProfiler("loss").profile(trained_model, units, FULL, _periodic(8, seed=7))
    total = {(k, v): _table(prof, k, v).sum() for k in (2, 4, 8, 16) for v in (2, 4, 8, 16)}
    assert total[2, 16] > total[4, 16] > total[8, 16] >= total[16, 16] == 0
    assert max(total, key=total.get) == (2, 2)
    # The layer that reads the period back carries most of it, and orders keys by itself.
    layer = int(np.argmax(_table(prof, 2, 16)))
    assert _table(prof, 2, 16)[layer] > _table(prof, 4, 16)[layer] > _table(prof, 8, 16)[layer]


def test_residual_window_covering_the_context_is_free(tiny_model):
    lossless = KVFormat(2, 2, 16, residual=32)
    for method in METHODS:
        prof = KVProfiler(method, tokens=64).profile(
            tiny_model, kv_units(tiny_model), [lossless], _calibration()
        )
        assert (prof.loss == 0).all()


# -- key vs value sensitivity --------------------------------------------------------------


def _hand_profile():
    formats = ("K2V16", "K16V2", "K4V16", "K16V4", "K2V2", "K16V16")
    loss = [[0.5, 0.1, 0.05, 0.02, 0.7, 0.0], [0.3, 0.2, 0.01, 0.03, 0.6, 0.0]]
    return Profile(("a.kv", "b.kv"), formats, np.array(loss))


def test_key_value_sensitivity_pairs_keys_with_values():
    rows = key_value_sensitivity(_hand_profile())
    assert rows == [
        {"unit": "a.kv", "key": {2: 0.5, 4: 0.05}, "value": {2: 0.1, 4: 0.02}},
        {"unit": "b.kv", "key": {2: 0.3, 4: 0.01}, "value": {2: 0.2, 4: 0.03}},
    ]
    lines = kv_sensitivity_table(_hand_profile()).splitlines()
    assert lines[0].split() == ["layer", "K2", "V2", "K4", "V4"]
    assert len(lines) == 4 and lines[-1].split()[0] == "mean"
    assert [float(x) for x in lines[-1].split()[1:]] == pytest.approx([0.4, 0.15, 0.03, 0.025])


def test_key_value_sensitivity_errors():
    only_joint = Profile(("a.kv",), ("K2V2", "K16V16"), np.zeros((1, 2)))
    with pytest.raises(BitallocError, match="K2V16 and K16V2"):
        key_value_sensitivity(only_joint)
    layouts = Profile(
        ("a.kv",), ("K2V16", "K16V2", "K2V16-g32-r0", "K16V2-g32-r0"), np.zeros((1, 4))
    )
    with pytest.raises(BitallocError, match="group_size= and residual="):
        key_value_sensitivity(layouts)
    assert key_value_sensitivity(layouts, group_size=32)[0]["key"] == {2: 0.0}
    weights = Profile(("a",), ("int4-g64",), np.zeros((1, 1)))
    with pytest.raises(BitallocError, match="not a KV format"):
        key_value_sensitivity(weights)


# -- errors --------------------------------------------------------------------------------


def test_clear_errors(tiny_model):
    units, cal = kv_units(tiny_model), _calibration()
    with pytest.raises(BitallocError, match="method must be one of"):
        KVProfiler("fisher")
    with pytest.raises(BitallocError, match="batch_size must be a positive integer"):
        KVProfiler(batch_size=0)
    with pytest.raises(BitallocError, match="not weight units"):
        KVProfiler().profile(tiny_model, discover_units(tiny_model), FULL, cal)
    with pytest.raises(BitallocError, match="listed twice"):
        KVProfiler().profile(tiny_model, [units[0], units[0]], FULL, cal)
    with pytest.raises(BitallocError, match="non-empty list"):
        KVProfiler().profile(tiny_model, units, [], cal)
    with pytest.raises(BitallocError, match="more than once"):
        KVProfiler().profile(tiny_model, units, ["K2V2", KVFormat(2, 2)], cal)
    with pytest.raises(BitallocError, match="token ids"):
        KVProfiler().profile(tiny_model, units, FULL, cal.float())
    with pytest.raises(BitallocError, match="max_position_embeddings"):
        KVProfiler().profile(tiny_model, units, FULL, random_windows(1, 300))


# -- the default model ---------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_keys_hurt_more_than_values_at_two_bits(default_model):
    from bitalloc.data import default_text, tokenize, windows

    model, tok = default_model.model, default_model.tokenizer
    ids = windows(tokenize(tok, default_text().calibration), 128, max_tokens=256)
    units = kv_units(model)
    palette = ["K2V16", "K16V2", "K16V16"]
    prof = KVProfiler("loss", batch_size=2).profile(model, units, palette, ids)
    print(f"\nKV sensitivity, loss increase (nats), {prof.metadata['tokens']} tokens")
    print(kv_sensitivity_table(prof))
    rows = key_value_sensitivity(prof)
    keys = np.mean([r["key"][2] for r in rows])
    values = np.mean([r["value"][2] for r in rows])
    assert keys > values > 0


@pytest.mark.parametrize("method", ["loss", "kl"])
def test_prefix_replay_measures_exactly_what_recomputing_measures(method, trained_model):
    model = make_tiny_llama(seed=3, layers=4)
    for net in (trained_model, model):
        units = kv_units(net)[::-1]
        calibration = _periodic(4, seed=11)
        calls = []
        hook = net.model.layers[1].register_forward_pre_hook(
            lambda *a, calls=calls: calls.append(1)
        )
        replayed = KVProfiler(method, batch_size=2).profile(net, units, FULL, calibration)
        hook.remove()
        # Block 1 ran in the reference forwards and when layer 0 or 1 was quantized, only.
        quantizing = sum(1 for f in FULL if not f.is_lossless)
        assert len(calls) == 2 * (1 + 2 * quantizing)
        blocks = [type(b).__name__ for b in net.model.layers]
        recomputed = KVProfiler(method, batch_size=2, replay_prefix=False).profile(
            net, units, FULL, calibration
        )
        np.testing.assert_allclose(replayed.loss, recomputed.loss, rtol=1e-5, atol=1e-9)
        # The model's blocks are its own again afterwards.
        assert (
            [type(b).__name__ for b in net.model.layers]
            == blocks
            == ["LlamaDecoderLayer"] * len(blocks)
        )
