import numpy as np
import pytest
import torch

from bitalloc.errors import BitallocError
from bitalloc.formats import parse_palette
from bitalloc.models import discover_units, get_linear
from bitalloc.sensitivity import KFACProfiler
from tests.conftest import random_windows

PALETTE = parse_palette("int2-g32,int4-g32,fp16")


def _reference(model, unit, windows, fmt, seed=None):
    """0.5 * T * sum_i D_i (dW G dW^T)_ii from a plain backward with the model's own gradients."""
    lin = get_linear(model, unit.name)
    xs, sq = [], []

    def capture(module, args, out):
        xs.append(args[0].detach().reshape(-1, args[0].shape[-1]))
        out.register_hook(lambda g: sq.append(g.reshape(-1, g.shape[-1]).square().sum(0)))

    handle = lin.register_forward_hook(capture)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    try:
        for ids in windows:
            model.zero_grad()
            if generator is None:
                model(input_ids=ids[None], labels=ids[None]).loss.backward()
            else:
                logits = model(input_ids=ids[None]).logits[0, :-1]
                losses = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none")
                signs = torch.randint(0, 2, (len(losses),), generator=generator) * 2 - 1
                (losses * signs).mean().backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    x = torch.cat(xs)
    gram = x.T @ x / len(x)
    d = torch.stack(sq).mean(0)
    w = lin.weight.detach()
    dw = fmt.fake_quantize(w) - w
    return 0.5 * (windows.shape[1] - 1) * float((d * ((dw @ gram) * dw).sum(1)).sum())


def test_prediction_matches_an_independent_computation(tiny_model):
    units = discover_units(tiny_model)
    cal = random_windows(n=3)
    prof = KFACProfiler(tokens=96, progress=False, estimator="window").profile(
        tiny_model, units, PALETTE, cal
    )
    for i in (0, 2, 6, 11):
        expected = _reference(tiny_model, units[i], cal, PALETTE[0])
        assert prof.loss[i, 0] == pytest.approx(expected, rel=1e-4)
    assert prof.metadata["windows"] == 3 and prof.metadata["skipped_batches"] == 0
    signed = KFACProfiler(tokens=96, progress=False, seed=3).profile(
        tiny_model, units, PALETTE, cal
    )
    for i in (1, 5):
        expected = _reference(tiny_model, units[i], cal, PALETTE[0], seed=3)
        assert signed.loss[i, 0] == pytest.approx(expected, rel=1e-4)
    assert (prof.column("fp16") < 1e-3 * prof.column("int4-g32")).all()


def test_no_weight_gradient_is_computed(tiny_model):
    seen = []
    for p in tiny_model.parameters():
        p.register_hook(lambda g: seen.append(g))
    KFACProfiler(tokens=64, progress=False).profile(
        tiny_model, discover_units(tiny_model), PALETTE, random_windows(n=2)
    )
    assert not seen


def test_non_finite_windows_are_skipped_and_all_bad_fails(tiny_model):
    units = discover_units(tiny_model)
    cal = random_windows(n=4)
    cal[cal == 255] = 0
    cal[2, 3] = 255
    handle = tiny_model.model.embed_tokens.register_forward_hook(
        lambda m, a, out: out.masked_fill((a[0] == 255)[..., None], float("inf"))
    )
    prof = KFACProfiler(tokens=128, progress=False).profile(tiny_model, units, PALETTE, cal)
    assert prof.metadata["skipped_batches"] == 1 and prof.metadata["windows"] == 3
    assert np.isfinite(prof.loss).all()
    handle.remove()
    with torch.no_grad():
        tiny_model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(BitallocError, match="non-finite"):
        KFACProfiler(tokens=64, progress=False).profile(tiny_model, units, PALETTE, cal)


def test_bad_options_raise():
    for bad in (0, -5, 1.5, True):
        with pytest.raises(BitallocError, match="positive integer"):
            KFACProfiler(tokens=bad)
