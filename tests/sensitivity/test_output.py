import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bitalloc.apply import fake_quantize_
from bitalloc.errors import BitallocError
from bitalloc.formats import parse_format, parse_palette
from bitalloc.models import discover_units, get_linear
from bitalloc.sensitivity.monotone import monotone_in_bits
from bitalloc.sensitivity.output import InputGramAccumulator, OutputProfiler, reference_format
from tests.conftest import make_tiny_llama, random_windows

PALETTE = parse_palette("int2-g32,int3-g32,int4-g32,int8-g32,int2-g64,int4-g64,fp16")


def _calibration(seed=0, n=4, seq_len=32):
    return random_windows(seed=seed, n=n, seq_len=seq_len)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before, training=False):
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(m.training == training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    for u in discover_units(model):
        lin = get_linear(model, u.name)
        assert not lin._forward_hooks and not lin._forward_pre_hooks


@pytest.fixture(scope="module")
def trained():
    """A tiny Llama fitted to a periodic text: at a loss minimum, so quantizing every unit
    reliably raises the loss (a random model's loss moves either way)."""
    torch.manual_seed(0)
    model = make_tiny_llama()
    base = torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(0))
    cal = torch.stack([base.roll(i)[torch.arange(32) % 16] for i in range(4)])
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        opt.zero_grad()
        model(input_ids=cal, labels=cal).loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    return model, cal


def _mean_loss(model, cal):
    with torch.inference_mode():
        return float(
            np.mean(
                [
                    float(F.cross_entropy(model(input_ids=w[None]).logits[0, :-1], w[1:]))
                    for w in cal
                ]
            )
        )


def test_gram_and_error_match_direct_computation(tiny_model):
    units = discover_units(tiny_model)
    names = [u.name for u in units]
    cal = _calibration(n=3)
    captured = []
    down = get_linear(tiny_model, "model.layers.1.mlp.down_proj")
    handle = down.register_forward_hook(lambda m, a, o: captured.append(a[0][0].clone()))
    acc = InputGramAccumulator(tiny_model, units)
    assert all(acc.add_batch(w) for w in cal)
    handle.remove()
    grams = acc.grams()
    assert acc.tokens == cal.numel()
    # layer 0 q_proj input, rebuilt from the embedding and the first norm
    with torch.no_grad():
        layer0 = tiny_model.model.layers[0]
        x = layer0.input_layernorm(tiny_model.model.embed_tokens(cal)).reshape(-1, 64).double()
    q = names.index("model.layers.0.self_attn.q_proj")
    torch.testing.assert_close(grams[q].double(), x.T @ x / len(x), rtol=1e-5, atol=1e-7)
    xd = torch.cat(captured).double()
    d = names.index("model.layers.1.mlp.down_proj")
    assert grams[d].shape == (96, 96)
    torch.testing.assert_close(grams[d].double(), xd.T @ xd / len(xd), rtol=1e-5, atol=1e-7)

    prof = OutputProfiler(tokens=96, progress=False, calibrate=False).profile(
        tiny_model, units, PALETTE, cal
    )
    assert prof.metadata["monotone_fixes"] == 0 and prof.metadata["scale_source"] == "unscaled"
    assert prof.metadata["tokens"] == 96 and prof.metadata["windows"] == 3
    for i, inputs in ((q, x), (d, xd)):
        w = get_linear(tiny_model, names[i]).weight.detach()
        for j, fmt in enumerate(PALETTE):
            dw = (fmt.fake_quantize(w) - w).double()
            direct = float((inputs @ dw.T).square().sum(dim=1).mean())  # mean ||dW x||^2
            assert prof.loss[i, j] == pytest.approx(direct, rel=1e-4, abs=1e-12)


def test_units_with_one_input_share_one_gram(tiny_model):
    units = discover_units(tiny_model)
    acc = InputGramAccumulator(tiny_model, units)
    acc.add_batch(_calibration(n=1)[0])
    acc.add_batch(_calibration(n=1, seed=1)[0])
    g = dict(zip((u.name for u in units), acc.grams()))

    def at(layer, sub):
        return g[f"model.layers.{layer}.{sub}"]

    for layer in (0, 1):
        assert at(layer, "self_attn.q_proj") is at(layer, "self_attn.k_proj")
        assert at(layer, "self_attn.q_proj") is at(layer, "self_attn.v_proj")
        assert at(layer, "mlp.gate_proj") is at(layer, "mlp.up_proj")
        assert at(layer, "self_attn.o_proj") is not at(layer, "self_attn.q_proj")
        assert at(layer, "mlp.down_proj") is not at(layer, "mlp.gate_proj")
        assert at(layer, "mlp.gate_proj") is not at(layer, "self_attn.q_proj")
    assert at(0, "self_attn.q_proj") is not at(1, "self_attn.q_proj")
    assert len({id(x) for x in g.values()}) == 8


