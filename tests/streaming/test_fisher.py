"""The layer-streamed Fisher profile: recomputing each layer's forward during a backward pass
that streams the layers in reverse gives the in-memory ``fisher`` profiler's table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bitalloc.formats import parse_palette
from bitalloc.importance import gather_importance
from bitalloc.models import discover_units
from bitalloc.sensitivity.fisher import FisherProfiler
from bitalloc.streaming.fisher import streamed_fisher_profile
from bitalloc.streaming.model import StreamedModel
from tests.conftest import random_windows

PALETTE = parse_palette("int2-g32,int3-g32,int4-g32,int8-g32,fp16")


def _in_memory(profiler, path, cal, estimator):
    """``profiler``'s table on the checkpoint loaded whole in float32, over the importance the
    streamed run gathers (128 tokens), and that importance."""
    from transformers import AutoModelForCausalLM

    whole = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    units = discover_units(whole)
    importance = gather_importance(whole, units, cal, tokens=128, progress=False)
    expected = profiler(tokens=128, progress=False, estimator=estimator).profile(
        whole, units, PALETTE, cal, importance=importance
    )
    return expected, importance


@pytest.mark.parametrize("estimator", ["token", "window"])
def test_streamed_fisher_equals_the_in_memory_profiler(sharded, estimator, monkeypatch, tmp_path):

    import bitalloc.streaming.fisher as streamed_fisher

    # The head (256 rows) read in blocks of 100: two full blocks and a short one.
    monkeypatch.setattr(streamed_fisher, "HEAD_ROWS", 100)
    cal = random_windows(seed=0, n=8, seq_len=32)
    streamed, recorded = streamed_fisher_profile(
        StreamedModel(sharded), PALETTE, cal, tokens=128, estimator=estimator, progress=False
    )
    # The layers' inputs kept on disk instead: the same table, and no file left behind.
    spilled, _ = streamed_fisher_profile(
        StreamedModel(sharded),
        PALETTE,
        cal,
        tokens=128,
        estimator=estimator,
        progress=False,
        spill=tmp_path,
    )
    np.testing.assert_array_equal(spilled.loss, streamed.loss)
    assert not list(tmp_path.iterdir())
    expected, importance = _in_memory(FisherProfiler, sharded, cal, estimator)
    assert streamed.units == expected.units and streamed.formats == expected.formats
    assert streamed.metadata["tokens"] == expected.metadata["tokens"] == 128
    assert streamed.metadata["windows"] == expected.metadata["windows"] == 4
    assert (expected.loss[:, :-1] > 0).all()
    np.testing.assert_allclose(streamed.loss, expected.loss, rtol=1e-5, atol=1e-12)
    for name in importance.values:
        torch.testing.assert_close(recorded.values[name], importance.values[name])


def test_a_fisher_allocation_spills_its_kept_inputs_when_memory_is_short(sharded, monkeypatch):
    import bitalloc.streaming.fisher as streamed_fisher
    import bitalloc.streaming.resources as resources
    from bitalloc.streaming.allocate import allocate_streamed

    cal = random_windows(seed=0, n=8, seq_len=32)
    kw = {"formats": PALETTE, "windows": cal, "tokens": 128, "profiler": "fisher"}
    in_memory = allocate_streamed(sharded, 4.0, progress=False, **kw)
    spilled_to = []
    original = streamed_fisher._KeptInputs

    def recording(spill):
        spilled_to.append(spill)
        return original(spill)

    monkeypatch.setattr(streamed_fisher, "_KeptInputs", recording)
    monkeypatch.setattr(resources, "available_bytes", lambda: 1024)
    spilled = allocate_streamed(sharded, 4.0, progress=False, **kw)
    assert spilled_to and spilled_to[0] is not None
    assert spilled.formats == in_memory.formats


def test_a_fisher_allocation_streams_end_to_end_and_plans_its_kept_inputs(sharded):
    from bitalloc.errors import BitallocError
    from bitalloc.streaming.allocate import allocate_streamed
    from bitalloc.streaming.resources import Speed, plan_streamed

    cal = random_windows(seed=0, n=8, seq_len=32)
    alloc = allocate_streamed(
        sharded, 4.0, formats=PALETTE, windows=cal, tokens=128, profiler="fisher", progress=False
    )
    assert alloc.avg_bits <= 4.0 and len(set(alloc.formats.values())) > 1
    assert alloc.importance() is not None
    with pytest.raises(BitallocError, match="runs in this process"):
        allocate_streamed(sharded, 4.0, windows=cal, profiler="fisher", workers=2)
    speed = Speed(flops=1e10, rounding={f.name: 1e7 for f in PALETTE if not f.is_float})
    plans = {
        name: plan_streamed(sharded, PALETTE, 128, seq_len=32, speed=speed, profiler=name)
        for name in ("output", "fisher")
    }
    model = StreamedModel(sharded)
    hidden, layers = model.config.hidden_size, len(model.layers)
    assert plans["fisher"].memory["kept layer inputs"] == 4 * layers * 128 * hidden
    assert "Gram statistics" not in plans["fisher"].memory
    # The Fisher score is elementwise: the scoring skips the error's Gram products.
    score = "scoring (formats x units)"
    assert plans["fisher"].seconds[score] < plans["output"].seconds[score]
    with pytest.raises(BitallocError, match="allow at least"):
        allocate_streamed(
            sharded, 4.0, windows=cal, profiler="fisher", tokens=128, max_memory=2**20
        )


@pytest.mark.parametrize("estimator", ["token", "window"])
def test_streamed_kfac_equals_the_in_memory_profiler(sharded, estimator):

    from bitalloc.sensitivity.kfac import KFACProfiler
    from bitalloc.streaming.allocate import allocate_streamed

    cal = random_windows(seed=0, n=8, seq_len=32)
    streamed, _ = streamed_fisher_profile(
        StreamedModel(sharded),
        PALETTE,
        cal,
        tokens=128,
        estimator=estimator,
        progress=False,
        method="kfac",
    )
    expected, _ = _in_memory(KFACProfiler, sharded, cal, estimator)
    assert streamed.metadata["method"] == expected.metadata["method"] == "kfac"
    assert (expected.loss[:, :-1] > 0).all()
    np.testing.assert_allclose(streamed.loss, expected.loss, rtol=1e-4, atol=1e-12)
    alloc = allocate_streamed(
        sharded, 4.0, formats=PALETTE, windows=cal, tokens=128, profiler="kfac", progress=False
    )
    assert alloc.avg_bits <= 4.0 and len(set(alloc.formats.values())) > 1
    from bitalloc.streaming.resources import Speed, plan_streamed

    speed = Speed(flops=1e10, rounding={f.name: 1e7 for f in PALETTE if not f.is_float})
    plan = plan_streamed(sharded, PALETTE, 128, seq_len=32, speed=speed, profiler="kfac")
    hidden = StreamedModel(sharded).config.hidden_size
    assert plan.memory["kept layer inputs"] == 4 * 3 * 128 * hidden
    assert "Gram statistics" in plan.memory and "gradients and squared sums" not in plan.memory
