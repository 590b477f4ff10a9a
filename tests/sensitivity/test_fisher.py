import numpy as np
import pytest
import torch

from bitalloc.data import windows
from bitalloc.errors import BitallocError
from bitalloc.formats import dequantize, parse_palette
from bitalloc.models import discover_units, get_linear, model_fingerprint
from bitalloc.sensitivity import FisherProfiler, Profile, cached_profile
from tests.conftest import random_windows

PALETTE = parse_palette("int2-g32,int3-g32,int4-g32,int8-g32,int2-g64,int4-g64,fp16")


def _calibration(seed=0, n=6, seq_len=32):
    return random_windows(seed=seed, n=n, seq_len=seq_len)


def test_profile_shape_order_and_values(tiny_model):
    units = discover_units(tiny_model)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    prof = FisherProfiler(tokens=128, progress=False).profile(
        tiny_model, units, PALETTE, _calibration()
    )
    assert prof.units == tuple(u.name for u in units)
    assert prof.formats == tuple(f.name for f in PALETTE)
    assert np.isfinite(prof.loss).all() and (prof.loss >= 0).all()
    assert prof.metadata["tokens"] == 128 and prof.metadata["skipped_batches"] == 0
    # Same group size: predicted loss falls as bits rise.
    for group in ("g32",):
        cols = [prof.column(f"int{b}-{group}") for b in (2, 3, 4, 8)]
        for a, b in zip(cols, cols[1:]):
            assert (a >= b).all()
    assert (prof.column("int2-g64") > prof.column("fp16")).all()
    # The model is left as it was, gradients included.
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in tiny_model.parameters())
    assert all(p.requires_grad for p in tiny_model.parameters())


def test_prediction_matches_quadratic_form(tiny_model):
    """0.5 * T * sum(F * dW^2) with F the mean squared per-window gradient."""
    units = discover_units(tiny_model)[:1]
    cal = _calibration(n=2)
    prof = FisherProfiler(tokens=64, progress=False, estimator="window").profile(
        tiny_model, units, PALETTE, cal
    )
    w = get_linear(tiny_model, units[0].name).weight
    fisher = torch.zeros_like(w)
    for window in cal:
        tiny_model.zero_grad()
        tiny_model(input_ids=window[None], labels=window[None]).loss.backward()
        fisher += w.grad.square() / len(cal)
    tiny_model.zero_grad()
    dw = PALETTE[0].fake_quantize(w.detach()) - w.detach()
    expected = 0.5 * (cal.shape[1] - 1) * float((fisher * dw.square()).sum())
    assert prof.loss[0, 0] == pytest.approx(expected, rel=1e-4)


def test_non_finite_batches_are_skipped_and_counted(tiny_model):
    units = discover_units(tiny_model)

    def overflow_on_255(module, args, output):
        # Windows holding token 255 overflow in the embedding output, as an fp16 model might.
        return output.masked_fill((args[0] == 255)[..., None], float("inf"))

    tiny_model.model.embed_tokens.register_forward_hook(overflow_on_255)
    cal = _calibration(n=4)
    cal[cal == 255] = 0
    cal[1, 5] = 255  # only window 1 overflows
    prof = FisherProfiler(tokens=128, progress=False).profile(tiny_model, units, PALETTE, cal)
    assert prof.metadata["skipped_batches"] == 1
    assert prof.metadata["windows"] == 3
    assert np.isfinite(prof.loss).all()


def test_all_batches_bad_fails_clearly(tiny_model):
    units = discover_units(tiny_model)
    with torch.no_grad():
        tiny_model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(BitallocError, match="non-finite gradients"):
        FisherProfiler(tokens=64, progress=False).profile(
            tiny_model, units, PALETTE, _calibration(n=2)
        )


def test_profile_save_load_round_trip(tmp_path, tiny_model):
    units = discover_units(tiny_model)
    prof = FisherProfiler(tokens=64, progress=False).profile(
        tiny_model, units, PALETTE, _calibration(n=2)
    )
    prof.save(tmp_path / "p.json")
    again = Profile.load(tmp_path / "p.json")
    assert again.units == prof.units and again.formats == prof.formats
    assert np.array_equal(again.loss, prof.loss)