def test_calibrated_scale_matches_uniform_loss_increase(trained):
    model, cal = trained
    units = discover_units(model)
    palette = parse_palette("int2-g32,int2-g64,int4-g32,int4-g64,int8-g64,fp16")
    before = _state(model)
    prof = OutputProfiler(tokens=128, progress=False).profile(model, units, palette, cal)
    raw = OutputProfiler(tokens=128, progress=False, calibrate=False).profile(
        model, units, palette, cal
    )
    _assert_unchanged(model, before)
    meta = prof.metadata
    assert meta["reference_format"] == "int4-g64" and meta["scale_source"] == "calibrated"
    quantized = fake_quantize_(copy.deepcopy(model), {u.name: "int4-g64" for u in units})
    increase = _mean_loss(quantized, cal) - _mean_loss(model, cal)
    assert increase > 0
    assert meta["reference_loss_increase"] == pytest.approx(increase, rel=1e-5)
    assert prof.column("int4-g64").sum() == pytest.approx(increase, rel=1e-5)
    # one global factor: the raw errors times the scale, ranking untouched
    np.testing.assert_allclose(prof.loss, meta["scale"] * raw.loss, rtol=1e-12)
    assert meta["scale"] == pytest.approx(increase / raw.column("int4-g64").sum(), rel=1e-5)


def test_reference_format_choice():
    def ref(names):
        found = reference_format(parse_palette(names))
        return found.name if found else None

    assert ref("int2-g32,int4-g32,int4-g128,int8-g128,fp16") == "int4-g128"
    assert ref("int2-g32,int3-g32,int5-g64,fp16") == "int5-g64"  # tie on bits: larger group
    assert ref("int3-g64,int5-g64") == "int3-g64"
    assert ref("int8-g32,int2-g64") == "int2-g64"
    assert ref("fp16") is None


def test_unscaled_fallbacks(tiny_model):
    units = discover_units(tiny_model)
    cal = _calibration(n=2)
    prof = OutputProfiler(tokens=64, progress=False).profile(
        tiny_model, units, parse_palette("fp16"), cal
    )
    assert prof.metadata["scale"] == 1.0
    assert prof.metadata["scale_source"] == "unscaled: no integer format"
    with torch.no_grad():
        for u in units:
            get_linear(tiny_model, u.name).weight.zero_()  # quantization changes nothing
    prof = OutputProfiler(tokens=64, progress=False).profile(tiny_model, units, PALETTE, cal)
    assert prof.metadata["scale_source"].startswith("unscaled: every unit at int4-g64 did not")
    assert prof.metadata["reference_loss_increase"] == 0.0
    assert (prof.loss == 0).all()


def test_more_bits_never_worse_and_fp16_near_zero(tiny_model):
    units = discover_units(tiny_model)
    prof = OutputProfiler(tokens=128, progress=False, calibrate=False).profile(
        tiny_model, units, PALETTE, _calibration()
    )
    assert np.isfinite(prof.loss).all() and (prof.loss >= 0).all()
    cols = [prof.column(f"int{b}-g32") for b in (2, 3, 4, 8)]
    for a, b in zip(cols, cols[1:]):
        assert (a > b).all()
    assert (prof.column("int2-g64") > prof.column("int4-g64")).all()
    assert (prof.column("fp16") <= 1e-2 * prof.column("int8-g32")).all()


def test_monotone_cap_only_within_a_group_size():
    palette = [parse_format(n) for n in ("int2-g32", "int3-g32", "int4-g64", "int3-g64", "fp16")]
    table = np.array([[1.0, 2.0, 5.0, 4.0, 9.0], [3.0, 1.0, 1.0, 2.0, 0.0]])
    out, fixed = monotone_in_bits(table, palette)
    np.testing.assert_array_equal(out, [[1.0, 1.0, 4.0, 4.0, 9.0], [3.0, 1.0, 1.0, 2.0, 0.0]])
    assert fixed == 2


def test_non_finite_batch_is_skipped_and_counted(tiny_model):
    units = discover_units(tiny_model)

    def overflow_on_255(module, args, output):
        return output.masked_fill((args[0] == 255)[..., None], float("inf"))

    tiny_model.model.embed_tokens.register_forward_hook(overflow_on_255)
    cal = _calibration(n=4)
    cal[cal == 255] = 0
    cal[1, 5] = 255
    acc = InputGramAccumulator(tiny_model, units)
    assert [acc.add_batch(w) for w in cal] == [True, False, True, True]
    good = InputGramAccumulator(tiny_model, units)
    for w in cal[[0, 2, 3]]:
        good.add_batch(w)
    for a, b in zip(acc.grams(), good.grams()):
        torch.testing.assert_close(a, b)
    before = _state(tiny_model)
    prof = OutputProfiler(tokens=128, progress=False).profile(tiny_model, units, PALETTE, cal)
    assert prof.metadata["skipped_batches"] == 1 and prof.metadata["windows"] == 3
    assert prof.metadata["tokens"] == 96 and np.isfinite(prof.loss).all()
    _assert_unchanged(tiny_model, before)


