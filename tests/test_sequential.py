"""Gram matrices for ``+gptq`` units: gathered with the importance, applied as measured, and
the sequential pass that takes each block's inputs from the quantized blocks before it."""

from __future__ import annotations

import copy

import pytest
import torch

from bitalloc.allocation import Allocation, UnitChoice
from bitalloc.errors import BitallocError
from bitalloc.evaluate import perplexity
from bitalloc.formats import parse_format
from bitalloc.importance import gather_importance
from bitalloc.models import discover_units, get_linear
from bitalloc.sequential import apply_sequential_, gram_importance
from tests.conftest import make_tiny_llama, random_windows
from tests.test_importance import _inputs


def test_grams_are_each_inputs_mean_outer_product_with_the_vector_on_the_diagonal():
    model = make_tiny_llama()
    units = discover_units(model)
    windows = random_windows(6, 24)
    imp = gather_importance(model, units, windows, progress=False, grams=True)
    inputs = _inputs(model, units, windows)
    for u in units:
        x = inputs[u.name]
        gram = imp.of(u.name)
        assert gram.shape == (u.shape[1], u.shape[1])
        assert torch.equal(torch.diagonal(gram), imp.vector(u.name))
        off = ~torch.eye(u.shape[1], dtype=torch.bool)
        torch.testing.assert_close(gram[off], (x.T @ x / len(x)).float()[off], rtol=1e-4, atol=1e-6)
    # q, k and v read one input: one shared matrix.
    q, k = units[0].name, units[1].name
    assert imp.of(q) is imp.of(k)
    plain = gather_importance(model, units, windows, progress=False)
    assert not plain.has_grams and all(
        torch.equal(plain.of(n), imp.vector(n)) for n in plain.values
    )
    assert plain.fingerprint(q) != imp.fingerprint(q)


def _allocation(model, fmt: str) -> Allocation:
    choices = [UnitChoice.of(u, parse_format(fmt)) for u in discover_units(model)]
    return Allocation.from_choices(model="tiny", budget=None, units=choices)


@pytest.fixture(scope="module")
def setting():
    model = make_tiny_llama()
    windows = random_windows(8, 32)
    units = discover_units(model)
    imp = gather_importance(model, units, windows, progress=False, grams=True)
    return model, windows, imp


def test_a_saved_gptq_allocation_needs_the_calibration_and_then_reproduces_the_run(setting):
    model, windows, imp = setting
    alloc = _allocation(model, "int3-g32+gptq").with_importance(imp)
    with pytest.raises(BitallocError, match="calibration="):
        alloc.apply(model)
    live = _allocation(model, "int3-g32+gptq").with_importance(imp).with_live_importance(imp)
    from_run = live.apply(model)
    again = alloc.apply(model, calibration=windows)
    name = discover_units(model)[0].name
    assert torch.equal(get_linear(from_run, name).weight, get_linear(again, name).weight)
    rounded = _allocation(model, "int3-g32").with_importance(imp).apply(model)
    assert not torch.equal(get_linear(from_run, name).weight, get_linear(rounded, name).weight)


def test_sequential_quantizes_block_by_block_from_quantized_inputs(setting):
    model, windows, imp = setting
    alloc = _allocation(model, "int2-g32+gptq").with_importance(imp).with_live_importance(imp)
    one_pass = alloc.apply(model)
    sequential = alloc.apply(model, calibration=windows, sequential=True, progress=False)
    units = discover_units(model)
    first, last = units[0].name, units[-1].name
    # The first block sees the same inputs either way; later ones see quantized inputs.
    assert torch.equal(get_linear(one_pass, first).weight, get_linear(sequential, first).weight)
    assert not torch.equal(get_linear(one_pass, last).weight, get_linear(sequential, last).weight)
    # Equal to the pass run by hand on a copy, and finite.
    by_hand = apply_sequential_(copy.deepcopy(model), alloc.formats, windows, imp, progress=False)
    assert torch.equal(get_linear(by_hand, last).weight, get_linear(sequential, last).weight)
    ppl = perplexity(sequential, windows)
    assert 1.0 < ppl.perplexity < float("inf")
    with pytest.raises(BitallocError, match="calibration"):
        alloc.apply(model, sequential=True)


def test_gram_importance_keeps_recorded_vectors_for_the_diagonal(setting):
    model, windows, imp = setting
    formats = {u.name: "int3-g32+gptq" for u in discover_units(model)}
    vectors_only = imp.without_grams()
    merged = gram_importance(model, formats, windows, vectors_only, progress=False)
    for name in formats:
        assert torch.equal(torch.diagonal(merged.of(name)), vectors_only.vector(name))