def test_cache_hit_returns_identical_profile(tiny_model, isolated_cache):
    units = discover_units(tiny_model)
    cal = windows(torch.arange(256).repeat(2), 64)
    kwargs = dict(
        model_fingerprint=model_fingerprint(tiny_model, units), calibration_fingerprint="c"
    )
    profiler = FisherProfiler(tokens=128, progress=False)
    first = cached_profile(profiler, tiny_model, units, PALETTE, cal, **kwargs)
    second = cached_profile(profiler, tiny_model, units, PALETTE, cal, **kwargs)
    assert first.metadata["cache"] == "miss" and second.metadata["cache"] == "hit"
    assert np.array_equal(first.loss, second.loss)
    other = cached_profile(
        FisherProfiler(tokens=64, progress=False), tiny_model, units, PALETTE, cal, **kwargs
    )
    assert other.metadata["cache"] == "miss"


def test_bad_profiles_raise(tmp_path):
    with pytest.raises(BitallocError, match="shape"):
        Profile(("a",), ("fp16", "int4-g128"), np.zeros((2, 2)))
    with pytest.raises(BitallocError, match="non-finite"):
        Profile(("a",), ("fp16",), np.array([[np.nan]]))
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(BitallocError, match="not valid JSON"):
        Profile.load(tmp_path / "x.json")
    with pytest.raises(BitallocError, match="tokens must be a positive integer"):
        FisherProfiler(tokens=0)


def test_token_estimator_is_unbiased_for_the_mean_per_token_fisher():
    """T * E_signs[(grad of mean_t s_t loss_t)^2] = mean_t (grad loss_t)^2, elementwise."""
    from bitalloc.sensitivity import FisherAccumulator
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(layers=1, hidden=16, intermediate=24)
    unit = discover_units(model)[2]  # v_proj: its output feeds every later position
    window = _calibration(n=1, seq_len=9)[0]
    w = get_linear(model, unit.name).weight
    per_token = torch.zeros_like(w)
    logits = model(input_ids=window[None]).logits[0, :-1]
    losses = torch.nn.functional.cross_entropy(logits, window[1:], reduction="none")
    for t in range(len(losses)):
        (g,) = torch.autograd.grad(losses[t], w, retain_graph=True)
        per_token += g.square() / len(losses)
    acc = FisherAccumulator(model, [unit], torch.Generator().manual_seed(0))
    for _ in range(600):
        acc.add_batch(window)
    estimate = len(losses) * acc.fisher()[0]
    assert float(estimate.sum()) == pytest.approx(float(per_token.sum()), rel=0.1)


def test_table_equals_the_format_by_format_reference(tiny_model):
    """The table quantizes each unit once per group size for all bit widths; every entry must
    equal the one computed format by format with the original clipping search (the down
    projection's 96 inputs leave a ragged last group at 64 and a lone short one at 128)."""
    from bitalloc.sensitivity.fisher import FisherAccumulator
    from tests.formats.test_int import reference_quantize

    # Every bit width and every group size, and fp16; the first block's units (every shape).
    palette = parse_palette("int2-g32,int3-g64,int4-g128,int5-g32,int6-g64,int8-g128,fp16")
    units = discover_units(tiny_model)[:7]
    cal = _calibration(n=2)
    prof = FisherProfiler(tokens=64, progress=False).profile(tiny_model, units, palette, cal)
    acc = FisherAccumulator(tiny_model, units, torch.Generator().manual_seed(0))
    tiny_model.eval()
    for window in cal:
        assert acc.add_batch(window)
    tiny_model.zero_grad()
    scale = 0.5 * (cal.shape[1] - 1)
    with torch.no_grad():
        for i, (w, f) in enumerate(zip(acc.weights, acc.fisher())):
            w = w.detach()
            for j, fmt in enumerate(palette):
                fq = w.half().float() if fmt.is_float else dequantize(reference_quantize(w, fmt))
                expected = scale * float((f * (fq - w).square()).sum())
                assert prof.loss[i, j] == expected, (units[i].name, fmt.name)