def test_all_bad_fails_and_restores_model(tiny_model):
    units = discover_units(tiny_model)
    tiny_model.model.embed_tokens.register_forward_hook(lambda m, a, o: o * float("inf"))
    before = _state(tiny_model)
    tiny_model.train()
    with pytest.raises(BitallocError, match="all 2 calibration windows gave non-finite"):
        OutputProfiler(tokens=64, progress=False).profile(
            tiny_model, units, PALETTE, _calibration(n=2)
        )
    _assert_unchanged(tiny_model, before, training=True)


def test_errors_mid_forward_restore_model(tiny_model):
    units = discover_units(tiny_model)
    before = _state(tiny_model)
    tiny_model.train()
    handle = tiny_model.model.layers[1].mlp.register_forward_hook(
        lambda m, a, o: (_ for _ in ()).throw(RuntimeError("boom"))
    )
    with pytest.raises(RuntimeError, match="boom"):
        OutputProfiler(tokens=64, progress=False).profile(
            tiny_model, units, PALETTE, _calibration(n=2)
        )
    handle.remove()
    _assert_unchanged(tiny_model, before, training=True)
    # fails in the fake-quantized reference pass (third forward): weights come back too
    calls = []

    def fail_third(module, args, output):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("late boom")

    tiny_model.model.norm.register_forward_hook(fail_third)
    with pytest.raises(RuntimeError, match="late boom"):
        OutputProfiler(tokens=64, progress=False).profile(
            tiny_model, units, PALETTE, _calibration(n=2)
        )
    assert len(calls) == 3
    _assert_unchanged(tiny_model, before, training=True)


def test_no_gradients_are_computed(tiny_model):
    units = discover_units(tiny_model)
    cal = _calibration(n=2)
    first = OutputProfiler(tokens=64, progress=False).profile(tiny_model, units, PALETTE, cal)
    assert all(p.grad is None and p.requires_grad for p in tiny_model.parameters())
    for p in tiny_model.parameters():
        p.requires_grad_(False)
    second = OutputProfiler(tokens=64, progress=False).profile(tiny_model, units, PALETTE, cal)
    assert not any(p.requires_grad for p in tiny_model.parameters())
    np.testing.assert_array_equal(first.loss, second.loss)


def test_options_and_validation():
    a = OutputProfiler(tokens=256)
    assert a.options()["tokens"] == 256 and a.options()["calibrate"] is True
    assert a.options() != OutputProfiler(tokens=256, calibrate=False).options()
    assert OutputProfiler.name == "output"
    with pytest.raises(BitallocError, match="tokens must be a positive integer"):
        OutputProfiler(tokens=0)
    with pytest.raises(BitallocError, match="tokens must be a positive integer"):
        OutputProfiler(tokens=1.5)
    with pytest.raises(BitallocError, match="calibrate must be True or False"):
        OutputProfiler(calibrate="yes")


def test_reuses_the_importance_gram_matrices_of_the_same_windows(tiny_model):
    from bitalloc.importance import gather_importance

    units = discover_units(tiny_model)
    cal = _calibration(n=3)
    profiler = OutputProfiler(tokens=96, progress=False, calibrate=True)
    own = profiler.profile(tiny_model, units, PALETTE, cal)
    assert "gram_source" not in own.metadata

    shared = gather_importance(tiny_model, units, cal, tokens=96, progress=False, grams=True)
    calls = []
    original = InputGramAccumulator.add_batch
    InputGramAccumulator.add_batch = lambda self, w: calls.append(1) or original(self, w)
    try:
        reused = profiler.profile(tiny_model, units, PALETTE, cal, importance=shared)
    finally:
        InputGramAccumulator.add_batch = original
    assert calls == [] and reused.metadata["gram_source"] == "importance"
    assert reused.metadata["tokens"] == own.metadata["tokens"] == 96
    assert reused.metadata["gram_matrices"] == own.metadata["gram_matrices"]
    assert reused.metadata["base_loss"] == pytest.approx(own.metadata["base_loss"], rel=1e-6)
    # Same windows, same matrices up to float32 summation order and the diagonal kept at the
    # importance vector's bfloat16 values; the weighted clipping is the same in both runs.
    with_vectors = profiler.profile(
        tiny_model, units, PALETTE, cal, importance=shared.without_grams()
    )
    assert "gram_source" not in with_vectors.metadata
    np.testing.assert_allclose(reused.loss, with_vectors.loss, rtol=0.02, atol=1e-9)

    # Other windows (another token count) are not reused.
    fewer = gather_importance(tiny_model, units, cal, tokens=64, progress=False, grams=True)
    other = profiler.profile(tiny_model, units, PALETTE, cal, importance=fewer)
    assert "gram_source" not in other.metadata
