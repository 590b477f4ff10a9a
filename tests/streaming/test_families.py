"""Streaming on families other than Llama: Qwen2 (biases on q/k/v, untied head) and Qwen3
(q/k norms, tied head) give the in-memory ``output`` and ``fisher`` tables when streamed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bitalloc.formats import parse_palette
from bitalloc.importance import gather_importance
from bitalloc.models import discover_units
from bitalloc.sensitivity.fisher import FisherProfiler
from bitalloc.sensitivity.output import OutputProfiler
from bitalloc.streaming.fisher import streamed_fisher_profile
from bitalloc.streaming.model import StreamedModel
from bitalloc.streaming.profile import streamed_output_profile
from tests import families

PALETTE = parse_palette("int2-g32,int3-g32,int4-g32,int8-g32,fp16")


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def family(request, tmp_path_factory):
    """The family's tiny model in bf16 shards, loaded back whole in float32, and windows."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp(request.param)
    model, _ = getattr(families, request.param)()
    model.to(torch.bfloat16).save_pretrained(path, max_shard_size="60KB")
    whole = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    windows = torch.randint(0, model.config.vocab_size, (8, 32), generator=generator)
    return path, whole, windows


def test_the_streamed_output_profile_equals_the_in_memory_one(family):
    path, whole, cal = family
    streamed, _ = streamed_output_profile(
        StreamedModel(path), PALETTE, cal, tokens=256, progress=False
    )
    units = discover_units(whole)
    importance = gather_importance(whole, units, cal, tokens=256, progress=False, grams=True)
    expected = OutputProfiler(tokens=256, progress=False).profile(
        whole, units, PALETTE, cal, importance=importance
    )
    assert streamed.units == expected.units
    np.testing.assert_allclose(streamed.loss, expected.loss, rtol=1e-3, atol=1e-12)


def test_the_streamed_fisher_profile_equals_the_in_memory_one(family):
    path, whole, cal = family
    streamed, _ = streamed_fisher_profile(
        StreamedModel(path), PALETTE, cal, tokens=128, progress=False
    )
    units = discover_units(whole)
    importance = gather_importance(whole, units, cal, tokens=128, progress=False)
    expected = FisherProfiler(tokens=128, progress=False).profile(
        whole, units, PALETTE, cal, importance=importance
    )
    assert (expected.loss[:, :-1] > 0).all()
    np.testing.assert_allclose(streamed.loss, expected.loss, rtol=1e-5, atol=1e-12)
